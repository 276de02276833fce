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
The inference itself lives in chestxray.predictor (Predictor is re-exported here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from chestxray.cam import with_legend
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.fileio import SpreadsheetWriter, atomic_write, dumps_json
from chestxray.imaging import IMAGE_SUFFIXES
from chestxray.messages import TRAIN_COMMAND
from chestxray.monitor import input_statistics
from chestxray.predictor import BACKEND_HELP, BACKENDS, Prediction, Predictor
from chestxray.results import PNG_COMPRESS_LEVEL
from chestxray.scoring import batched, decode_in_order, merge_parts, part_path, shard_bounds
from chestxray.store import AnalysisStore, StoreError, answered_entry, model_version, refused_entry

__all__ = ["DEFAULT_CHECKPOINT", "Prediction", "Predictor", "get_args_parser", "main"]


def find_images(paths: list[str]) -> list[Path]:
    """Expand files and folders (searched recursively for PNG/JPEG/DICOM) into a sorted, de-duplicated list."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)  # a missing or odd file is reported as that image's error, not skipped
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


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


def _heatmap_dir(out: Path, image: Path, used: set[str]) -> Path:
    # The stem of "..png" is "." and of "...png" is "..": as a folder name they would put the overlays in --out
    # itself or in its parent.
    stem = image.stem if image.stem not in ("", ".", "..") else "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return out / name


def _record(pred: Prediction, path: Path, folder: Path | None, which: str) -> dict:
    """{"image": path, **to_dict()}, plus "heatmaps" {label: overlay PNG path} when `folder` is given."""
    record = {"image": str(path), **pred.to_dict()}
    if folder is not None:
        record["heatmaps"] = {}
        for label in pred.labels if which == "all" else pred.positive:
            supported = pred.support[label]
            caption = (f"{label}: colour = evidence for this finding, scaled to this map's own peak" if supported
                       else f"{label}: no region supports this finding")
            image = with_legend(pred.overlay(label), caption)
            target = atomic_write(folder / f"{label}.png", lambda f, image=image: image.save(
                f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))  # the web app's level: ~3x faster than 6
            record["heatmaps"][label] = str(target)
    return record


def csv_header(labels) -> list[str]:
    """The --csv columns: path, in_scope, one probability per label (model order), one call per label ("LABEL
    call": positive, negative, not validated or out of scope), the positive calls, the warning, the error."""
    return ["path", "in_scope", *labels, *(f"{name} call" for name in labels), "positive", "warning", "error"]


def csv_row(record: dict, labels) -> list:
    if "error" in record:
        return [record["image"], "", *([""] * 2 * len(labels)), "", "", record["error"]]
    rows = {item["label"]: item for item in record["labels"]}
    return [record["image"], record["in_scope"], *(f"{rows[name]['probability']:.6f}" for name in labels),
            *(rows[name]["call"] for name in labels), "|".join(record["positive"]), record.get("warning") or "", ""]


def _usage(args: argparse.Namespace, world_size: int) -> str | None:
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.workers < 0:
        return f"--workers must be 0 or more, got {args.workers}"
    if world_size > 1 and not (args.jsonl or args.csv):
        return ("under torchrun give --jsonl FILE (and/or --csv FILE): each rank writes its part and rank 0 merges "
                "them in input order; several ranks cannot share stdout")
    return None


def _sinks(stack: ExitStack, args: argparse.Namespace, rank: int, world_size: int, labels):
    """(JSON-lines file or None, CSV writer or None): stdout for JSON unless a file is named; parts under torchrun."""
    def open_file(path: str | None):
        if path is None:
            return None
        target = part_path(path, rank) if world_size > 1 else Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return stack.enter_context(target.open("w", newline="", encoding="utf-8"))

    jsonl = open_file(args.jsonl) or (sys.stdout if world_size == 1 else None)
    csv_file = open_file(args.csv)
    writer = SpreadsheetWriter(csv_file) if csv_file is not None else None
    if writer is not None:
        writer.writerow(csv_header(labels))
    return jsonl, writer


def _score(predictor: Predictor, images: list[Path], folders: list, args: argparse.Namespace, jsonl, writer,
           progress, store=None) -> int:
    """Decode (workers), predict (batches) and write every image's record in input order; returns the failures.

    store: a chestxray.store.AnalysisStore that gets one row per image (--database), or None."""
    want_maps = args.out is not None and args.heatmaps != "none"
    failed = 0
    version = model_version(args.checkpoint, predictor) if store is not None else None
    decoded = decode_in_order(images, predictor.transform, args.workers, max_bytes=int(args.max_file_mb * 2**20))
    for batch in batched(decoded, args.batch_size):
        good = [d for d in batch if d.error is None]
        started = time.perf_counter()
        preds = iter(predictor.predict_batch([d.image for d in good], want_maps, [d.format for d in good],
                                             torch.stack([d.inputs for d in good])) if good else [])
        seconds, entries = (time.perf_counter() - started) / max(1, len(good)), []  # each image's share of the batch
        for d in batch:
            if d.error is not None:
                failed += 1
                record = {"image": str(d.path), "error": d.error}
                entries.append(refused_entry(source="cli", reason="unreadable image", latency_s=None, model=version)
                               if store is not None else None)
            else:
                prediction = next(preds)
                record = _record(prediction, d.path, folders[d.index], args.heatmaps)
                entries.append(answered_entry(prediction, source="cli", latency_s=seconds, model=version, data=d.path,
                                              input_stats=input_statistics(d.inputs)) if store is not None else None)
                if record.get("in_scope") is False:  # said where a person watching the run sees it
                    print(f"{d.path}: {record['scope']}", file=sys.stderr, flush=True)
            if jsonl is not None:
                jsonl.write(dumps_json(record) + "\n")
                jsonl.flush()
            if writer is not None:
                writer.writerow(csv_row(record, predictor.labels))
        if store is not None:
            store.record_many(entries)  # technical facts only: never the path or the DICOM header's patient data
        if progress is not None:
            progress.update(len(batch))
    return failed


def _merge_ranks(args: argparse.Namespace, rank: int, world_size: int, failed: int) -> int:
    """Under torchrun: wait for every rank, rank 0 merges the parts in rank (= input) order; the total failures."""
    import torch.distributed as dist

    failures = torch.tensor([failed])
    dist.all_reduce(failures)  # every rank's exit code reports a failure anywhere
    dist.barrier()
    if rank == 0:
        for path, header_lines in ((args.jsonl, 0), (args.csv, 1)):
            if path:
                merge_parts(path, world_size, header_lines=header_lines)
    dist.barrier()
    dist.destroy_process_group()
    return int(failures.item())


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
    used: set[str] = set()
    folders = [_heatmap_dir(Path(args.out), path, used) if args.out and args.heatmaps != "none" else None
               for path in images]
    start, stop = shard_bounds(len(images), rank, world_size)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # for the barrier before the merge only; the models do not communicate
    progress = None
    if rank == 0 and (len(images) > 1 or any(Path(p).is_dir() for p in args.paths)):
        from tqdm import tqdm

        progress = tqdm(total=stop - start, unit="img", file=sys.stderr)
    with ExitStack() as stack:
        jsonl, writer = _sinks(stack, args, rank, world_size, predictor.labels)
        failed = _score(predictor, images[start:stop], folders[start:stop], args, jsonl, writer, progress, store)
    if progress is not None:
        progress.close()
    if world_size > 1:
        failed = _merge_ranks(args, rank, world_size, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
