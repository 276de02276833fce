"""A demo model trained on the bundled sample, so that `make run` serves a working app on a fresh clone.

    python Model_Training/demo.py [--force]     (writes .cache/demo_model.pth; a few minutes on 2 CPU cores)

`python main.py` builds it by itself when no checkpoint is given or found. It is a ResNet-18 at 128 px with output
stride 8 (heatmaps of 16x16 cells) trained for two epochs on the 221 training images of samples/nih, with random
initialisation (nothing is downloaded): it exercises the whole app (upload, probabilities, heatmaps) but its answers
are meaningless. Its checkpoint says
so in `meta.training["demo"]` ({"images": N, "minutes": M}); the web app then shows a banner on every page and
`"demo": true` in its API.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chestxray.checkpoint import (
    CheckpointError,
    checkpoint_from_obj,
    load_checkpoint,
    safe_torch_load,
    write_checkpoint,
)
from chestxray.meta import Meta

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_DIR = ROOT / "samples" / "nih"
DEMO_CHECKPOINT = ROOT / ".cache" / "demo_model.pth"
TRAIN_SCRIPT = ROOT / "Model_Training" / "train.py"
# 128 px (the sample's images are 64-128 px anyway) at output stride 8: heatmaps of 16x16 cells. The finer stride
# costs about 5x the compute of stride 32 (layer3 and layer4 run at 16x16); a 1x1 transition keeps that from
# being 6x.
DEMO_TRAIN_ARGS = ("--arch", "resnet18", "--image-size", "128", "--output-stride", "8", "--transition-kernel", "1",
                   "--epochs", "2", "--batch-size", "16", "--no-pretrained", "--device", "auto", "--workers", "0")


class DemoError(RuntimeError):
    """The demo model could not be built; the message says why."""


def demo_summary(meta: Meta) -> dict | None:
    """{"images": N, "minutes": M} when `meta` is a demo model's, else None."""
    demo = meta.training.get("demo")
    return demo if isinstance(demo, dict) else None


def run_training(argv: list[str]) -> int:
    """Run Model_Training/train.py with `argv` in a child process -> its exit code; its progress and messages go
    straight to this process's terminal. Raises DemoError when it cannot be started."""
    # A child process, not an import: one script never imports another (what they share lives in chestxray/).
    try:
        return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *argv]).returncode
    except OSError as exc:
        raise DemoError(f"cannot run {TRAIN_SCRIPT}: {exc.strerror or exc}") from None


def build_demo_model(path: str | Path = DEMO_CHECKPOINT, data_dir: str | Path = SAMPLE_DIR,
                     extra_args: tuple[str, ...] = (), progress: bool = True, force: bool = False) -> Path:
    """Train the demo model on data_dir into `path`, unless a loadable demo checkpoint is there already -> path.

    `extra_args` are appended to the train.py arguments (the last value of a flag wins). Raises DemoError when
    training fails; a damaged file at `path` is rebuilt, and `path` is written atomically.
    """
    path = Path(path)
    if path.is_file() and not force:
        try:
            if demo_summary(load_checkpoint(path)[1]) is not None:
                return path
        except CheckpointError:
            pass  # a damaged cache: build it again
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-", dir=path.parent) as tmp:
        argv = ["--data-dir", str(data_dir), *DEMO_TRAIN_ARGS, "--output", str(Path(tmp) / "demo.pth"),
                "--run-dir", str(Path(tmp) / "run"), *extra_args, *([] if progress else ["--no-progress"])]
        start = time.monotonic()
        rc = run_training(argv)
        minutes = (time.monotonic() - start) / 60
        if rc != 0:
            raise DemoError(f"training the demo model on {data_dir} failed (exit code {rc}; see the messages above)")
        obj = safe_torch_load(Path(tmp) / "demo.pth")  # kept whole: the trust data fitted by train.py stay
        meta = checkpoint_from_obj(obj, Path(tmp) / "demo.pth")[1]
        demo = {"images": int(meta.training.get("n_train", 0)), "minutes": round(minutes, 1)}
        obj["meta"] = meta.replace(training={**meta.training, "demo": demo}).to_dict()
        write_checkpoint(path, obj)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(DEMO_CHECKPOINT), help="demo checkpoint (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="build it again even if it exists (default: off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Build the demo checkpoint; returns the exit code (0 built or already there, 1 failed)."""
    try:
        path = build_demo_model(args.output, progress=not args.no_progress, force=args.force)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = demo_summary(load_checkpoint(path)[1])
    print(f"demo model: {path} (trained on {demo['images']} images for {demo['minutes']} minutes; its answers "
          "are meaningless)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
