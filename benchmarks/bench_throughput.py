"""Eight readers at once: the server as it was when the speed issue was filed against the server of this tree, each
started with the settings its own load test ran on, in interleaved rounds on the same machine.

    .venv/bin/python benchmarks/bench_throughput.py [--baseline-rev 5ad0b5f~1] [--baseline-flags "--threads 10"]
        [--arch resnet18] [--image-size 224] [--rounds 3] [--requests 40] [--out benchmarks/results/throughput.md]

The baseline is `python main.py` of --baseline-rev, checked out into a temporary git worktree (removed at the end):
by default the commit before 5ad0b5f ("Defaults that serve a team"), the server the speed issue measured, with
`--threads 10`, the setting its load benchmark passed with (its defaults refused 37 of 40 uploads), on its default
backend (PyTorch). The other server is this tree's main.py on its defaults (backend auto: ONNX Runtime on a CPU).
Both load one random-weight checkpoint made by the baseline's own tests/support code (this tree reads older
checkpoints); its export for the auto backend is made before the rounds. Each round posts --requests real 1024-px
NIH PNGs from --clients threads to each server in turn (bench_load.py's client: POST /api/predict, a new connection
per request). Reported: throughput and p95 latency per server (medians over rounds) and the per-round ratio
current / baseline, errors, and the largest probability difference between the two servers' answers to an image
(same weights, so it shows whether both computed the same thing).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_load import multipart, post, rss_mib, run_concurrently, start_server, timed_round
from common import NIH_IMAGES, ROOT, livesite

MAKE_CHECKPOINT = """
import sys
sys.path.insert(0, "tests")
try:
    from support.checkpoints import make_checkpoint
except ImportError:  # trees before tests/support: conftest.py held it
    from conftest import make_checkpoint
make_checkpoint(sys.argv[1], arch=sys.argv[2], image_size=int(sys.argv[3]))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--baseline-rev", default="5ad0b5f~1", help="git revision of the baseline server (default: %(default)s)")
    add("--baseline-flags", default="--threads 10", help="main.py flags of the baseline (default: %(default)s)")
    add("--current-flags", default="", help="main.py flags of this tree's server (default: none, its defaults)")
    add("--arch", default="resnet18", help="checkpoint architecture, random weights (default: %(default)s)")
    add("--image-size", type=int, default=224, help="checkpoint input size (default: %(default)s)")
    add("--clients", type=int, default=8, help="concurrent client threads (default: %(default)s)")
    add("--requests", type=int, default=40, help="posts per server per round (default: %(default)s)")
    add("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    add("--images", type=int, default=8, help="distinct NIH PNGs posted in turn (default: %(default)s)")
    add("--image-dir", default=str(NIH_IMAGES), help="folder of 1024-px NIH PNGs (default: %(default)s)")
    add("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    add("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.md"), help="Markdown report (default: "
        "%(default)s)")
    return parser


def server_args(backend: str, flags: list[str]) -> argparse.Namespace:
    """What bench_load.start_server reads: backend, retention 50, and any other main.py flags."""
    return argparse.Namespace(retention=50, backend=backend, threads=None, max_analyses=None, extra=flags)


def main(args: argparse.Namespace) -> int:
    paths = sorted(Path(args.image_dir).glob("*.png"))[:args.images]
    if not paths:
        print(f"error: no PNGs in {args.image_dir}", file=sys.stderr)
        return 2
    bodies = [multipart(p.read_bytes(), p.name) for p in paths]
    names = ("baseline", "current")
    results = {n: {"throughput": [], "p95": [], "errors": 0} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = tmp / "baseline-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree),
                        args.baseline_rev], check=True)
        servers = {}
        try:
            revision = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                                      capture_output=True, text=True).stdout.strip()
            checkpoint = tmp / "model.pth"
            subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(checkpoint), args.arch, str(args.image_size)],
                           cwd=tree, check=True)
            servers["baseline"] = start_server(server_args("torch", shlex.split(args.baseline_flags)), checkpoint,
                                               tmp / "results-baseline", tmp / "baseline.log", timeout=600, root=tree)
            servers["current"] = start_server(server_args("auto", shlex.split(args.current_flags)), checkpoint,
                                              tmp / "results-current", tmp / "current.log", timeout=1200)
            answers = {n: [post(servers[n][1], body, i, args.timeout) for i, body in enumerate(bodies)]
                       for n in names}  # each image alone, on each server (and a warm-up)
            gap = max(abs(a.probabilities[k] - b.probabilities[k])
                      for a, b in zip(answers["baseline"], answers["current"]) for k in a.probabilities)
            for n in names:
                run_concurrently(servers[n][1], bodies, 2 * args.clients, args.clients, args.timeout,
                                 time.monotonic() + 3600)
            load = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                for n in names:
                    throughput, p95, errors, _ = timed_round(servers[n][1], bodies, args.requests, args.clients,
                                                          args.timeout)
                    results[n]["errors"] += errors
                    results[n]["throughput"].append(throughput)
                    results[n]["p95"].append(p95)
                load.append(os.getloadavg()[0])
            rss = {n: rss_mib(proc.pid) for n, (proc, _) in servers.items()}
        finally:
            for proc, _ in servers.values():
                livesite.stop_server(proc)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    ratio = {key: [c / b for c, b in zip(results["current"][key], results["baseline"][key])]
             for key in ("throughput", "p95")}
    rows = []
    current = f"current tree, `{args.current_flags}`" if args.current_flags else "current tree, main.py's defaults"
    for n, label in zip(names, (f"baseline: `{revision}` (`--baseline-rev {args.baseline_rev}`), "
                                f"`{args.baseline_flags}`, backend torch", current)):
        r = results[n]
        rows.append(f"| {label} | {statistics.median(r['throughput']):.2f} | "
                    f"{statistics.median(r['p95']) * 1000:.0f} | {r['errors']} | {rss[n]:.0f} |")
    current_flags = f' --current-flags "{args.current_flags}"' if args.current_flags else ""
    report = f"""# Eight readers at once: the server when the speed issue was filed vs this tree's defaults

Command: `python benchmarks/bench_throughput.py --baseline-rev {args.baseline_rev} --baseline-flags \
"{args.baseline_flags}"{current_flags} --arch {args.arch} --image-size {args.image_size} --rounds {args.rounds} \
--requests {args.requests}`

Random-weight {args.arch} at {args.image_size} px (one checkpoint for both); {args.clients} clients posting \
{len(bodies)} real NIH PNGs (1024 px) in turn to POST /api/predict; {args.rounds} interleaved rounds of \
{args.requests} posts per server. {os.cpu_count()} CPUs ({platform.machine()}); load average over the rounds \
{min(load):.1f}–{max(load):.1f}; {time.strftime('%Y-%m-%d')}.

| server | throughput (req/s, median) | p95 latency (ms, median) | errors | RSS after (MiB) |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Per-round ratio current / baseline: throughput **{statistics.median(ratio['throughput']):.2f}x** \
({min(ratio['throughput']):.2f}–{max(ratio['throughput']):.2f}), p95 latency \
**{statistics.median(ratio['p95']):.2f}x** ({min(ratio['p95']):.2f}–{max(ratio['p95']):.2f}).
Largest probability difference between the two servers' answers to the same image: {gap:.1e}.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
