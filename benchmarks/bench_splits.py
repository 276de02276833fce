"""One checkpoint scored on the split that chose its epoch (validation), the split that fitted its trust data
(calibration) and, optionally, a patient-disjoint external folder: side by side, the figures a user should compare
before trusting validation numbers.

    python benchmarks/bench_splits.py --checkpoint CKPT --data-dir samples/nih [--external DIR]
        [--work eval/splits] [--out benchmarks/results/splits.md]

Each column is one run of Model_Training/test.py (validation and calibration with --in-sample, since both fitted the
checkpoint; the external folder with --external and --train-data-dir for the metadata baseline). The table reads
their metrics.json: mean AUROC with its CI, ECE, the share of label-image pairs the product calls positive (its
decision) against the share the raw thresholds would call and the prevalence, scope acceptance, and the metadata-only
baseline (age, sex, view position) beside the model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import write_report

ROOT = Path(__file__).resolve().parents[1]


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f} (CI not estimable)"


def evaluate(checkpoint: str, data_dir: str, out: Path, *extra: str) -> dict:
    """Run test.py once -> its metrics.json (raises with test.py's output when it fails)."""
    cmd = [sys.executable, str(ROOT / "Model_Training" / "test.py"), "--checkpoint", checkpoint, "--data-dir",
           data_dir, "--out", str(out), "--no-progress", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads((out / "metrics.json").read_text())


def column(m: dict) -> dict[str, str]:
    """The figures of one metrics.json, formatted."""
    labels, n = m["labels"], m["n_images"]
    pairs = n * len(labels)
    called = sum(m["decision"][name]["all"]["calls"]["positive"] for name in labels)
    raw = sum(m["per_label"][name]["tp"] + m["per_label"][name]["fp"] for name in labels)
    positives = sum(m["per_label"][name]["positives"] for name in labels)
    eces = [v["ece"] for v in m["calibration"]["per_label"].values() if v.get("ece") is not None]
    meta = m["baselines"]["metadata"]
    scope = m["scope"]
    return {
        "images (patients)": f"{n} ({m['n_patients']})",
        "in-sample": "yes" if m["run"]["in_sample"] else "no",
        "mean AUROC [95 % CI] (labels)": f"{_ci(m['mean_auroc'], m['mean_auroc_ci'])} ({m['mean_auroc_labels']})",
        "ECE, pooled (mean per label)": f"{m['calibration']['ece']:.3f} ({sum(eces) / max(len(eces), 1):.3f})",
        "called positive: product's calls": f"{called}/{pairs} ({100 * called / pairs:.1f} %)",
        "called positive: raw thresholds": f"{raw}/{pairs} ({100 * raw / pairs:.1f} %)",
        "prevalence (positive label-image pairs)": f"{positives}/{pairs} ({100 * positives / pairs:.1f} %)",
        "labels validated for calls": f"{sum(bool(m['decision'][name]['validated']) for name in labels)}/"
                                      f"{len(labels)}",
        "in-scope acceptance": (f"{scope['accepted']}/{scope['total']}" if scope.get("available") else "n/a"),
        "metadata baseline mean AUROC [95 % CI]": (_ci(meta.get("mean_auroc"), meta.get("mean_auroc_ci"))
                                                   if meta.get("available") else "not available"),
        "model beats the metadata baseline": ({True: "yes", False: "no"}.get(meta.get("model_beats"), "n/a")
                                              if meta.get("available") else "n/a"),
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint with a calibration split (train.py's)")
    parser.add_argument("--data-dir", required=True, help="the folder it was trained on")
    parser.add_argument("--external", default=None, help="a labelled folder disjoint from its patients (optional)")
    parser.add_argument("--work", default=str(ROOT / "eval" / "splits"), help="test.py output folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "splits.md"), help="markdown table")
    return parser


def main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    columns = {
        "validation (chose the epoch)": evaluate(args.checkpoint, args.data_dir, work / "val", "--split", "val",
                                                 "--in-sample"),
        "calibration (fitted the trust data)": evaluate(args.checkpoint, args.data_dir, work / "calibration",
                                                        "--split", "calibration", "--in-sample"),
    }
    if args.external:
        columns["external (patient-disjoint)"] = evaluate(args.checkpoint, args.external, work / "external",
                                                          "--external", "--train-data-dir", args.data_dir)
    rows = {name: column(m) for name, m in columns.items()}
    figures = list(next(iter(rows.values())))
    lines = ["| figure | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {fig} | " + " | ".join(rows[name][fig] for name in rows) + " |" for fig in figures]
    first = next(iter(columns.values()))["run"]
    lines += ["", f"Checkpoint {args.checkpoint} ({first['arch']}, {first['image_size']} px), trained on "
                  f"{args.data_dir}; figures from Model_Training/test.py's metrics.json in {work}."]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
