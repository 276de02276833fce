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
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, flash, jsonify, redirect, render_template, request, url_for
from flask.wrappers import Request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, InternalServerError

import dicom_node
import views
import worklist
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.evidence import format_call, format_scope
from chestxray.predictor import Predictor
from chestxray.results import ResultStore
from predictions import TRAIN_COMMAND
from views import POINT_COMMAND, model_state, no_model_message, shown_name
from webconfig import secret_key

ROOT = Path(__file__).resolve().parent
# Part headers a multipart parser reads (Content-Disposition, Content-Type), to repair names that are not UTF-8.
PART_HEADER = re.compile(rb"\r\nContent-(?:Disposition|Type):[^\r\n]*", re.IGNORECASE)
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


def default_checkpoint() -> str:
    """$CXR_CHECKPOINT, else chestxray_model_resnet50.pth in the project root."""
    return os.environ.get("CXR_CHECKPOINT") or str(ROOT / DEFAULT_CHECKPOINT)


def load_model(checkpoint: str, device: str = "auto", backend: str = "torch") -> ModelState:
    """Build the Predictor once; a missing or broken checkpoint gives a state with no predictor and its error."""
    try:
        return ModelState(Predictor.from_checkpoint(checkpoint, device=device, backend=backend), checkpoint)
    except (CheckpointError, RuntimeError) as exc:
        return ModelState(None, checkpoint, str(exc))


def create_app(config: dict | None = None) -> Flask:
    """Application factory. Keys: CHECKPOINT, DEVICE, BACKEND (torch|onnx), RESULTS_DIR, RETENTION, RESULT_MIN_AGE,
    MAX_FILES, MAX_ANALYSES, ANALYSIS_QUEUE, MAX_CONTENT_LENGTH, SECRET_KEY, INSTANCE_PATH (the folder keeping
    secret_key when SECRET_KEY and $CXR_SECRET_KEY are unset; default ./instance).

    Raises ValueError for an invalid RETENTION, MAX_FILES or MAX_ANALYSES, or an unusable secret key
    (webconfig.secret_key).
    """
    config = config or {}
    app = Flask(__name__, instance_path=str(Path(config["INSTANCE_PATH"]).resolve()) if config.get("INSTANCE_PATH")
                else None)
    app.request_class = MemoryRequest
    app.config.update(
        CHECKPOINT=None,
        DEVICE="auto",
        BACKEND="torch",
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
    app.config.update(config)
    if app.config["CHECKPOINT"] is None:
        app.config["CHECKPOINT"] = default_checkpoint()
    if not app.config["SECRET_KEY"]:
        # Kept across restarts, so forms opened before a restart still submit after it (sessions only carry
        # flash messages and the CSRF token).
        app.config["SECRET_KEY"] = secret_key(app.instance_path)
    for key in ("RETENTION", "MAX_FILES", "MAX_ANALYSES"):
        if int(app.config[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {app.config[key]}")
    app.json.sort_keys = False  # keep the model's label order in JSON

    state = load_model(str(app.config["CHECKPOINT"]), app.config["DEVICE"], app.config["BACKEND"])
    if state.error:
        log.warning(no_model_message(state.error))
    app.extensions["chestxray"] = state
    app.extensions["chestxray.results"] = ResultStore(app.config["RESULTS_DIR"], int(app.config["RETENTION"]),
                                                      min_age=float(app.config["RESULT_MIN_AGE"]))
    app.extensions["analyses"] = views.AnalysisGate(int(app.config["MAX_ANALYSES"]),
                                                    int(app.config["ANALYSIS_QUEUE"]))
    csrf.init_app(app)
    csrf.exempt(views.api_predict)  # an API for scripts: no session, no form token
    csrf.exempt(views.api_delete_result)  # a cross-site DELETE needs CORS approval, which the app never gives
    app.register_blueprint(views.bp)
    app.register_blueprint(worklist.bp)  # /worklist: images from the DICOM node, when main() starts one
    _register_errors(app)
    app.after_request(_security_headers)
    app.after_request(_no_store_for_results)
    app.jinja_env.filters["label_name"] = lambda label: label.replace("_", " ")
    app.jinja_env.filters["percent"] = lambda p: f"{100 * p:.1f}%"
    app.jinja_env.globals["format_call"] = format_call  # probability/threshold texts that agree with the call
    app.jinja_env.globals["format_scope"] = format_scope

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
        message = too_large_message() if exc.code == 413 else exc.description
        if _wants_json():
            response = app.make_response((jsonify(error=message), exc.code))
        elif request.endpoint == "views.predict" and exc.code in (400, 413, 415, 503, 507):
            response = upload_page(message)
        else:
            response = app.make_response(
                (render_template("error.html", code=exc.code, name=exc.name, message=message), exc.code))
        if getattr(exc, "retry_after", None) is not None:  # views.Busy: when to try again
            response.headers["Retry-After"] = str(exc.retry_after)
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
    parser.add_argument("--checkpoint", default=None,
                        help=f"checkpoint file (default: $CXR_CHECKPOINT, else {default_checkpoint()}; when neither "
                        "is there, a demo model trained on the bundled sample)")
    parser.add_argument("--no-demo", action="store_true",
                        help="with no checkpoint given or found, start without a model instead of serving the demo "
                        "model (default: build it once into .cache/demo_model.pth and serve it)")
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
    dicom_node.add_arguments(parser)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="torch, or onnx: ONNX Runtime on the export of --checkpoint (a .onnx file, or the .onnx "
                        "beside the checkpoint; Model_Training/export.py writes it) (default: %(default)s)")
    parser.add_argument("--instance-dir", default=str(ROOT / "instance"),
                        help="folder keeping the secret key across restarts, made 0600 on first start, unless "
                             "$CXR_SECRET_KEY is set (default: %(default)s)")
    return parser


def choose_checkpoint(args: argparse.Namespace) -> str:
    """--checkpoint, else $CXR_CHECKPOINT, else the default file if it exists; else the demo model (built once).

    A checkpoint the user names always wins, even a broken one (the app then says why it cannot load it). The demo
    model is used only when nothing is named or found and --no-demo is not given; if it cannot be built, the app
    starts without a model.
    """
    if args.checkpoint:
        return args.checkpoint
    default = default_checkpoint()
    if args.no_demo or os.environ.get("CXR_CHECKPOINT") or Path(default).exists():
        return default
    from Model_Training.demo import DEMO_CHECKPOINT, DemoError, build_demo_model

    print(f"No checkpoint at {default}: serving a demo model trained on the bundled sample, cached in "
          f"{DEMO_CHECKPOINT} (the first start trains it, 1-3 minutes on a CPU). Its answers are meaningless; "
          "pass --no-demo to start without a model.", flush=True)
    try:
        return str(build_demo_model(DEMO_CHECKPOINT))
    except DemoError as exc:
        log.warning("the demo model could not be built: %s", exc)
        return default


def waitress_body_limit(app_limit: int) -> int:
    """Waitress's request body limit for an app limit: WAITRESS_BODY_FACTOR times it (1 GB for the default 50 MB)."""
    return WAITRESS_BODY_FACTOR * app_limit


def main(args: argparse.Namespace) -> int:
    """Build the app once and serve it with waitress until interrupted; returns the exit code."""
    from waitress import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.checkpoint = choose_checkpoint(args)
    app = create_app({
        "CHECKPOINT": args.checkpoint,
        "DEVICE": args.device,
        "BACKEND": args.backend,
        "RESULTS_DIR": args.results_dir,
        "RETENTION": args.retention,
        "RESULT_MIN_AGE": args.min_age,
        "MAX_ANALYSES": max(1, min(args.max_analyses, args.threads - 1)),
        "ANALYSIS_QUEUE": max(0, args.threads - args.max_analyses - 1),
        "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024),
        "INSTANCE_PATH": args.instance_dir,
    })
    state = app.extensions["chestxray"]
    # Waitress reads a whole request body before the app sees it. Its limit is set far above the app's, so every
    # over-limit upload a person makes gets the app's own 413 page (or JSON) saying what the limit is (the page's
    # script refuses such uploads before sending them at all). Bodies up to the app's limit stay in memory (waitress
    # would spool anything over 512 KB to an unlinked temporary file, DICOM header included: issue 11); a larger
    # body is spooled until the app refuses it. Silent connections are closed after channel_timeout; a client that
    # trickles a header line every few seconds is not, which is what a reverse proxy in front is for
    # (docs/RELIABILITY.md, "Deploying").
    limit = app.config["MAX_CONTENT_LENGTH"]
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=waitress_body_limit(limit), inbuf_overflow=limit + 2**16,
                           connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
                           cleanup_interval=args.cleanup_interval)
    listen = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    model = (f"{state.predictor.meta.arch} at {state.predictor.meta.image_size} px from {args.checkpoint}"
             if state.predictor else "none loaded (see the warning above); predictions answer 503")
    if state.predictor and state.predictor.meta.training.get("demo"):
        model = f"DEMO ({model}; its answers are meaningless; train a real one with: {TRAIN_COMMAND})"
    try:
        node = start_dicom_node(app, args)
    except (ValueError, OSError) as exc:
        server.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for host, port in listen:
        print(f"Serving the chest X-ray app on http://{f'[{host}]' if ':' in host else host}:{port}/", flush=True)
    print(f"Model: {model}\nNot for clinical use. Press Ctrl+C to stop.", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if node is not None:
            node.stop()
    return 0


def start_dicom_node(app: Flask, args: argparse.Namespace) -> dicom_node.DicomNode | None:
    """Start the DICOM node the --dicom-* flags ask for, sharing the app's model and results store; None without.

    Raises ValueError for bad flags or a missing model, OSError when the port cannot be bound.
    """
    if args.dicom_port is None:
        return None
    predictor = app.extensions["chestxray"].predictor
    if predictor is None:
        raise ValueError("the DICOM node needs a loaded model: " + no_model_message(app.extensions["chestxray"].error))
    node = dicom_node.node_from_args(args, dicom_node.analyser(predictor, app.extensions["chestxray.results"]))
    app.extensions["dicom_node"] = node.start()  # logs "DICOM node <AET> listening on <host>:<port>"
    return node


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
