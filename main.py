"""Web app: upload chest X-rays (PNG, JPEG or DICOM), see every label's probability and heatmap. Not for clinical use.

    python main.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 5000] [--results-dir DIR] [--retention N]

`create_app(config)` is the Flask application factory (tests pass a config): it loads the model once, opens the
results store (chestxray.results) and registers the routes (views.py) and the error pages; `python main.py` serves
it with waitress. The upload itself, its file name and any DICOM header are never written to disk.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, flash, jsonify, redirect, render_template, request, url_for
from flask.wrappers import Request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, InternalServerError

import views
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.predictor import Predictor
from chestxray.results import ResultStore
from predictions import TRAIN_COMMAND
from views import POINT_COMMAND, model_state, no_model_message, shown_name
from webconfig import secret_key

ROOT = Path(__file__).resolve().parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# Bodies up to 20x the app's limit get the app's own 413 answer (waitress spools them to temporary files first);
# larger ones waitress refuses from their Content-Length alone, before reading them.
WAITRESS_BODY_FACTOR = 20

log = logging.getLogger("chestxray.web")
csrf = CSRFProtect()


class MemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH): the file, DICOM header included, never touches disk."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # Werkzeug's default spools uploads over 500 KB to a temporary file


@dataclass(frozen=True)
class ModelState:
    """What app.extensions["chestxray"] holds: the Predictor built at start-up, or why there is none."""

    predictor: Predictor | None
    checkpoint: str
    error: str | None = None  # the loader's message when no model is loaded


def default_checkpoint() -> str:
    """$CXR_CHECKPOINT, else chestxray_model_resnet50.pth in the project root."""
    return os.environ.get("CXR_CHECKPOINT") or str(ROOT / DEFAULT_CHECKPOINT)


def load_model(checkpoint: str, device: str = "auto") -> ModelState:
    """Build the Predictor once; a missing or broken checkpoint gives a state with no predictor and its error."""
    try:
        return ModelState(Predictor.from_checkpoint(checkpoint, device=device), checkpoint)
    except (CheckpointError, RuntimeError) as exc:
        return ModelState(None, checkpoint, str(exc))


def create_app(config: dict | None = None) -> Flask:
    """Application factory. Keys: CHECKPOINT, DEVICE, RESULTS_DIR, RETENTION, MAX_FILES, MAX_CONTENT_LENGTH, SECRET_KEY,
    INSTANCE_PATH (the folder keeping secret_key when SECRET_KEY and $CXR_SECRET_KEY are unset; default ./instance).

    Raises ValueError for an invalid RETENTION or MAX_FILES, or an unusable secret key (webconfig.secret_key).
    """
    config = config or {}
    app = Flask(__name__, instance_path=str(Path(config["INSTANCE_PATH"]).resolve()) if config.get("INSTANCE_PATH")
                else None)
    app.request_class = MemoryRequest
    app.config.update(
        CHECKPOINT=None,
        DEVICE="auto",
        RESULTS_DIR=str(ROOT / "static" / "results"),
        RETENTION=200,
        MAX_FILES=20,
        MAX_CONTENT_LENGTH=50 * 1024 * 1024,
        SECRET_KEY=None,
        WTF_CSRF_ENABLED=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config)
    if app.config["CHECKPOINT"] is None:
        app.config["CHECKPOINT"] = default_checkpoint()
    if not app.config["SECRET_KEY"]:
        # Kept across restarts, so forms opened before a restart still submit after it (sessions only carry
        # flash messages and the CSRF token).
        app.config["SECRET_KEY"] = secret_key(app.instance_path)
    for key in ("RETENTION", "MAX_FILES"):
        if int(app.config[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {app.config[key]}")
    app.json.sort_keys = False  # keep the model's label order in JSON

    state = load_model(str(app.config["CHECKPOINT"]), app.config["DEVICE"])
    if state.error:
        log.warning(no_model_message(state.error))
    app.extensions["chestxray"] = state
    app.extensions["chestxray.results"] = ResultStore(app.config["RESULTS_DIR"], int(app.config["RETENTION"]))
    csrf.init_app(app)
    csrf.exempt(views.api_predict)  # an API for scripts: no session, no form token
    csrf.exempt(views.api_delete_result)  # a cross-site DELETE needs CORS approval, which the app never gives
    app.register_blueprint(views.bp)
    _register_errors(app)
    app.after_request(_security_headers)
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


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/api", "/healthz")


def _chosen_names() -> list[str]:
    """The names of the files in a refused upload form, as a message shows them ([] when the body is unreadable)."""
    try:
        return [shown_name(f.filename) for f in request.files.getlist("file") if f.filename]
    except HTTPException:  # a body over the limit or cut off: the message then lists no names
        return []


def _register_errors(app: Flask) -> None:
    def upload_page(message: str):
        # A redirect, not a page at /predict: the address bar shows the upload page and a reload posts nothing.
        flash(message, "error")
        return redirect(url_for("views.index"), 303)

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        message = ("The form could not be verified (its security token is missing or has expired, e.g. the page was "
                   "open for a long time)")
        if _wants_json():
            return jsonify(error=message + "."), 400
        if request.endpoint != "views.predict":  # the batch page's sort and CSV forms, the delete button
            return render_template("error.html", code=400, name="Bad Request",
                                   message=message + ": reload the page and try again."), 400
        names = _chosen_names()
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return upload_page(message + ": nothing was analysed. Please choose the files again"
                           + (f": {shown}." if names else "."))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"The upload is too large: the limit is {limit / 1024 ** 2:g} MB in all."
        if _wants_json():
            return jsonify(error=message), exc.code
        if request.endpoint == "views.predict" and exc.code in (400, 413, 415, 503):
            return upload_page(message)
        return render_template("error.html", code=exc.code, name=exc.name, message=message), exc.code

    @app.errorhandler(InternalServerError)
    def server_error(exc: InternalServerError):
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc.original_exception)
        message = "Something went wrong on our side; the error was logged. Please try again."
        if _wants_json():
            return jsonify(error=message), 500
        return render_template("error.html", code=500, name="Internal Server Error", message=message), 500


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
    parser.add_argument("--max-upload-mb", type=float, default=50, help="request size limit (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="waitress worker threads (default: %(default)s)")
    parser.add_argument("--instance-dir", default=str(ROOT / "instance"),
                        help="folder keeping the secret key across restarts, made 0600 on first start, unless "
                             "$CXR_SECRET_KEY is set (default: %(default)s)")
    return parser


def waitress_body_limit(app_limit: int) -> int:
    """Waitress's request body limit for an app limit: WAITRESS_BODY_FACTOR times it (1 GB for the default 50 MB)."""
    return WAITRESS_BODY_FACTOR * app_limit


def main(args: argparse.Namespace) -> int:
    """Build the app once and serve it with waitress until interrupted; returns the exit code."""
    from waitress import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app({
        "CHECKPOINT": args.checkpoint,
        "DEVICE": args.device,
        "RESULTS_DIR": args.results_dir,
        "RETENTION": args.retention,
        "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024),
        "INSTANCE_PATH": args.instance_dir,
    })
    state = app.extensions["chestxray"]
    # Waitress reads a whole request body before the app sees it and answers a body over its own limit with a bare
    # text page. Its limit is set far above the app's, so every over-limit upload a person makes gets the app's 413
    # page (or JSON) saying what the limit is; the page's script refuses such uploads before sending them at all.
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=waitress_body_limit(app.config["MAX_CONTENT_LENGTH"]))
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
