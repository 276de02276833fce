"""Printable reports: one A4 (or Letter) page per saved result, drawn with matplotlib's PDF backend.

Each page holds the X-ray with the chosen heatmap and its colour legend, the findings table (probability,
threshold, call, evidence AUROC), the model card summary, the dates, the result id and the "not for clinical
use" notice. matplotlib is already a dependency and its PdfPages writes standard PDF with real (extractable,
searchable) text when TrueType fonts are embedded; no second PDF library is needed.

The input is plain data (`ReportPage`: a result record, the display image and the raw maps), so any store
that keeps those three can make a report.
"""
from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..calls import POSITIVE, ranked_labels, statements
from ..cam import COLORMAP, upsample_map
from .formatting import SCALES, auroc_text, finding_text, label_name, strongest_zone  # noqa: F401 (re-exported)

# matplotlib's PDF backend is imported in report_bytes only: it costs ~0.5 s at every start of the app.

PAPER_SIZES = {"a4": (8.27, 11.69), "letter": (8.5, 11.0)}  # inches, portrait
NOTICE = ("Not for clinical use. This is a research and teaching tool, not a medical device: its outputs are "
          "unvalidated estimates from a model trained on NIH ChestX-ray14's text-mined labels and may be wrong. "
          "Do not use them to diagnose or treat anyone.")
PRINT_DPI = 200  # matplotlib rasterizes each picture at this resolution: 200 dpi prints sharp, files stay small
HEAT_MAX_SIDE = 512  # the overlay is smooth (bilinear from a 2..32 px map); more pixels only grow the file
POSITIVE_FILL = "#fff1e8"  # the web page's --positive-soft
POSITIVE_INK = "#c2410c"  # the web page's --positive
INK, MUTED = "#1d2430", "#5d6776"


@dataclass(frozen=True)
class ReportPage:
    """One result as a report page shows it.

    image: (H, W) display image, float in [0, 1] or uint8. heatmaps: raw class activation maps (L, h, w) in
    `labels` order, or None. label: the heatmap drawn (None: the plain image). calls: the call shown per label
    ("positive", "negative", or another word such as "not validated — no call"). notes: lines printed above the
    findings (e.g. an out-of-scope warning). auroc / auroc_ci: the evidence per label (calibration split), as the
    page shows it (missing: "–"). in_scope: the in-scope check's verdict (False: the heatmap is described in the
    picture's words).
    """

    result_id: str
    created: str
    labels: tuple[str, ...]
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float]
    calls: Mapping[str, str]
    model: Mapping
    image: np.ndarray = field(repr=False)
    heatmaps: np.ndarray | None = field(default=None, repr=False)
    label: str | None = None
    scale: str = "own"
    source: str = ""
    notes: tuple[str, ...] = ()
    auroc: Mapping[str, float | None] = field(default_factory=dict)
    auroc_ci: Mapping[str, Sequence[float] | None] = field(default_factory=dict)
    in_scope: bool | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.image) != 2:
            raise ValueError(f"image must be a 2-D grayscale array, got shape {np.shape(self.image)}")
        missing = [name for name in self.labels
                   if name not in self.probabilities or name not in self.thresholds or name not in self.calls]
        if missing:
            raise ValueError(f"probabilities, thresholds and calls must cover every label; missing for {missing}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown heatmap scale {self.scale!r}; choose one of {sorted(SCALES)}")
        if self.label is not None:
            if self.label not in self.labels:
                raise ValueError(f"unknown label {self.label!r}; this result's labels are {list(self.labels)}")
            if self.heatmaps is None:
                raise ValueError(f"a heatmap of {self.label!r} was asked for but no heatmaps were given")
        if self.heatmaps is not None and (np.ndim(self.heatmaps) != 3 or len(self.heatmaps) != len(self.labels)):
            raise ValueError(f"heatmaps must be (L={len(self.labels)}, h, w), got shape {np.shape(self.heatmaps)}")

    @classmethod
    def from_record(cls, record: Mapping, image: np.ndarray, heatmaps: np.ndarray | None,
                    label: str | None = None, scale: str = "own") -> ReportPage:
        """From a saved result's record (result.json: id, created, and Prediction.to_dict()'s labels rows, format,
        original_size, model), its display image and its raw maps; label None draws the plain image.

        A row's "call" is printed when the record has one, else "positive"/"negative" from its "positive" flag. The
        notes are the answer's statements (chestxray.calls.statements: scope, warning, demo, evidence), as on the page.
        Raises ValueError when the pieces do not fit together (unknown label or scale, wrong shapes).
        """
        rows = record["labels"]
        source = record.get("format") or ""
        if record.get("original_size"):
            width, height = record["original_size"]
            source = f"{source} · {width} × {height} px".lstrip(" ·")
        return cls(
            result_id=record["id"], created=record["created"], labels=tuple(row["label"] for row in rows),
            probabilities={row["label"]: row["probability"] for row in rows},
            thresholds={row["label"]: row["threshold"] for row in rows},
            calls={row["label"]: row.get("call") or ("positive" if row["positive"] else "negative") for row in rows},
            model=record.get("model") or {}, image=np.asarray(image), heatmaps=heatmaps, label=label,
            scale=scale, source=source, notes=tuple(text for text in statements(record).values() if text),
            auroc={row["label"]: row.get("auroc") for row in rows},
            auroc_ci={row["label"]: row.get("auroc_ci") for row in rows}, in_scope=record.get("in_scope"),
        )


def scaled_map(heatmaps: np.ndarray, index: int, scale: str = "own") -> tuple[np.ndarray, float]:
    """(map of label `index` with negatives cut to 0 and divided by the scale's peak, in [0, 1]; that peak).

    scale "own" divides by the map's own maximum, "shared" by the maximum over all maps (raw CAM values are
    comparable across labels: they share the same features). A peak of 0 (no positive evidence) gives zeros.
    """
    positive = np.maximum(np.asarray(heatmaps, dtype=np.float32), 0.0)
    peak = float(positive[index].max() if scale == "own" else positive.max())
    return (positive[index] / peak if peak > 0 else np.zeros_like(positive[index])), peak


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0)


def _model_lines(card: Mapping) -> list[str]:
    training = card.get("training") or {}
    lines = [f"Architecture: {card.get('arch', 'not recorded')}"]
    if card.get("image_size"):
        lines.append(f"Input size: {card['image_size']} × {card['image_size']} px")
    lines.append(f"Training data: {training.get('data') or 'not recorded'}")
    if training.get("n_train") is not None and training.get("n_val") is not None:
        lines.append(f"Images: {training['n_train']} training, {training['n_val']} validation")
    lines.append(f"Trained: {str(training.get('date') or 'date not recorded').replace('T', ' ')}")
    if training.get("epochs") is not None:
        passes = "pass" if training["epochs"] == 1 else "passes"
        lines.append(f"Epochs: {training['epochs']} {passes} over the training images")
    if isinstance(training.get("val_mean_auroc"), (int, float)):
        lines.append(f"Mean validation AUROC: {auroc_text(training['val_mean_auroc'])} (at the end of training)")
    if training.get("threshold_rule"):
        lines.append(f"Threshold rule: {training['threshold_rule']}")
    if training.get("commit"):
        lines.append(f"Code version: {training['commit']}")
    return lines


def _draw_image(fig: Figure, page: ReportPage, colormap: str, opacity: float) -> tuple[list[str], float]:
    """The X-ray with the heatmap and its legend; returns (caption lines, the lowest figure y drawn on)."""
    gray = _gray(page.image)
    height, width = gray.shape
    left, top, box_width, box_height = 0.06, 0.895, 0.42, 0.36
    ax = fig.add_axes((left, top - box_height, box_width, box_height))
    ax.set_anchor("N")  # hug the top: the legend goes right under the picture whatever its aspect ratio
    ax.imshow(gray, cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
    ax.set_axis_off()
    paper_width, paper_height = fig.get_size_inches()
    shown_height = min(box_height * paper_height, box_width * paper_width * height / width) / paper_height
    bottom = top - shown_height
    if page.label is None:
        return ["Plain image (no heatmap)."], bottom
    index = page.labels.index(page.label)
    heat, peak = scaled_map(page.heatmaps, index, page.scale)
    title = f"Heatmap of {label_name(page.label)} ({_texts(page, page.label).probability})"
    if peak <= 0 or not heat.any():
        return [title + ":", "no region supports this finding (its map has no positive values)."], bottom
    factor = min(1.0, HEAT_MAX_SIDE / max(height, width))
    layer = upsample_map(heat, max(1, round(height * factor)), max(1, round(width * factor)))
    rgba = colormaps[colormap](np.clip(layer, 0.0, 1.0))
    rgba[..., 3] = np.clip(layer, 0.0, 1.0) * opacity  # as on the page: opacity follows the heat
    ax.imshow(rgba, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
    cax = fig.add_axes((left + 0.02, bottom - 0.022, box_width - 0.04, 0.009))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, peak), colormaps[colormap]), cax=cax, orientation="horizontal")
    # The page's legend: the same colour map, the same words at its two ends.
    bar.set_ticks([0.0, peak], labels=["0: no evidence", "peak over all labels" if page.scale == "shared"
                                       else "this map's peak"])
    bar.ax.tick_params(labelsize=6.5, length=2, pad=1)
    for tick, align in zip(bar.ax.get_xticklabels(), ("left", "right")):
        tick.set_horizontalalignment(align)
    bar.set_label(f"Class activation, {SCALES[page.scale]}", fontsize=6.5, color=MUTED, labelpad=1)
    zone = strongest_zone(page.heatmaps[index], page.in_scope is not False)
    caption = [title + ":", f"strongest in {zone}." if zone else "",
               "Where the evidence for this finding lies; a class activation map, not an outline of the finding."]
    return caption, bottom - 0.055


def _draw_findings(fig: Figure, page: ReportPage, top: float) -> None:
    # The page's order (chestxray.calls.ranked_labels) and its texts (chestxray.reporting.formatting).
    ranked = ranked_labels({name: page.probabilities[name] for name in page.labels},
                           {name for name in page.labels if page.calls[name] == POSITIVE})
    texts = [_texts(page, name) for name in ranked]
    cells = [[t.name, t.probability, t.threshold, t.call, t.auroc] for t in texts]
    ax = fig.add_axes((0.06, 0.08, 0.88, top - 0.08))
    ax.set_axis_off()
    ax.set_title("Findings: called findings first, then by probability; evidence AUROC on the calibration split",
                 loc="left", fontsize=10, fontweight="bold", color=INK)
    table = ax.table(cellText=cells, colLabels=["Label", "Probability", "Threshold", "Call",
                                                "Evidence AUROC (95% CI)"],
                     colWidths=[0.27, 0.14, 0.14, 0.18, 0.27], cellLoc="left", loc="upper left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.35)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#d9dee6")
        if row == 0:
            cell.set_text_props(fontweight="bold", color=MUTED)
        elif page.calls[ranked[row - 1]] == "positive":
            cell.set_facecolor(POSITIVE_FILL)
            cell.get_text().set_color(POSITIVE_INK)


def _texts(page: ReportPage, name: str):
    return finding_text({"label": name, "probability": page.probabilities[name], "threshold": page.thresholds[name],
                         "call": page.calls[name], "auroc": page.auroc.get(name), "auroc_ci": page.auroc_ci.get(name)})


def draw_page(page: ReportPage, paper: str = "a4", colormap: str = COLORMAP, opacity: float = 0.6,
              made: datetime | None = None) -> Figure:
    """A matplotlib Figure of one report page (paper 'a4' or 'letter'); raises ValueError for other papers."""
    if paper not in PAPER_SIZES:
        raise ValueError(f"unknown paper {paper!r}; choose one of {sorted(PAPER_SIZES)}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    made = made or datetime.now(UTC)
    fig = Figure(figsize=PAPER_SIZES[paper])
    fig.text(0.06, 0.962, "Chest X-ray findings · ChestX-ray14 classifier", fontsize=14, fontweight="bold", color=INK)
    created = str(page.created).replace("T", " ").replace("+00:00", " UTC")
    fig.text(0.06, 0.935, f"Result {page.result_id}", fontsize=9, color=INK, family="monospace")
    fig.text(0.94, 0.935, "Research tool · not for clinical use", fontsize=9, color=POSITIVE_INK, ha="right")
    fig.text(0.06, 0.917, f"Analysed {created} · report made {made.strftime('%Y-%m-%d %H:%M UTC')}"
             + (f" · {page.source}" if page.source else ""), fontsize=8.5, color=MUTED)

    caption, below_image = _draw_image(fig, page, colormap, opacity)
    text = "\n".join(textwrap.fill(line, 56) for line in caption if line)
    fig.text(0.53, 0.895, text, fontsize=8.5, color=INK, va="top", linespacing=1.4)
    y = 0.895 - 0.0135 * (text.count("\n") + 3)
    fig.text(0.53, y, "Model", fontsize=10, fontweight="bold", color=INK, va="top")
    model_text = "\n".join(textwrap.fill(line, 60, subsequent_indent="  ") for line in _model_lines(page.model))
    fig.text(0.53, y - 0.02, model_text, fontsize=8, color=INK, va="top", linespacing=1.4)

    top = min(below_image, 0.52)
    if page.notes:
        notes = "\n".join(textwrap.fill(note, 110, break_on_hyphens=False) for note in page.notes)
        fig.text(0.06, top, notes, fontsize=8.5, color=POSITIVE_INK, va="top", fontweight="bold")
        top -= 0.014 * (notes.count("\n") + 2)
    _draw_findings(fig, page, top)
    fig.text(0.06, 0.078, textwrap.fill(
        "A finding is called positive when its probability reaches the model's threshold. AUROC measures how well "
        "the model ranks validation images, not how calibrated its probabilities are.", 140),
        fontsize=7, color=MUTED, va="top")
    fig.text(0.06, 0.045, textwrap.fill(NOTICE, 118), fontsize=8, color=INK, va="top", fontweight="bold",
             linespacing=1.3)
    return fig


def write_report(target: str | os.PathLike | IO[bytes], pages: Sequence[ReportPage], paper: str = "a4",
                 colormap: str = COLORMAP, opacity: float = 0.6, made: datetime | None = None) -> None:
    """Write a PDF with one page per ReportPage to a path or a binary file; raises ValueError for no pages."""
    from matplotlib.backends.backend_pdf import PdfPages
    if not pages:
        raise ValueError("a report needs at least one result")
    made = made or datetime.now(UTC)
    # Type 42 (TrueType) fonts keep the text selectable and extractable; matplotlib's default Type 3 glyphs are not
    # reliably read back by PDF readers and screen readers.
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(target, metadata={
        "Title": f"Chest X-ray findings report ({len(pages)} result{'s' if len(pages) > 1 else ''})",
        "Subject": "Research tool, not for clinical use",
        "Creator": "chestxray.reporting.pdf",
    }) as pdf:
        for page in pages:
            pdf.savefig(draw_page(page, paper, colormap, opacity, made), dpi=PRINT_DPI)


def report_bytes(pages: Sequence[ReportPage], **options) -> bytes:
    """write_report into memory: the PDF file's bytes."""
    buffer = io.BytesIO()
    write_report(buffer, pages, **options)
    return buffer.getvalue()
