"""Does the monitor catch drift? Streams replayed through the results store (SQLite) and the monitor's alert rule.

    python benchmarks/bench_drift.py [--checkpoint CKPT --train-data DIR] [--window 200] [--out ...]

With --checkpoint and --train-data (the folder it was trained on, a labels CSV of some of the shared NIH sample's
patients), the reference is the one the checkpoint carries (train.py / fit_trust.py fit it on its calibration split:
calibrated probabilities, the mean label rank, thresholds and called-positive rates, scope score, brightness,
contrast), and the stream is the shared sample's images of the patients that are not in --train-data. Without them the
reference is fitted (chestxray.monitor.fit_reference) on half of the shared sample's patients and the other half is
streamed. The held-out images in random order (made into a long stream, no image repeated within a window where the
pool allows) are the in-distribution stream: every alert onset there is a false alert. Each shifted stream starts with
one full window of in-distribution images, then switches to: other-cxr images (repeated: the folder holds few),
contrast-reduced, gamma-shifted, inverted and lower-resolution copies of the held-out images, and a different
prevalence (only images with a finding; only images without). Detection delay = shifted images recorded until the
alert first fires. The monitor checks at every --step-th answered analysis (chestxray.monitor.checked_drift, as the
app's Monitor.status does), so its state is read at each check and held in between; a shift that starts just after a
check waits longer than one that starts just before, so each shifted stream is replayed with the shift starting at
--phases points spread over one step, and the longest delay is the one reported.
Write throughput: analyses recorded per second by SQLite and by a PostgreSQL started here (tests/support/store.py),
one transaction per analysis as the app does, beside the model's own rate on the same machine in the same run.
Without --checkpoint a random-initialised ResNet-18 at 128 px is used (no trained model ships with the repository):
its outputs still depend on the input, so input shifts move them, but a prevalence shift cannot: a prevalence shift
shows in the outputs only as far as the model tells findings apart. BENCHMARKS.md's model was made with:

    python - <<'EOF'   # held out: 1 of 4 patient folds stratified by view x any finding; the rest into DIR
    import shutil, numpy as np, pandas as pd; from pathlib import Path
    from sklearn.model_selection import StratifiedGroupKFold
    S, out = Path("../shared/data/nih"), Path("DIR"); labels = pd.read_csv(S / "labels.csv").set_index("Image Index")
    files = sorted([*(S / "images_64").glob("*.png"), *(S / "images_256").glob("*.png")])
    rows = labels.loc[[f.name for f in files]]
    strata = rows["View Position"] + "|" + (rows["Finding Labels"] != "No Finding").astype(str)
    _, held = next(StratifiedGroupKFold(4, shuffle=True, random_state=0).split(np.zeros(len(files)), strata,
                                                                               rows["Patient ID"]))
    keep = {f.name for i, f in enumerate(files) if i not in set(held)}
    (out / "images").mkdir(parents=True)
    [shutil.copyfile(f, out / "images" / f.name) for f in files if f.name in keep]
    lines = (S / "labels.csv").read_text().splitlines(keepends=True)
    (out / "labels.csv").write_text(lines[0] + "".join(r for r in lines[1:] if r.split(",", 1)[0] in keep))
    EOF
    nice python Model_Training/train.py --data-dir DIR --output m.pth --run-dir RUN --arch resnet18 \
        --image-size 128 --epochs 12 --batch-size 16 --lr 0.0003 --no-pretrained --device cpu --val-fraction 0.1 \
        --calibration-fraction 0.4 --stratify-split --orientation-images 0 --seed 0 --workers 1 --cache-dir CACHE \
        --no-progress
    python Model_Training/fit_trust.py --checkpoint m.pth --data-dir DIR --out model.pth \
        --orientation-images 0 --n-boot 200
    python benchmarks/bench_drift.py --checkpoint model.pth --train-data DIR \
        --out benchmarks/results/drift-stratified.md

The held-out pool is one of four patient-disjoint folds of scikit-learn's StratifiedGroupKFold on view position x any
finding (198 images of 86 patients; DIR: 589 images of 264 patients), and train.py --stratify-split assigns DIR's
patients to train / validation / calibration the same way, so the calibration split (the monitor's reference) and
the held-out pool are two samples of one population with the same view mix and finding share (the report lists both,
with Fisher's exact p). The recipe is otherwise the one chosen in a9d1f6e as the best of six runs by validation AUROC
(lr 3e-4, 128 px, 12 epochs, the epoch kept by validation AUROC); nothing was chosen on the held-out stream. Before,
the held-out patients were the last quarter of the sorted patients shuffled with numpy.random.default_rng(0) and the
split was train.py's plain one: the held-out pool had 10% AP views against the calibration split's 23% (Fisher p
0.0005). Every stream is drawn so that no image comes back within a window where its pool holds a window's worth
(spaced_order); a smaller pool (the held-out pool of 198 against a window of 200) is cycled in one random order, so a
window repeats only window - pool images: the monitor's tests take a window's images as independent draws.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.checkpoints, support.store

SHARED = ROOT.parent / "shared" / "data"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model to replay (default: random ResNet-18, 128 px)")
    parser.add_argument("--train-data", default=None,
                        help="folder whose labels CSV lists the images --checkpoint was trained and calibrated on: "
                             "its patients are left out of the streams, and the checkpoint's own reference is used "
                             "(default: none; the reference is fitted on half the patients)")
    from chestxray.monitor import AlertLimits

    parser.add_argument("--window", type=int, default=AlertLimits.window, help="drift window (default: %(default)s)")
    parser.add_argument("--psi", type=float, default=AlertLimits.psi,
                        help="PSI alert limit, beyond chance (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=AlertLimits.alpha,
                        help="family-wise false-alert probability per check (default: %(default)s)")
    parser.add_argument("--step", type=int, default=None,
                        help="check at every STEP-th answered analysis (default: the monitor's, window / 8)")
    parser.add_argument("--consecutive", type=int, default=AlertLimits.consecutive,
                        help="checks in a row at which a quantity must alert (default: %(default)s)")
    parser.add_argument("--phases", type=int, default=5,
                        help="shift starts tried per shifted stream, spread over one step (default: %(default)s)")
    parser.add_argument("--in-distribution", type=int, default=2000,
                        help="length of the in-distribution stream (default: %(default)s)")
    parser.add_argument("--max-delay", type=int, default=400,
                        help="shifted images replayed before giving up (default: %(default)s)")
    parser.add_argument("--writes", type=int, default=500, help="analyses per throughput run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drift.md"),
                        help="markdown file for the figures (default: %(default)s)")
    return parser


def load_gray(path: Path) -> np.ndarray:
    from chestxray.imaging import read_xray

    return read_xray(path.read_bytes())


def shifts(images: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    def lowres(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        small = Image.fromarray((x * 255).astype(np.uint8)).resize((max(8, w // 8), max(8, h // 8)),
                                                                   Image.Resampling.BILINEAR)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255

    return {"contrast x0.6": [0.5 + 0.6 * (x - 0.5) for x in images],
            "gamma 0.6": [np.power(x, 0.6) for x in images],
            "inverted": [1.0 - x for x in images],
            "lower resolution (1/8, upsampled)": [lowres(x) for x in images]}


def spaced_order(n_pool: int, n: int, spacing: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) indices into a pool of n_pool, each drawn at random among those not drawn in the last spacing - 1 draws
    (1 <= spacing <= n_pool): with spacing = min(window, pool) no window repeats an image when the pool holds a
    window's worth, and a smaller pool repeats only window - pool per window (its first order, then cycled)."""
    recent: list[int] = []
    order = np.empty(n, dtype=np.int64)
    for k in range(n):
        free = np.setdiff1d(np.arange(n_pool), recent[max(0, k - spacing + 1):k])
        order[k] = rng.choice(free)
        recent.append(int(order[k]))
    return order


def record_now(store, entry: dict) -> None:
    """Record a replayed entry as analysed now: the window is the newest analyses by time."""
    from datetime import UTC, datetime

    store.record({**entry, "created": datetime.now(UTC)})


def replay(store, monitor_fn, entries: list[dict], step: int) -> list[bool]:
    """Record each entry; the alert state after each one, read at every check (every step-th analysis: the state
    cannot change in between) and held until the next."""
    states, state = [], False
    for entry in entries:
        record_now(store, entry)
        if store.answered_count() % step == 0:
            state = monitor_fn()
        states.append(state)
    return states


def first_alert(store, before: list[dict], shifted: list[dict], step: int, evaluate) -> int | None:
    """Record `before`, then the shifted entries until the check (every step-th analysis) alerts: how many shifted
    entries that took, None if it never did."""
    for entry in before:
        record_now(store, entry)
    for i, entry in enumerate(shifted, start=1):
        record_now(store, entry)
        if store.answered_count() % step == 0 and evaluate(store):
            return i
    return None


def main(args: argparse.Namespace) -> int:
    import torch
    from support.checkpoints import make_checkpoint

    from chestxray.monitor import AlertLimits, check_span, checked_drift, quantities
    from chestxray.predictor import Predictor
    from chestxray.store import AnalysisStore, ModelVersion, answered_entry

    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    checkpoint = args.checkpoint or make_checkpoint(tmp / "random128.pth", image_size=128)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    import pandas as pd

    labels = pd.read_csv(SHARED / "nih" / "labels.csv")
    files = sorted([*(SHARED / "nih" / "images_64").glob("*.png"), *(SHARED / "nih" / "images_256").glob("*.png")])
    patient = dict(zip(labels["Image Index"], labels["Patient ID"]))
    finding = dict(zip(labels["Image Index"], labels["Finding Labels"] != "No Finding"))
    patients = sorted({patient[f.name] for f in files})
    rng.shuffle(patients)
    own = getattr(predictor.trust, "reference", None) if args.train_data else None
    ref_patients = trained_patients(args.train_data) if args.train_data else set(patients[: len(patients) // 2])
    ref_files = [f for f in files if patient[f.name] in ref_patients]
    held_files = [f for f in files if patient[f.name] not in ref_patients]
    print(f"reference patients' images {len(ref_files)}, held out {len(held_files)}", flush=True)

    def predict(images: list[np.ndarray]) -> list:
        out = []
        for i in range(0, len(images), 32):
            out += predictor.predict_batch(images[i:i + 32], heatmaps=False)
        return out

    # The checkpoint's own calibration split, as the app compares with; else fitted here on the reference half.
    reference = own if own is not None else fitted_reference(predictor, [load_gray(f) for f in ref_files], predict)
    limits = AlertLimits(window=args.window, psi=args.psi, alpha=args.alpha, step=args.step,
                         consecutive=args.consecutive)
    model = ModelVersion("bench", "bench", "torch")

    def as_entries(preds: list) -> list[dict]:
        return [answered_entry(p, source="replay", latency_s=0.0, model=model) for p in preds]

    def entries(images: list[np.ndarray]) -> list[dict]:
        return as_entries(predict(images))

    held_images = [load_gray(f) for f in held_files]
    held_preds = predict(held_images)
    held_entries = as_entries(held_preds)
    mix = composition(args, predictor, reference, labels, held_files, held_preds) if own is not None else []
    print("\n".join(mix), flush=True)

    def stream(pool: list[dict], n: int) -> list[dict]:
        """n of the pool in random order, no image again within a window where the pool allows (spaced_order):
        repeats within a window are not independent draws, and the monitor's tests assume independent images."""
        return [pool[i] for i in spaced_order(len(pool), n, min(limits.window, len(pool)), rng)]

    def alerting_quantities(store) -> list[str]:
        """The monitor's verdict as the app computes it (Monitor.status) at the newest check."""
        answered = store.answered_count()
        rows, _ = checked_drift(reference, store.columns(last=check_span(answered, limits)), answered, limits)
        return [row.quantity for row in rows if row.alert]

    def evaluate(store) -> bool:
        return bool(alerting_quantities(store))

    # In-distribution: false alert onsets per 1,000 analyses recorded once the window is full.
    store = AnalysisStore(f"sqlite:///{tmp / 'indist.sqlite3'}")
    states = replay(store, lambda: evaluate(store), stream(held_entries, args.in_distribution), limits.step)
    evaluated = states[limits.window - 1:]
    onsets = sum(1 for a, b in zip([False, *evaluated], evaluated) if b and not a)
    alerting = float(np.mean(evaluated))
    n_checks = len(range(limits.window, args.in_distribution + 1, limits.step))
    print(f"in-distribution: {onsets} alert onsets over {len(evaluated)} analyses ({n_checks} checks)", flush=True)

    other = sorted(p for p in (SHARED / "other-cxr").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    other_images = []
    for p in other:
        try:
            other_images.append(load_gray(p))
        except Exception:
            continue
    shifted = {"other-cxr images": entries(other_images), **{k: entries(v) for k, v in shifts(held_images).items()},
               "prevalence (findings only)": [e for e, f in zip(held_entries, held_files) if finding[f.name]],
               "prevalence (no finding only)": [e for e, f in zip(held_entries, held_files) if not finding[f.name]]}
    # The shift starts after one full window plus `offset` analyses: offset 0 is right after a check.
    offsets = sorted({round(i * limits.step / args.phases) for i in range(args.phases)})
    delays = {}
    for name, pool in shifted.items():
        found = []
        for offset in offsets:
            store = AnalysisStore(f"sqlite:///{tmp / f'{abs(hash(name))}-{offset}.sqlite3'}")
            delay = first_alert(store, stream(held_entries, limits.window + offset), stream(pool, args.max_delay),
                                limits.step, evaluate)
            found.append((delay, alerting_quantities(store) if delay else []))
        worst = None if any(d is None for d, _ in found) else max(d for d, _ in found)
        which = sorted({q for _, qs in found for q in qs})
        delays[name] = (worst, len(pool), which, [d for d, _ in found])
        print(f"{name}: delays {delays[name][3]} {which}", flush=True)

    rates = write_rates(stream(held_entries, args.writes), predictor, tmp)

    where, model_text = describe(args, predictor, reference, own is not None, checkpoint, len(ref_files),
                                 len(ref_patients), len(held_files))
    lines = ["# Drift detection and store throughput (benchmarks/bench_drift.py)", "",
             f"{where}, drawn into a stream of {args.in_distribution} with no image again within a window where "
             f"the pool allows (a pool smaller than the window cycles in one random order). Window {limits.window}, "
             f"checked at every {limits.step}th analysis, alert at {limits.consecutive} check(s) in a row, PSI limit "
             f"{limits.psi} beyond chance, alpha {limits.alpha} (Bonferroni over {len(quantities(reference))} "
             f"quantities), seed {args.seed}. Model: {model_text}.", "",
             f"Detection delay: the longest over {len(offsets)} shift starts (after one full window plus "
             f"{', '.join(map(str, offsets))} analyses; 0 = just after a check).", "",
             "| stream | images in pool | detection delay (images), longest | per shift start | alerting quantities |",
             "|---|---|---|---|---|"]
    for name, (delay, pool, which, each) in delays.items():
        lines.append(f"| {name} | {pool} | {delay if delay is not None else f'not within {args.max_delay}'} | "
                     f"{', '.join(str(d) if d is not None else '-' for d in each)} | {', '.join(which) or '-'} |")
    lines += ["", f"In-distribution: {onsets} alert onsets over {len(evaluated)} analyses ({n_checks} checks) = "
              f"**{1000 * onsets / len(evaluated):.2f} false alerts per 1,000 images** "
              f"(alerting {100 * alerting:.1f}% of the time).", "", *mix,
              "| writer | analyses / s | ratio to the model |", "|---|---|---|"]
    model_rate = list(rates.values())[-1]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:.0f} | {rate / model_rate:.1f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    plot(delays, args.max_delay, Path(args.out).with_suffix(".png"))
    print("\n".join(lines))
    return 0


def trained_patients(folder: str) -> set:
    """The patients of the labels CSV in `folder` (what the checkpoint was trained and calibrated on)."""
    from chestxray.data import find_data_entry, read_data_entry

    return set(read_data_entry(find_data_entry(folder))["patient"].astype(int))


def composition(args, predictor, reference, labels, held_files: list[Path], held_preds: list) -> list[str]:
    """The report's lines on what the in-distribution stream is: view mix and finding share of the checkpoint's
    calibration split (rebuilt from its recorded split of --train-data) against the held-out pool, with Fisher's
    exact p, and how well the pool's mean label rank tells images with a finding from those without (AUROC)."""
    import warnings

    from scipy.stats import fisher_exact
    from sklearn.metrics import roc_auc_score

    from chestxray.data import load_index, rebuild_splits
    from chestxray.labels import NO_FINDING
    from chestxray.monitor import mean_label_rank, probability_key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bundled official lists standing in: training said so already
        calibration = rebuild_splits(predictor.meta, load_index(args.train_data), args.train_data)["calibration"]
    rows = labels.set_index("Image Index").loc[[f.name for f in held_files]]
    held = {"AP views": (rows["View Position"] == "AP").to_numpy(),
            "with a finding": (rows["Finding Labels"] != NO_FINDING).to_numpy()}
    calib = {"AP views": (calibration["view"] == "AP").to_numpy(),
             "with a finding": (calibration["findings"] != NO_FINDING).to_numpy()}
    how = "stratified" if predictor.meta.split and predictor.meta.split.stratify else "by each patient's own draw"
    lines = [f"What the in-distribution stream is: the checkpoint's calibration split ({len(calibration)} images; "
             f"split {how}) against the held-out "
             f"pool ({len(held_files)} images):", "",
             "| share | calibration split | held-out pool | Fisher's exact p |", "|---|---|---|---|"]
    for name in held:
        a, b = calib[name], held[name]
        p = fisher_exact([[a.sum(), (~a).sum()], [b.sum(), (~b).sum()]]).pvalue
        lines.append(f"| {name} | {100 * a.mean():.1f}% ({a.sum()}) | {100 * b.mean():.1f}% ({b.sum()}) | {p:.2g} |")
    probs = np.array([[p.probabilities[n] for n in predictor.labels] for p in held_preds])
    rank = mean_label_rank(probs, [reference.samples[probability_key(n)] for n in predictor.labels])
    auroc = roc_auc_score(held["with a finding"], rank)
    return lines + ["", f"On the held-out pool the mean label rank tells images with a finding from those without "
                        f"with AUROC {auroc:.2f} (0.5 = not at all): a prevalence shift moves it only that far.", ""]


def fitted_reference(predictor, images: list[np.ndarray], predict):
    """A reference fitted on `images` (probabilities, brightness, contrast, scope score when the model has one)."""
    from chestxray.monitor import fit_reference

    preds = predict(images)
    probs = np.array([[p.probabilities[n] for n in predictor.labels] for p in preds])
    reference = fit_reference(probs, predictor.labels)
    stats = np.array([p.input_stats for p in preds])
    reference.samples["brightness"], reference.samples["contrast"] = np.sort(stats[:, 0]), np.sort(stats[:, 1])
    if preds[0].scope_score is not None:
        reference.samples["scope_score"] = np.sort([p.scope_score for p in preds])
    return reference


def describe(args, predictor, reference, own: bool, checkpoint, n_ref: int, n_ref_patients: int,
             n_held: int) -> tuple[str, str]:
    """The report's sentences on the reference and the model."""
    if own:
        val = predictor.meta.training.get("val_auroc") or {}
        aurocs = [v for v in val.values() if v is not None and np.isfinite(v)]
        where = (f"Reference: the checkpoint's own, its {reference.split} split ({reference.n_images} images; the "
                 f"model was trained and calibrated on {n_ref} images of {n_ref_patients} patients); "
                 f"in-distribution stream: the {n_held} images of the other patients")
        model_text = (f"{Path(checkpoint).name} ({predictor.meta.arch} {predictor.meta.image_size} px trained on "
                      f"the sample, validation mean AUROC {np.mean(aurocs):.2f} over {len(aurocs)} labels)")
        return where, model_text
    where = (f"Reference: {n_ref} images of half the shared NIH sample's patients; in-distribution stream: "
             f"{n_held} held-out images of the other half")
    return where, "random-initialised ResNet-18, 128 px" if not args.checkpoint else str(checkpoint)


def write_rates(write: list[dict], predictor, tmp: Path) -> dict[str, float]:
    """Analyses per second recorded by SQLite and by a PostgreSQL started here, one transaction per analysis as the
    app records them, and the model's own rate, in the same run."""
    from support.store import create_database, postgres_server

    from chestxray.store import AnalysisStore

    rates = {}
    sqlite_store = AnalysisStore(f"sqlite:///{tmp / 'writes.sqlite3'}")
    start = time.perf_counter()
    for e in write:
        record_now(sqlite_store, e)
    rates["SQLite (file, WAL)"] = len(write) / (time.perf_counter() - start)
    with postgres_server() as server:
        pg = AnalysisStore(create_database(server))
        start = time.perf_counter()
        for e in write:
            record_now(pg, e)
        rates["PostgreSQL (local, TCP)"] = len(write) / (time.perf_counter() - start)
        pg.dispose()
    sample = (SHARED / "nih" / "images").glob("*.png").__next__().read_bytes()
    predictor.predict(sample)
    n_model = 10
    start = time.perf_counter()
    for _ in range(n_model):
        predictor.predict(sample)
    rates[f"the model itself ({predictor.meta.arch} {predictor.meta.image_size} px, 1024 px PNG, 2 threads)"] = \
        n_model / (time.perf_counter() - start)

    return rates


def plot(delays: dict, cap: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.add_subplot()
    names = list(delays)
    values = [d if d is not None else cap for d, *_ in delays.values()]
    bars = ax.barh(names, values, color=["#1f5fbf" if d is not None else "#b91c1c" for d, *_ in delays.values()])
    ax.axvline(200, color="grey", ls="--", label="goal: 200 images")
    ax.set_xlabel("shifted images until the alert, longest over shift starts (red: none)", fontsize=9)
    ax.legend(fontsize=8)
    ax.bar_label(bars, labels=[str(d) if d is not None else "none" for d, *_ in delays.values()], fontsize=8)
    FigureCanvasAgg(fig).print_png(str(path))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
