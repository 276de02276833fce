"""The int8 quality gate on a trained checkpoint: fp32 ONNX vs int8 ONNX, per label, for several int8 settings.

    python benchmarks/int8_gate.py --checkpoint CKPT --data-dir DIR [--external DIR] [--variants a,b] [--bootstrap N]

Exports fp32 once, then quantizes it with each setting of VARIANTS (chestxray.onnx_backend.quantize_int8 options,
calibrated on the *training* split as Model_Training/export.py --int8 does) and scores two sets with fp32 and int8:
the validation split (rebuilt as training made it) and the held-out set, every image of --data-dir outside the
training split (or every image of --external DIR, a labelled folder the model never saw). Per label: AUROC fp32 and
int8 with patient-bootstrap 95 % intervals (do they overlap?), |ΔAUROC|, call agreement at the checkpoint's
thresholds (raw: calibrated probability >= threshold; product: chestxray.predictor's calls, with the in-scope and
evidence rules), and the correlation of the int8 heatmaps with the fp32 ones. Gate, on the held-out set: every label
with both classes |ΔAUROC| <= 0.01, calls agree on >= 99 % of label-images, every label's heatmap correlation
>= 0.95. Speed: batch-1 latency of PyTorch eager, ONNX fp32 and ONNX int8 (and OpenVINO when it imports) in one
interleaved run, at the checkpoint's size and at --speed-size with the same architecture (random weights).
Writes benchmarks/results/int8.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import Model_Training.export as export  # noqa: E402
from chestxray.calls import NEGATIVE, POSITIVE  # noqa: E402
from chestxray.cam import predict_with_maps  # noqa: E402
from chestxray.checkpoint import load_checkpoint, model_from_meta  # noqa: E402
from chestxray.data import load_index, rebuild_splits, targets  # noqa: E402
from chestxray.imaging import read_xray  # noqa: E402
from chestxray.metrics import binarize, bootstrap_auroc, per_label_auroc  # noqa: E402
from chestxray.onnx_backend import OnnxModel, export_onnx, quantize_int8  # noqa: E402
from chestxray.predictor import Predictor  # noqa: E402
from chestxray.transforms import build_transform  # noqa: E402

AUROC_TOL, AGREEMENT, MAP_CORR = 0.01, 0.99, 0.95
# name -> (quantize_int8 options, calibration images). The first is what export.py --int8 writes by default.
VARIANTS = {
    "minmax": ({}, 128),
    "minmax-384": ({}, 384),
    "first-conv-float": ({"float_first_conv": True}, 128),
    "percentile": ({"calibration": "percentile"}, 128),
    "entropy": ({"calibration": "entropy"}, 128),
    "int8-activations": ({"symmetric_activations": True}, 128),
    "first-conv-float+percentile-384": ({"float_first_conv": True, "calibration": "percentile"}, 384),
}
DESCRIPTIONS = {
    "minmax": "per-channel weights, uint8 activations, MinMax, head float (today's default), 128 images",
    "minmax-384": "the same, calibrated on 384 images",
    "first-conv-float": "+ first conv kept float",
    "percentile": "percentile (99.999 %) calibration instead of MinMax",
    "entropy": "entropy calibration instead of MinMax",
    "int8-activations": "int8 (signed) activations instead of uint8",
    "first-conv-float+percentile-384": "first conv float + percentile, 384 images",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint")
    parser.add_argument("--data-dir", required=True, help="the data folder it was trained on (calibration images "
                        "come from its training split)")
    parser.add_argument("--external", default=None, help="a labelled folder to use as the held-out set instead of "
                        "the images of --data-dir outside the training split (default: those)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS "
                        "(default: all)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates for the "
                        "intervals (default: %(default)s)")
    parser.add_argument("--speed-size", type=int, default=512, help="second input size for the speed rows, same "
                        "architecture, random weights (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per engine and size "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine (default: "
                        "%(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.md"),
                        help="(default: %(default)s)")
    return parser


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per label: correlation of all images' map cells, (N, L, h, w) x2 -> (L,)."""
    a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    b = b.transpose(1, 0, 2, 3).reshape(b.shape[1], -1)
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def evaluation_sets(meta, data_dir: str, external: str | None):
    """(held-out frame, {set name: boolean mask over it}, training frame)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # split notices are training's business
        index = load_index(data_dir)
        splits = rebuild_splits(meta, index, data_dir)
        held = load_index(external) if external else index[~index["image"].isin(set(splits["train"]["image"]))]
    held = held.reset_index(drop=True)
    sets = {"validation": held["image"].isin(set(splits["val"]["image"])).to_numpy(),
            "held-out": np.ones(len(held), dtype=bool)}
    if external:
        sets.pop("validation")
    return held, sets, splits["train"]


class Scored:
    """One ONNX model's outputs on the held-out images: logits, maps, raw calls and the product's calls."""

    def __init__(self, path: Path, inputs: torch.Tensor, images: list[np.ndarray]) -> None:
        predictor = Predictor.from_checkpoint(path, device="cpu", backend="onnx")
        x = predictor.normalize(inputs).numpy()
        self.logits, self.maps, _ = predictor.onnx.run(x)
        calibration = predictor.trust.calibration
        probs = np.stack([calibration.apply(z) for z in self.logits.astype(np.float64)]) if calibration else \
            _sigmoid(self.logits)
        self.raw_calls = binarize(probs, predictor.thresholds)
        predictions = predictor.predict_batch(images, heatmaps=False, inputs=inputs)
        self.calls = np.array([[p.calls[name] for name in predictor.labels] for p in predictions])
        self.info = predictor.onnx.info


def judge(y: np.ndarray, patients: np.ndarray, ref: Scored, q: Scored, mask: np.ndarray, n_boot: int) -> dict:
    """Per-label criteria of int8 (q) against fp32 (ref) on the images of `mask`."""
    y = y[mask]
    p32, p8 = _sigmoid(ref.logits[mask]), _sigmoid(q.logits[mask])
    a32, a8 = per_label_auroc(y, p32), per_label_auroc(y, p8)
    ci32 = bootstrap_auroc(y, p32, patients[mask], n_boot)["per_label"]
    ci8 = bootstrap_auroc(y, p8, patients[mask], n_boot)["per_label"]
    validated = np.isfinite(a32) & np.isfinite(a8)
    # A label with too few positives has no interval (NaN): its overlap is not estimable, counted as not overlapping.
    overlap = (ci8[:, 0] <= ci32[:, 1]) & (ci32[:, 0] <= ci8[:, 1])
    return {"n": int(mask.sum()), "positives": y.sum(axis=0).astype(int), "validated": validated,
            "auroc32": a32, "auroc8": a8, "ci32": ci32, "ci8": ci8, "overlap": overlap,
            "delta": np.abs(a8 - a32), "raw_agree": (ref.raw_calls[mask] == q.raw_calls[mask]).mean(axis=0),
            "agree": (ref.calls[mask] == q.calls[mask]).mean(axis=0),
            "called": np.isin(ref.calls[mask], [POSITIVE, NEGATIVE]).mean(),
            "corr": _corr(q.maps[mask], ref.maps[mask])}


def verdict(r: dict) -> tuple[bool, list[str]]:
    """(passed, the failed criteria with their numbers) of a judge() result."""
    v = r["validated"]
    fails = []
    worst = float(r["delta"][v].max()) if v.any() else float("nan")
    if not worst <= AUROC_TOL:
        fails.append(f"max |ΔAUROC| {worst:.3f} > {AUROC_TOL} ({int((r['delta'][v] > AUROC_TOL).sum())} of "
                     f"{int(v.sum())} labels)")
    for key, name in (("raw_agree", "raw call"), ("agree", "product call")):
        if r[key].mean() < AGREEMENT:
            fails.append(f"{name} agreement {100 * r[key].mean():.1f} % < {100 * AGREEMENT:.0f} %")
    if not r["corr"].min() >= MAP_CORR:
        fails.append(f"min map correlation {r['corr'].min():.3f} < {MAP_CORR}")
    return not fails, fails


def _timed(engines: dict, x: np.ndarray, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per batch-1 call of each engine. Each engine runs in blocks (ONNX Runtime's threads spin after
    a run and would slow whichever engine ran next), and the blocks alternate over `rounds` so that drifting load on
    a shared machine hits every engine alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    per_block = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, run in engines.items():
            run(x)  # warm-up: first-call allocation and kernel selection, and the caches after the other engines
            for _ in range(per_block):
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _engines(model, fp32: Path, int8: Path, threads: int) -> dict:
    def eager(x):
        with torch.inference_mode():
            predict_with_maps(model, torch.from_numpy(x))

    engines = {"PyTorch eager": eager,
               "ONNX Runtime fp32": OnnxModel(fp32, device="cpu", threads=threads).run,
               "ONNX Runtime int8": OnnxModel(int8, device="cpu", threads=threads).run}
    try:
        import openvino as ov
    except ImportError:
        return engines
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    # OpenVINO's CPU plugin runs float graphs in bf16 by default where the CPU has AMX/AVX512-BF16: the f32 hint
    # gives the fp32 anchor, the default row shows what OpenVINO does unasked.
    engines["OpenVINO fp32 (f32 hint)"] = core.compile_model(str(fp32), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engines["OpenVINO fp32 file, default precision"] = core.compile_model(str(fp32), "CPU")
    engines["OpenVINO int8 (same QDQ file)"] = core.compile_model(str(int8), "CPU")
    return engines


def speed(model, meta, fp32: Path, int8: Path, args, size: int, calibration: list[Path], tmp: Path) -> dict:
    """Median batch-1 seconds per engine at `size`; another size exports random weights of the same architecture."""
    if size != meta.image_size:
        meta = dataclasses.replace(meta, image_size=size)
        model = model_from_meta(meta).eval()
        fp32, int8 = tmp / f"speed{size}.onnx", tmp / f"speed{size}.int8.onnx"
        export_onnx(model, meta, fp32)
        options, _ = VARIANTS[args.speed_variant]
        quantize_int8(fp32, int8, export.calibration_batches(calibration[:8], meta, 4, []), **options)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return _timed(_engines(model, fp32, int8, args.threads), x, args.repeats)


def _criteria_rows(results: dict, set_name: str) -> list[str]:
    rows = ["| int8 setting | max \\|ΔAUROC\\| (labels over 0.01 / with both classes) | 95 % CIs overlap | raw call "
            "agreement (lowest label) | product call agreement | lowest map correlation | gate |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, (by_set, _, _) in results.items():
        r = by_set[set_name]
        v = r["validated"]
        passed, fails = verdict(r)
        over, overlap = int((r["delta"][v] > AUROC_TOL).sum()), int(r["overlap"][v].sum())
        judged = "**passes**" if passed else "fails: " + "; ".join(fails).replace("|", "\\|")
        rows.append(f"| {name}: {DESCRIPTIONS[name]} | {r['delta'][v].max():.3f} ({over} / {int(v.sum())}) | "
                    f"{overlap} / {int(v.sum())} | {100 * r['raw_agree'].mean():.1f} % "
                    f"({100 * r['raw_agree'].min():.1f} %) | {100 * r['agree'].mean():.1f} % "
                    f"({100 * r['called']:.0f} % called) | "
                    f"{r['corr'].min():.3f} | {judged} |")
    return rows


def _label_rows(r: dict, labels: list[str]) -> list[str]:
    rows = ["| label | positives | AUROC fp32 (95 % CI) | AUROC int8 (95 % CI) | \\|Δ\\| | CIs overlap | raw call "
            "agreement | map correlation |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for j, name in enumerate(labels):
        if not r["validated"][j]:
            rows.append(f"| {name} | {r['positives'][j]} | – | – | – | – | {100 * r['raw_agree'][j]:.1f} % | "
                        f"{r['corr'][j]:.3f} |")
            continue
        (l32, h32), (l8, h8) = r["ci32"][j], r["ci8"][j]
        estimable = np.isfinite([l32, h32, l8, h8]).all()
        overlap = ("yes" if r["overlap"][j] else "no") if estimable else "not estimable"
        rows.append(f"| {name} | {r['positives'][j]} | {r['auroc32'][j]:.3f} ({l32:.2f}–{h32:.2f}) | "
                    f"{r['auroc8'][j]:.3f} ({l8:.2f}–{h8:.2f}) | {r['delta'][j]:.3f} | "
                    f"{overlap} | {100 * r['raw_agree'][j]:.1f} % | {r['corr'][j]:.3f} |")
    return rows


def _speed_rows(timings: dict[int, dict[str, float]], variant: str) -> list[str]:
    rows = ["| size | engine | median ms per image (batch 1) | × PyTorch eager |", "|---:|---|---:|---:|"]
    for size, by_engine in timings.items():
        eager = by_engine["PyTorch eager"]
        rows += [f"| {size} px | {name}{f' ({variant})' if 'int8' in name else ''} | {1000 * s:.1f} | "
                 f"{s / eager:.2f} |" for name, s in by_engine.items()]
    return rows


def report(args, meta, sets: dict, held, results: dict, timings: dict, seconds: float) -> list[str]:
    command = " ".join(["python benchmarks/int8_gate.py", *sys.argv[1:]]) if sys.argv[1:] else "(called from code)"
    t = meta.training
    lines = ["# int8 quality gate", "", f"Command: `{command}`", "",
             f"Checkpoint: {meta.arch} at {meta.image_size} px, {t.get('data', '')}; validation mean AUROC at "
             f"training {t.get('val_mean_auroc'):.4f}. Sets: "
             + ", ".join(f"{name} {int(mask.sum())} images" for name, mask in sets.items())
             + f" ({'--external' if args.external else 'every image of --data-dir outside the training split'}). "
             f"Calibration images from the training split (export.py's seeded sample). Bootstrap: {args.bootstrap} "
             f"patient replicates. Export, {len(results)} quantizations and scoring {seconds:.0f} s.", "",
             f"Gate on the held-out set: every label with both classes |ΔAUROC| <= {AUROC_TOL}, calls agree on >= "
             f"{100 * AGREEMENT:.0f} % of label-images (raw and product), every label's map correlation >= {MAP_CORR}."]
    for set_name in sets:
        lines += ["", f"## {set_name}", "", *_criteria_rows(results, set_name)]
    for name in dict.fromkeys(["minmax", args.speed_variant]):
        if name in results:
            lines += ["", f"## Per label, held-out set, {name}", "",
                      *_label_rows(results[name][0]["held-out"], meta.labels)]
    try:
        import openvino
        anchor = f"OpenVINO {openvino.__version__} CPU plugin"
    except ImportError:
        anchor = "OpenVINO not importable, so not measured"
    lines += ["", f"## Speed ({args.threads} threads per engine, {args.repeats} runs each in alternating blocks, "
              f"median; {anchor})", "",
              *_speed_rows(timings, args.speed_variant)]
    return lines


def main(args: argparse.Namespace) -> dict:
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise SystemExit(f"--variants: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    model, meta, _ = load_checkpoint(args.checkpoint)
    held, sets, _ = evaluation_sets(meta, args.data_dir, args.external)
    transform = build_transform(meta)
    inputs = torch.stack([transform(read_xray(p)) for p in held["path"]])
    # The product's calls need images only to carry them in each Prediction: the model inputs stand in for them,
    # so a few hundred full-size radiographs are not held in memory.
    images = [a[0].numpy() for a in inputs]
    y, patients = targets(held, meta.labels), held["patient"].to_numpy()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "model.onnx"
        if export.main(export.get_args_parser().parse_args(["--checkpoint", args.checkpoint, "--out", str(fp32)])):
            raise SystemExit("the fp32 export failed")
        ref = Scored(fp32, inputs, images)
        results = {}
        for name in names:
            options, count = VARIANTS[name]
            paths, description = export.calibration_paths(Path(args.data_dir), meta, count, 0)
            path = tmp / f"{name}.int8.onnx"
            quantize_int8(fp32, path, export.calibration_batches(paths, meta, 16, []), **options)
            q = Scored(path, inputs, images)
            results[name] = ({s: judge(y, patients, ref, q, mask, args.bootstrap) for s, mask in sets.items()},
                             description, path)
            print(name, "held-out:", verdict(results[name][0]["held-out"]), flush=True)
        seconds = time.perf_counter() - start
        passing = [n for n in names if verdict(results[n][0]["held-out"])[0]]
        args.speed_variant = passing[0] if passing else names[0]
        calibration, _ = export.calibration_paths(Path(args.data_dir), meta, 8, 0)
        timings = {size: speed(model, meta, fp32, results[args.speed_variant][2], args, size, calibration, tmp)
                   for size in dict.fromkeys([meta.image_size, args.speed_size])}
    lines = report(args, meta, sets, held, results, timings, seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"passing": passing, "results": results, "timings": timings}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
