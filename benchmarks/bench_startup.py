"""What a command line or the web app pays before and after its model runs: loading a checkpoint, writing overlays,
and the web server's start and memory on PyTorch and on ONNX Runtime.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7] [--parts load overlay server] [--arch resnet50]
        [--image-size 512] [--server-repeats 3] [--out benchmarks/results/startup.md]

1. Loading: `load_checkpoint` builds the model on the meta device and takes the saved tensors as its own
   (`load_state_dict(assign=True)`), against the earlier way in the same process: build it with torchvision's
   random initialisation, then copy the saved tensors over it. ResNet-18 and ResNet-50 (14 labels, random weights).
2. Overlays: one 1024-px heatmap overlay with its legend written as PNG at the level the app and predictions.py use
   (`PNG_COMPRESS_LEVEL`, 1) against Pillow's default level 6; sizes of both files.
3. The server: `python main.py` with `--backend torch`, and without torch on the same checkpoint (`--backend auto`
   with its export already beside it, the default on a CPU; and `--backend onnx` on the .onnx file), each started
   --server-repeats times, interleaved: resident memory (VmRSS) once /healthz answers (idle), and after warm-up
   (one upload answered, then WARM_UPLOADS more), peak (VmHWM), and the seconds from starting the process to its
   first answered POST /api/predict; whether libtorch is mapped into the process (/proc/PID/maps). Linux only.
Medians of --repeats interleaved runs; ratios new / old (lower is faster).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common
import numpy as np
import torch
from common import ROOT, add_out_argument, support, timed

from chestxray.cam import overlay, with_legend
from chestxray.checkpoint import load_checkpoint, model_from_meta, safe_torch_load
from chestxray.imaging import read_xray
from chestxray.meta import Meta
from chestxray.results import PNG_COMPRESS_LEVEL

SAMPLE = ROOT / "samples" / "nih" / "images" / "00000001_000.png"
PARTS = ("load", "overlay", "server")
WARM_UPLOADS = 5  # uploads after the first before the warm memory is read
BOUNDARY = "bench-startup-boundary-41c7"


def load_with_random_init(path: Path) -> torch.nn.Module:
    """The earlier load: random initialisation first, then the saved weights copied over it."""
    obj = safe_torch_load(path)
    model = model_from_meta(Meta.from_dict(obj["meta"]))
    model.load_state_dict(obj["model"], strict=True)
    return model.eval()


def png_bytes(image, level: int) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return len(buffer.getvalue())


def multipart(data: bytes, filename: str) -> bytes:
    """A multipart/form-data body with the one field the API reads, `file`."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(base: str, body: bytes) -> None:
    request = urllib.request.Request(base + "/api/predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    with urllib.request.urlopen(request, timeout=300) as response:
        if response.status != 200:
            raise RuntimeError(f"POST /api/predict answered {response.status}")
        response.read()


def memory(pid: int) -> dict[str, float]:
    """{"VmRSS", "VmHWM"} of a process in MiB, and "torch": 1.0 when libtorch is mapped into it."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    out = {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
    out["torch"] = float("libtorch" in Path(f"/proc/{pid}/maps").read_text())
    return out


def serve_once(checkpoint: Path, backend: str, folder: Path, body: bytes) -> dict[str, float]:
    """Start `python main.py --checkpoint CKPT --backend BACKEND` -> {"idle", "warm", "peak" (MiB), "first" (s from
    starting the process to its first answer), "ready" (s to /healthz), "torch"}."""
    procs = []

    def launch(cmd, **kwargs):
        procs.append(common.livesite.popen_logged(cmd, **kwargs))
        return procs[-1]

    start = time.perf_counter()
    with common.livesite.run_server(checkpoint, folder / "results", timeout=600, launch=launch,
                                    extra_args=["--backend", backend, "--no-demo"]) as base:
        ready = time.perf_counter() - start
        idle = memory(procs[0].pid)
        post(base, body)
        first = time.perf_counter() - start
        for _ in range(WARM_UPLOADS):
            post(base, body)
        warm = memory(procs[0].pid)
    return {"idle": idle["VmRSS"], "warm": warm["VmRSS"], "peak": warm["VmHWM"], "first": first, "ready": ready,
            "torch": max(idle["torch"], warm["torch"])}


def server_rows(arch: str, image_size: int, repeats: int) -> tuple[list[str], dict]:
    """Part 3: the servers side by side, interleaved -> (markdown lines, medians per server)."""
    from chestxray.auto_backend import checkpoint_digest, export_path
    from chestxray.predictor import Predictor

    body = multipart(SAMPLE.read_bytes(), SAMPLE.name)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = support.checkpoints.make_checkpoint(Path(tmp) / f"{arch}.pth", arch=arch, image_size=image_size)
        started = time.perf_counter()
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=print)  # the first start's export
        export_seconds = time.perf_counter() - started
        exported = export_path(checkpoint, checkpoint_digest(checkpoint))
        servers = {"torch (`--backend torch`)": (checkpoint, "torch"),
                   "auto, export cached (`--backend auto`, the default)": (checkpoint, "auto"),
                   "onnx (`--backend onnx`, the .onnx file)": (exported, "onnx")}
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for i in range(repeats):
            for name, (path, backend) in servers.items():
                folder = Path(tmp) / f"run{i}-{name.split()[0]}"
                folder.mkdir()
                runs[name].append(serve_once(path, backend, folder, body))
                print(name, runs[name][-1], flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base = medians[next(iter(servers))]
    lines = [f"Server: {arch} at {image_size} px, random weights, 14 labels; the sample image "
             f"({SAMPLE.name}); {repeats} starts of each, interleaved; medians. The export made on the first start "
             f"of auto took {export_seconds:.0f} s (not counted below: the cached export is present).", "",
             "| server | torch loaded | idle RSS (MiB) | after warm-up (MiB) | peak (MiB) | start to /healthz (s) "
             "| start to first answer (s) | idle / torch | warm / torch | first answer / torch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {'yes' if m['torch'] else 'no'} | {m['idle']:.0f} | {m['warm']:.0f} | "
                     f"{m['peak']:.0f} | {m['ready']:.1f} | {m['first']:.1f} | **{m['idle'] / base['idle']:.2f}** | "
                     f"**{m['warm'] / base['warm']:.2f}** | **{m['first'] / base['first']:.2f}** |")
    return lines, medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved runs of each (default: %(default)s)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all of %(default)s)")
    parser.add_argument("--arch", default="resnet50", help="the servers' model trunk (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="the servers' input size (default: %(default)s)")
    parser.add_argument("--server-repeats", type=int, default=3,
                        help="starts of each server, interleaved (default: %(default)s)")
    add_out_argument(parser, "startup.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, notes = [], []
    if "load" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in ("resnet18", "resnet50"):
                path = support.checkpoints.make_checkpoint(Path(tmp) / f"{arch}.pth", arch=arch, image_size=512)
                load_checkpoint(path)  # warm-up: the file in the page cache, both code paths loaded once
                load_with_random_init(path)
                new, old = [], []
                for _ in range(args.repeats):
                    new.append(timed(lambda p=path: load_checkpoint(p)))
                    old.append(timed(lambda p=path: load_with_random_init(p)))
                rows.append((f"load a {arch} checkpoint", statistics.median(old), statistics.median(new)))
    if "overlay" in args.parts:
        gray = read_xray(SAMPLE)
        heat = np.outer(np.hanning(32), np.hanning(32)).astype(np.float32)
        image = with_legend(overlay(gray, heat), "Cardiomegaly: colour = evidence for this finding")
        sizes = {level: png_bytes(image, level) for level in (6, PNG_COMPRESS_LEVEL)}
        six, chosen = [], []
        for _ in range(args.repeats):
            six.append(timed(lambda: png_bytes(image, 6)))
            chosen.append(timed(lambda: png_bytes(image, PNG_COMPRESS_LEVEL)))
        rows.append((f"write a {image.width}-px overlay PNG (level 6 -> level {PNG_COMPRESS_LEVEL})",
                     statistics.median(six), statistics.median(chosen)))
        notes += ["", f"Overlay file size: {sizes[6] / 1024:.0f} KB at level 6, "
                  f"{sizes[PNG_COMPRESS_LEVEL] / 1024:.0f} KB at level {PNG_COMPRESS_LEVEL} "
                  f"({sizes[PNG_COMPRESS_LEVEL] / sizes[6]:.2f}x)."]
    if "server" in args.parts:
        server, _ = server_rows(args.arch, args.image_size, args.server_repeats)
        notes += ["", *server]

    lines = ["# Start-up and overlays: checkpoint load without a random initialisation, PNG level; the server on "
             "PyTorch and ONNX Runtime", "",
             f"`python benchmarks/bench_startup.py {' '.join(sys.argv[1:])}` on {platform.machine()} CPU "
             f"({os.cpu_count()} cores, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end), "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {sys.version.split()[0]}."]
    if rows:
        lines += ["", "| what | earlier (ms) | now (ms) | now / earlier |", "|---|---:|---:|---:|"]
        lines += [f"| {what} | {old * 1000:.1f} | {new * 1000:.1f} | **{new / old:.2f}** |" for what, old, new in rows]
    lines += notes
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
