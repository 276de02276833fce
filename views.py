"""The web app's routes, as one Blueprint: thin views over chestxray.predictor and chestxray.results.

Every view reads the Predictor and the ResultStore that create_app hung on app.extensions; core errors map to
HTTP here (InvalidImage -> 400, UnsupportedFormat -> 415, ResultNotFound -> 404, no model -> 503, every
analysis slot busy -> 503 with Retry-After, a full results disk -> 507, a cross-origin API request -> 403).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from flask import (
    Blueprint,
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
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from chestxray.imaging import ACCEPTED, InvalidImage, UnsupportedFormat
from chestxray.predictor import Predictor
from chestxray.results import HEATMAP_SCALES, ResultNotFound, ResultStore, default_label, label_names, ranked
from predictions import TRAIN_COMMAND

if TYPE_CHECKING:
    from main import ModelState

POINT_COMMAND = "python main.py --checkpoint PATH"
RETRY_AFTER_SECONDS = 5  # what a 503 "busy" tells clients to wait

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


class AnalysisGate:
    """At most `slots` analyses run at once and `queue` more wait (up to `wait` seconds); beyond that, Busy at once.

    Bounding the analyses, not the worker threads, keeps threads free for /healthz and static files while images
    are being analysed (issue 11: four requests of ten 60 MP PNGs each made /healthz wait 28 s).
    """

    def __init__(self, slots: int, queue: int, wait: float = 60.0):
        self.slots, self.capacity, self.wait = threading.BoundedSemaphore(slots), slots + queue, wait
        self.admitted = 0  # analysing + waiting
        self._lock = threading.Lock()

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Hold one analysis slot for the block; raises Busy when the queue is full or the wait runs out."""
        with self._lock:
            if self.admitted >= self.capacity:
                raise Busy(retry_after=RETRY_AFTER_SECONDS)
            self.admitted += 1
        try:
            if not self.slots.acquire(timeout=self.wait):
                raise Busy(retry_after=RETRY_AFTER_SECONDS)
            try:
                yield
            finally:
                self.slots.release()
        finally:
            with self._lock:
                self.admitted -= 1


def no_model_message(reason: str) -> str:
    """The one message every page, the 503 answers and the console give when no model is loaded."""
    return (
        f"No model is loaded ({reason.rstrip('.')}). Train one with: {TRAIN_COMMAND} "
        f"— or point the app at one with: {POINT_COMMAND} (or set CXR_CHECKPOINT=PATH)."
    )


def model_state() -> ModelState:
    """The ModelState built at start-up (app.extensions["chestxray"])."""
    return current_app.extensions["chestxray"]


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
    try:
        return result_store().load(rid)
    except ResultNotFound as exc:
        abort(404, str(exc))


def analyse(upload: FileStorage, predictor: Predictor, batch: set[str]) -> dict:
    """Sniff, read and predict one upload, save the result; returns its record and adds its id to `batch`.

    Aborts 415/400 for bad input, 507 when the results disk is full. Pruning spares `batch` (this request's results).
    """
    try:
        prediction = predictor.predict(upload.read(), filename=upload.filename or "")
    except UnsupportedFormat as exc:
        abort(415, str(exc))
    except InvalidImage as exc:
        abort(400, str(exc))
    try:
        record = result_store().save(prediction, source=request_source(), protect=batch)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("cannot save a result: the results folder's disk is full")  # one line, no traceback
        raise DiskFull() from None
    batch.add(record["id"])
    return record


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
    """The JSON answer for one result: result.json's record (to_dict() + id, created, display_size) + its URLs."""
    rid = record["id"]
    return {
        **{key: value for key, value in record.items() if key != "source"},  # the keyed client hash stays inside
        "image": url_for("views.result_image", rid=rid),
        "heatmaps": {label: url_for("views.heatmap", rid=rid, label=label) for label in label_names(record)},
        "result": url_for("views.result", rid=rid),
    }


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(request.args.get(name, default))))
    except ValueError:
        return default


@bp.get("/")
def index():
    return render_template("index.html")


@bp.post("/predict")
def predict():
    predictor = require_predictor()
    uploads = [f for f in request.files.getlist("file") if f.filename]  # browsers send one empty part if none
    if not uploads:
        abort(400, f"No file was chosen: pick one or more {ACCEPTED} files.")
    limit = current_app.config["MAX_FILES"]
    if len(uploads) > limit:
        abort(400, f"Too many files ({len(uploads)}): upload at most {limit} at once.")
    records, failures, batch = [], [], set()
    with current_app.extensions["analyses"].enter():
        for upload in uploads:  # one file's failure, whatever it is, never loses the others' results
            try:
                records.append(analyse(upload, predictor, batch))
            except HTTPException as exc:
                failures.append(exc.code)
                flash(f"{shown_name(upload.filename)}: {exc.description}", "error")
            except Exception:
                log.exception("analysing one upload of a batch failed")
                failures.append(500)
                flash(f"{shown_name(upload.filename)}: something went wrong on our side while analysing it (the "
                      "error was logged); the other files were analysed.", "error")
    if not records:
        return render_template("index.html"), failures[0]
    if len(records) == 1:
        return redirect(url_for("views.result", rid=records[0]["id"]), 303)
    return redirect(url_for("views.results", ids=",".join(r["id"] for r in records)), 303)


@bp.get("/results")
def results():
    ids = [rid for rid in request.args.get("ids", "").split(",") if rid][: current_app.config["MAX_FILES"]]
    if not ids:
        abort(404, "No results were named.")
    items = []
    for rid in ids:
        try:
            items.append(result_store().load(rid))
        except ResultNotFound:
            items.append(None)  # expired or unknown: listed as such
    if not any(items):
        abort(404, "These results do not exist or have expired.")
    return render_template("results.html", items=items, ranked=ranked)


@bp.get("/results/<rid>")
def result(rid: str):
    record = load_result(rid)
    label = request.args.get("label")
    if label not in label_names(record):
        label = default_label(record)
    rows = ranked(record)
    scale = request.args.get("scale") if request.args.get("scale") in HEATMAP_SCALES else "own"
    return render_template(
        "result.html", r=record, rows=rows, label=label, selected=next(r for r in rows if r["label"] == label),
        opacity=round(_int_arg("opacity", 60, 0, 100), -1), plain=request.args.get("plain") == "1", scale=scale,
        show_anyway=request.args.get("show") == "1",
    )


@bp.get("/results/<rid>/image.png")
def result_image(rid: str):
    try:
        return send_file(result_store().image_path(rid), mimetype="image/png")
    except ResultNotFound as exc:
        abort(404, str(exc))


@bp.get("/results/<rid>/heatmap/<label>.png")
def heatmap(rid: str, label: str):
    try:
        return send_file(result_store().heatmap_path(rid, label, request.args.get("scale", "own")),
                         mimetype="image/png")
    except ResultNotFound as exc:
        abort(404, str(exc))


@bp.get("/api/results/<rid>")
def api_result(rid: str):
    return jsonify(api_document(load_result(rid)))


@bp.post("/api/predict")
def api_predict():
    # CSRF-exempt (no cookie is needed or used), so a browser request from another site's page is refused by its
    # own headers instead: five such posts could otherwise evict a user's results (issue 11).
    if cross_origin_request():
        abort(403, "cross-origin requests to the API are refused: post from this site's own pages, or from a "
                   "script or command line (which send no Origin header)")
    predictor = require_predictor()
    upload = request.files.get("file")
    if upload is None:
        abort(400, f"missing the multipart form field 'file' ({ACCEPTED})")
    with current_app.extensions["analyses"].enter():
        return jsonify(api_document(analyse(upload, predictor, set())))


@bp.get("/api/model")
def api_model():
    return jsonify(require_predictor().model_card())


@bp.get("/favicon.ico")
def favicon():
    return "", 204  # no icon; answers browsers' automatic request without a 404 in their console


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok", model_loaded=model_state().predictor is not None)
