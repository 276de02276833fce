"""Which model the web app serves, built once at start-up.

`choose_checkpoint` picks the file: --checkpoint, else $CXR_CHECKPOINT, else chestxray_model_resnet50.pth in the
project root, else the demo model trained once on the bundled sample (Model_Training/demo.py, run as its own
process: the package never imports a script). `load_model` builds the Predictor from it, or records why it cannot;
create_app keeps the result in app.extensions["chestxray"].
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chestxray.auto_backend import checkpoint_digest, export_path
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]  # the project root: chestxray/web/ is two levels down
DEMO_SCRIPT = ROOT / "Model_Training" / "demo.py"
DEMO_CHECKPOINT = ROOT / ".cache" / "demo_model.pth"  # the script's own default (a test checks they agree)
log = logging.getLogger("chestxray.web")


@dataclass(frozen=True)
class ModelState:
    """What app.extensions["chestxray"] holds: the Predictor built at start-up, or why there is none."""

    predictor: Predictor | None
    checkpoint: str
    error: str | None = None  # the loader's message when no model is loaded


class DemoUnavailable(RuntimeError):
    """The demo model could not be built; the message says why (the script's own messages are above it)."""


def build_demo(path: str | os.PathLike = DEMO_CHECKPOINT) -> Path:
    """Run Model_Training/demo.py in a child process to build (or find) the demo checkpoint at `path` -> path.

    Its progress goes straight to this process's terminal. Raises DemoUnavailable when it fails. A demo checkpoint
    whose ONNX export (named by the file's SHA-256, chestxray.auto_backend) is beside it is returned at once: those
    very bytes were loaded and checked when the export was made, and the child (which imports torch to load the file
    again) was most of every later `make run` start.
    """
    path = Path(path)
    if path.is_file() and export_path(path, checkpoint_digest(path)).is_file():
        return path
    # A child process, not an import: the training script and its dependencies stay out of the server process, and
    # the package imports no entry point.
    try:
        rc = subprocess.run([sys.executable, str(DEMO_SCRIPT), "--output", str(path)], cwd=ROOT).returncode
    except OSError as exc:
        raise DemoUnavailable(f"cannot run {DEMO_SCRIPT}: {exc.strerror or exc}") from None
    if rc != 0 or not Path(path).is_file():
        raise DemoUnavailable(f"{DEMO_SCRIPT} failed (exit code {rc}; see the messages above)")
    return Path(path)


def default_checkpoint() -> str:
    """$CXR_CHECKPOINT, else chestxray_model_resnet50.pth in the project root."""
    return os.environ.get("CXR_CHECKPOINT") or str(ROOT / DEFAULT_CHECKPOINT)


def load_model(checkpoint: str, device: str = "auto", backend: str = "torch",
               allow_untrusted: bool = False) -> ModelState:
    """Build the Predictor once; a missing or broken checkpoint gives a state with no predictor and its error."""
    try:
        return ModelState(Predictor.from_checkpoint(checkpoint, device=device, backend=backend,
                                                    allow_untrusted=allow_untrusted), checkpoint)
    except (CheckpointError, RuntimeError) as exc:
        return ModelState(None, checkpoint, str(exc))
    finally:
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the memory that loading used and freed (the parsed file, its JSON, the runtime's graph optimisation)
    back to the OS: glibc keeps freed heap pages mapped, and malloc_trim(3) returns them, so the server's resident
    size is what it holds (about 0.4 GB less for a ResNet-50 on ONNX Runtime; BENCHMARKS.md). A no-op where the C
    library has no malloc_trim (macOS, Windows, musl)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass


def list_models(models_dir: str | os.PathLike | None, served: str | None = None) -> list[dict]:
    """The *.pth files of a models folder, by name: {"name", "path", "served", "arch", "image_size", "adapted"
    (meta.training["adapted"]: mode, base SHA-256, date...) or None, "error" (why it does not load) or None}.
    Each file is read with the safe loader; none is served from here (choose one with --model and restart)."""
    if not models_dir or not Path(models_dir).is_dir():
        return []
    from chestxray.checkpoint import safe_torch_load
    from chestxray.meta import Meta

    served_path = Path(served).resolve() if served else None
    out = []
    for path in sorted(Path(models_dir).glob("*.pth")):
        entry = {"name": path.name, "path": str(path), "served": path.resolve() == served_path, "arch": None,
                 "image_size": None, "adapted": None, "error": None}
        try:
            meta = Meta.from_dict(safe_torch_load(path)["meta"])
            entry.update(arch=meta.arch, image_size=meta.image_size, adapted=meta.training.get("adapted"))
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            entry["error"] = str(exc)[:300]
        out.append(entry)
    return out


def model_in_folder(models_dir: str | os.PathLike | None, name: str) -> str:
    """--model NAME -> the path of NAME (with or without .pth) in --models-dir. Raises CheckpointError when absent."""
    if not models_dir:
        raise CheckpointError("--model needs --models-dir (the folder of checkpoints to choose from)")
    path = Path(models_dir) / (name if name.endswith(".pth") else f"{name}.pth")
    if Path(name).name != name or not path.is_file():
        names = [m["name"] for m in list_models(models_dir)]
        raise CheckpointError(f"no model {name!r} in {models_dir}; available: {', '.join(names) or 'none'}")
    return str(path)


def choose_checkpoint(args: argparse.Namespace) -> str:
    """--checkpoint, else $CXR_CHECKPOINT, else the default file if it exists; else the demo model (built once).

    A checkpoint the user names always wins, even a broken one (the app then says why it cannot load it). The demo
    model is used only when nothing is named or found and --no-demo is not given; if it cannot be built, the app
    starts without a model.
    """
    if getattr(args, "model", None):
        return model_in_folder(getattr(args, "models_dir", None), args.model)
    if args.checkpoint:
        return args.checkpoint
    default = default_checkpoint()
    if args.no_demo or os.environ.get("CXR_CHECKPOINT") or Path(default).exists():
        return default
    print(f"No checkpoint at {default}: serving a demo model trained on the bundled sample, cached in "
          f"{DEMO_CHECKPOINT} (the first start trains it: about 1.5 minutes on 2 CPU cores). Its answers are "
          "meaningless; pass --no-demo to start without a model.", flush=True)
    try:
        return str(build_demo(DEMO_CHECKPOINT))
    except DemoUnavailable as exc:
        log.warning("the demo model could not be built: %s", exc)
        return default
