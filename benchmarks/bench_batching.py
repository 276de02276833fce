"""In-server batching under load: 8 concurrent clients against servers that differ only in --max-batch and
--max-analyses, measured in interleaved rounds so that every variant meets the same machine load.

    .venv/bin/python benchmarks/bench_batching.py [--arch resnet50] [--image-size 512] [--rounds 3]
        [--requests 32] [--variants "1,2 8,2 8,4 8,8"] [--out benchmarks/results/batching.md]

Each variant ("MAX_BATCH,MAX_ANALYSES") is a `python main.py` (backend auto: ONNX Runtime on this CPU, exported once
into the shared temporary checkpoint's folder) started once and warmed up; then, round after round, each server in
turn gets --requests posts of real NIH PNGs from --clients threads (bench_load.py's client). Reported per variant:
median throughput and p95 latency over rounds, each as a ratio to the first variant in the same round (the
baseline: "1,2" is the server before batching: one image per pass, two analyses at once), errors, the largest
probability difference from the same image posted alone, the server's RSS after the rounds.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench_load import PROBABILITY_TOLERANCE, multipart, post, rss_mib, run_concurrently, start_server, timed_round
from common import ROOT, livesite, support

make_checkpoint = support.checkpoints.make_checkpoint
HEADER = ("| server | throughput (req/s, median) | vs baseline, same round (median, range) | p95 latency (ms, median) "
          "| p95 vs baseline | errors | max \\|Δp\\| vs alone | RSS after (MiB) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--arch", default="resnet50", help="checkpoint architecture, random weights (default: %(default)s)")
    add("--image-size", type=int, default=512, help="checkpoint input size (default: %(default)s)")
    add("--variants", default="1,2 8,2 8,4 8,8", help="space-separated MAX_BATCH,MAX_ANALYSES pairs; the first is "
        "the baseline (default: %(default)s)")
    add("--clients", type=int, default=8, help="concurrent client threads (default: %(default)s)")
    add("--requests", type=int, default=32, help="posts per variant per round (default: %(default)s)")
    add("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    add("--images", type=int, default=8, help="distinct NIH images posted in turn (default: %(default)s)")
    add("--image-dir", default=str(support.data.NIH_DIR / "images"), help="folder of NIH PNGs (default: "
        "%(default)s)")
    add("--timeout", type=float, default=300.0, help="seconds allowed per request (default: %(default)s)")
    add("--out", default=str(ROOT / "benchmarks" / "results" / "batching.md"), help="Markdown report (default: "
        "%(default)s)")
    return parser


def server_args(args: argparse.Namespace, max_batch: int, max_analyses: int) -> argparse.Namespace:
    """What bench_load.start_server reads, for one variant (its --threads stay main.py's default)."""
    return argparse.Namespace(retention=50, backend="auto", threads=None, max_analyses=max_analyses,
                              extra=["--max-batch", str(max_batch)])


def main(args: argparse.Namespace) -> int:
    variants = [tuple(int(v) for v in pair.split(",")) for pair in args.variants.split()]
    paths = sorted(Path(args.image_dir).glob("*.png"))[:args.images]
    bodies = [multipart(p.read_bytes(), p.name) for p in paths]
    servers, results = {}, {v: {"throughput": [], "p95": [], "errors": 0, "gap": 0.0} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "model.pth", arch=args.arch, image_size=args.image_size)
        try:
            for v in variants:  # one after the other: the first start exports, the others find the export
                servers[v] = start_server(server_args(args, *v), checkpoint, tmp / f"results-{v[0]}-{v[1]}",
                                          tmp / f"server-{v[0]}-{v[1]}.log", timeout=1200)
            port = servers[variants[0]][1]
            reference = [post(port, body, i, args.timeout) for i, body in enumerate(bodies)]  # each alone
            for v in variants:  # warm-up: every server's first passes, at every batch size it will see
                run_concurrently(servers[v][1], bodies, 2 * args.clients, args.clients, args.timeout,
                                 time.monotonic() + 3600)
            load = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                for v in variants:
                    throughput, p95, errors, good = timed_round(servers[v][1], bodies, args.requests, args.clients,
                                                                args.timeout)
                    r = results[v]
                    r["errors"] += errors
                    r["throughput"].append(throughput)
                    r["p95"].append(p95)
                    for o in good:
                        ref = reference[o.image].probabilities or {}
                        r["gap"] = max([r["gap"], *(abs(o.probabilities[k] - ref[k]) for k in ref)])
                load.append(os.getloadavg()[0])
            rss = {v: rss_mib(proc.pid) for v, (proc, _) in servers.items()}
        finally:
            for proc, _ in servers.values():
                livesite.stop_server(proc)
    base = results[variants[0]]
    rows = []
    for v in variants:
        r = results[v]
        tput = [a / b for a, b in zip(r["throughput"], base["throughput"])]
        p95 = [a / b for a, b in zip(r["p95"], base["p95"])]
        rows.append(f"| `--max-batch {v[0]} --max-analyses {v[1]}` | {statistics.median(r['throughput']):.2f} | "
                    f"**{statistics.median(tput):.2f}x** ({min(tput):.2f}–{max(tput):.2f}) | "
                    f"{statistics.median(r['p95']) * 1000:.0f} | {statistics.median(p95):.2f}x | {r['errors']} | "
                    f"{r['gap']:.1e} | {rss[v]:.0f} |")
    report = f"""# In-server batching: 8 clients, throughput and p95 latency against the server before batching

Command: `python benchmarks/bench_batching.py --arch {args.arch} --image-size {args.image_size} --rounds {args.rounds}
--requests {args.requests} --variants "{args.variants}"`

Random-weight {args.arch} at {args.image_size} px, backend auto (ONNX Runtime), main.py's default --threads;
{args.clients} clients posting {len(bodies)} real NIH PNGs (1024 px) in turn; {args.rounds} interleaved rounds of
{args.requests} posts per variant. {os.cpu_count()} CPUs ({platform.machine()}); load average over the rounds
{min(load):.1f}–{max(load):.1f}; {time.strftime('%Y-%m-%d')}.

{HEADER}
{chr(10).join(rows)}

Answers equal to the image posted alone within {PROBABILITY_TOLERANCE:g}: \
{"yes" if all(results[v]["gap"] <= PROBABILITY_TOLERANCE for v in variants) else "NO"}.
"""
    Path(args.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
