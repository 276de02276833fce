"""The web app's routes, as one Blueprint: thin views over chestxray.predictor and chestxray.results.

Every view reads the Predictor and the ResultStore that create_app hung on app.extensions; core errors map to
HTTP here (InvalidImage -> 400, UnsupportedFormat -> 415, no model -> 503, every analysis slot busy -> 503 with
Retry-After, a full results disk -> 507, a cross-origin API request -> 403), except ResultNotFound (a malformed,
unknown, expired or deleted result id), which any view may let through: chestxray.web.http answers it 404.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from chestxray.calls import statements
from chestxray.fileio import SpreadsheetWriter
from chestxray.imaging import ACCEPTED, InvalidImage, UnsupportedFormat
from chestxray.messages import POINT_COMMAND, TRAIN_COMMAND
from chestxray.predictor import Predictor
from chestxray.reporting.formatting import (
    SCALES,
    FindingText,
    auroc_text,
    change_text,
    finding_texts,
    label_name,
    percent,
    strongest_zone,
)
from chestxray.results import ResultNotFound, ResultStore, default_label, label_names, ranked
from chestxray.service import ResultNotSaved, analyse_and_store
from chestxray.trust.evidence import format_call, format_scope
from chestxray.web import monitoring

if TYPE_CHECKING:
    from chestxray.reporting.pdf import ReportPage
    from chestxray.web.checkpoints import ModelState

RETRY_AFTER_SECONDS = 5  # what a 503 "busy" tells clients to wait

DEFAULT_SCALE = "own"
MAX_FLASHED = 5  # per-file error messages carried to the upload page; the rest are counted
API_ENDPOINTS = (  # the /api index: (method, rule, what it does)
    ("POST", "/api/predict", "analyse one or more images: multipart field 'file' (repeat it for several); "
                             "answers one result document, or a list for several files"),
    ("GET", "/api/results/<id>", "a saved result's document (probabilities, calls, thresholds, model, URLs)"),
    ("DELETE", "/api/results/<id>", "delete a saved result now (image, heatmaps and record)"),
    ("GET", "/api/model", "the loaded model's card (architecture, labels, thresholds, training summary)"),
    ("GET", "/api/models", "the checkpoints of the models folder (--models-dir) and which one is served"),
    ("GET", "/results/<id>/heatmaps.npy", "the raw class activation maps, float32 (labels, h, w) in label order"),
    ("GET", "/results/<id>/report.pdf", "a one-page PDF report (query: label, scale, plain)"),
    ("GET", "/healthz", "liveness and whether a model is loaded"),
)

bp = Blueprint("views", __name__)
log = logging.getLogger("chestxray.web")


class Busy(ServiceUnavailable):
    """503: every analysis slot and queue place is taken; Retry-After says when to try again."""

    description = "The server is busy analysing other images: try again in a few seconds."


class DiskFull(HTTPException):
    """507 Insufficient Storage (RFC 4918): the results folder's disk is full."""

    code = 507
    description = ("The server's disk is full: the result could not be saved. Try again later, or tell the server's "
                   "administrator.")


class ReadOnlyResults(ServiceUnavailable):
    """503: the results folder cannot be written (read-only file system, or no permission)."""

    description = ("The results folder cannot be written at the moment (it is read-only or the server may not write "
                   "there): nothing new can be analysed or deleted, but saved results can still be viewed. Tell the "
                   "server's administrator.")


class AnalysisGate:
    """At most `slots` analyses run at once and `queue` more wait, first come first served, up to `wait` seconds;
    beyond that, Busy at once (503 with Retry-After).

    Bounding the analyses, not the worker threads, keeps threads free for /healthz and static files while images
    are being analysed (four requests of ten 60 MP PNGs each once made /healthz wait 28 s). The waiting requests
    form a line: a request that arrives while others wait never overtakes them, so a few readers sharing a server
    each wait their turn instead of one waiting for ever.
    """

    def __init__(self, slots: int, queue: int, wait: float = 60.0):
        self.slots, self.capacity, self.wait = slots, slots + queue, wait
        self._running = 0
        self._line: collections.deque = collections.deque()  # waiting requests' tickets, in arrival order
        self._cond = threading.Condition()

    @property
    def admitted(self) -> int:
        """Requests analysing or waiting."""
        with self._cond:
            return self._running + len(self._line)

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Hold one analysis slot for the block; raises Busy when the line is full or the wait runs out."""
        ticket = object()
        with self._cond:
            if self._running + len(self._line) >= self.capacity:
                raise Busy(retry_after=RETRY_AFTER_SECONDS)
            self._line.append(ticket)
            turn = self._cond.wait_for(lambda: self._line[0] is ticket and self._running < self.slots, self.wait)
            self._line.remove(ticket)
            self._cond.notify_all()  # the next in line may be first now
            if not turn:
                raise Busy(retry_after=RETRY_AFTER_SECONDS)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


def no_model_message(reason: str) -> str:
    """The one message every page, the 503 answers and the console give when no model is loaded."""
    return (
        f"No model is loaded ({reason.rstrip('.')}). Train one with: {TRAIN_COMMAND} "
        f"— or point the app at one with: {POINT_COMMAND} (or set CXR_CHECKPOINT=PATH)."
    )


def model_state() -> ModelState:
    """The ModelState built at start-up (app.extensions["chestxray"])."""
    return current_app.extensions["chestxray"]


@bp.app_context_processor
def model_context() -> dict:
    """What every template (base.html's model card and no-model banner) knows of the loaded model."""
    state = model_state()
    return {
        "model": state.predictor.model_card() if state.predictor else None,
        "model_error": state.error,  # the loader's message; base.html adds the commands
        "train_command": TRAIN_COMMAND,
        "point_command": POINT_COMMAND,
        "checkpoint": state.checkpoint,
    }


# Names and numbers are written by chestxray.reporting.formatting only, so page, tab title and PDF print the same
# strings.
bp.add_app_template_filter(label_name, "label_name")
bp.add_app_template_filter(percent, "percent")
bp.add_app_template_global(auroc_text, "auroc_text")
bp.add_app_template_global(format_call, "format_call")  # probability/threshold texts that agree with the call
bp.add_app_template_global(format_scope, "format_scope")
bp.add_app_template_global(lambda endpoint, **values: external_url(endpoint, **values), "external_url")
bp.add_app_template_global(statements, "statements")  # the scope, warning, demo and evidence sentences


def result_store() -> ResultStore:
    """The ResultStore built at start-up (app.extensions["chestxray.results"])."""
    return current_app.extensions["chestxray.results"]


def require_predictor() -> Predictor:
    """The loaded Predictor, or a 503 saying how to get one."""
    state = model_state()
    if state.predictor is None:
        abort(503, no_model_message(state.error or "no checkpoint"))
    return state.predictor


def load_result(rid: str) -> dict:
    """A saved result's record; 404 for a malformed, unknown or expired id."""
    return result_store().load(rid)


def analyse(upload: FileStorage, predictor: Predictor, batch: set[str]) -> dict:
    """Analyse and save one upload (chestxray.service); returns its record and adds its id to `batch`.

    Aborts 415/400 for bad input, 507 when the results disk is full. Pruning spares `batch` (this request's results).
    """
    try:
        stored = analyse_and_store(predictor, result_store(), upload.read(), source=request_source(),
                                   channel=monitoring.request_source(), filename=upload.filename or "",
                                   monitor=monitoring.monitor(), protect=batch)
    except UnsupportedFormat as exc:
        abort(415, str(exc))
    except InvalidImage as exc:
        abort(400, str(exc))
    except ResultNotSaved as exc:
        raise storage_error(exc, "save a result") from None
    batch.add(stored.record["id"])
    return stored.record


def storage_error(exc: OSError, action: str) -> HTTPException:
    """The answer to a results folder that cannot be written: 507 when its disk is full, 503 when it is read-only
    or not ours to write (the app goes on showing saved results). One log line, no traceback."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("cannot %s: the results folder's disk is full", action)
        return DiskFull()
    log.error("cannot %s: the results folder cannot be written (%s)", action, exc.strerror or type(exc).__name__)
    return ReadOnlyResults(retry_after=RETRY_AFTER_SECONDS * 12)


def delete_saved(rid: str) -> None:
    """Delete a saved result; 404 for an unknown one, 503/507 when the results folder cannot be written."""
    try:
        result_store().delete(rid)
    except OSError as exc:
        raise storage_error(exc, "delete a result") from None


def external_url(endpoint: str, **values) -> str:
    """An absolute URL: PUBLIC_URL (configuration) + the path, else the request's host, which TRUSTED_HOSTS has
    already checked; never an address a client made up."""
    base = current_app.config.get("PUBLIC_URL")
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)


def request_source() -> str:
    """Who sent the request, as a keyed hash of the client address: retention is counted per source, and the
    address itself is never written."""
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, (request.remote_addr or "").encode(), hashlib.sha256).hexdigest()[:16]


def cross_origin_request() -> bool:
    """True for a browser request sent by another site's page (Origin / Sec-Fetch-Site); scripts send neither."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    return origin is not None and origin != request.host_url.rstrip("/")


def shown_name(filename: str, limit: int = 80) -> str:
    """An upload's file name as a message shows it: its last path part, no control characters, at most `limit` chars."""
    # The name is the client's to choose: NUL bytes, bidi overrides and "../" would otherwise be echoed into the page.
    name = "".join(ch for ch in filename if ch.isprintable()).replace("\\", "/").rsplit("/", 1)[-1]
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def api_document(record: dict) -> dict:
    """The JSON answer for one result: result.json's record (Prediction.to_dict() + id, created, display_size) + URLs.

    The URLs are absolute, so a script can fetch them as they are.
    """
    rid = record["id"]
    return {
        **{key: value for key, value in record.items() if key != "source"},  # the keyed client hash stays inside
        "image": external_url("views.result_image", rid=rid),
        "heatmaps": {label: external_url("views.heatmap", rid=rid, label=label)
                     for label in label_names(record)},
        "heatmaps_npy": external_url("views.heatmaps_npy", rid=rid),
        "report": external_url("views.report_pdf", rid=rid),
        "result": external_url("views.result", rid=rid),
    }


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(request.args.get(name, default))))
    except ValueError:
        return default


@dataclass(frozen=True)
class View:
    """How a result is shown, from the query string: heatmap label, opacity (0..100, step 10), plain image, scale."""

    label: str
    opacity: int
    plain: bool
    scale: str

    def args(self) -> dict:
        """This view's query parameters for url_for (plain and scale left out at their defaults)."""
        values = {"label": self.label, "opacity": self.opacity, "plain": 1 if self.plain else None,
                  "scale": None if self.scale == DEFAULT_SCALE else self.scale}
        return {key: value for key, value in values.items() if value is not None}


def view_from_args(record: dict) -> View:
    """The View the query string asks for; no label gives the default one, an unknown label 404 (showing another
    label's heatmap under the asked-for name would mislead); unknown scales fall back to the default."""
    label = request.args.get("label")
    if label is None:
        label = default_label(record)
    elif label not in label_names(record):
        abort(404, f"This result has no label {shown_name(label, 40)!r}. Its labels are: "
                   f"{', '.join(label_names(record))}.")
    scale = request.args.get("scale", DEFAULT_SCALE)
    return View(label=label, opacity=round(_int_arg("opacity", 60, 0, 100), -1),
                plain=request.args.get("plain") == "1", scale=scale if scale in SCALES else DEFAULT_SCALE)


def heat_descriptions(record: dict, maps: np.ndarray) -> dict[str, str]:
    """Per label, the heatmap in words for screen readers: "Heatmap of Effusion: strongest in the lower zone, …"
    (an out-of-scope image's in the picture's words, not anatomy's)."""
    descriptions = {}
    in_scope = record.get("in_scope") is not False
    for label, cam in zip(label_names(record), maps):
        zone = strongest_zone(cam, in_scope)
        where = f"strongest in {zone}" if zone else "no region supports this finding"
        descriptions[label] = f"Heatmap of {label_name(label)}: {where}."
    return descriptions


@dataclass(frozen=True)
class BatchItem:
    """One file of a batch: its position, its name as uploaded (held in this response only), its record or error."""

    number: int
    name: str
    record: dict | None
    error: str | None = None


def batch_items(names: list[str], ids: list[str], errors: list[str]) -> list[BatchItem]:
    """Pair the form's parallel name/id/error lists; an unknown or expired id becomes an item with that error."""
    limit = current_app.config["MAX_FILES"]
    if not ids or len(ids) > limit:
        abort(400, f"Name between 1 and {limit} results.")
    names = (names + [""] * len(ids))[: len(ids)]
    errors = (errors + [""] * len(ids))[: len(ids)]
    items = []
    for number, (name, rid, error) in enumerate(zip(names, ids, errors), start=1):
        record = None
        if rid:
            try:
                record = result_store().load(rid)
            except ResultNotFound:
                error = "this result has expired or was deleted"
        items.append(BatchItem(number, shown_name(name) or f"Image {number}", record,
                               None if record else (error or "not analysed")))
    return items


def sort_items(items: list[BatchItem], key: str) -> list[BatchItem]:
    """Items in upload order ("" or unknown key), by top probability ("top") or by one finding's probability (label);
    failed files last."""
    def probability(item: BatchItem) -> float:
        rows = item.record["labels"]
        if key == "top":
            return max(row["probability"] for row in rows)
        return next((row["probability"] for row in rows if row["label"] == key), -1.0)

    if not key or all(item.record is None for item in items):
        return items
    return sorted(items, key=lambda item: (item.record is None, -probability(item) if item.record else 0.0))


def render_batch(items: list[BatchItem]) -> str:
    """The batch page: a summary table (file, in scope, called findings, top probability) and a card per file."""
    labels = next(label_names(item.record) for item in items if item.record)
    sort = request.values.get("sort", "")
    if sort not in ("top", *labels):
        sort = ""
    return render_template("results.html", items=sort_items(items, sort), all_items=items, labels=labels, sort=sort,
                           ranked=ranked)


SUMMARY_COLUMNS = ("number", "file", "result", "in_scope", "called_findings", "top_finding", "top_probability")


def summary_csv(items: list[BatchItem]) -> str:
    """The batch summary as CSV text: one row per file with each label's probability and call (the core's words);
    failed files keep their error."""
    labels = next(label_names(item.record) for item in items if item.record)
    buffer = io.StringIO()
    writer = SpreadsheetWriter(buffer, lineterminator="\n")
    writer.writerow([*SUMMARY_COLUMNS, *labels, *(f"{label} call" for label in labels), "error"])
    for item in items:
        if item.record is None:
            writer.writerow([item.number, item.name, "", "", "", "", "", *[""] * 2 * len(labels), item.error])
            continue
        record, top = item.record, ranked(item.record)[0]
        in_scope = record.get("in_scope")
        by_label = {row["label"]: row for row in record["labels"]}
        writer.writerow([
            item.number, item.name, external_url("views.result", rid=record["id"]),
            "" if in_scope is None else ("yes" if in_scope else "no"), "|".join(record["positive"]),
            # Shortest round-trip text of each probability: the page's rounding of the CSV's number gives the page's
            # string (six decimals did not: 0.17499996 -> 0.175000 reads 17.5 %, the page 17.4 %).
            top["label"], repr(float(top["probability"])),
            *(repr(float(by_label[label]["probability"])) if label in by_label else "nan" for label in labels),
            *(by_label[label]["call"] if label in by_label else "" for label in labels), "",
        ])
    return buffer.getvalue()


@bp.get("/")
def index():
    return render_template("index.html")


def chosen_files() -> list[FileStorage]:
    """The request's non-empty `file` parts; 400 when there are none or more than MAX_FILES."""
    uploads = [f for f in request.files.getlist("file") if f.filename]  # browsers send one empty part if none
    if not uploads:
        abort(400, f"No file was chosen: pick one or more {ACCEPTED} files.")
    limit = current_app.config["MAX_FILES"]
    if len(uploads) > limit:
        abort(400, f"Too many files ({len(uploads)}): upload at most {limit} at once.")
    return uploads


@bp.post("/predict")
def predict():
    predictor = require_predictor()
    items, batch = [], set()
    with current_app.extensions["analyses"].enter():
        for number, upload in enumerate(chosen_files(), start=1):
            name = shown_name(upload.filename)
            try:  # one file's failure, whatever it is, never loses the others' results
                items.append(BatchItem(number, name, analyse(upload, predictor, batch)))
            except HTTPException as exc:
                items.append(BatchItem(number, name, None, exc.description))
            except Exception:
                log.exception("analysing one upload of a batch failed")
                items.append(BatchItem(number, name, None, "something went wrong on our side while analysing it "
                                       "(the error was logged); the other files were analysed."))
    if not any(item.record for item in items):
        # Nothing to show: back to the upload page (a redirect, so a reload does not post the files again).
        for item in items[:MAX_FLASHED]:
            flash(f"{item.name}: {item.error}", "error")
        if len(items) > MAX_FLASHED:  # the session cookie holding the messages must stay under 4 KB
            flash(f"… and {len(items) - MAX_FLASHED} more files could not be analysed.", "error")
        return redirect(url_for("views.index"), 303)
    if len(items) == 1:
        return redirect(url_for("views.result", rid=items[0].record["id"]), 303)
    # Several files: the page is the response itself, so the files' names are shown without being stored anywhere.
    return render_batch(items)


@bp.get("/results")
def results():
    ids = [rid for rid in request.args.get("ids", "").split(",") if rid][: current_app.config["MAX_FILES"]]
    if not ids:
        abort(404, "No results were named.")
    items = batch_items([], ids, [])
    if not any(item.record for item in items):
        abort(404, "These results do not exist or have expired.")
    return render_batch(items)


@bp.post("/results")
def results_named():
    """The batch page for results named in a form (id, name and error fields, in upload order): how the upload page's
    script shows the file names after analysing the files one by one, and how the page re-sorts without a script."""
    items = batch_items(request.form.getlist("name"), request.form.getlist("id"), request.form.getlist("error"))
    if not any(item.record for item in items):
        abort(404, "These results do not exist or have expired.")
    return render_batch(items)


@bp.route("/results.csv", methods=["GET", "POST"])
def results_csv():
    """The batch summary table as CSV (POST: with the file names from the page's form; GET ?ids=: numbered)."""
    if request.method == "POST":
        items = batch_items(request.form.getlist("name"), request.form.getlist("id"), request.form.getlist("error"))
    else:
        items = batch_items([], [rid for rid in request.args.get("ids", "").split(",") if rid], [])
    if not any(item.record for item in items):
        abort(404, "These results do not exist or have expired.")
    return Response(summary_csv(items), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=chestxray-results.csv",
                             "Cache-Control": "no-store"})  # it may hold file names: keep it out of caches


@bp.get("/results/<rid>")
def result(rid: str):
    record = load_result(rid)
    view = view_from_args(record)
    rows = ranked(record)
    maps = np.load(result_store().heatmaps_path(rid))
    return render_template(
        "result.html", r=record, rows=rows, label=view.label, view=view, descriptions=heat_descriptions(record, maps),
        texts=finding_texts(record),
        top_call=next((row for row in rows if row["positive"]), None),
        selected=next(r for r in rows if r["label"] == view.label), opacity=view.opacity, plain=view.plain,
        scale=view.scale, scales=SCALES, show_anyway=request.args.get("show") == "1",
    )


# What makes two results' probabilities comparable: the same model and calibration (device and backend do not matter).
MODEL_IDENTITY = ("arch", "image_size", "labels", "thresholds", "training", "calibration", "evidence")


@dataclass(frozen=True)
class Change:
    """One label of a comparison: its texts in the earlier and the later result, the change, whether the call
    changed."""

    label: str
    name: str
    before: FindingText
    after: FindingText
    change: str
    call_changed: bool


def compare_changes(earlier: dict, later: dict) -> list[Change]:
    """The labels both results have: calls that changed first, then by the size of the change in probability."""
    before, after = finding_texts(earlier), finding_texts(later)
    p_before = {row["label"]: row["probability"] for row in earlier["labels"]}
    p_after = {row["label"]: row["probability"] for row in later["labels"]}
    changes = [Change(label, after[label].name, before[label], after[label],
                      change_text(p_before[label], p_after[label]), before[label].call != after[label].call)
               for label in label_names(later) if label in before]
    return sorted(changes, key=lambda c: (not c.call_changed, -abs(p_after[c.label] - p_before[c.label])))


@bp.get("/compare")
def compare():
    """Two results side by side (?id=A&id=B; the earlier first, within the same second the link's order): the same
    label's heatmap on both, one zoom, pan and window for both, and the findings whose call changed. Fewer or more
    than two ids: 400; an unknown id or a label not in both: 404."""
    ids = list(dict.fromkeys(rid for rid in request.args.getlist("id") if rid))
    if len(ids) != 2:
        abort(400, f"Choose two different results to compare (this link names {len(ids)}).")
    earlier, later = sorted((load_result(rid) for rid in ids), key=lambda record: record["created"])
    changes = compare_changes(earlier, later)
    if not changes:
        abort(400, "These two results share no label: they come from models with different label lists.")
    labels = [change.label for change in changes]
    label = request.args.get("label")
    if label is None:
        label = default_label(later) if default_label(later) in labels else labels[0]
    elif label not in labels:
        abort(404, f"These results have no label {shown_name(label, 40)!r} in common. Their labels are: "
                   f"{', '.join(labels)}.")
    same_model = all(earlier["model"].get(key) == later["model"].get(key) for key in MODEL_IDENTITY)
    return render_template("compare.html", earlier=earlier, later=later, changes=changes, label=label,
                           labels=[name for name in label_names(later) if name in labels],
                           opacity=round(_int_arg("opacity", 60, 0, 100), -1), same_model=same_model)


@bp.post("/results/<rid>/delete")
def delete_result(rid: str):
    delete_saved(rid)
    flash("The result was deleted: its image, heatmaps and findings are gone from this server.", "info")
    return redirect(url_for("views.index"), 303)


@bp.get("/results/<rid>/image.png")
def result_image(rid: str):
    return send_file(result_store().image_path(rid), mimetype="image/png")


@bp.get("/results/<rid>/heatmap/<label>.png")
def heatmap(rid: str, label: str):
    path = result_store().heatmap_path(rid, label, request.args.get("scale", DEFAULT_SCALE))
    return send_file(path, mimetype="image/png")


@bp.get("/results/<rid>/heatmaps.npy")
def heatmaps_npy(rid: str):
    return send_file(result_store().heatmaps_path(rid), mimetype="application/octet-stream", as_attachment=True,
                     download_name=f"heatmaps-{rid}.npy")


def report_page(rid: str, view: View | None = None) -> ReportPage:
    """The PDF report page of a saved result in the given view (default: the result's default view)."""
    from chestxray.reporting.pdf import ReportPage  # matplotlib's figure: only when a report is asked for

    record = load_result(rid)
    view = view or View(default_label(record), 60, False, DEFAULT_SCALE)
    image = np.asarray(Image.open(result_store().image_path(rid)).convert("L"))
    maps = np.load(result_store().heatmaps_path(rid))
    return ReportPage.from_record(record, image, maps, label=None if view.plain else view.label, scale=view.scale)


def pdf_response(pages: list[ReportPage], name: str, opacity: int = 60) -> Response:
    # Rendering costs about as much CPU per page as an analysis: it waits for the same slots (or gets 503), so a
    # report of many results never takes the threads /healthz and the other pages need.
    from chestxray.reporting.pdf import report_bytes

    with current_app.extensions["analyses"].enter():
        pdf = report_bytes(pages, opacity=opacity / 100)
    return Response(pdf, mimetype="application/pdf",
                    headers={"Content-Disposition": f"inline; filename={name}"})


@bp.get("/results/<rid>/report.pdf")
def report_pdf(rid: str):
    view = view_from_args(load_result(rid))
    return pdf_response([report_page(rid, view)], f"chestxray-report-{rid[:8]}.pdf", view.opacity)


@bp.get("/results/report.pdf")
def batch_report_pdf():
    ids = list(dict.fromkeys(rid for rid in request.args.get("ids", "").split(",") if rid))
    if not ids:
        abort(404, "No results were named.")
    limit = current_app.config["MAX_REPORT_PAGES"]
    if len(ids) > limit:
        abort(400, f"A PDF report holds at most {limit} results; {len(ids)} were named. Ask for fewer at a time.")
    return pdf_response([report_page(rid) for rid in ids], "chestxray-report.pdf")


@bp.get("/model")
def model_card():
    return render_template("model.html", card=require_predictor().model_card())


@bp.get("/api")
@bp.get("/api/")
def api_index():
    return jsonify(
        endpoints=[{"method": method, "path": rule, "description": text} for method, rule, text in API_ENDPOINTS],
        model_loaded=model_state().predictor is not None,
        example=f"curl -F file=@xray.png {external_url('views.api_predict')}",
    )


@bp.get("/api/results/<rid>")
def api_result(rid: str):
    return jsonify(api_document(load_result(rid)))


@bp.delete("/api/results/<rid>")
def api_delete_result(rid: str):
    delete_saved(rid)
    return jsonify(deleted=rid)


@bp.post("/api/predict")
def api_predict():
    # CSRF-exempt (no cookie is needed or used), so a browser request from another site's page is refused by its
    # own headers instead: five such posts could otherwise evict a user's results.
    if cross_origin_request():
        abort(403, "cross-origin requests to the API are refused: post from this site's own pages, or from a "
                   "script or command line (which send no Origin header)")
    predictor = require_predictor()
    if "file" not in request.files:
        abort(400, f"missing the multipart form field 'file' ({ACCEPTED})")
    uploads = chosen_files()
    with current_app.extensions["analyses"].enter():
        if len(request.files.getlist("file")) == 1:
            return jsonify(api_document(analyse(uploads[0], predictor, set())))
        # Several files: every one is analysed, as the page does, and answered in upload order as a list whose items
        # are result documents or {"file", "error", "status"} for a file that could not be analysed.
        answers, batch = [], set()
        for upload in uploads:
            try:
                answers.append({"file": shown_name(upload.filename), **api_document(analyse(upload, predictor, batch))})
            except HTTPException as exc:
                answers.append({"file": shown_name(upload.filename), "error": exc.description, "status": exc.code})
    return jsonify(answers)


@bp.get("/api/model")
def api_model():
    return jsonify(require_predictor().model_card())


@bp.get("/api/models")
def api_models():
    """The checkpoints of the models folder (MODELS_DIR), which one is served, and each one's adaptation record."""
    from chestxray.web.checkpoints import list_models  # otherwise imported only for type checking here

    served = model_state().checkpoint
    return jsonify(served=served, models=list_models(current_app.config.get("MODELS_DIR"), served))


@bp.get("/favicon.ico")
def favicon():
    return "", 204  # no icon; answers browsers' automatic request without a 404 in their console


@bp.get("/healthz")
def healthz():
    predictor = model_state().predictor
    if predictor is None:
        return jsonify(status="ok", model_loaded=False)
    return jsonify(status="ok", model_loaded=True, backend=predictor.choice or predictor.backend)
