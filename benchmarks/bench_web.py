"""Web app speed: POST /predict + following its redirect to the result page vs a bare forward pass of the same model.

    .venv/bin/python benchmarks/bench_web.py [--repeats 21] [--image PATH] [--backend torch|onnx|auto]
        [--out benchmarks/results/web.md]

Both are timed side by side in one process, interleaved (ABBA order) after a warm-up, on the CPU, with a ResNet-50
at 512 px and random weights (tests/support/checkpoints.py). The bare pass is
`predictor.model(predictor.preprocess(image))` under torch.inference_mode() on the already-decoded image; the page
time includes everything else a user waits for: multipart parsing, decoding the file, the forward pass with all
heatmaps, saving the result (plain image, raw maps, result.json, retention) and rendering the
page; the heat layer shown first is drawn when the browser asks for it, so the "+ images" figure counts it. The
target is a median ratio of at most 1.3. With --backend onnx the app serves the
ONNX export (ONNX Runtime) while the bare pass stays today's PyTorch eager forward, so the ratio shows what the
faster backend buys a user.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, support

from chestxray.checkpoint import load_checkpoint
from chestxray.imaging import read_xray
from chestxray.onnx_backend import export_onnx
from chestxray.transforms import preprocess
from chestxray.web import create_app

NIH_PNG, make_checkpoint = support.data.NIH_PNG, support.checkpoints.make_checkpoint

TARGET = 1.3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(NIH_PNG), help="X-ray to upload (default: %(default)s)")
    parser.add_argument("--arch", default="resnet50", help="checkpoint architecture (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="checkpoint input size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs of each (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backend", choices=("torch", "onnx", "auto"), default="torch",
                        help="backend the app serves; auto: as `make run` serves by default, exporting on its first "
                        "start (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web.md"), help="Markdown report")
    return parser


def measure(args: argparse.Namespace, data: bytes) -> dict:
    """Time the bare pass and the result page, interleaved, against an app with a full results folder."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "model.pth", arch=args.arch, image_size=args.image_size)
        results = Path(tmp) / "results"
        results.mkdir()
        for i in range(200):  # a full results folder, so each POST also scans it and removes the oldest result
            (results / f"{i:032x}").mkdir()
            (results / f"{i:032x}" / "result.json").write_text("{}")
        model, meta, _ = load_checkpoint(checkpoint)  # the bare pass: today's PyTorch eager forward
        if args.backend == "onnx":
            export_onnx(model, meta, checkpoint.with_suffix(".onnx"))
        app = create_app({"CHECKPOINT": str(checkpoint), "RESULTS_DIR": str(results), "DEVICE": "cpu",
                          "BACKEND": args.backend, "WTF_CSRF_ENABLED": False, "RETENTION": 200,
                          "RESULT_MIN_AGE": 0})  # pruned to the retention at once, as the folder check expects
        assert app.extensions["chestxray"].predictor.backend == {"auto": "onnx"}.get(args.backend, args.backend)
        client = app.test_client()
        image = read_xray(data)

        def bare() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                model(preprocess(meta, image))
            return time.perf_counter() - start

        def page() -> tuple[float, float]:
            start = time.perf_counter()
            response = client.post("/predict", data={"file": (io.BytesIO(data), Path(args.image).name)})
            result = client.get(response.headers["Location"])
            ready = time.perf_counter() - start
            assert response.status_code == 303 and result.status_code == 200, result.data[:300]
            for src in re.findall(r'<img class="(?:xray|heat[^"]*)"[^>]*?src="([^"]+)"', result.data.decode()):
                assert client.get(src).status_code == 200  # the X-ray and the heat layer the page shows
            return ready, time.perf_counter() - start

        for _ in range(args.warmup):
            bare()
            page()
        bare_times, page_times, asset_times = [], [], []
        load_before = os.getloadavg()
        for i in range(args.repeats):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    bare_times.append(bare())
                else:
                    ready, assets = page()
                    page_times.append(ready)
                    asset_times.append(assets)
        load_after = os.getloadavg()
        assert len(list(results.iterdir())) == 200
    return {"bare": bare_times, "page": page_times, "assets": asset_times, "load": (load_before, load_after)}


def write_report(args: argparse.Namespace, data: bytes, measured: dict) -> float:
    """Print and write the Markdown report; returns the ratio of the medians (page / bare)."""
    bare_times, page_times, asset_times = measured["bare"], measured["page"], measured["assets"]
    load_before, load_after = measured["load"]
    med_bare, med_page, med_assets = map(statistics.median, (bare_times, page_times, asset_times))
    ratio, ratio_assets = med_page / med_bare, med_assets / med_bare
    ratios = sorted(p / b for p, b in zip(page_times, bare_times))
    command = "python benchmarks/bench_web.py " + " ".join(sys.argv[1:])
    report = f"""# Web app speed: result page vs a bare forward pass

Command: `{command.strip()}`

{args.arch} at {args.image_size} px, random weights, app backend {args.backend}, CPU
({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}),
torch {torch.__version__}; image
`{Path(args.image).name}` ({len(data) // 1024} KB); {args.repeats} interleaved runs of each after {args.warmup}
warm-up runs; results folder kept full at 200 results (each POST removes the oldest).
Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (other jobs on the machine add noise).

| measure | median (ms) | min (ms) |
|---|---:|---:|
| bare pass, PyTorch eager `model(preprocess(img))` | {1000 * med_bare:.0f} | {1000 * min(bare_times):.0f} |
| POST /predict + GET /results/&lt;id&gt; (page ready) | {1000 * med_page:.0f} | {1000 * min(page_times):.0f} |
| ... + GET the X-ray and the heat layer shown | {1000 * med_assets:.0f} | {1000 * min(asset_times):.0f} |

**Ratio (median page / median bare): {ratio:.2f}** (target ≤ {TARGET}); with the two images: {ratio_assets:.2f}.
Per-run ratios (paired runs): median {statistics.median(ratios):.2f}, range {ratios[0]:.2f}–{ratios[-1]:.2f}.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    print(f"wrote {args.out}")
    return ratio


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print and write the report; exit code 1 if the median ratio is over the target."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.image).read_bytes()
    ratio = write_report(args, data, measure(args, data))
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
