"""Adapting to a shifted site, on real data: a model trained on PA views adapted to AP views, patient-wise.

From the shared NIH sample (labels.csv "View Position"): the base model is trained (Model_Training/train.py) on the
PA images of the patients who have no AP image; the "clinic" is every AP image (other patients, or the AP studies
of patients whose PA images the base never saw). Model_Training/adapt.py then runs in both modes on the AP data
(NIH labels, so all 14 labels are informed) and the before/after figures on the AP held-out part are written, with
each mode's wall time on this machine, to --out.

    python benchmarks/bench_adapt.py [--epochs 6] [--image-size 64] [--out benchmarks/results/adapt.md]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Model_Training import adapt, train  # noqa: E402

NIH = ROOT.parent / "shared" / "data" / "nih"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--nih-dir", default=str(NIH), help="the shared NIH sample (default: %(default)s)")
    add("--image-size", type=int, default=64, help="input size of the base model (default: %(default)s)")
    add("--epochs", type=int, default=6, help="base training epochs (default: %(default)s)")
    add("--finetune-epochs", type=int, default=8, help="adapt.py --epochs (default: %(default)s)")
    add("--bootstrap", type=int, default=500, help="bootstrap replicates (default: %(default)s)")
    add("--work-dir", default=None, help="keep the data, checkpoints and reports here (default: a temporary folder)")
    add("--out", default=str(ROOT / "benchmarks" / "results" / "adapt.md"), help="markdown file for the figures "
        "(default: %(default)s)")
    return parser


def subset_folder(nih: Path, rows: pd.DataFrame, header: str, lines: dict, folder: Path) -> Path:
    """A data folder: labels.csv with `rows`' lines, links to their image files (the largest copy present)."""
    folder.mkdir(parents=True)
    (folder / "labels.csv").write_text("\n".join([header] + [lines[name] for name in rows["Image Index"]]) + "\n")
    for name in rows["Image Index"]:
        for sub in ("images_256", "images", "images_64"):
            if (nih / sub / name).is_file():
                (folder / name).symlink_to(nih / sub / name)
                break
    return folder


def fmt_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def main(args: argparse.Namespace) -> int:
    nih = Path(args.nih_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-adapt-"))
    work.mkdir(parents=True, exist_ok=True)
    text = (nih / "labels.csv").read_text().splitlines()
    header, lines = text[0], {line.split(",")[0]: line for line in text[1:]}
    df = pd.read_csv(nih / "labels.csv", index_col=False)
    ap_patients = set(df.loc[df["View Position"] == "AP", "Patient ID"])
    base_rows = df[(df["View Position"] == "PA") & ~df["Patient ID"].isin(ap_patients)]
    local_rows = df[df["View Position"] == "AP"]
    base_dir = subset_folder(nih, base_rows, header, lines, work / "pa")
    local_dir = subset_folder(nih, local_rows, header, lines, work / "ap")
    base = work / "base_pa.pth"
    start = time.perf_counter()
    rc = train.main(train.get_args_parser().parse_args([
        "--data-dir", str(base_dir), "--arch", "resnet18", "--image-size", str(args.image_size), "--epochs",
        str(args.epochs), "--no-pretrained", "--device", "cpu", "--batch-size", "32", "--workers", "0",
        "--no-progress", "--output", str(base), "--run-dir", str(work / "run"), "--lr", "3e-4"]))
    if rc:
        return rc
    train_seconds = time.perf_counter() - start
    results = {}
    for mode, extra in (("recalibrate", []), ("finetune", ["--trainable", "last-block", "--epochs",
                                                           str(args.finetune_epochs), "--lr", "3e-4"])):
        out = work / f"{mode}.pth"
        out.unlink(missing_ok=True)
        shutil.rmtree(work / f"{mode}-report", ignore_errors=True)  # a rerun is a new fine-tune, not a resume
        start = time.perf_counter()
        code = adapt.main(adapt.get_args_parser().parse_args([
            "--checkpoint", str(base), "--data-dir", str(local_dir), "--labels", str(local_dir / "labels.csv"),
            "--mode", mode, "--output", str(out), "--report-dir", str(work / f"{mode}-report"), "--bootstrap",
            str(args.bootstrap), "--device", "cpu", "--no-progress", "--test-fraction", "0.4",
            "--calibration-fraction", "0.3", "--val-fraction", "0.1", *extra]))
        if code:
            return code
        summary = json.loads((work / f"{mode}-report" / "metrics.json").read_text())
        results[mode] = {"seconds_total": time.perf_counter() - start,
                         "seconds_adapt": summary["adaptation"]["seconds"], "summary": summary}
    lines_md = [f"Base: ResNet-18 at {args.image_size} px, {args.epochs} epochs from random initialisation on "
                f"{len(base_rows)} PA images of {base_rows['Patient ID'].nunique()} patients with no AP image "
                f"({train_seconds:.0f} s). Local site: {len(local_rows)} AP images of "
                f"{local_rows['Patient ID'].nunique()} patients (NIH labels, all 14 informed), split patient-wise "
                "40% held out / 30% calibration / 10% val / 20% train.", ""]
    first = results["recalibrate"]["summary"]
    counts = first["adaptation"]["local"]["test"]
    lines_md += [f"Held-out AP part: {counts['images']} images of {counts['patients']} patients; positives: "
                 + ", ".join(f"{k} {v}" for k, v in counts["positives"].items() if v), ""]
    lines_md += ["| mode | time here | mean AUROC before | mean AUROC after | mean ECE before → after (checked "
                 "labels) | verdict |", "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        s = r["summary"]
        verdict = s["promotion"]
        lines_md.append(
            f"| {mode} | {r['seconds_adapt']:.0f} s adapt + {r['seconds_total'] - r['seconds_adapt']:.0f} s report "
            f"| {fmt_ci(s['before']['mean_auroc'], s['before']['mean_auroc_ci'])} "
            f"| {fmt_ci(s['after']['mean_auroc'], s['after']['mean_auroc_ci'])} "
            f"| {fmt_ci(verdict['mean_ece']['before'], None)} → {fmt_ci(verdict['mean_ece']['after'], None)} "
            f"| {'recommended' if verdict['recommended'] else 'not recommended: ' + '; '.join(verdict['reasons'])} |")
    lines_md += ["", "Per label on the held-out part (labels with at least 5 held-out positive images; AUROC "
                 "difference after − before with its paired patient-bootstrap 95% CI; ECE with its CI):", "",
                 "| mode | label | AUROC before | AUROC after | difference | ECE before | ECE after |",
                 "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        s = r["summary"]
        for name in s["promotion"]["labels_checked"]:
            c = s["comparison"][name]
            eb, ea = (s[side]["calibration"]["per_label"][name] for side in ("before", "after"))
            lines_md.append(f"| {mode} | {name} | {fmt_ci(c['before'], None)} | {fmt_ci(c['after'], None)} "
                            f"| {fmt_ci(c['difference'], c['ci'])} | {fmt_ci(eb['ece'], eb.get('ece_ci'))} "
                            f"| {fmt_ci(ea['ece'], ea.get('ece_ci'))} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines_md) + "\n")
    print("\n".join(lines_md))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
