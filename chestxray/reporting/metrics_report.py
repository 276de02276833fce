"""Evaluation outputs: metrics.json (strict JSON), per_label.csv, PNG plots (matplotlib Agg, no pyplot) and report.md.

Everything here formats numbers that metrics.py and localization.py computed; nothing is computed twice.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from ..metrics import has_both_classes

# Published mean AUROCs over the 14 labels on ChestX-ray14, for context only: the splits differ, and the official
# test list is harder than a random patient-wise split (sicker patients, more AP views), by about 0.03 AUROC.
PUBLISHED = (
    ("Wang et al. 2017 (ChestX-ray8, ResNet-50, updated 14-label results)", 0.745, "official split (test_list.txt)"),
    ("Best ResNet-50 reported on the official split", 0.806, "official split (test_list.txt)"),
    ("CheXNet, Rajpurkar et al. 2017 (DenseNet-121)", 0.841,
     "random 70/10/20 patient-wise split (not the official test list)"),
)
PLOTS = {"roc": "roc.png", "pr": "pr.png", "confusion": "confusion.png", "reliability": "reliability.png"}
TABLE_COLUMNS = ["label", "positives", "auroc", "auroc_ci_low", "auroc_ci_high", "average_precision", "threshold",
                 "precision", "recall", "f1", "specificity", "accuracy", "tp", "fp", "fn", "tn",
                 "precision_at_0.5", "recall_at_0.5", "f1_at_0.5", "specificity_at_0.5", "accuracy_at_0.5"]


# --- files -----------------------------------------------------------------------------------------------------


def per_label_frame(metrics: dict) -> pd.DataFrame:
    """One row per label of metrics["per_label"] with TABLE_COLUMNS (None for undefined values)."""
    rows = []
    for name, m in metrics["per_label"].items():
        ci = m["auroc_ci"] or [None, None]
        half = m["at_0.5"]
        rows.append({
            "label": name, "positives": m["positives"], "auroc": m["auroc"], "auroc_ci_low": ci[0],
            "auroc_ci_high": ci[1], "average_precision": m["average_precision"], "threshold": m["threshold"],
            "precision": m["precision"], "recall": m["recall"], "f1": m["f1"], "specificity": m["specificity"],
            "accuracy": m["accuracy"], "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"],
            **{f"{k}_at_0.5": half[k] for k in ("precision", "recall", "f1", "specificity", "accuracy")},
        })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# --- what the user gets: calls, scope, baselines, calibration ---------------------------------------------------


def fmt_share(share: dict | None) -> str:
    """A decisions.wilson() proportion as '0.150 [0.101, 0.214]'; 'n/a' when undefined."""
    return "n/a" if not share else fmt_ci(share["value"], share["ci"])


def decision_rows(metrics: dict, part: str = "all") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the calls table (metrics["decision"]; part "all" images or "accepted" ones)."""
    header = ["label", "validated", "images", "pos", "called +", "no call", "called + rate [95% CI]", "prevalence",
              "sensitivity", "specificity", "PPV", "NPV"]
    rows = []
    for name, d in metrics["decision"].items():
        m = d[part]
        if m is None:
            continue
        validated = {True: "yes", False: "no", None: "no evidence"}[d["validated"]]
        rows.append([name, validated, str(m["n_images"]), str(m["positives"]), str(m["tp"] + m["fp"]),
                     str(m["calls"]["not validated"] + m["calls"]["out of scope"]),
                     fmt_share(m["called_positive_rate"]), fmt(m["prevalence"]["value"]),
                     fmt_share(m["sensitivity"]), fmt_share(m["specificity"]), fmt_share(m["ppv"]),
                     fmt_share(m["npv"])])
    return header, rows


def scope_lines(metrics: dict) -> list[str]:
    """Sentences on the in-scope check: acceptance with its interval, and AUROC on accepted vs all images."""
    scope = metrics["scope"]
    if not scope["available"]:
        return ["In-scope check: not available (the checkpoint has no scope statistics), so no image was checked "
                "and the product makes no call."]
    lines = [f"In-scope check: {scope['accepted']} of {scope['total']} images accepted "
             f"({fmt_share(scope['acceptance'])}); {scope['rejected']} judged out of scope, whose labels all read "
             "\"out of scope\" (no call)."]
    acc = scope.get("accepted_metrics")
    if acc:
        lines.append(f"Mean AUROC on the accepted images {fmt_ci(acc['mean_auroc'], acc['mean_auroc_ci'])} "
                     f"({acc['mean_auroc_labels']} labels); on all images "
                     f"{fmt_ci(metrics['mean_auroc'], metrics['mean_auroc_ci'])}.")
    return lines


def baseline_lines(metrics: dict) -> list[str]:
    """The verdict against the metadata baseline, one sentence (said plainly when the model does not beat it)."""
    meta = metrics["baselines"]["metadata"]
    if not meta.get("available"):
        return [f"Metadata baseline: not available ({meta['reason']})."]
    diff = meta["model_minus_metadata"]
    verdict = {True: "The model beats the metadata baseline",
               False: "**The model does not beat the metadata baseline**",
               None: "**Whether the model beats the metadata baseline cannot be told** (no interval)",
               }[meta["model_beats"]]
    worse = [name for name, m in meta["per_label"].items() if m["model_better"] is False]
    return [f"{verdict}: mean AUROC {fmt(meta['model_mean_auroc'])} against "
            f"{fmt_ci(meta['mean_auroc'], meta['mean_auroc_ci'])} from age, sex and view position alone; difference "
            f"{fmt_ci(diff['difference'], diff['ci'])} (paired patient bootstrap; the model beats it when the "
            "interval lies above 0)."
            + (f" Labels where the metadata alone ranks better: {', '.join(worse)}." if worse else "")]


def baseline_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Per label: the model's AUROC and Brier beside the metadata and prevalence baselines."""
    base = metrics["baselines"]
    meta, prev = base["metadata"], base["prevalence"]
    cal = metrics["calibration"]["per_label"]
    header = ["label", "pos", "model AUROC [95% CI]", "metadata AUROC [95% CI]", "prevalence AUROC", "model Brier",
              "prevalence Brier [95% CI]", "all-negative accuracy"]
    rows = []
    for name, m in metrics["per_label"].items():
        md = meta["per_label"][name] if meta.get("available") else None
        p = prev["per_label"][name]
        rows.append([name, str(m["positives"]), fmt_ci(m["auroc"], m["auroc_ci"]),
                     fmt_ci(md["auroc"], md["auroc_ci"]) if md else "n/a", fmt(p["auroc"]),
                     fmt(cal[name]["brier"], 4), fmt_ci4(p["brier"], p["brier_ci"]),
                     fmt_share(p["all_negative_accuracy"])])
    rows.append([f"mean ({metrics['mean_auroc_labels']} labels)", "",
                 fmt_ci(metrics["mean_auroc"], metrics["mean_auroc_ci"]),
                 fmt_ci(meta["mean_auroc"], meta["mean_auroc_ci"]) if meta.get("available") else "n/a",
                 fmt(prev["mean_auroc"]), "", "", ""])
    return header, rows


def calibration_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Per label ECE and Brier with their patient-bootstrap intervals (metrics["calibration"]["per_label"])."""
    header = ["label", "pos", "ECE [95% CI]", "Brier [95% CI]"]
    rows = [[name, str(c["positives"]), fmt_ci(c["ece"], c["ece_ci"]), fmt_ci4(c["brier"], c["brier_ci"])]
            for name, c in metrics["calibration"]["per_label"].items()]
    return header, rows


def fmt_ci4(value, ci) -> str:
    """fmt_ci with 4 decimals (Brier scores of rare labels are small)."""
    if value is None:
        return "n/a"
    return f"{fmt(value, 4)} [{fmt(ci[0], 4)}, {fmt(ci[1], 4)}]" if ci else fmt(value, 4)


# --- text tables -----------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    """A number for a table: fixed digits, 'n/a' for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def fmt_ci(value, ci) -> str:
    """'0.812 [0.781, 0.840]', or the value alone without an interval."""
    if value is None:
        return "n/a"
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(value)


def per_label_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-label table shown on the console and in report.md (plus a mean row)."""
    header = ["label", "pos", "AUROC [95% CI]", "AP", "thr", "prec", "recall", "F1", "spec", "acc",
              "TP", "FP", "FN", "TN"]
    rows = []
    for name, m in metrics["per_label"].items():
        rows.append([name, str(m["positives"]), fmt_ci(m["auroc"], m["auroc_ci"]), fmt(m["average_precision"]),
                     fmt(m["threshold"]), fmt(m["precision"]), fmt(m["recall"]), fmt(m["f1"]),
                     fmt(m["specificity"]), fmt(m["accuracy"]), str(m["tp"]), str(m["fp"]), str(m["fn"]),
                     str(m["tn"])])
    rows.append([f"mean ({metrics['mean_auroc_labels']} labels)", "", fmt_ci(metrics["mean_auroc"],
                 metrics["mean_auroc_ci"]), *[""] * (len(header) - 3)])
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain fixed-width table for the console."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (str(c).ljust(w) if i == 0 else str(c).rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """GitHub-flavoured Markdown table; the first `left` columns left-aligned, the others right-aligned."""
    align = [":--"] * left + ["--:"] * (len(header) - left)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --- plots -----------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    return fig


def _colours(n: int) -> list:
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def plot_roc(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str], metrics: dict,
             path: str | os.PathLike) -> Path:
    """All labels' ROC curves on one figure (sklearn roc_curve), AUROC in the legend; labels without both
    classes are listed as n/a."""
    fig = _figure(8, 7)
    ax = fig.subplots()
    for j, (name, colour) in enumerate(zip(labels, _colours(len(labels)), strict=True)):
        if has_both_classes(y_true[:, j]):
            fpr, tpr, _ = roc_curve(y_true[:, j], y_prob[:, j])
            ax.plot(fpr, tpr, color=colour, lw=1.4, label=f"{name} ({metrics['per_label'][name]['auroc']:.3f})")
        else:
            ax.plot([], [], color=colour, lw=1.4, ls=":", label=f"{name} (n/a)")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (recall)",
           title=f"ROC, {metrics['n_images']} images; mean AUROC {fmt(metrics['mean_auroc'])}")
    ax.legend(loc="lower right", fontsize=7, title="label (AUROC)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_pr(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str], metrics: dict,
            path: str | os.PathLike) -> Path:
    """All labels' precision-recall curves (sklearn), AP and prevalence (a random model's AP) in the legend."""
    fig = _figure(8, 7)
    ax = fig.subplots()
    for j, (name, colour) in enumerate(zip(labels, _colours(len(labels)), strict=True)):
        m = metrics["per_label"][name]
        if y_true[:, j].any():
            precision, recall, _ = precision_recall_curve(y_true[:, j], y_prob[:, j])
            ax.plot(recall, precision, color=colour, lw=1.4, drawstyle="steps-post",
                    label=f"{name} ({m['average_precision']:.3f}; {m['prevalence']:.3f})")
        else:
            ax.plot([], [], color=colour, lw=1.4, ls=":", label=f"{name} (n/a: no positives)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
           title=f"Precision-recall, {metrics['n_images']} images")
    ax.legend(loc="upper right", fontsize=7, title="label (AP; prevalence)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_confusion_grid(metrics: dict, path: str | os.PathLike, ncols: int = 4) -> Path:
    """A grid of 2x2 confusion matrices [[TN, FP], [FN, TP]], one per label, at the checkpoint's thresholds."""
    labels = list(metrics["per_label"])
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig = _figure(3.0 * ncols, 2.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, name in zip(axes, labels, strict=False):
        m = metrics["per_label"][name]
        cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        # Colour by row share, so the rare positive row is readable next to thousands of negatives.
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in np.ndenumerate(cm):
            ax.text(c, r, str(count), ha="center", va="center", fontsize=10,
                    color="white" if share[r, c] > 0.6 else "black")
        ax.set_xticks([0, 1], ["pred -", "pred +"], fontsize=8)
        ax.set_yticks([0, 1], ["true -", "true +"], fontsize=8)
        ax.set_title(f"{name}\nthreshold {m['threshold']:.3f}", fontsize=9)
    for ax in axes[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_reliability(calibration: dict, path: str | os.PathLike) -> Path:
    """Reliability diagram (observed positive fraction vs mean predicted probability, all labels pooled) above a
    histogram of the predicted probabilities; ECE in the title."""
    bins = [b for b in calibration["bins"] if b["count"]]
    fig = _figure(6, 7)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="perfectly calibrated")
    top.plot([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins], "o-", color="C0",
             label="model (all labels pooled)")
    top.set(ylim=(0, 1), ylabel="fraction of positives",
            title=f"Reliability diagram; ECE {fmt(calibration['ece'])} ({calibration['n_bins']} bins)")
    top.legend(loc="upper left", fontsize=8)
    lowers = [b["lower"] for b in calibration["bins"]]
    widths = [b["upper"] - b["lower"] for b in calibration["bins"]]
    bottom.bar(lowers, [b["count"] for b in calibration["bins"]], width=widths, align="edge", color="C0",
               edgecolor="white")
    bottom.set(xlim=(0, 1), xlabel="predicted probability", ylabel="(image, label)\npairs")
    if any(b["count"] for b in calibration["bins"]):
        bottom.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_plots(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str], metrics: dict,
                out: str | os.PathLike) -> dict[str, Path]:
    """Write the four PNGs of PLOTS into `out`; returns {kind: path}."""
    out = Path(out)
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    return {
        "roc": plot_roc(y_true, y_prob, labels, metrics, out / PLOTS["roc"]),
        "pr": plot_pr(y_true, y_prob, labels, metrics, out / PLOTS["pr"]),
        "confusion": plot_confusion_grid(metrics, out / PLOTS["confusion"]),
        "reliability": plot_reliability(metrics["calibration"], out / PLOTS["reliability"]),
    }


# --- report.md -------------------------------------------------------------------------------------------------


def _published_rows(metrics: dict, context: dict) -> list[list[str]]:
    ours = [f"This model ({context.get('arch', '?')}, {context.get('image_size', '?')} px)",
            f"{context.get('split', '?')}: {context.get('split_description', '?')}",
            fmt_ci(metrics["mean_auroc"], metrics["mean_auroc_ci"])]
    return [ours, *([name, split, f"{auroc:.3f}"] for name, auroc, split in PUBLISHED)]


def _subgroup_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    groups = metrics.get("subgroups") or {}
    header = ["label", *(f"{g} (n={s['n_images']})" for g, s in groups.items())]
    rows = []
    for name in metrics["per_label"]:
        cells = []
        for s in groups.values():
            m = s["per_label"][name]
            cells.append(f"{fmt_ci(m['auroc'], m['auroc_ci'])} ({m['positives']}+)")
        rows.append([name, *cells])
    rows.append(["mean", *(fmt_ci(s["mean_auroc"], s["mean_auroc_ci"]) for s in groups.values())])
    return header, rows


def _localization_section(loc: dict) -> list[str]:
    lines = ["## Localization (heatmaps vs NIH's boxes)", ""]
    lines.append(
        f"{loc['boxes_evaluated']} of the {loc['boxes_in_file']} boxes in the file ({loc['images_evaluated']} of "
        f"{loc['images_in_file']} images) could be evaluated: the others' images are not under the data folder"
        + (f" or their label is not one of the model's ({', '.join(loc['labels_not_in_model'])})"
           if loc["labels_not_in_model"] else "") + "."
    )
    lines += ["", "Method (Wang et al. 2017): each label's class activation map, upsampled to the loaded image and "
              "min-max normalised to 0-255; boxes around the connected regions above "
              f"{' and above '.join(map(str, loc['heatmap_thresholds']))} are the candidates; a box is found at "
              "T(IoBB) when a candidate has IoBB = area(candidate ∩ truth) / area(candidate) > T. Pointing game: the "
              "heatmap's peak lies inside the box; the centre baseline always points at the image centre. Note that "
              "IoBB rewards small candidates (any box inside the truth scores 1), so read it next to the pointing "
              "game and its baseline.", ""]
    if loc.get("images_in_training_split"):
        lines += [f"**Warning:** {loc['images_in_training_split']} evaluated boxed image(s) are in this "
                  "checkpoint's training split (as recorded in the checkpoint), so their heatmaps "
                  "come from images the model was trained on.", ""]
    if not loc["boxes_evaluated"]:
        return lines + ["No boxed image was found under the data folder, so there are no localization scores.", ""]
    ts = [str(t) for t in loc["iobb_thresholds"]]
    header = ["label", "boxes", *(f"acc T={t}" for t in ts), "pointing", "centre baseline"]
    rows = []
    for name, s in [*loc["per_label"].items(), ("all", loc["overall"])]:
        rows.append([name, str(s["boxes"]), *(fmt(s["accuracy"][t]) for t in ts), fmt(s["pointing_game"]),
                     fmt(s["centre_baseline"])])
    return lines + [markdown_table(header, rows), ""]


def _decision_section(metrics: dict, context: dict) -> list[str]:
    """What the user gets: the product's calls scored, the scope (unless already first), and the baselines."""
    if "decision" not in metrics:
        return []
    lines = ["## What the user gets: the product's calls", "",
             "Each label of each image gets the call the app shows (the same Predictor): positive, negative, or no "
             "call (\"not validated\": the label lacks validation evidence; \"out of scope\": the image does not "
             "look like the radiographs the model was validated on). A no-call counts as not flagged: sensitivity = "
             "positive calls among the positive images; specificity = images not called positive among the "
             "negative ones; PPV among the positive calls; NPV among the negative calls. 95% Wilson intervals.", ""]
    if not context.get("external"):
        lines += [*scope_lines(metrics), ""]
    if metrics.get("not_validated"):
        lines += [f"Not validated (never called): {', '.join(metrics['not_validated'])}.", ""]
    lines += ["### All images", "", markdown_table(*decision_rows(metrics, "all")), ""]
    if metrics["scope"]["available"] and metrics["scope"]["accepted"]:
        lines += ["### Accepted (in-scope) images", "", markdown_table(*decision_rows(metrics, "accepted")), ""]
    if "baselines" in metrics:
        base = metrics["baselines"]
        lines += ["## Baselines", "", *baseline_lines(metrics), "",
                  "Metadata: one logistic regression per label on patient age, sex and view position "
                  + (f"({base['metadata']['source']})" if base["metadata"].get("available") else "")
                  + f". Prevalence: every image gets the prevalence of the {base['prevalence']['prevalence_from']} "
                  "and every call is negative (AUROC 0.5 by construction).", "",
                  markdown_table(*baseline_rows(metrics)), ""]
    return lines


def write_report(path: str | os.PathLike, metrics: dict, context: dict, plots: dict[str, Path]) -> Path:
    """Write report.md: setup, comparison with published results, per-label table, accuracies (defined),
    subgroups, localization and the plots (linked by relative path)."""
    path = Path(path)
    lines = [*_setup_lines(metrics, context), *_decision_section(metrics, context)]
    lines += [
        "## Comparison with published results", "",
        markdown_table(["model", "split", "mean AUROC [95% CI]"], _published_rows(metrics, context), left=2), "",
        "The published numbers are means over the 14 labels on other splits of the full dataset; they are context, "
        "not a like-for-like comparison. The official test list is harder than a random patient-wise split "
        "(sicker patients, more AP views), by about 0.03 AUROC. "
        f"This model's mean is over the {metrics['mean_auroc_labels']} labels with both positives and negatives "
        "here.", "",
        "## Per-label metrics", "",
        "At the checkpoint's raw thresholds, for every image and label, before the in-scope check and the evidence "
        "rule withhold calls (the product's calls are scored above). AUROC and AP need no threshold; n/a marks a "
        "value that is undefined here (e.g. no positives). pos = positive images. With few positives (under ~10) "
        "an interval is wide or, when too many bootstrap replicates lack a positive, not estimable (shown without "
        "one).", "",
        markdown_table(*per_label_rows(metrics)), "",
    ]
    notes = [f"- {name}: {m['note']}" for name, m in metrics["per_label"].items() if m.get("note")]
    if notes:
        lines += notes + [""]
    lines += _accuracy_lines(metrics)
    if metrics["calibration"].get("per_label"):
        lines += ["## Calibration per label", "",
                  "Of the probabilities the product shows (calibrated when the checkpoint holds a calibration). ECE: "
                  "10 equal-width bins; Brier: mean squared error of the probability. 95% intervals from the patient "
                  "bootstrap.", "", markdown_table(*calibration_rows(metrics)), ""]
    if metrics.get("subgroups"):
        lines += ["## Subgroups", "", "AUROC [95% CI] (positives) per view position and sex.", "",
                  markdown_table(*_subgroup_table(metrics)), ""]
    if metrics.get("localization"):
        lines += _localization_section(metrics["localization"])
    lines += ["## Plots", ""]
    titles = {"roc": "ROC curves", "pr": "Precision-recall curves", "confusion": "Confusion matrices",
              "reliability": "Reliability diagram"}
    for kind, plot in plots.items():
        lines += [f"### {titles.get(kind, kind)}", "", f"![{titles.get(kind, kind)}]({Path(plot).name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _setup_lines(metrics: dict, context: dict) -> list[str]:
    """The report's title, its scope section for an external folder and the setup: checkpoint, data, thresholds."""
    external, in_sample = context.get("external"), context.get("in_sample")
    title = ("# External validation report" if external
             else "# In-sample evaluation report (not an independent estimate)" if in_sample
             else "# Evaluation report")
    lines = [title, "", "Not for clinical use: a research tool evaluated on NLP-mined labels (NIH estimates >90% label "
             "accuracy).", ""]
    if in_sample:
        lines += [f"**In-sample:** {in_sample}.", ""]
    if external:
        # An external folder is first of all a question of scope: how much of it would the product answer at all.
        lines += ["## In-scope acceptance", "", *scope_lines(metrics), ""]
        overlap = context.get("training_overlap") or {}
        if not overlap.get("checked", True):
            lines += [f"**Overlap with the training data not checked:** {overlap.get('how')}. If this folder shares "
                      "images or patients with the training data, these figures are optimistic.", ""]
    lines += [
        f"- checkpoint: `{context.get('checkpoint', '?')}` ({context.get('arch', '?')}, "
        f"{context.get('image_size', '?')} px, {len(metrics['labels'])} labels)",
        f"- data: `{context.get('data_dir', '?')}`, split **{context.get('split', '?')}**: "
        f"{context.get('split_description', '')}",
        f"- images: {metrics['n_images']} from {metrics['n_patients']} patients"
        + (f" (limited to the first {context['limit']})" if context.get("limit") else ""),
        f"- thresholds: the checkpoint's ({context.get('threshold_source', 'chosen on validation data')})",
        f"- 95% confidence intervals: percentile bootstrap over patients ({metrics['bootstrap']['n_boot']} "
        f"replicates, seed {metrics['bootstrap']['seed']}); all images of a patient are resampled together",
        f"- date: {context.get('date', '')}", "",
    ]
    return lines


def _accuracy_lines(metrics: dict) -> list[str]:
    """The metrics at 0.5, the two accuracies beside their all-negative baselines and the pooled calibration error."""
    acc = metrics["accuracy"]
    lines = []
    half_header = ["label", "precision", "recall", "F1", "specificity", "accuracy", "TP", "FP", "FN", "TN"]
    half_rows = [[name, fmt(h["precision"]), fmt(h["recall"]), fmt(h["f1"]), fmt(h["specificity"]),
                  fmt(h["accuracy"]), str(h["tp"]), str(h["fp"]), str(h["fn"]), str(h["tn"])]
                 for name, h in ((n, m["at_0.5"]) for n, m in metrics["per_label"].items())]
    lines += ["### At a fixed threshold of 0.5, for comparison", "", markdown_table(half_header, half_rows), ""]
    lines += [
        "## Accuracy, two ways", "",
        "- **Per-label (element-wise) accuracy**: the fraction of all (image, label) decisions that are right. "
        "Most labels are rare, so a model that calls everything negative already scores high: that is the "
        "all-negative baseline next to it.",
        "- **Exact-match accuracy**: the fraction of images whose whole set of labels is right (every label). "
        "Its all-negative baseline is the fraction of \"No Finding\" images.", "",
        markdown_table(["accuracy", "model (checkpoint thresholds)", "model (0.5)", "all-negative baseline"], [
            ["per-label (element-wise)", fmt(acc["per_label_mean"]), fmt(acc["at_0.5"]["per_label_mean"]),
             fmt(acc["all_negative_baseline"])],
            ["exact match (whole label set)", fmt(acc["exact_match"]), fmt(acc["at_0.5"]["exact_match"]),
             fmt(acc["exact_match_all_negative_baseline"])],
        ]), "",
        f"Calibration (all labels pooled): expected calibration error {fmt(metrics['calibration']['ece'])}.", "",
    ]
    return lines
