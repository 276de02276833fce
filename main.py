"""Web app: upload chest X-rays (PNG, JPEG or DICOM), see every label's probability and heatmap. Not for clinical use.

    python main.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 5000] [--results-dir DIR] [--retention N]

`create_app(config)` is the Flask application factory (tests pass a config); `python main.py` serves it with
waitress. Each result is saved under RESULTS_DIR/<random id>/: the plain image downsized (image.png), the raw
class activation maps (heatmaps.npy), result.json, and heatmap/<label>.png, rendered on first request. The upload
itself, its file name and any DICOM header are never written. Only the newest RETENTION results are kept.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flask import (
    Flask,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_from_directory,
    url_for,
)
from flask.wrappers import Request
from flask_wtf.csrf import CSRFError, CSRFProtect
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable

from chestxray.cam import heatmap_image
from chestxray.checkpoint import CheckpointError
from chestxray.imaging import ACCEPTED, IMAGE_SUFFIXES, InvalidImage, is_dicom
from predictions import DEFAULT_CHECKPOINT, TRAIN_COMMAND, Prediction, Predictor

ROOT = Path(__file__).resolve().parent
POINT_COMMAND = "python main.py --checkpoint PATH"
DISPLAY_MAX_SIDE = 768  # the saved plain image; the original upload is not kept
HEATMAP_MAX_SIDE = 512  # heat layers are smooth (bilinear from a 2..32 px map); the browser scales them up
PNG_COMPRESS_LEVEL = 1  # level 6 costs ~4x the time for ~25% smaller files; speed wins (issue: page after one pass)
RESULT_ID = re.compile(r"[0-9a-f]{32}")
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600
RETRY_AFTER_SECONDS = 5  # what a 503 "busy" tells clients to wait
# Part headers a multipart parser reads (Content-Disposition, Content-Type), to repair names that are not UTF-8.
PART_HEADER = re.compile(rb"\r\nContent-(?:Disposition|Type):[^\r\n]*", re.IGNORECASE)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Content signatures of formats people upload by mistake; these get 415 even when named .png.
OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"%PDF", "PDF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF (WebP)"), (b"PK\x03\x04", "ZIP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
)

log = logging.getLogger("chestxray.web")
csrf = CSRFProtect()


class MemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH): the file, DICOM header included, never touches disk."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # Werkzeug's default spools uploads over 500 KB to a temporary file

    def _load_form_data(self) -> None:
        # Werkzeug decodes part headers as strict UTF-8 and, on a file name in another encoding (Latin-1 from an
        # old browser, raw bytes from a script), silently returns an empty form: the page then said "security token
        # missing" (issue 11). Such a body is parsed again with the bad bytes of its part headers replaced.
        if self.mimetype != "multipart/form-data":
            return super()._load_form_data()
        body = self.get_data(cache=True)  # in memory anyway (MAX_CONTENT_LENGTH), read once
        super()._load_form_data()
        if self.form or self.files or not body:
            return None
        repaired = PART_HEADER.sub(lambda m: m.group(0).decode("utf-8", "replace").encode(), body)
        if repaired != body:
            self._cached_data = repaired
            for name in ("form", "files", "stream"):
                self.__dict__.pop(name, None)
            super()._load_form_data()
        return None


@dataclass(frozen=True)
class ModelState:
    """What app.extensions["chestxray"] holds: the Predictor built at start-up, or why there is none."""

    predictor: Predictor | None
    checkpoint: str
    error: str | None = None  # the loader's message when no model is loaded


class DiskFull(HTTPException):
    """507 Insufficient Storage (RFC 4918): the results disk is full."""

    code = 507
    description = ("The server's disk is full: the result could not be saved. Try again later, or tell the server's "
                   "administrator.")


class Busy(ServiceUnavailable):
    """503: every analysis slot and queue place is taken; Retry-After says when to try again."""

    description = "The server is busy analysing other images: try again in a few seconds."


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


def default_checkpoint() -> str:
    """$CXR_CHECKPOINT, else chestxray_model_resnet50.pth in the project root."""
    return os.environ.get("CXR_CHECKPOINT") or str(ROOT / DEFAULT_CHECKPOINT)


def no_model_message(reason: str) -> str:
    """The one message every page, the 503 answers and the console give when no model is loaded."""
    return (
        f"No model is loaded ({reason.rstrip('.')}). Train one with: {TRAIN_COMMAND} "
        f"— or point the app at one with: {POINT_COMMAND} (or set CXR_CHECKPOINT=PATH)."
    )


def load_model(checkpoint: str, device: str = "auto") -> ModelState:
    """Build the Predictor once; a missing or broken checkpoint gives a state with no predictor and its error."""
    try:
        return ModelState(Predictor.from_checkpoint(checkpoint, device=device), checkpoint)
    except (CheckpointError, RuntimeError) as exc:
        return ModelState(None, checkpoint, str(exc))


def create_app(config: dict | None = None) -> Flask:
    """Application factory. Keys: CHECKPOINT, DEVICE, RESULTS_DIR, RETENTION, RESULT_MIN_AGE, MAX_FILES,
    MAX_ANALYSES, ANALYSIS_QUEUE, MAX_CONTENT_LENGTH, SECRET_KEY.

    Raises ValueError for an invalid RETENTION or MAX_FILES.
    """
    app = Flask(__name__)
    app.request_class = MemoryRequest
    app.config.update(
        CHECKPOINT=None,
        DEVICE="auto",
        RESULTS_DIR=str(ROOT / "static" / "results"),
        RETENTION=200,
        RESULT_MIN_AGE=600,  # seconds: a younger result is never pruned, so no one can flush another's new results
        MAX_FILES=20,
        MAX_ANALYSES=2,  # analyses at once (each uses all cores; more only share them)
        ANALYSIS_QUEUE=1,  # requests that may wait for a slot; more get 503 + Retry-After
        MAX_CONTENT_LENGTH=50 * 1024 * 1024,
        SECRET_KEY=None,
        WTF_CSRF_ENABLED=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config or {})
    if app.config["CHECKPOINT"] is None:
        app.config["CHECKPOINT"] = default_checkpoint()
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)  # sessions only carry flash messages and the CSRF token
    for key in ("RETENTION", "MAX_FILES", "MAX_ANALYSES"):
        if int(app.config[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {app.config[key]}")
    app.extensions["analyses"] = AnalysisGate(int(app.config["MAX_ANALYSES"]), int(app.config["ANALYSIS_QUEUE"]))
    app.json.sort_keys = False  # keep the model's label order in JSON
    Path(app.config["RESULTS_DIR"]).mkdir(parents=True, exist_ok=True)

    state = load_model(str(app.config["CHECKPOINT"]), app.config["DEVICE"])
    if state.error:
        log.warning(no_model_message(state.error))
    app.extensions["chestxray"] = state
    csrf.init_app(app)
    _register_routes(app)
    _register_errors(app)
    app.after_request(_security_headers)
    app.after_request(_no_store_for_results)
    app.jinja_env.filters["label_name"] = lambda label: label.replace("_", " ")
    app.jinja_env.filters["percent"] = lambda p: f"{100 * p:.1f}%"

    @app.context_processor
    def model_context() -> dict:
        state = model_state()
        return {
            "model": state.predictor.model_card() if state.predictor else None,
            "model_error": state.error,  # the loader's message; base.html adds the commands
            "train_command": TRAIN_COMMAND,
            "point_command": POINT_COMMAND,
            "checkpoint": state.checkpoint,
        }

    return app


def model_state() -> ModelState:
    """The ModelState built at start-up (app.extensions["chestxray"])."""
    return current_app.extensions["chestxray"]


def require_predictor() -> Predictor:
    """The loaded Predictor, or a 503 saying how to get one."""
    state = model_state()
    if state.predictor is None:
        abort(503, no_model_message(state.error or "no checkpoint"))
    return state.predictor


# ---------------------------------------------------------------- uploads and saved results


def sniff_format(data: bytes, filename: str) -> str:
    """'PNG', 'JPEG' or 'DICOM' from the content; aborts 415 for other types, 400 for an image name with bad content."""
    if is_dicom(data):
        return "DICOM"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    suffix = Path(shown_name(filename)).suffix.lower()[:12]  # printable only: no U+202E echoed (issue 11)
    other = next((name for signature, name in OTHER_SIGNATURES if data.startswith(signature)), None)
    if other or suffix not in IMAGE_SUFFIXES:
        kind = other or (f"'{suffix}'" if suffix else "a file without extension")
        abort(415, f"unsupported file type ({kind}): upload a {ACCEPTED} file")
    abort(400, f"not a readable image: the file is named '{suffix}' but does not hold {ACCEPTED} data")


def analyse(upload: FileStorage, predictor: Predictor, batch: set[str]) -> dict:
    """Read, check and predict one upload, save the result; returns its record and adds its id to `batch`.

    Aborts 400/415 for bad input, 507 when the results disk is full. Pruning spares `batch` (this request's results).
    """
    data = upload.read()
    if not data:
        abort(400, "the file is empty")
    image_format = sniff_format(data, upload.filename or "")
    try:
        prediction = predictor.predict(data)
    except InvalidImage as exc:
        abort(400, str(exc))
    config = current_app.config
    try:
        record = save_result(Path(config["RESULTS_DIR"]), prediction, image_format, predictor.model_card(),
                             source=request_source())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("cannot save a result: the results disk is full (%s)", config["RESULTS_DIR"])  # no traceback
        raise DiskFull() from None
    batch.add(record["id"])
    prune_results(Path(config["RESULTS_DIR"]), int(config["RETENTION"]), protect=batch,
                  min_age=float(config["RESULT_MIN_AGE"]))
    return record


def request_source() -> str:
    """Who sent the request, as a keyed hash of the client address: retention is counted per source, and the
    address itself is never written."""
    key = current_app.config["SECRET_KEY"].encode()
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


def display_image(image: np.ndarray) -> Image.Image:
    """(H, W) float image in [0, 1] -> 8-bit grayscale PIL image, longest side at most DISPLAY_MAX_SIDE."""
    im = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    scale = DISPLAY_MAX_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    return im


def default_label(record: dict) -> str:
    """The label whose heatmap is shown first: the most probable positive call, else the most probable label."""
    ranked = sorted(record["labels"], key=lambda label: -record["probabilities"][label])
    return next((label for label in ranked if label in record["positive"]), ranked[0])


def save_result(results_dir: Path, prediction: Prediction, image_format: str, model_card: dict,
                source: str = "") -> dict:
    """Write RESULTS_DIR/<new random id>/ atomically (temp folder + rename); returns its record."""
    rid = secrets.token_hex(16)
    image = display_image(prediction.image)
    record = {
        "id": rid,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "format": image_format,
        "original_size": [int(prediction.image.shape[1]), int(prediction.image.shape[0])],
        "image_size": [image.width, image.height],
        "labels": list(prediction.labels),
        "probabilities": prediction.probabilities,
        "positive": prediction.positive,
        "thresholds": prediction.thresholds,
        "model": model_card,
        "source": source,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=results_dir))
    try:
        image.save(tmp / "image.png", compress_level=PNG_COMPRESS_LEVEL)
        np.save(tmp / "heatmaps.npy", np.asarray(prediction.heatmaps, dtype=np.float32))
        (tmp / "heatmap").mkdir()
        render_heatmap(tmp, record, default_label(record))  # the one shown first; the others on request
        (tmp / "result.json").write_text(json.dumps(record, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.rename(tmp, results_dir / rid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def prune_results(results_dir: Path, keep: int, protect: set[str] = frozenset(), min_age: float = 0.0) -> list[str]:
    """Delete results beyond `keep` and stale temp folders; returns the deleted ids.

    Never deletes a result in `protect` (the current request's batch) or younger than `min_age` seconds, so the
    count may exceed `keep` for a while. Among the others, the source holding the most results loses its oldest
    first: one client posting many images evicts its own results, not another's (issue 11).
    """
    results, now = [], time.time()
    for entry in os.scandir(results_dir):
        try:
            if entry.name.startswith(TMP_PREFIX):
                if now - entry.stat().st_mtime > STALE_TMP_SECONDS:  # left by a crash mid-write
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif RESULT_ID.fullmatch(entry.name):
                path = os.path.join(entry.path, "result.json")
                mtime = os.stat(path).st_mtime
                results.append((mtime, entry.name, _source_of(path)))
        except FileNotFoundError:  # removed meanwhile by a concurrent request
            continue
    excess = len(results) - keep
    if excess <= 0:
        return []
    count: dict[str, int] = defaultdict(int)
    candidates: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for mtime, name, source in results:
        count[source] += 1
        if name not in protect and now - mtime >= min_age:
            candidates[source].append((mtime, name))
    for group in candidates.values():
        group.sort(reverse=True)  # oldest last, popped first
    removed = []
    while excess > 0 and any(candidates.values()):
        source = max((s for s, group in candidates.items() if group), key=lambda s: (count[s], -candidates[s][-1][0]))
        _, name = candidates[source].pop()
        shutil.rmtree(results_dir / name, ignore_errors=True)
        removed.append(name)
        count[source] -= 1
        excess -= 1
    return removed


def _source_of(result_json: str) -> str:
    try:
        with open(result_json) as f:
            return str(json.load(f).get("source", ""))
    except (OSError, ValueError):
        return ""


def heatmap_size(image_size: list[int]) -> tuple[int, int]:
    """(width, height) of a heat layer: the plain image's aspect ratio, longest side at most HEATMAP_MAX_SIDE."""
    width, height = image_size
    scale = min(1.0, HEATMAP_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_heatmap(folder: Path, record: dict, label: str) -> Path:
    """heatmap/<label>.png from the saved raw maps (RGBA, opacity following the heat); kept on disk once made."""
    target = folder / "heatmap" / f"{label}.png"
    if target.is_file():
        return target
    maps = np.load(folder / "heatmaps.npy")
    width, height = heatmap_size(record["image_size"])
    layer = heatmap_image(maps[record["labels"].index(label)], height, width)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".png", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            layer.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, target)  # two requests rendering the same label both write whole files
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_result(rid: str) -> tuple[Path, dict]:
    """(folder, record) of a saved result; 404 for a malformed, unknown or expired id."""
    folder = Path(current_app.config["RESULTS_DIR"]) / rid
    try:
        if not RESULT_ID.fullmatch(rid):
            raise FileNotFoundError(rid)
        return folder, json.loads((folder / "result.json").read_text())
    except FileNotFoundError:
        abort(404, f"This result does not exist or has expired (only the newest "
                   f"{current_app.config['RETENTION']} results are kept).")


def api_document(record: dict) -> dict:
    """The JSON answer for one result: id, probabilities, positive, thresholds, heatmap URLs, model card."""
    rid = record["id"]
    return {
        "id": rid,
        "probabilities": record["probabilities"],
        "positive": record["positive"],
        "thresholds": record["thresholds"],
        "heatmaps": {label: url_for("heatmap", rid=rid, label=label) for label in record["labels"]},
        "model": record["model"],
        "image": url_for("result_image", rid=rid),
        "result": url_for("result", rid=rid),
        "created": record["created"],
        "format": record["format"],
    }


def finding_rows(record: dict) -> list[dict]:
    """Labels sorted by probability, highest first, with threshold and positive call, for the result table."""
    rows = [
        {"label": label, "probability": record["probabilities"][label], "threshold": record["thresholds"][label],
         "positive": label in record["positive"]}
        for label in record["labels"]
    ]
    return sorted(rows, key=lambda row: -row["probability"])


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(request.args.get(name, default))))
    except ValueError:
        return default


# ---------------------------------------------------------------- routes


def _register_routes(app: Flask) -> None:
    @app.get("/")
    def index():
        return render_template("index.html")

    @app.post("/predict")
    def predict():
        predictor = require_predictor()
        uploads = [f for f in request.files.getlist("file") if f.filename]  # browsers send one empty part if none
        if not uploads:
            abort(400, f"No file was chosen: pick one or more {ACCEPTED} files.")
        if len(uploads) > app.config["MAX_FILES"]:
            abort(400, f"Too many files ({len(uploads)}): upload at most {app.config['MAX_FILES']} at once.")
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
                    flash(f"{shown_name(upload.filename)}: something went wrong on our side while analysing it "
                          "(the error was logged); the other files were analysed.", "error")
        if not records:
            return render_template("index.html"), failures[0]
        if len(records) == 1:
            return redirect(url_for("result", rid=records[0]["id"]), 303)
        return redirect(url_for("results", ids=",".join(r["id"] for r in records)), 303)

    @app.get("/results")
    def results():
        ids = [rid for rid in request.args.get("ids", "").split(",") if rid][: app.config["MAX_FILES"]]
        if not ids:
            abort(404, "No results were named.")
        items = []
        for rid in ids:
            try:
                items.append(load_result(rid)[1])
            except HTTPException:
                items.append(None)  # expired or unknown: listed as such
        if not any(items):
            abort(404, "These results do not exist or have expired.")
        return render_template("results.html", items=items, rows=finding_rows)

    @app.get("/results/<rid>")
    def result(rid: str):
        _, record = load_result(rid)
        label = request.args.get("label")
        if label not in record["labels"]:
            label = default_label(record)
        opacity = _int_arg("opacity", 60, 0, 100)
        return render_template(
            "result.html", r=record, rows=finding_rows(record), label=label, opacity=round(opacity, -1),
            plain=request.args.get("plain") == "1",
        )

    @app.get("/results/<rid>/image.png")
    def result_image(rid: str):
        folder, _ = load_result(rid)
        return send_from_directory(folder, "image.png", mimetype="image/png")

    @app.get("/results/<rid>/heatmap/<label>.png")
    def heatmap(rid: str, label: str):
        folder, record = load_result(rid)
        if label not in record["labels"]:
            abort(404, f"This model has no label {label!r}.")
        try:
            target = render_heatmap(folder, record, label)
        except FileNotFoundError:  # removed by retention while rendering
            abort(404, "This result has expired.")
        return send_from_directory(target.parent, target.name, mimetype="image/png")

    @app.get("/api/results/<rid>")
    def api_result(rid: str):
        return jsonify(api_document(load_result(rid)[1]))

    @app.post("/api/predict")
    @csrf.exempt  # no cookie is needed or used; browsers' cross-site requests are refused by their headers instead
    def api_predict():
        if cross_origin_request():
            abort(403, "cross-origin requests to the API are refused: post from this site's own pages, or from a "
                       "script or command line (which send no Origin header)")
        predictor = require_predictor()
        upload = request.files.get("file")
        if upload is None:
            abort(400, f"missing the multipart form field 'file' ({ACCEPTED})")
        with current_app.extensions["analyses"].enter():
            return jsonify(api_document(analyse(upload, predictor, set())))

    @app.get("/api/model")
    def api_model():
        return jsonify(require_predictor().model_card())

    @app.get("/favicon.ico")
    def favicon():
        return "", 204  # no icon; answers browsers' automatic request without a 404 in their console

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", model_loaded=model_state().predictor is not None)


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def _register_errors(app: Flask) -> None:
    def upload_page(message: str, status: int):
        flash(message, "error")
        return render_template("index.html"), status

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        message = ("The form could not be verified (its security token is missing or has expired): "
                   "reload the page and upload again.")
        if _wants_json():
            return jsonify(error=message), 400
        return upload_page(message, 400)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description
        if exc.code == 413:
            message = too_large_message()
        if _wants_json():
            response = jsonify(error=message), exc.code
        elif request.endpoint == "predict" and exc.code in (400, 413, 415, 503, 507):
            response = upload_page(message, exc.code)
        else:
            response = render_template("error.html", code=exc.code, name=exc.name, message=message), exc.code
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response = app.make_response(response)
            response.headers["Retry-After"] = str(retry_after)
        return response

    def too_large_message() -> str:
        limit = app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and request.content_length <= limit:
            # Within the size limit: Werkzeug's form limits were hit, not ours (issue 11: both said "50 MB").
            return (f"The form has more than {app.config.get('MAX_FORM_PARTS') or 1000} parts or a text field "
                    f"over {(app.config.get('MAX_FORM_MEMORY_SIZE') or 500_000) // 1000} KB: send only the "
                    "images, in the form field 'file'.")
        return f"The upload is too large: the limit is {limit / 1024 ** 2:g} MB in all."

    @app.errorhandler(InternalServerError)
    def server_error(exc: InternalServerError):
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc.original_exception)
        message = "Something went wrong on our side; the error was logged. Please try again."
        if _wants_json():
            return jsonify(error=message), 500
        return render_template("error.html", code=500, name="Internal Server Error", message=message), 500


def _no_store_for_results(response):
    # Result pages, images and JSON describe one patient's radiograph: no browser or proxy cache keeps them.
    if request.path.startswith(("/results", "/api/", "/predict", "/static/results/")):
        response.headers["Cache-Control"] = "no-store"
    return response


def _security_headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    return response


# ---------------------------------------------------------------- serving


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help="checkpoint file (default: $CXR_CHECKPOINT, else %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 exposes the app)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--results-dir", default=str(ROOT / "static" / "results"),
                        help="folder for saved results (default: %(default)s)")
    parser.add_argument("--retention", type=int, default=200, help="keep the newest N results (default: %(default)s)")
    parser.add_argument("--min-age", type=float, default=600,
                        help="seconds a result is kept whatever the retention, so one client cannot flush another's "
                             "new results (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=50, help="request size limit (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="waitress worker threads (default: %(default)s)")
    parser.add_argument("--max-analyses", type=int, default=2,
                        help="images analysed at once; up to THREADS - MAX_ANALYSES - 1 more requests wait, the rest "
                             "get 503 with Retry-After, and one thread stays free for /healthz (default: %(default)s)")
    parser.add_argument("--connection-limit", type=int, default=500,
                        help="open connections waitress accepts at once (default: %(default)s; under the 1024 of "
                             "select())")
    parser.add_argument("--channel-timeout", type=int, default=30,
                        help="seconds a connection may stay silent before it is closed (default: %(default)s)")
    parser.add_argument("--cleanup-interval", type=int, default=5,
                        help="seconds between checks for silent connections (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Build the app once and serve it with waitress until interrupted; returns the exit code."""
    from waitress import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app({
        "CHECKPOINT": args.checkpoint,
        "DEVICE": args.device,
        "RESULTS_DIR": args.results_dir,
        "RETENTION": args.retention,
        "RESULT_MIN_AGE": args.min_age,
        "MAX_ANALYSES": max(1, min(args.max_analyses, args.threads - 1)),
        "ANALYSIS_QUEUE": max(0, args.threads - args.max_analyses - 1),
        "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024),
    })
    state = app.extensions["chestxray"]
    # Waitress reads a whole request body before the app sees it (up to 1 GB by default). Bounding it refuses a
    # body far over the limit from its Content-Length alone; one up to twice the limit still reaches the app, whose
    # 413 page says what the limit is. Bodies up to the limit stay in memory (waitress would spool anything over
    # 512 KB to an unlinked temporary file, DICOM header included: issue 11), so the memory held by uploads in
    # flight is at most connection_limit x the limit. Silent connections are closed after channel_timeout;
    # a client that trickles a header line every few seconds is not, which is what a reverse proxy in front is for
    # (README, "Deploying").
    limit = app.config["MAX_CONTENT_LENGTH"]
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=2 * limit, inbuf_overflow=limit + 2**16,
                           connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
                           cleanup_interval=args.cleanup_interval)
    listen = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    model = (f"{state.predictor.meta.arch} at {state.predictor.meta.image_size} px from {args.checkpoint}"
             if state.predictor else "none loaded (see the warning above); predictions answer 503")
    for host, port in listen:
        print(f"Serving the chest X-ray app on http://{f'[{host}]' if ':' in host else host}:{port}/", flush=True)
    print(f"Model: {model}\nNot for clinical use. Press Ctrl+C to stop.", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
