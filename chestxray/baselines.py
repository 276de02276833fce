"""Trivial baselines scored beside the model, so a reader can tell whether the image model learned anything that
the file's metadata did not already give away:

- prevalence: every image gets the same probability (the training prevalence) and every call is negative. Its AUROC
  is 0.5 by construction; its Brier score and its accuracy are the floor any model must beat;
- metadata: a logistic regression (scikit-learn) on patient age, sex and view position, one per label, fitted on the
  checkpoint's own training split. On NIH, AP views and age carry real signal (AP films are the sicker, bedside
  patients), so a model that does not beat this baseline has not shown it reads the image.

Plain data out; AUROC intervals come from metrics.auroc_summary (patient bootstrap), the model-vs-metadata difference
from a paired patient bootstrap (the same resampled patients score both).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .decisions import calibration_errors, wilson
from .metrics import (
    CI_LEVEL,
    auroc_summary,
    has_both_classes,
    patient_bootstrap_weights,
    percentile_interval,
    weighted_auroc,
)

METADATA_COLUMNS = ("age", "sex", "view")  # data.read_data_entry's names for Patient Age, Patient Gender, View Position


def metadata_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """rows' age (float, NaN where missing), sex and view (upper-case strings, "" where missing)."""
    missing = [c for c in METADATA_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"the rows lack the metadata column(s) {missing} (Patient Age, Patient Gender, "
                         "View Position of the Data_Entry CSV)")
    return pd.DataFrame({
        "age": pd.to_numeric(rows["age"], errors="coerce").astype(np.float64).to_numpy(),
        "sex": rows["sex"].fillna("").astype(str).str.upper().to_numpy(),
        "view": rows["view"].fillna("").astype(str).str.upper().to_numpy(),
    })


class MetadataModel:
    """One logistic regression per label on (age, sex, view); a label with one class in training predicts its
    training prevalence (0 or 1) for every image."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.models: list = []
        self.constant: list[float | None] = []

    def fit(self, rows: pd.DataFrame, y: np.ndarray) -> MetadataModel:
        """rows: training rows with age, sex, view; y (N, L) 0/1. Raises ValueError when there are no rows."""
        from sklearn.compose import ColumnTransformer
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        if not len(rows):
            raise ValueError("no training rows to fit the metadata baseline on")
        x, y = metadata_frame(rows), np.asarray(y)
        self.models, self.constant = [], []
        for j in range(len(self.labels)):
            if not has_both_classes(y[:, j]):
                self.models.append(None)
                self.constant.append(float(y[0, j]))
                continue
            features = ColumnTransformer([
                ("age", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), ["age"]),
                ("categories", OneHotEncoder(handle_unknown="ignore"), ["sex", "view"]),
            ])
            model = make_pipeline(features, LogisticRegression(max_iter=1000))
            self.models.append(model.fit(x, y[:, j]))
            self.constant.append(None)
        return self

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        """(N, L) probabilities for rows with age, sex, view."""
        x = metadata_frame(rows)
        out = np.empty((len(x), len(self.labels)))
        for j, (model, constant) in enumerate(zip(self.models, self.constant, strict=True)):
            out[:, j] = model.predict_proba(x)[:, 1] if model is not None else constant
        return out


def paired_mean_auroc_difference(y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, patients: Sequence,
                                 n_boot: int = 1000, seed: int = 0, chunk: int = 100) -> dict:
    """mean AUROC(a) - mean AUROC(b) over the labels with both classes, with a paired patient-bootstrap percentile
    interval: each replicate scores both on the same resampled patients. -> {"difference", "ci", "replicates"}
    (ci None when n_boot is 0 or no replicate is defined)."""
    y_true = np.asarray(y_true)
    defined = [j for j in range(y_true.shape[1]) if has_both_classes(y_true[:, j])]
    if not defined:
        return {"difference": None, "ci": None, "replicates": 0}
    point = float(np.mean([roc_auroc(y_true[:, j], prob_a[:, j]) - roc_auroc(y_true[:, j], prob_b[:, j])
                           for j in defined]))
    diffs = np.full(n_boot, np.nan)
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        weights = patient_bootstrap_weights(patients, stop - start, rng)
        per_label = np.stack([weighted_auroc(y_true[:, j], prob_a[:, j], weights)
                              - weighted_auroc(y_true[:, j], prob_b[:, j], weights) for j in defined], axis=1)
        ok = np.isfinite(per_label).any(axis=1)
        with np.errstate(invalid="ignore"):
            diffs[start:stop][ok] = np.nanmean(per_label[ok], axis=1)
    low, high = percentile_interval(diffs, CI_LEVEL)
    return {"difference": point, "ci": [low, high] if np.isfinite(low) else None,
            "replicates": int(np.isfinite(diffs).sum())}


def roc_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """sklearn's ROC-AUC of one label (both classes present)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def metadata_baseline(train_rows: pd.DataFrame, y_train: np.ndarray, rows: pd.DataFrame, y_true: np.ndarray,
                      labels: Sequence[str], patients: Sequence, model_prob: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> tuple[dict, np.ndarray]:
    """Fit MetadataModel on the training rows, score it on `rows` -> (summary, its (N, L) probabilities); summary
    {"per_label": {label: {"auroc", "auroc_ci",
    "positives", "model_auroc", "model_better"}}, "mean_auroc", "mean_auroc_ci", "mean_auroc_labels",
    "model_mean_auroc", "model_minus_metadata": paired_mean_auroc_difference, "model_beats": bool | None,
    "n_train", "features"}. model_beats is True only when the difference's interval lies above 0 (None without an
    interval)."""
    prob = MetadataModel(labels).fit(train_rows, y_train).predict_proba(rows)
    summary = auroc_summary(y_true, prob, labels, patients, n_boot, seed)
    model = auroc_summary(y_true, model_prob, labels, patients, 0, seed)
    per_label = {}
    for name in labels:
        s, m = summary["per_label"][name], model["per_label"][name]
        per_label[name] = {"auroc": s["auroc"], "auroc_ci": s["auroc_ci"], "positives": s["positives"],
                           "model_auroc": m["auroc"],
                           "model_better": None if s["auroc"] is None else bool(m["auroc"] > s["auroc"])}
    diff = paired_mean_auroc_difference(y_true, model_prob, prob, patients, n_boot, seed)
    beats = None if diff["ci"] is None else bool(diff["ci"][0] > 0)
    return {"per_label": per_label, "mean_auroc": summary["mean_auroc"], "mean_auroc_ci": summary["mean_auroc_ci"],
            "mean_auroc_labels": summary["mean_auroc_labels"], "model_mean_auroc": model["mean_auroc"],
            "model_minus_metadata": diff, "model_beats": beats, "n_train": int(len(train_rows)),
            "features": list(METADATA_COLUMNS)}, prob


def prevalence_baseline(y_true: np.ndarray, labels: Sequence[str], patients: Sequence,
                        train_prevalence: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The constant predictor: probability = the training prevalence (the evaluated folder's when None), every call
    negative -> {"per_label": {label: {"probability", "auroc" and "auroc_ci" (0.5 where defined), "brier", "brier_ci",
    "all_negative_accuracy": wilson()}}, "mean_auroc", "prevalence_from": "training split" | "evaluated images"}."""
    y_true = np.asarray(y_true, dtype=np.float64)
    n = len(y_true)
    source = "training split" if train_prevalence is not None else "evaluated images"
    prevalence = (np.asarray(train_prevalence, dtype=np.float64) if train_prevalence is not None
                  else (y_true.mean(axis=0) if n else np.zeros(len(labels))))
    prob = np.broadcast_to(prevalence, y_true.shape)
    errors = calibration_errors(y_true, prob, labels, patients, n_boot, seed)
    per_label = {}
    for j, name in enumerate(labels):
        positives = int(y_true[:, j].sum())
        per_label[name] = {"probability": float(prevalence[j]),
                           "auroc": 0.5 if has_both_classes(y_true[:, j]) else None,
                           "auroc_ci": [0.5, 0.5] if has_both_classes(y_true[:, j]) else None,
                           "brier": errors[name]["brier"], "brier_ci": errors[name]["brier_ci"],
                           "all_negative_accuracy": wilson(n - positives, n)}
    defined = [m["auroc"] for m in per_label.values() if m["auroc"] is not None]
    return {"per_label": per_label, "mean_auroc": 0.5 if defined else None, "mean_auroc_ci": [0.5, 0.5]
            if defined else None, "prevalence_from": source}
