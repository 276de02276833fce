"""GPU check: every CUDA path run once, timed, and written to benchmarks/results/gpu.md.

    bash benchmarks/gpu_check.sh            # on the GPU machine: <= 8 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run  # the same steps on the CPU with tiny sizes (a couple of minutes)

Steps (each is reported, a failing one does not stop the others):
  1. environment: GPU, torch, onnxruntime and its execution providers
  2. a data folder of N images at the training size, built from the repo's sample X-rays (samples/, else
     ../shared/data, else generated), with an NIH-style labels.csv and split lists
  3. training at 512 px with AMP + channels_last: Model_Training/train.py, epoch 1 fills the resized cache, the
     next epochs read it; their images/s against
  4. the pure-compute ceiling: the same model and engine.train_one_epoch step on random batches already on the GPU
  5. the training loader's images/s alone (the same dataset and loader settings, no model)
  6. --resume after a SIGKILL during the second epoch
  7. torchrun --nproc_per_node 1 (train.py) and a DDP/NCCL probe (all_reduce + DDP steps under torchrun)
  8. export to ONNX, then predictions.py on CUDA with each backend, and in-process latency per backend
  9. the web app: POST /api/predict on CUDA with each backend
The GPU machine has no network: nothing is downloaded (pretrained=False), data comes from the repo.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
SOURCES = (ROOT / "samples" / "nih", ROOT.parent / "shared" / "data" / "nih")
GOAL_TRAIN_VS_CEILING = 0.90


@dataclass
class Plan:
    """Sizes of one run: the real check on a GPU, or the dry run on the CPU."""

    device: str
    arch: str
    image_size: int
    images: int
    batch_size: int
    workers: int
    epochs: int
    ceiling_steps: int
    predict_images: int
    web_posts: int
    budget_s: float


FULL = Plan(device="cuda", arch="resnet50", image_size=512, images=2048, batch_size=32, workers=12, epochs=3,
            ceiling_steps=40, predict_images=128, web_posts=20, budget_s=450)
DRY = Plan(device="cpu", arch="resnet18", image_size=32, images=32, batch_size=8, workers=1, epochs=2,
           ceiling_steps=3, predict_images=8, web_posts=3, budget_s=1200)  # generous: CPUs are often shared


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | FAILED | skipped | not available
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same steps (default: off)")
    parser.add_argument("--work", default="/tmp/gpu_check", help="scratch folder, emptied first "
                        "(default: %(default)s)")
    parser.add_argument("--out", default=None, help="markdown report (default: benchmarks/results/gpu.md, or "
                        "<work>/gpu-dry-run.md with --dry-run)")
    parser.add_argument("--ddp-probe", action="store_true", help=argparse.SUPPRESS)  # run by torchrun (step 7)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# helpers


class Runner:
    """Runs subprocesses with a log and a shared time budget."""

    def __init__(self, work: Path, budget_s: float) -> None:
        self.work = work
        self.deadline = time.monotonic() + budget_s
        self.log_path = work / "gpu_check.log"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list[str], timeout: float, label: str, stdout_only: bool = False) -> tuple[int, str, float]:
        """(returncode, output, seconds); returncode 124 on timeout. stdout_only: stderr (progress bars) goes to
        the log alone, so the returned text is the program's stdout."""
        start = time.perf_counter()
        timeout = max(5.0, min(timeout, self.left()))
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if stdout_only else subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            rc = 124
        seconds = time.perf_counter() - start
        with self.log_path.open("a") as log:
            log.write(f"\n===== {label}: rc {rc}, {seconds:.1f} s\n$ {' '.join(argv)}\n{out[-6000:]}\n"
                      f"{(err or '')[-3000:]}\n")
        return rc, out if not stdout_only or rc == 0 else out + (err or ""), seconds


def _tail(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-400:]


def _read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# steps


def step_environment(plan: Plan, step: Step) -> None:
    import onnxruntime as ort

    step.rows += [("python", platform.python_version()), ("torch", torch.__version__),
                  ("torch.cuda.is_available()", str(torch.cuda.is_available())),
                  ("onnxruntime", ort.__version__), ("onnxruntime providers", ", ".join(ort.get_available_providers()))]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        step.rows += [("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"),
                      ("CUDA (torch build)", str(torch.version.cuda)), ("cuDNN", str(torch.backends.cudnn.version()))]
    elif plan.device == "cuda":
        raise RuntimeError("no CUDA GPU visible to torch: run with --dry-run on a CPU machine")
    step.rows.append(("CPU cores", str(os.cpu_count())))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        step.notes.append("onnxruntime has no CUDAExecutionProvider here (a CPU-only build): the onnx backend runs "
                          "on the CPU in the steps below; install onnxruntime-gpu for CUDA")
    step.status = "ok"


def _source_images() -> tuple[list[tuple[Path, str]], str]:
    """[(png, findings)] from the repo's sample (or ../shared/data), with where they came from."""
    from chestxray.data import read_data_entry

    for folder in SOURCES:
        csv_path = folder / "labels.csv"
        if not csv_path.is_file():
            continue
        df = read_data_entry(csv_path)
        files = {p.name: p for p in folder.rglob("*.png")}
        pairs = [(files[name], findings) for name, findings in zip(df["image"], df["findings"]) if name in files]
        if pairs:
            return pairs, f"{len(pairs)} real NIH images from {folder.relative_to(folder.parents[1])}"
    return [], "generated images (no sample X-rays found in the repo)"


def _write_png(args: tuple[str, np.ndarray]) -> None:
    from PIL import Image

    path, array = args
    Image.fromarray(array, mode="L").save(path, compress_level=1)


def step_data(plan: Plan, work: Path, step: Step) -> Path:
    from concurrent.futures import ThreadPoolExecutor

    from chestxray.data import resized_uint8
    from chestxray.imaging import read_xray
    from chestxray.labels import LABELS

    data = work / "data"
    (data / "images").mkdir(parents=True)
    sources, origin = _source_images()
    rng = np.random.default_rng(0)
    size = plan.image_size
    if sources:
        arrays = [resized_uint8(read_xray(p), size) for p, _ in sources[:64]]
        findings = [f for _, f in sources[:64]]
    else:
        arrays = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(16)]
        findings = [LABELS[i % len(LABELS)] if i % 3 else "No Finding" for i in range(16)]
    rows, jobs = [], []
    for i in range(plan.images):
        k = i % len(arrays)
        # Each copy is shifted by a few pixels so that no two files are identical.
        array = np.roll(arrays[k], shift=(int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), axis=(0, 1))
        name = f"{90000000 + i:08d}_000.png"  # one image per patient: the patient-wise split has many to draw
        jobs.append((str(data / "images" / name), np.ascontiguousarray(array)))
        rows.append(f"{name},{findings[k]},0,{90000000 + i},50,M,PA,{size},{size},0.143,0.143")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_png, jobs))
    (data / "labels.csv").write_text(NIH_HEADER + "\n" + "\n".join(rows) + "\n")
    (data / "train_val_list.txt").write_text("\n".join(r.split(",")[0] for r in rows))
    (data / "test_list.txt").write_text("")
    step.rows += [("images", f"{plan.images} PNGs at {size} px"), ("made from", origin)]
    step.status = "ok"
    return data


def _train_argv(plan: Plan, data: Path, cache: Path, run_dir: Path, epochs: int, *extra: str) -> list[str]:
    return ["Model_Training/train.py", "--data-dir", str(data), "--cache-dir", str(cache), "--image-size",
            str(plan.image_size), "--arch", plan.arch, "--epochs", str(epochs), "--batch-size", str(plan.batch_size),
            "--workers", str(plan.workers), "--no-pretrained", "--device", plan.device, "--run-dir", str(run_dir),
            "--output", str(run_dir / "model.pth"), "--no-progress", *extra]


def step_train(plan: Plan, runner: Runner, data: Path, step: Step) -> tuple[Path | None, float | None]:
    run_dir = runner.work / "run_train"
    rc, out, seconds = runner.run([sys.executable, *_train_argv(plan, data, runner.work / "cache", run_dir,
                                                                plan.epochs)], 240, "train")
    history = _read_history(run_dir)
    if rc != 0 or not history:
        step.status = "FAILED"
        step.notes.append(f"train.py exit code {rc}: {_tail(out)}")
        return None, None
    for row in history:
        step.rows.append((f"epoch {row['epoch']} images/s" + (" (fills the cache)" if row["epoch"] == "1"
                                                                else " (from the cache)"),
                          f"{float(row['images_per_s']):.1f} ({row['train_images']} images, {row['seconds']} s)"))
    cached = [float(r["images_per_s"]) for r in history[1:]]
    rate = max(cached) if cached else float(history[0]["images_per_s"])
    step.rows.append(("training images/s from the cache (best epoch after the first)", f"**{rate:.1f}**"))
    step.rows.append((f"whole command (start-up, {plan.epochs} epochs, validation, checkpoints)", f"{seconds:.0f} s"))
    amp = "on" if plan.device == "cuda" else "off (CPU)"
    step.notes.append(f"{plan.arch} at {plan.image_size} px, batch {plan.batch_size}, {plan.workers} workers, AMP "
                      f"{amp}, channels_last {'on' if plan.device == 'cuda' else 'off'} (train.py's defaults)")
    step.status = "ok"
    return run_dir / "model.pth", rate


def step_ceiling(plan: Plan, step: Step, train_rate: float | None) -> None:
    from chestxray.checkpoint import Meta
    from chestxray.engine import train_one_epoch
    from chestxray.losses import build_loss
    from chestxray.model import build_model
    from chestxray.transforms import build_normalize

    device = torch.device(plan.device)
    cuda = plan.device == "cuda"
    torch.manual_seed(0)
    model = build_model(plan.arch, 14).to(device)
    if cuda:  # as train.py does (which leaves torch.backends.cudnn.benchmark at its default, off)
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    normalize = build_normalize(Meta.new(arch=plan.arch, image_size=plan.image_size))
    loss_fn = build_loss("wbce")
    s, b = plan.image_size, plan.batch_size
    # Random batches already on the device, in the loader's form (uint8 (B, 1, S, S)): the step does exactly what
    # training does (normalise on the device, autocast, scaled backward, Adam) without waiting for any data.
    batches = [(torch.randint(0, 256, (b, 1, s, s), dtype=torch.uint8, device=device),
                (torch.rand(b, 14, device=device) < 0.2).float(), torch.arange(b)) for _ in range(4)]

    def loop(n: int):
        return [batches[i % len(batches)] for i in range(n)]

    kw = dict(scaler=scaler, amp=cuda, channels_last=cuda, progress=False)
    train_one_epoch(model, loop(max(3, plan.ceiling_steps // 4)), loss_fn, optimizer, device, normalize, **kw)
    _sync(plan.device)
    stats = train_one_epoch(model, loop(plan.ceiling_steps), loss_fn, optimizer, device, normalize, **kw)
    _sync(plan.device)
    ceiling = stats.images_per_s
    step.rows.append(("pure-compute ceiling images/s (random batches on the device)", f"**{ceiling:.1f}**"))
    if train_rate is not None:
        ratio = train_rate / ceiling
        met = "met" if ratio >= GOAL_TRAIN_VS_CEILING else "not met"
        step.rows.append(("training / ceiling", f"**{ratio:.0%}** (goal >= {GOAL_TRAIN_VS_CEILING:.0%}: {met})"))
    if cuda:
        step.rows.append(("peak GPU memory of the step", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
    batches.clear()
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    step.status = "ok"


def step_loader(plan: Plan, runner: Runner, data: Path, step: Step) -> None:
    import warnings

    from torch.utils.data import DataLoader

    from chestxray.checkpoint import Meta
    from chestxray.data import XrayDataset, collate_batch, load_index, make_splits
    from chestxray.labels import LABELS
    from chestxray.transforms import build_transform

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_index(data)
        train_df = make_splits(index, data)["train"]
    meta = Meta.new(arch=plan.arch, image_size=plan.image_size)
    dataset = XrayDataset(train_df, LABELS, build_transform(meta, train=True), runner.work / "cache",
                          skip_unreadable=True)
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=True, num_workers=plan.workers,
                        collate_fn=collate_batch, pin_memory=plan.device == "cuda",
                        persistent_workers=plan.workers > 0)
    rates = []
    for _ in range(3):  # the first pass starts the workers
        start, n = time.perf_counter(), 0
        for images, *_ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
    step.rows.append(("loader images/s (training transform, from the cache, "
                      f"{plan.workers} workers, batch {plan.batch_size})", f"**{max(rates[1:]):.0f}**"))
    step.rows.append(("passes", ", ".join(f"{r:.0f}" for r in rates)))
    step.status = "ok"


def step_resume(plan: Plan, runner: Runner, data: Path, step: Step) -> None:
    run_dir = runner.work / "run_resume"
    argv = [sys.executable, *_train_argv(plan, data, runner.work / "cache", run_dir, 3)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed_at = None
    deadline = time.monotonic() + min(150, runner.left())
    # Kill once epoch 1's state is written, i.e. during epoch 2.
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_read_history(run_dir)) >= 1 and (run_dir / "last.pth").is_file():
            time.sleep(0.5 if plan.device == "cuda" else 0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = len(_read_history(run_dir))
            break
        time.sleep(0.2)
    out, _ = proc.communicate()
    with runner.log_path.open("a") as log:
        log.write(f"\n===== resume: first run (killed after {killed_at} epoch(s))\n{out[-3000:]}\n")
    if killed_at is None:
        step.status = "FAILED"
        step.notes.append(f"the first run was not caught between epochs (exit code {proc.returncode}): "
                          f"{_tail(out)}")
        return
    rc, out, seconds = runner.run([sys.executable, "Model_Training/train.py", "--resume", "--run-dir", str(run_dir),
                                   "--no-progress"], 200, "resume")
    epochs = [int(r["epoch"]) for r in _read_history(run_dir)]
    ok = rc == 0 and epochs == [1, 2, 3] and (run_dir / "model.pth").is_file()
    step.rows += [("killed (SIGKILL) after epoch", str(killed_at)), ("--resume exit code", str(rc)),
                  ("epochs in history.csv after the resume", str(epochs)), ("resume run", f"{seconds:.0f} s")]
    step.status = "ok" if ok else "FAILED"
    if not ok:
        step.notes.append(_tail(out))


def ddp_probe() -> int:
    """Under torchrun: NCCL (gloo on CPU) process group, an all_reduce and three DDP steps; prints one JSON line."""
    import torch.distributed as dist

    from chestxray.model import build_model

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    value = torch.ones(1, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(value)
    model = torch.nn.parallel.DistributedDataParallel(build_model("resnet18", 14).to(device),
                                                      device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 64, 64, device=device)).sum().backward()
        optimizer.step()
    print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                      "all_reduce": value.item(), "ddp_steps": 3}), flush=True)
    dist.destroy_process_group()
    return 0


def step_torchrun(plan: Plan, runner: Runner, data: Path, step: Step) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    run_dir = runner.work / "run_torchrun"
    rc, out, seconds = runner.run([*torchrun, *_train_argv(plan, data, runner.work / "cache", run_dir, 1)], 150,
                                  "torchrun train.py")
    history = _read_history(run_dir)
    step.rows.append(("torchrun --nproc_per_node 1 train.py: exit code", f"{rc} ({seconds:.0f} s)"))
    if history:
        step.rows.append(("its epoch images/s", history[-1]["images_per_s"]))
    step.notes.append("with one process (WORLD_SIZE 1) train.py runs without a process group, so the probe below "
                      "checks the DDP/NCCL path itself")
    rc2, out2, seconds2 = runner.run([*torchrun, "benchmarks/gpu_check.py", "--ddp-probe"], 120, "ddp probe")
    probe = next((json.loads(line) for line in out2.splitlines() if line.startswith("{")), None)
    step.rows.append(("DDP probe under torchrun", f"exit code {rc2}, {probe}" if probe else f"exit code {rc2}"))
    step.status = "ok" if rc == 0 and rc2 == 0 and probe else "FAILED"
    if rc != 0:
        step.notes.append(_tail(out))
    if rc2 != 0:
        step.notes.append(_tail(out2))


def step_export(plan: Plan, runner: Runner, checkpoint: Path, step: Step) -> Path | None:
    onnx_path = checkpoint.with_suffix(".onnx")
    rc, out, seconds = runner.run([sys.executable, "Model_Training/export.py", "--checkpoint", str(checkpoint),
                                   "--out", str(onnx_path)], 180, "export")
    step.rows.append(("Model_Training/export.py", f"exit code {rc}, {seconds:.0f} s: {_tail(out, 1)}"))
    step.status = "ok" if rc == 0 else "FAILED"
    return onnx_path if rc == 0 else None


def step_predictions(plan: Plan, runner: Runner, data: Path, checkpoint: Path, onnx_path: Path | None,
                     step: Step) -> None:
    from chestxray.imaging import read_xray

    images = sorted((data / "images").glob("*.png"))[: plan.predict_images]
    listing = runner.work / "predict_images"
    listing.mkdir(exist_ok=True)
    for p in images:
        (listing / p.name).symlink_to(p)
    ok = True
    outputs = {}
    for backend in ("torch", "onnx"):
        argv = [sys.executable, "predictions.py", str(listing), "--checkpoint", str(checkpoint), "--device",
                plan.device]
        if backend == "onnx":
            if onnx_path is None:
                step.rows.append(("predictions.py --backend onnx", "no ONNX export"))
                continue
            argv[argv.index(str(checkpoint))] = str(onnx_path)
            # auto: the CUDA execution provider when this onnxruntime has it, else the CPU one (reported below)
            argv[argv.index("--device") + 1] = "auto"
        argv += ["--backend", backend, "--batch-size", "16", "--workers", str(plan.workers)]
        rc, out, seconds = runner.run(argv, 150, f"predictions.py {backend}", stdout_only=True)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        good = rc == 0 and len(lines) == len(images) and all("labels" in r for r in lines)
        ok &= good
        outputs[backend] = lines
        ran_on = lines[0].get("model", {}).get("device", "?") if lines else "?"
        step.rows.append((f"predictions.py, backend {backend}",
                          f"exit code {rc}, {len(lines)}/{len(images)} results on {ran_on}, {seconds:.1f} s for the "
                          f"whole command ({len(images) / seconds:.1f} images/s including start-up)"))
        if not good:
            step.notes.append(f"{backend}: {_tail(out)}")
    if len(outputs) == 2 and outputs["torch"] and outputs["onnx"]:
        diff = max(abs(x["probability"] - y["probability"]) for a, b in zip(outputs["torch"], outputs["onnx"])
                   for x, y in zip(a["labels"], b["labels"]))
        step.rows.append(("max |Δprobability| torch vs onnx (predictions.py JSON)", f"{diff:.1e}"))
    # In-process latency, batch 1, of each backend (the server's case).
    from chestxray.checkpoint import load_checkpoint
    from chestxray.onnx_backend import OnnxModel
    from chestxray.transforms import preprocess

    model, meta, _ = load_checkpoint(checkpoint)
    device = torch.device(plan.device)
    model = model.to(device).eval()
    x = preprocess(meta, read_xray(images[0]), device)

    def torch_step():
        from chestxray.cam import predict_with_maps

        with torch.inference_mode():
            logits, maps = predict_with_maps(model, x)
            return torch.sigmoid(logits).cpu(), maps.cpu()

    timings = {"torch (eager fp32)": torch_step}
    if onnx_path is not None:
        try:
            om = OnnxModel(onnx_path, device="auto")
            xn = x.cpu().numpy()
            timings[f"onnxruntime ({om.providers[0]})"] = lambda: om.run(xn)
        except Exception as exc:
            step.notes.append(f"onnxruntime session: {type(exc).__name__}: {exc}")
    for name, fn in timings.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(10 if plan.device == "cuda" else 3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        step.rows.append((f"in-process predict latency, batch 1, {name}", f"{statistics.median(times) * 1000:.1f} ms"))
    step.status = "ok" if ok else "FAILED"


def step_web(plan: Plan, runner: Runner, data: Path, checkpoint: Path, onnx_path: Path | None, step: Step) -> None:
    from chestxray.web import create_app

    image = sorted((data / "images").glob("*.png"))[0]
    payload = image.read_bytes()
    ok = True
    for backend in ("torch", "onnx"):
        config = {"CHECKPOINT": str(checkpoint), "DEVICE": plan.device, "RESULTS_DIR": str(runner.work / "results"),
                  "WTF_CSRF_ENABLED": False, "TESTING": True}
        if backend == "onnx":
            if onnx_path is None:
                step.rows.append(("POST /api/predict, backend onnx", "no ONNX export"))
                continue
            config.update(CHECKPOINT=str(onnx_path), BACKEND="onnx", DEVICE="auto")  # CPU EP if no CUDA EP
        client = create_app(config).test_client()
        times, codes = [], []
        for i in range(plan.web_posts + 2):
            start = time.perf_counter()
            response = client.post("/api/predict", data={"file": (io.BytesIO(payload), image.name)},
                                   content_type="multipart/form-data")
            if i >= 2:  # two warm-up requests
                times.append(time.perf_counter() - start)
            codes.append(response.status_code)
        good = all(c == 200 for c in codes)
        ok &= good
        ran_on = (response.get_json(silent=True) or {}).get("model", {}).get("device", "?")
        step.rows.append((f"POST /api/predict, backend {backend}",
                          f"median {statistics.median(times) * 1000:.1f} ms over {len(times)} posts on {ran_on}, "
                          f"status codes {sorted(set(codes))}"))
    step.status = "ok" if ok else "FAILED"


# ----------------------------------------------------------------------------------------------------------------


def write_report(path: Path, plan: Plan, steps: list[Step], dry: bool, total: float) -> None:
    lines = ["# GPU check", "",
             "Command: `bash benchmarks/gpu_check.sh`" + (" --dry-run (CPU, tiny sizes: a test of the script, "
                                                         "not a measurement)" if dry else ""),
             "", f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node() or 'machine'}, {os.cpu_count()} CPU cores; "
             f"{plan.arch} at {plan.image_size} px on {plan.device}; whole check {total:.0f} s.", "",
             "| step | status | time (s) |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s.name}: {s.status}", ""]
        if s.rows:
            lines += ["| what | value |", "|---|---|"]
            lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in s.rows]
        lines += [f"- {n}" for n in s.notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    """Run every step; returns 0 when all ran ok, 1 otherwise (the report says which)."""
    if args.ddp_probe:
        return ddp_probe()
    plan = DRY if args.dry_run else FULL
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(args.out) if args.out else (work / "gpu-dry-run.md" if args.dry_run
                                           else ROOT / "benchmarks" / "results" / "gpu.md")
    runner = Runner(work, plan.budget_s)
    started = time.perf_counter()
    steps: list[Step] = []
    state: dict = {}

    def do(name: str, fn, *a, needs: tuple[str, ...] = ()) -> None:
        step = Step(name)
        steps.append(step)
        missing = [k for k in needs if state.get(k) is None]
        if missing:
            step.status = "skipped"
            step.notes.append(f"needs {', '.join(missing)} from an earlier step")
            return
        if runner.left() < 10:
            step.status = "skipped"
            step.notes.append("out of the time budget")
            return
        start = time.perf_counter()
        try:
            fn(*a, step)
        except Exception as exc:  # one broken path must not hide the others' results
            step.status = "FAILED"
            step.notes.append(f"{type(exc).__name__}: {exc}")
            with runner.log_path.open("a") as log:
                log.write(f"\n===== {name}: exception\n{traceback.format_exc()}\n")
        step.seconds = time.perf_counter() - start
        print(f"[gpu_check] {name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        write_report(out, plan, steps, args.dry_run, time.perf_counter() - started)

    do("1. environment", step_environment, plan)
    do("2. data folder", lambda s: state.update(data=step_data(plan, work, s)))
    do("3. training from the cache", lambda s: state.update(zip(("checkpoint", "train_rate"),
                                                                step_train(plan, runner, state["data"], s))),
       needs=("data",))
    do("4. pure-compute ceiling", lambda s: step_ceiling(plan, s, state.get("train_rate")))
    do("5. loader", lambda s: step_loader(plan, runner, state["data"], s), needs=("data",))
    do("6. --resume after a kill", lambda s: step_resume(plan, runner, state["data"], s), needs=("data",))
    do("7. torchrun and DDP", lambda s: step_torchrun(plan, runner, state["data"], s), needs=("data",))
    do("8a. ONNX export", lambda s: state.update(onnx=step_export(plan, runner, state["checkpoint"], s)),
       needs=("checkpoint",))
    do("8b. predictions.py, both backends", lambda s: step_predictions(plan, runner, state["data"],
                                                                       state["checkpoint"], state.get("onnx"), s),
       needs=("checkpoint",))
    do("9. web POST, both backends", lambda s: step_web(plan, runner, state["data"], state["checkpoint"],
                                                        state.get("onnx"), s), needs=("checkpoint",))
    total = time.perf_counter() - started
    write_report(out, plan, steps, args.dry_run, total)
    if os.environ.get("OUT") and not args.dry_run:  # the device tool brings back what is under $OUT
        shutil.copy(out, Path(os.environ["OUT"]) / "gpu.md")
        shutil.copy(runner.log_path, Path(os.environ["OUT"]) / "gpu_check.log")
    print(f"[gpu_check] wrote {out} ({total:.0f} s)", flush=True)
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
