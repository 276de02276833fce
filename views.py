"""The web app's routes, as one Blueprint: thin views over chestxray.predictor and chestxray.results.

Every view reads the Predictor and the ResultStore that create_app hung on app.extensions; core errors map to
HTTP here (InvalidImage -> 400, UnsupportedFormat -> 415, ResultNotFound -> 404, no model -> 503).
"""
from __future__ import annotations

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
from werkzeug.exceptions import HTTPException

from chestxray.imaging import ACCEPTED, InvalidImage, UnsupportedFormat
from chestxray.predictor import Predictor
from chestxray.results import ResultNotFound, ResultStore, default_label, label_names, ranked
from predictions import TRAIN_COMMAND

if TYPE_CHECKING:
    from main import ModelState

POINT_COMMAND = "python main.py --checkpoint PATH"

bp = Blueprint("views", __name__)


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


def analyse(upload: FileStorage, predictor: Predictor) -> dict:
    """Sniff, read and predict one upload, save the result; returns its record. Aborts 415/400 for bad input."""
    try:
        prediction = predictor.predict(upload.read(), filename=upload.filename or "")
    except UnsupportedFormat as exc:
        abort(415, str(exc))
    except InvalidImage as exc:
        abort(400, str(exc))
    return result_store().save(prediction)


def shown_name(filename: str, limit: int = 80) -> str:
    """An upload's file name as a message shows it: its last path part, no control characters, at most `limit` chars."""
    # The name is the client's to choose: NUL bytes, bidi overrides and "../" would otherwise be echoed into the page.
    name = "".join(ch for ch in filename if ch.isprintable()).replace("\\", "/").rsplit("/", 1)[-1]
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def api_document(record: dict) -> dict:
    """The JSON answer for one result: result.json's record (to_dict() + id, created, display_size) + its URLs."""
    rid = record["id"]
    return {
        **record,
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
    records, failures = [], []
    for upload in uploads:
        try:
            records.append(analyse(upload, predictor))
        except HTTPException as exc:
            failures.append(exc.code)
            flash(f"{shown_name(upload.filename)}: {exc.description}", "error")
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
    return render_template(
        "result.html", r=record, rows=rows, label=label, selected=next(r for r in rows if r["label"] == label),
        opacity=round(_int_arg("opacity", 60, 0, 100), -1), plain=request.args.get("plain") == "1",
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
        return send_file(result_store().heatmap_path(rid, label), mimetype="image/png")
    except ResultNotFound as exc:
        abort(404, str(exc))


@bp.get("/api/results/<rid>")
def api_result(rid: str):
    return jsonify(api_document(load_result(rid)))


@bp.post("/api/predict")
def api_predict():
    predictor = require_predictor()
    upload = request.files.get("file")
    if upload is None:
        abort(400, f"missing the multipart form field 'file' ({ACCEPTED})")
    return jsonify(api_document(analyse(upload, predictor)))


@bp.get("/api/model")
def api_model():
    return jsonify(require_predictor().model_card())


@bp.get("/favicon.ico")
def favicon():
    return "", 204  # no icon; answers browsers' automatic request without a 404 in their console


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok", model_loaded=model_state().predictor is not None)
