"""Predict chest X-rays from the command line: probabilities, positive calls and heatmap overlays per image.

    python predictions.py PATH [PATH ...] --checkpoint CKPT [--out DIR] [--heatmaps all|positive|none]
        [--backend auto|torch|onnx] [--batch-size 16] [--workers 2] [--jsonl FILE] [--csv FILE]
    torchrun --nproc_per_node N predictions.py PATH ... --jsonl FILE [--csv FILE]   (--nnodes for several machines)

prints one JSON object per image on its own line (to stdout, or to --jsonl FILE): Prediction.to_dict() (the shape
the web API answers) plus "image" (its path) and, with --out, "heatmaps" ({label: overlay PNG path}); a refused
image gets {"image": PATH, "error": MESSAGE}. --csv FILE adds one row per image: path, in_scope, every
probability, the positive calls (or the error). Files are decoded by --workers DataLoader processes and predicted
--batch-size at a time; the output is in input order and the same as one image at a time.
Under torchrun each rank scores one contiguous block of the sorted file list and writes its part beside the output
file; rank 0 merges the parts into the output in input order.
Exit code 1 if any image failed, 2 without a usable checkpoint or for bad arguments.
The inference lives in chestxray.predictor (Predictor is re-exported here), the batched scoring and its
JSON-lines / CSV output in chestxray.scoring.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.messages import TRAIN_COMMAND
from chestxray.predictor import BACKEND_HELP, BACKENDS, Prediction, Predictor
from chestxray.scoring import find_images, heatmap_folders, merge_ranks, open_outputs, score_files, shard_bounds
from chestxray.store import AnalysisStore, StoreError

__all__ = ["DEFAULT_CHECKPOINT", "Prediction", "Predictor", "get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--checkpoint",
        default=os.environ.get("CXR_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint file (default: $CXR_CHECKPOINT, else %(default)s)",
    )
    parser.add_argument("--out", default=None, help="folder for heatmap overlay PNGs (default: none written)")
    parser.add_argument(
        "--heatmaps", choices=("all", "positive", "none"), default="all",
        help="which labels get an overlay PNG under --out (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--max-file-mb", type=float, default=50,
                        help="largest image file read, per image, as the web app's upload limit; a larger one gets "
                             "an error line (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=f"{BACKEND_HELP} (default: %(default)s)")
    parser.add_argument("--allow-untrusted", action="store_true",
                        help="call findings even when the checkpoint lacks validation evidence or scope statistics; "
                        "every JSON line then carries a \"warning\" (default: off: such labels are 'not validated')")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes decoding the files; 0 = in the main process (default: %(default)s)")
    parser.add_argument("--jsonl", default=None, help="write the JSON lines to this file instead of stdout "
                        "(required under torchrun, with or instead of --csv) (default: stdout)")
    parser.add_argument("--csv", default=None, help="also write one CSV row per image to this file "
                        "(default: none)")
    parser.add_argument("--database", default=None,
                        help="also record every image in this results database, as the web app does (e.g. "
                        "sqlite:///instance/results.sqlite3 or postgresql://USER:PASSWORD@HOST/DB), so /monitor "
                        "sees batch runs (default: not recorded)")
    return parser


def _usage(args: argparse.Namespace, world_size: int) -> str | None:
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.workers < 0:
        return f"--workers must be 0 or more, got {args.workers}"
    if world_size > 1 and not (args.jsonl or args.csv):
        return ("under torchrun give --jsonl FILE (and/or --csv FILE): each rank writes its part and rank 0 merges "
                "them in input order; several ranks cannot share stdout")
    return None


def _say_out_of_scope(path: Path, reason: str) -> None:
    print(f"{path}: {reason}", file=sys.stderr, flush=True)  # where a person watching the run sees it


def main(args: argparse.Namespace) -> int:
    """Run the CLI; returns the exit code (0 all good, 1 some image failed, 2 no usable checkpoint/bad arguments)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    problem = _usage(args, world_size)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device
    if world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per rank on each machine
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=device, backend=args.backend,
                                              allow_untrusted=args.allow_untrusted)
    except (CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}\nTrain a model with: {TRAIN_COMMAND}\nor point at one with --checkpoint", file=sys.stderr)
        return 2
    if predictor.untrusted and rank == 0:
        print(predictor.model_card()["warning"], file=sys.stderr, flush=True)
    store = None
    if args.database:
        try:
            store = AnalysisStore(args.database)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    images = find_images(args.paths)
    if not images:
        print("error: no PNG, JPEG or DICOM files found in the given paths", file=sys.stderr)
        return 1
    # Overlay folders are named over the whole list first, so every rank names them as one process would.
    folders = heatmap_folders(args.out, images, args.heatmaps)
    start, stop = shard_bounds(len(images), rank, world_size)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # for the barrier before the merge only; the models do not communicate
    progress = None
    if rank == 0 and (len(images) > 1 or any(Path(p).is_dir() for p in args.paths)):
        from tqdm import tqdm

        progress = tqdm(total=stop - start, unit="img", file=sys.stderr)
    with ExitStack() as stack:
        outputs = open_outputs(stack, args.jsonl, args.csv, predictor.labels, rank, world_size)
        failed = score_files(predictor, images[start:stop], folders[start:stop], outputs, heatmaps=args.heatmaps,
                             batch_size=args.batch_size, workers=args.workers,
                             max_bytes=int(args.max_file_mb * 2**20), progress=progress, store=store,
                             checkpoint=args.checkpoint, on_out_of_scope=_say_out_of_scope)
    if progress is not None:
        progress.close()
    if world_size > 1:
        failed = merge_ranks(args.jsonl, args.csv, rank, world_size, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
