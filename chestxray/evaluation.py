"""Evaluating a checkpoint on labelled images through the app's own predictor: the predictions frame (one row per
image: probabilities, labels, calls, in-scope answers), the metrics computed from it, and the files written
(metrics.json, per_label.csv, plots, report.md). Model_Training/test.py and Model_Training/adapt.py both use it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from chestxray.data import DataError, XrayDataset, collate_batch
from chestxray.decisions import calibration_errors, decision_report, not_validated, scope_report
from chestxray.fileio import write_json
from chestxray.meta import Meta
from chestxray.metrics import auroc_summary, evaluate_predictions
from chestxray.predictor import Predictor
from chestxray.reporting.metrics_report import per_label_frame, write_plots, write_report

SUBGROUPS = (("view", "PA"), ("view", "AP"), ("sex", "F"), ("sex", "M"))
PREDICTION_COLUMNS = ("image", "patient", "view", "sex", "age")


def predictions_frame(rows: pd.DataFrame, labels, y_true: np.ndarray, y_prob: np.ndarray,
                      calls: np.ndarray | None = None) -> pd.DataFrame:
    """predictions.csv content: image, patient, view, sex, age, then <label>_prob and <label>_true per label, and
    <label>_call (the product's call word) when calls (N, L) are given."""
    out = rows[[c for c in PREDICTION_COLUMNS if c in rows.columns]].reset_index(drop=True).copy()
    for j, name in enumerate(labels):
        out[f"{name}_prob"] = y_prob[:, j].astype(np.float64)  # written at full precision; metrics read these
        out[f"{name}_true"] = y_true[:, j].astype(int)
        if calls is not None:
            out[f"{name}_call"] = calls[:, j]
    return out


def read_predictions(path: str | os.PathLike, labels) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Read predictions.csv back -> (frame, y_true (N, L), y_prob (N, L)) for recomputing metrics without a model."""
    df = pd.read_csv(path, dtype={"image": str, "view": str, "sex": str, "in_scope": "boolean",
                                  **{f"{name}_call": str for name in labels}})
    y_true = df[[f"{name}_true" for name in labels]].to_numpy(dtype=np.float64)
    y_prob = df[[f"{name}_prob" for name in labels]].to_numpy(dtype=np.float64)
    return df, y_true, y_prob


def frame_arrays(df: pd.DataFrame, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """A predictions frame -> (y_true (N, L), y_prob (N, L), calls (N, L) call words, in_scope (N,) True/False/None)."""
    y_true = df[[f"{name}_true" for name in labels]].to_numpy(dtype=np.float64)
    y_prob = df[[f"{name}_prob" for name in labels]].to_numpy(dtype=np.float64)
    calls = df[[f"{name}_call" for name in labels]].to_numpy(dtype=object)
    in_scope = [None if pd.isna(v) else bool(v) for v in df["in_scope"]]
    return y_true, y_prob, calls, in_scope


def subgroup_masks(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """{"view=PA", "view=AP", "sex=F", "sex=M"} -> boolean masks over df's rows."""
    return {f"{column}={value}": (df[column].astype(str).str.upper() == value).to_numpy()
            for column, value in SUBGROUPS if column in df.columns}


def evaluate_frame(df: pd.DataFrame, labels, thresholds, n_boot: int, seed: int) -> dict:
    """All metrics (metrics.evaluate_predictions) from a predictions frame, subgroups included."""
    y_true = df[[f"{name}_true" for name in labels]].to_numpy(dtype=np.float64)
    y_prob = df[[f"{name}_prob" for name in labels]].to_numpy(dtype=np.float64)
    return evaluate_predictions(y_true, y_prob, labels, thresholds, df["patient"].to_numpy(),
                                subgroups=subgroup_masks(df), n_boot=n_boot, seed=seed)


def _frame_from(predictions: list, rows: pd.DataFrame, labels, y_true: np.ndarray) -> pd.DataFrame:
    y_prob = np.array([[p.probabilities[name] for name in labels] for p in predictions], dtype=np.float64)
    calls = np.array([[p.call(name) for name in labels] for p in predictions], dtype=object)
    frame = predictions_frame(rows, labels, y_true, y_prob, calls)
    for name in labels:
        frame[f"{name}_logit"] = np.array([p.logits[name] for p in predictions], dtype=np.float64)
    frame["in_scope"] = pd.array([p.in_scope for p in predictions], dtype="boolean")
    frame["scope_score"] = np.array([np.nan if p.scope_score is None else p.scope_score for p in predictions])
    return frame


def predict_frame(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 32, workers: int = 0,
                  cache_dir: str | os.PathLike | None = None, amp: bool = False, progress: bool = True,
                  split: str = "selected", log: Callable[[str], object] = print) -> tuple[pd.DataFrame, list]:
    """Every readable image through Predictor.predict_batch (the app's path: calibration, scope, evidence, calls)
    -> (predictions frame, unreadable names); DataError when none can be read (`split` names them).

    <label>_prob is the probability the app shows (calibrated when the checkpoint holds a calibration; its
    thresholds are on that scale), <label>_logit the raw output, <label>_call the app's call; in_scope and
    scope_score the in-scope check (empty without scope statistics). `amp` runs float16 autocast on CUDA only."""
    labels = predictor.labels
    dataset = XrayDataset(rows, labels, predictor.transform, cache_dir, skip_unreadable=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_batch, pin_memory=str(predictor.device).startswith("cuda"))
    amp = amp and str(predictor.device).startswith("cuda")  # "cpu" on ONNX Runtime, whose inputs stay on the CPU
    predictions, y_true, indices = [], [], []
    for images, batch_targets, batch_indices, _ in tqdm(loader, desc="predict", unit="batch", leave=False,
                                                         disable=not progress, dynamic_ncols=True):
        if images.numel() == 0:
            continue
        # The loader's resized input stands in for the decoded image: an evaluation draws no overlay.
        shown = list(images[:, 0].float().div(255).numpy())
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            predictions += predictor.predict_batch(shown, heatmaps=False, inputs=images)
        y_true.append(batch_targets.numpy())
        indices.append(batch_indices.numpy())
    if not predictions:
        raise DataError(f"none of the {len(rows)} images of the {split} split could be read")
    indices = np.concatenate(indices)
    unreadable = sorted(set(rows["image"]) - set(rows["image"].iloc[indices]))
    if unreadable:
        log(f"warning: {len(unreadable)} unreadable image(s) left out: {', '.join(unreadable[:10])}"
            + (" ..." if len(unreadable) > 10 else ""))
    frame = _frame_from(predictions, rows.iloc[indices].reset_index(drop=True), labels, np.concatenate(y_true))
    return frame, unreadable


def user_metrics(frame: pd.DataFrame, predictor: Predictor, n_boot: int, seed: int) -> dict:
    """What the user gets, from a predictions frame: {"decision": per label (decisions.decision_report),
    "not_validated": [labels], "scope": acceptance (decisions.scope_report) with "accepted_metrics" (AUROCs on the
    accepted images), "calibration_errors": per label ECE and Brier with patient-bootstrap intervals}."""
    labels = predictor.labels
    y_true, y_prob, calls, in_scope = frame_arrays(frame, labels)
    patients = frame["patient"].to_numpy()
    scope = scope_report(in_scope, calls)
    accepted = np.array([bool(v) for v in in_scope]) if scope["available"] else None
    scope["accepted_metrics"] = (auroc_summary(y_true[accepted], y_prob[accepted], labels, patients[accepted], n_boot,
                                               seed) if accepted is not None and accepted.any() else None)
    evidence = predictor.trust.evidence or {}
    reasons = {name: (evidence.get(name) or {}).get("reason") for name in labels}
    unvalidated = set(not_validated(calls, labels)) | {n for n in labels if predictor.validated.get(n) is False}
    return {
        "decision": decision_report(y_true, calls, labels, accepted, dict(predictor.validated), reasons),
        "not_validated": [name for name in labels if name in unvalidated],
        "scope": scope,
        "calibration_errors": calibration_errors(y_true, y_prob, labels, patients, n_boot, seed),
    }


def write_outputs(out: Path, frame: pd.DataFrame, metrics: dict, meta: Meta, context: dict) -> list[str]:
    """metrics.json, per_label.csv, the plots and report.md -> the plots' file names."""
    write_json(out / "metrics.json", metrics)
    per_label_frame(metrics).to_csv(out / "per_label.csv", index=False, float_format="%.6g")
    plots = write_plots(frame[[f"{n}_true" for n in meta.labels]].to_numpy(),
                        frame[[f"{n}_prob" for n in meta.labels]].to_numpy(), meta.labels, metrics, out)
    write_report(out / "report.md", metrics, context, plots)
    return [p.name for p in plots.values()]
