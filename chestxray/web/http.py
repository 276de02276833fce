"""The HTTP layer around the routes: uploads kept in memory, security headers, error pages, the waitress server.

`install(app)` sets the request class, the headers and the error pages on an app (create_app calls it);
`add_server_arguments` and `make_server` are the waitress side of `python main.py`.
"""
from __future__ import annotations

import argparse
import io
import logging
import re

from flask import Flask, flash, jsonify, redirect, render_template, request, url_for
from flask.wrappers import Request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError, NotFound, SecurityError

from chestxray.results import ResultNotFound
from chestxray.web.views import shown_name

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


class MemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH): the file, DICOM header included, never touches disk."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # Werkzeug's default spools uploads over 500 KB to a temporary file

    def _load_form_data(self) -> None:
        # Werkzeug decodes part headers as strict UTF-8 and, on a file name in another encoding (Latin-1 from an
        # old browser, raw bytes from a script), silently returns an empty form: the page then said "security token
        # missing". Such a body is parsed again with the bad bytes of its part headers replaced.
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


def install(app: Flask) -> None:
    """Give the app the in-memory request class, the security and no-store headers, and the error pages."""
    app.request_class = MemoryRequest
    app.after_request(_security_headers)
    app.after_request(_no_store_for_results)
    _register_errors(app)


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/api", "/healthz")


def _chosen_names() -> list[str]:
    """The names of the files in a refused upload form, as a message shows them ([] when the body is unreadable)."""
    try:
        return [shown_name(f.filename) for f in request.files.getlist("file") if f.filename]
    except HTTPException:  # a body over the limit or cut off: the message then lists no names
        return []


def _upload_page(message: str):
    # A redirect, not a page at /predict: the address bar shows the upload page and a reload posts nothing.
    flash(message, "error")
    return redirect(url_for("views.index"), 303)


def _too_large_message(app: Flask) -> str:
    limit = app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length <= limit:
        # Within the size limit: Werkzeug's form limits were hit, not ours (naming the size limit would mislead).
        return (f"The form has more than {app.config.get('MAX_FORM_PARTS') or 1000} parts or a text field "
                f"over {(app.config.get('MAX_FORM_MEMORY_SIZE') or 500_000) // 1000} KB: send only the "
                "images, in the form field 'file'.")
    return f"The upload is too large: the limit is {limit / 1024 ** 2:g} MB in all."


def _register_errors(app: Flask) -> None:
    @app.errorhandler(SecurityError)
    def untrusted_host(exc: SecurityError):
        # Raised before routing (Flask's TRUSTED_HOSTS), so no page can be rendered: url_for has no adapter. The
        # message names neither the host asked for nor the trusted ones.
        message = ("This server does not answer to that host name (DNS rebinding protection): use the address its "
                   "administrator configured (--trusted-hosts).")
        if _wants_json():
            return jsonify(error=message), 400
        return app.response_class(message + "\n", 400, mimetype="text/plain")

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
        return _upload_page(message + ": nothing was analysed. Please choose the files again"
                            + (f": {shown}." if names else "."))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = _too_large_message(app) if exc.code == 413 else exc.description
        if _wants_json():
            response = app.make_response((jsonify(error=message), exc.code))
        elif request.endpoint == "views.predict" and exc.code in (400, 413, 415, 503, 507):
            response = _upload_page(message)
        else:
            response = app.make_response(
                (render_template("error.html", code=exc.code, name=exc.name, message=message), exc.code))
        if getattr(exc, "retry_after", None) is not None:  # views.Busy: when to try again
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(ResultNotFound)
    def result_not_found(exc: ResultNotFound):  # a malformed, unknown, expired or deleted result id, from any view
        return http_error(NotFound(str(exc)))

    @app.errorhandler(InternalServerError)
    def server_error(exc: InternalServerError):
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc.original_exception)
        message = "Something went wrong on our side; the error was logged. Please try again."
        if _wants_json():
            return jsonify(error=message), 500
        return render_template("error.html", code=500, name="Internal Server Error", message=message), 500


def _no_store_for_results(response):
    # Result pages, images and JSON describe one patient's radiograph, and the worklist lists them: no browser or
    # proxy cache keeps them.
    if request.path.startswith(("/results", "/api/", "/predict", "/static/results/", "/worklist")):
        response.headers["Cache-Control"] = "no-store"
    return response


def _security_headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    return response


# ---------------------------------------------------------------- serving with waitress


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The waitress flags of `python main.py`."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 exposes the app)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--threads", type=int, default=12,
                        help="waitress worker threads; a request waiting for an analysis slot holds one, so the "
                             "default (2 analysing, 9 waiting in line, 1 kept for /healthz) lets 8 or more readers "
                             "wait their turn instead of being refused (default: %(default)s)")
    parser.add_argument("--connection-limit", type=int, default=500,
                        help="open connections waitress accepts at once (default: %(default)s; under the 1024 of "
                             "select())")
    parser.add_argument("--channel-timeout", type=int, default=30,
                        help="seconds a connection may stay silent before it is closed (default: %(default)s)")
    parser.add_argument("--cleanup-interval", type=int, default=5,
                        help="seconds between checks for silent connections (default: %(default)s)")


def waitress_body_limit(app_limit: int) -> int:
    """Waitress's request body limit for an app limit: WAITRESS_BODY_FACTOR times it (1 GB for the default 50 MB)."""
    return WAITRESS_BODY_FACTOR * app_limit


def make_server(app: Flask, args: argparse.Namespace):
    """A waitress server for the app with the flags of add_server_arguments; returns it unstarted.

    Waitress reads a whole request body before the app sees it. Its limit is set far above the app's, so every
    over-limit upload a person makes gets the app's own 413 page (or JSON) saying what the limit is (the page's
    script refuses such uploads before sending them at all). Bodies up to the app's limit stay in memory (waitress
    would spool anything over 512 KB to an unlinked temporary file, DICOM header included); a larger
    body is spooled until the app refuses it. Silent connections are closed after channel_timeout; a client that
    trickles a header line every few seconds is not, which is what a reverse proxy in front is for
    (docs/RELIABILITY.md, "Deploying").
    """
    from waitress import create_server

    limit = app.config["MAX_CONTENT_LENGTH"]
    return create_server(app, host=args.host, port=args.port, threads=args.threads,
                         max_request_body_size=waitress_body_limit(limit), inbuf_overflow=limit + 2**16,
                         connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
                         cleanup_interval=args.cleanup_interval)


def listening_urls(server) -> list[str]:
    """The http:// addresses a waitress server listens on (IPv6 hosts in brackets)."""
    listen = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return [f"http://{f'[{host}]' if ':' in host else host}:{port}/" for host, port in listen]
