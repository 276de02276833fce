"""The web app: `create_app(config)`, the Flask application factory (tests pass a config).

It loads the model once (checkpoints), opens the results store (chestxray.results), registers the routes (views,
worklist, monitoring) and the HTTP layer (http: in-memory uploads, security headers, error pages). main.py parses
the flags and serves it with waitress, with a DICOM node (chestxray.pacs) beside it when asked. The upload itself,
its file name and any DICOM header are never written to disk.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from chestxray import batching
from chestxray.results import ResultStore
from chestxray.web import http, monitoring, views, worklist
from chestxray.web.checkpoints import ROOT, default_checkpoint, load_model
from chestxray.web.config import secret_key

__all__ = ["LOOPBACK_HOSTS", "create_app"]

log = logging.getLogger("chestxray.web")
csrf = CSRFProtect()
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


def create_app(config: dict | None = None) -> Flask:
    """Application factory. Keys: CHECKPOINT, DEVICE, BACKEND (torch|onnx), ALLOW_UNTRUSTED, RESULTS_DIR, RETENTION,
    RESULT_MIN_AGE, MAX_FILES, MAX_ANALYSES, ANALYSIS_QUEUE, MAX_BATCH (chestxray.batching), MAX_CONTENT_LENGTH,
    SECRET_KEY, INSTANCE_PATH (the folder keeping secret_key when SECRET_KEY and $CXR_SECRET_KEY are unset, and the
    SQLite results database; default ./instance), DATABASE (the results database's URL; monitoring.database_url),
    ALERT_LIMITS (monitor.AlertLimits), MAX_REPORT_PAGES, TRUSTED_HOSTS (Flask's; default: localhost, 127.0.0.1),
    PUBLIC_URL (base of absolute URLs).

    Raises ValueError for an invalid RETENTION, MAX_FILES, MAX_ANALYSES or MAX_BATCH, or an unusable secret key
    (chestxray.web.config.secret_key); chestxray.store.StoreError for a results database that cannot be opened.
    """
    config = config or {}
    # The templates, static files and default instance folder are the project root's, not this package's.
    app = Flask(__name__, root_path=str(ROOT), instance_path=str(Path(config.get("INSTANCE_PATH") or ROOT / "instance")
                                                                   .resolve()))
    app.config.update(
        CHECKPOINT=None,
        DEVICE="auto",
        BACKEND="torch",
        ALLOW_UNTRUSTED=False,  # call labels without evidence or scope statistics (every answer then warns)
        RESULTS_DIR=str(ROOT / "static" / "results"),
        RETENTION=200,
        RESULT_MIN_AGE=600,  # seconds: a younger result is never pruned, so no one can flush another's new results
        MAX_FILES=20,
        MAX_ANALYSES=2,  # analyses at once (each uses all cores; more only share them)
        ANALYSIS_QUEUE=9,  # requests that may wait, in arrival order, for a slot; more get 503 + Retry-After
        MAX_BATCH=None,  # concurrent analyses' images in one forward pass at most (1: none; None: batching.serving)
        MAX_CONTENT_LENGTH=50 * 1024 * 1024,
        MAX_REPORT_PAGES=20,  # results in one PDF report (each page costs about half a second of CPU)
        # Host names the app answers to (Flask refuses any other Host header with 400): a page on another site
        # whose name resolves to this machine (DNS rebinding) cannot drive the app. IPv6 literals cannot be listed
        # (Werkzeug 3.1 drops them); use a name.
        TRUSTED_HOSTS=list(LOOPBACK_HOSTS),
        PUBLIC_URL=None,  # e.g. https://cxr.hospital.example: the base of absolute URLs (else the request's host)
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
    for key in ("RETENTION", "MAX_FILES", "MAX_ANALYSES", "MAX_BATCH", "MAX_REPORT_PAGES"):
        if app.config[key] is not None and int(app.config[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {app.config[key]}")
    app.json.sort_keys = False  # keep the model's label order in JSON

    state = load_model(str(app.config["CHECKPOINT"]), app.config["DEVICE"], app.config["BACKEND"],
                       bool(app.config["ALLOW_UNTRUSTED"]))
    if state.error:
        log.warning(views.no_model_message(state.error))
    else:  # the upload pages, the API and the DICOM node share it (and its forward passes, when batching)
        max_batch = app.config["MAX_BATCH"]
        state = dataclasses.replace(state, predictor=batching.serving(state.predictor,
                                                                      None if max_batch is None else int(max_batch)))
    app.extensions["chestxray"] = state
    app.extensions["chestxray.results"] = ResultStore(app.config["RESULTS_DIR"], int(app.config["RETENTION"]),
                                                      min_age=float(app.config["RESULT_MIN_AGE"]))
    app.extensions["analyses"] = views.AnalysisGate(int(app.config["MAX_ANALYSES"]),
                                                    int(app.config["ANALYSIS_QUEUE"]))
    csrf.init_app(app)
    csrf.exempt(views.api_predict)  # an API for scripts: no session, no form token
    csrf.exempt(views.api_delete_result)  # a cross-site DELETE needs CORS approval, which the app never gives
    app.register_blueprint(views.bp)  # the pages, the API, and the templates' filters and model context
    app.register_blueprint(worklist.bp)  # /worklist: images from the DICOM node, when main() starts one
    monitoring.install(app)  # the results database (DATABASE), feedback, /monitor, /metrics, /api/results
    http.install(app)
    return app
