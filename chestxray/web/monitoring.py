"""After deployment: the results database, readers' feedback and drift monitoring, as one Blueprint.

`install(app)` (create_app calls it) opens the results database (chestxray.store: DATABASE from the config, else
DATABASE in <instance>/config.toml, else an SQLite file in the instance folder), hangs a Monitor on
app.extensions["chestxray.monitor"], makes deleting a result delete its row, and registers the routes:

- POST /results/<id>/feedback: agree/disagree per finding and the true labels (CSRF-protected form);
- GET /monitor (+ its PNG plots), /metrics (Prometheus text format), /api/results?since=... and /api/results.csv.

chestxray.service records each analysis through the Monitor (`answered` / `refused`). A database that fails to write
never costs the reader the answer: the error is logged, counted (/metrics, /monitor) and the result is still shown.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flask import Blueprint, Response, abort, current_app, flash, jsonify, redirect, render_template, request, url_for

from chestxray.calls import NEGATIVE, POSITIVE
from chestxray.fileio import SpreadsheetWriter
from chestxray.imaging import InvalidImage, UnsupportedFormat
from chestxray.monitor import (
    CALLED,
    INPUTS,
    MEAN_LABEL_RANK,
    OUT_OF_SCOPE,
    AlertLimits,
    DriftRow,
    Reference,
    agreement,
    check_span,
    checked_drift,
    percentile,
    periods,
)
from chestxray.store import (
    AnalysisStore,
    ModelVersion,
    Review,
    answered_entry,
    model_version,
    refused_entry,
    sqlite_url,
)
from chestxray.store.models import TRUTHS

if TYPE_CHECKING:
    from flask import Flask  # only in annotations here
    from matplotlib.figure import Figure

bp = Blueprint("monitoring", __name__)
log = logging.getLogger("chestxray.web")

MONITOR_KEY = "chestxray.monitor"
CONFIG_FILE = "config.toml"  # in the instance folder: DATABASE = "postgresql://..." (and any other config key)
STATUS_SECONDS = 5.0  # the alert status is recomputed at most this often (every result page shows it)
PERIODS = {"day": 30, "week": 26}  # how many days / weeks /monitor shows
API_LIMIT = 1000  # analyses per /api/results answer at most (page with ?since=)
PLOTS = ("volume", "rates", "drift", "latency")


@dataclass
class Status:
    """The drift alert over the newest window: rows per quantity, and when it was computed."""

    rows: list[DriftRow]
    n: int
    computed: float

    @property
    def alerts(self) -> list[DriftRow]:
        return [row for row in self.rows if row.alert]


class Monitor:
    """What the app knows for monitoring: the store, the model's identity and reference, the alert limits."""

    def __init__(self, store: AnalysisStore, model: ModelVersion, reference: Reference | None,
                 limits: AlertLimits = AlertLimits()) -> None:
        self.store, self.model, self.reference, self.limits = store, model, reference, limits
        self.write_errors = 0
        self._lock = threading.Lock()
        self._status: Status | None = None

    def record(self, entry: dict) -> None:
        """Store one analysis; a failure is logged and counted, never raised (the answer is what matters)."""
        try:
            self.store.record(entry)
        except Exception as exc:
            with self._lock:
                self.write_errors += 1
            log.error("the results database %s could not record an analysis: %s: %s", self.store.shown_url,
                      type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return
        with self._lock:
            self._status = None  # the next page recomputes the alert with this analysis in the window

    def answered(self, prediction, source: str, started: float, data: bytes | None, result_id: str | None) -> None:
        """Record an answered analysis: the latency since `started` (time.perf_counter()), the input's technical
        facts read from `data`, and the brightness and contrast of its model input (Prediction.input_stats)."""
        latency = time.perf_counter() - started
        self.record(answered_entry(prediction, source=source, latency_s=latency, model=self.model,
                                   result_id=result_id, data=data))

    def refused(self, source: str, started: float, exc: BaseException) -> None:
        """Record an analysis that raised `exc`: its category only, never its message."""
        outcome, reason = refusal_reason(exc)
        self.record(refused_entry(source=source, reason=reason, outcome=outcome, model=self.model,
                                  latency_s=time.perf_counter() - started))

    def refused_at_reception(self, source: str, outcome: str, reason: str) -> None:
        """Record an input turned away before any analysis (the DICOM node's C-STORE refusals, pacs.node.REFUSALS):
        outcome "refused" or "failed", reason a fixed category; no latency (nothing was analysed)."""
        self.record(refused_entry(source=source, reason=reason, outcome=outcome, model=self.model, latency_s=None))

    def status(self) -> Status | None:
        """The drift alert status of this model's newest check (monitor.checked_drift: every `limits.step`-th
        answered analysis, over the `limits.window` before it; cached briefly); None when the checkpoint has no
        reference."""
        if self.reference is None:
            return None
        with self._lock:
            if self._status is not None and time.monotonic() - self._status.computed < STATUS_SECONDS:
                return self._status
        answered = self.store.answered_count(model_hash=self.model.hash)
        columns = self.store.columns(last=check_span(answered, self.limits), model_hash=self.model.hash)
        rows, n = checked_drift(self.reference, columns, answered, self.limits)
        status = Status(rows, n, time.monotonic())
        with self._lock:
            self._status = status
        return status


def database_url(app: Flask) -> str:
    """DATABASE from the app's config, else from <instance>/config.toml, else SQLite in the instance folder."""
    if app.config.get("DATABASE"):
        return str(app.config["DATABASE"])
    path = Path(app.instance_path) / CONFIG_FILE
    if path.is_file():
        with path.open("rb") as f:
            try:
                url = tomllib.load(f).get("DATABASE")
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from None
        if url:
            return str(url)
    return sqlite_url(app.instance_path)


def install(app: Flask) -> Monitor:
    """Open the results database (running its migrations), register the routes. Raises chestxray.store.StoreError
    when the database cannot be opened or upgraded (the message names it, password hidden)."""
    store = AnalysisStore(database_url(app))
    state = app.extensions["chestxray"]
    predictor = state.predictor
    reference = getattr(predictor.trust, "reference", None) if predictor is not None else None
    monitor = Monitor(store, model_version(state.checkpoint, predictor), reference,
                      AlertLimits(**app.config.get("ALERT_LIMITS", {})))
    app.extensions[MONITOR_KEY] = monitor
    app.extensions["chestxray.results"].on_delete = store.delete_result
    app.register_blueprint(bp)
    log.info("results database: %s", store.shown_url)
    return monitor


def monitor() -> Monitor:
    return current_app.extensions[MONITOR_KEY]


# -- what the views pass to chestxray.service.analyse_and_store -------------------------------------------------------

def request_source() -> str:
    """The channel an upload is recorded under: "api" or "web"."""
    return "api" if request.path.startswith("/api/") else "web"


def refusal_reason(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason) for an analysis that raised: bad input is refused, anything else failed."""
    if isinstance(exc, UnsupportedFormat):
        return "refused", "unsupported format"
    if isinstance(exc, InvalidImage):
        return "refused", "unreadable image"
    return "failed", type(exc).__name__[:80]


# -- templates ---------------------------------------------------------------------------------------------------------

@bp.app_context_processor
def monitoring_context() -> dict:
    """The result page's feedback form and the drift notice (templates/_feedback.html)."""
    def feedback_for(rid: str) -> dict:
        try:
            return monitor().store.feedback(rid)
        except Exception as exc:  # the page still shows the result; the form then starts empty
            log.error("cannot read feedback: %s", type(exc).__name__)
            return {}

    def drift_alert() -> Status | None:
        try:
            status = monitor().status()
        except Exception as exc:
            log.error("cannot compute the drift status: %s", type(exc).__name__)
            return None
        return status if status is not None and status.alerts else None

    return {"feedback_for": feedback_for, "drift_alert": drift_alert, "truths": TRUTHS,
            "quantity_name": quantity_name}


def quantity_name(quantity: str) -> str:
    if quantity.startswith("probability:"):
        return f"{quantity.split(':', 1)[1].replace('_', ' ')} probability"
    if quantity.startswith(CALLED):
        return f"{quantity[len(CALLED):].replace('_', ' ')} called-positive rate"
    return {"scope_score": "in-scope score", "brightness": "input brightness", "contrast": "input contrast",
            MEAN_LABEL_RANK: "mean label rank (all labels)", OUT_OF_SCOPE: "out-of-scope rate"}.get(quantity, quantity)


# -- feedback ----------------------------------------------------------------------------------------------------------

@bp.post("/results/<rid>/feedback")
def feedback(rid: str):
    """Save a reader's reviews: per label agree_<label> = agree|disagree|"" and truth_<label> = present|absent|""
    (not assessed), and an optional reader name."""
    record = current_app.extensions["chestxray.results"].load(rid)  # 404 for an unknown or expired result
    reviews = {}
    for row in record["labels"]:
        label = row["label"]
        opinion = request.form.get(f"agree_{label}", "")
        truth = request.form.get(f"truth_{label}", "")
        if opinion not in ("", "agree", "disagree") or truth not in ("", *TRUTHS):
            abort(400, f"feedback for {label}: agree is 'agree', 'disagree' or empty; the true label is "
                       f"{', '.join(TRUTHS)} or empty (not assessed)")
        if opinion and row["call"] not in (POSITIVE, NEGATIVE):
            abort(400, f"{label} has no call ({row['call']}): there is nothing to agree or disagree with")
        reviews[label] = Review(agree={"agree": True, "disagree": False}.get(opinion), truth=truth or None)
    try:
        saved = monitor().store.save_feedback(rid, reviews, reader=request.form.get("reader"))
    except LookupError:
        abort(404, "This result is not in the results database (it was saved before the database existed), so "
                   "feedback cannot be stored for it.")
    flash(f"Feedback saved: {saved} finding{'s' if saved != 1 else ''} reviewed.", "info")
    return redirect(url_for("views.result", rid=rid, _anchor="feedback"), 303)


# -- export ------------------------------------------------------------------------------------------------------------

def _time_arg(name: str) -> datetime | None:
    text = request.args.get(name)
    if not text:
        return None
    if "T" in text:  # an unencoded "+00:00" in a query string arrives as " 00:00"
        text = text.replace(" ", "+")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        abort(400, f"?{name}= must be an ISO 8601 date or time, e.g. 2026-12-01 or 2026-12-01T08:00:00Z; got "
                   f"{text[:40]!r}")
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _export_args() -> dict:
    try:
        limit = int(request.args.get("limit", API_LIMIT))
    except ValueError:
        abort(400, "?limit= must be a whole number")
    if not 1 <= limit <= API_LIMIT:
        abort(400, f"?limit= must be between 1 and {API_LIMIT}")
    return {"since": _time_arg("since"), "until": _time_arg("until"), "limit": limit,
            "reviewed_only": request.args.get("reviewed") == "1"}


@bp.get("/api/results")
def api_results():
    """Analyses (oldest first) since ?since= (ISO 8601), until ?until=, at most ?limit= (1000); ?reviewed=1 only
    those with feedback. "next" is the ?since= that continues the list when it was cut at the limit."""
    args = _export_args()
    rows = monitor().store.analyses(**args)
    more = len(rows) == args["limit"]
    return jsonify(analyses=rows, count=len(rows),
                   next=url_for("monitoring.api_results", since=rows[-1]["created"], limit=args["limit"],
                                _external=True) if more else None)


def export_csv(rows: list[dict]) -> str:
    """Analyses as CSV: one row each, with every label's probability, call, agreement and true label."""
    labels = list(dict.fromkeys(a["label"] for row in rows for a in row["labels"]))
    buffer = io.StringIO()
    writer = SpreadsheetWriter(buffer, lineterminator="\n")
    writer.writerow(["created", "result_id", "source", "model_name", "model_hash", "backend", "outcome", "reason",
                     "in_scope", "scope_score", "image_format", "width", "height", "bit_depth", "photometric",
                     "latency_ms", "reader",
                     *(f"{label} {part}" for label in labels for part in ("probability", "call", "agree", "truth"))])
    for row in rows:
        by_label = {a["label"]: a for a in row["labels"]}
        readers = {a["feedback"]["reader"] for a in row["labels"] if a["feedback"] and a["feedback"]["reader"]}
        cells = []
        for label in labels:
            a = by_label.get(label)
            f = a["feedback"] if a else None
            cells += ["" if a is None else f"{a['probability']:.6f}", "" if a is None else a["call"],
                      "" if f is None or f["agree"] is None else ("agree" if f["agree"] else "disagree"),
                      (f["truth"] if f and f["truth"] else "not assessed") if a else ""]
        image = row["image"]
        writer.writerow([row["created"], row["result_id"] or "", row["source"], row["model"]["name"] or "",
                         row["model"]["hash"] or "", row["model"]["backend"] or "", row["outcome"],
                         row["reason"] or "", "" if row["in_scope"] is None else int(row["in_scope"]),
                         "" if row["scope_score"] is None else f"{row['scope_score']:.6f}",
                         image["format"] or "", image["width"] or "", image["height"] or "", image["bit_depth"] or "",
                         image["photometric"] or "",
                         "" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}",
                         "; ".join(sorted(readers)), *cells])
    return buffer.getvalue()


@bp.get("/api/results.csv")
def api_results_csv():
    """The same analyses as /api/results, as CSV (for local validation: ?reviewed=1 keeps the reviewed ones)."""
    rows = monitor().store.analyses(**_export_args())
    return Response(export_csv(rows), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=chestxray-analyses.csv",
                             "Cache-Control": "no-store"})


# -- /monitor ----------------------------------------------------------------------------------------------------------

def _period_arg() -> str:
    period = request.args.get("period", "day")
    return period if period in PERIODS else "day"


def monitor_figures(period: str) -> dict:
    """Everything /monitor shows for the chosen period length."""
    m = monitor()
    until = datetime.now(UTC)
    since = until - timedelta(days=PERIODS[period] * (7 if period == "week" else 1))
    columns = m.store.columns(since=since, model_hash=m.model.hash)
    return {"periods": periods(columns, period, m.reference, m.limits), "columns": columns, "since": since,
            "until": until}


@bp.get("/monitor")
def monitor_page():
    m = monitor()
    period = _period_arg()
    figures = monitor_figures(period)
    status = m.status()
    window = m.store.columns(last=m.limits.window, model_hash=m.model.hash)
    in_scope = np.array([v is not False for v in window["in_scope"]], dtype=bool) & (window["outcome"] == "answered")
    calls = window["call"][in_scope]
    labels = window["labels"] or (list(m.reference.prevalence) if m.reference else [])
    label_rows = []
    for label in labels:
        j = window["labels"].index(label) if label in window["labels"] else None
        rate = float(np.mean(calls[:, j] == POSITIVE)) if j is not None and len(calls) else None
        label_rows.append({"label": label, "rate": rate, "n": int(len(calls)),
                           "prevalence": m.reference.prevalence.get(label) if m.reference else None,
                           "reference_rate": m.reference.positive_rate.get(label) if m.reference else None})
    return render_template(
        "monitor.html", period=period, periods=PERIODS, figures=figures, status=status, limits=m.limits,
        reference=m.reference, label_rows=label_rows, model_version=m.model, store_url=m.store.shown_url,
        agreement=agreement(m.store.reviews(model_hash=m.model.hash), labels), write_errors=m.write_errors, plots=PLOTS,
        latency_p50=percentile(window["latency_ms"], 50), latency_p95=percentile(window["latency_ms"], 95))


def _figure() -> tuple[Figure, object]:
    from matplotlib.figure import Figure  # imported when a plot is drawn: ~0.3 s off every start of the app

    fig = Figure(figsize=(7.5, 2.6), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def plot_png(name: str, period: str) -> bytes:
    """One of PLOTS over the chosen periods, as PNG bytes (matplotlib Agg, no pyplot: safe in threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, DateFormatter

    m = monitor()
    figures = monitor_figures(period)
    rows = figures["periods"]
    x = [p.start for p in rows]
    fig, ax = _figure()
    if not rows:
        ax.text(0.5, 0.5, "no analyses yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    elif name == "volume":
        bottom = np.zeros(len(rows))
        for source in sorted({s for p in rows for s in p.volume}):
            counts = np.array([p.volume.get(source, 0) for p in rows], dtype=float)
            ax.bar(x, counts, bottom=bottom, label=source, width=0.8 if period == "day" else 5)
            bottom += counts
        ax.set_ylabel("analyses")
    elif name == "rates":
        ax.plot(x, [100 * (p.refused_rate or 0) for p in rows], marker="o", label="refused")
        ax.plot(x, [100 * (p.out_of_scope_rate or 0) for p in rows], marker="s", label="out of scope")
        if m.reference is not None and m.reference.out_of_scope_rate is not None:
            ax.axhline(100 * m.reference.out_of_scope_rate, color="grey", ls=":", label="reference out of scope")
        ax.set_ylabel("% of analyses")
    elif name == "drift":
        for quantity in INPUTS:
            ax.plot(x, [_psi_of(p.drift, quantity) for p in rows], marker="o", label=quantity_name(quantity))
        ax.plot(x, [max((r.psi for r in p.drift if r.psi is not None and r.quantity.startswith("probability:")),
                        default=np.nan) for p in rows], marker="^", label="largest label probability")
        ax.axhline(m.limits.psi, color="#b91c1c", ls="--", label=f"alert limit {m.limits.psi:g}")
        ax.set_ylabel("PSI vs reference")
    elif name == "latency":
        ax.plot(x, [p.latency_p50 or np.nan for p in rows], marker="o", label="p50")
        ax.plot(x, [p.latency_p95 or np.nan for p in rows], marker="s", label="p95")
        ax.set_ylabel("latency (ms)")
    if rows:
        # Every plot spans the whole chosen window with dates as ticks: with one or two periods of data, matplotlib's
        # own limits stretch a lone point over years or a lone bar over hours.
        ax.set_xlim(figures["since"], figures["until"] + timedelta(days=1))
        ax.xaxis.set_major_locator(AutoDateLocator(maxticks=8))
        ax.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
        ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _psi_of(rows: list[DriftRow], quantity: str) -> float:
    return next((r.psi for r in rows if r.quantity == quantity and r.psi is not None), np.nan)


@bp.get("/monitor/<name>.png")
def monitor_plot(name: str):
    if name not in PLOTS:
        abort(404, f"no plot {name!r}; plots: {', '.join(PLOTS)}")
    return Response(plot_png(name, _period_arg()), mimetype="image/png", headers={"Cache-Control": "no-store"})


# -- /metrics ----------------------------------------------------------------------------------------------------------

class StoreCollector:
    """Prometheus metrics read from the results database at each scrape (so every app server sharing a PostgreSQL
    reports the same totals) and from this process (write errors)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m: Monitor = self.app.extensions[MONITOR_KEY]
        totals = CounterMetricFamily("chestxray_analyses", "Analyses recorded in the results database",
                                     labels=["source", "outcome"])
        for (source, outcome), n in m.store.totals().items():
            totals.add_metric([source, outcome], n)
        yield totals
        errors = CounterMetricFamily("chestxray_store_write_errors", "Analyses this process could not record")
        errors.add_metric([], m.write_errors)
        yield errors
        window = m.store.columns(last=m.limits.window, model_hash=m.model.hash)
        latency = GaugeMetricFamily("chestxray_latency_seconds", "Analysis latency over the drift window",
                                    labels=["quantile"])
        for q in (50, 95):
            value = percentile(window["latency_ms"], q)
            if value is not None:
                latency.add_metric([f"{q / 100:g}"], value / 1000.0)
        yield latency
        answered = window["outcome"] == "answered"
        in_scope = [v for v in window["in_scope"][answered] if v is not None]
        if in_scope:
            yield GaugeMetricFamily("chestxray_out_of_scope_ratio", "Out-of-scope share of the drift window",
                                    value=sum(v is False for v in in_scope) / len(in_scope))
        status = m.status()
        if status is None:
            return
        psi = GaugeMetricFamily("chestxray_drift_psi", "Population stability index vs the reference",
                                labels=["quantity"])
        ks = GaugeMetricFamily("chestxray_drift_ks", "Kolmogorov-Smirnov statistic vs the reference",
                               labels=["quantity"])
        alert = GaugeMetricFamily("chestxray_drift_alert", "1 while the quantity is beyond its alert limit",
                                  labels=["quantity"])
        for row in status.rows:
            if row.psi is not None:
                psi.add_metric([row.quantity], row.psi)
            if row.ks is not None:
                ks.add_metric([row.quantity], row.ks)
            alert.add_metric([row.quantity], float(row.alert))
        yield psi
        yield ks
        yield alert
        yield GaugeMetricFamily("chestxray_drift_window_analyses", "Analyses in the drift window", value=status.n)


@bp.get("/metrics")
def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = current_app.extensions.get("chestxray.metrics")
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector(current_app._get_current_object()))
        current_app.extensions["chestxray.metrics"] = registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
