"""The DICOM worklist page (/worklist): images the DICOM node received, newest first or by highest probability.

A small Blueprint of its own; main.py registers it and hangs the running node on app.extensions["dicom_node"].
The worklist holds no patient data: result id, received time, modality, scope, calls, top probability, send status.
"""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request, url_for

bp = Blueprint("worklist", __name__)

SORTS = {"newest": "Newest first", "probability": "Highest probability first"}
RESULT_ENDPOINT = "views.result"  # the result page's endpoint in the main views


@bp.get("/worklist")
def worklist():
    """The worklist page; ?sort=newest (default) or ?sort=probability for triage."""
    node = current_app.extensions.get("dicom_node")
    entries = node.worklist() if node is not None else []
    sort = request.args.get("sort", "newest")
    if sort not in SORTS:
        sort = "newest"
    if sort == "probability":
        # Stable sort: equal probabilities stay newest first; entries without a result go last.
        entries = sorted(entries, key=lambda e: -1.0 if e.top_probability is None else -e.top_probability)
    rows = [{"entry": e, "url": url_for(RESULT_ENDPOINT, rid=e.result_id) if e.result_id else None,
             "problem": e.send_status.startswith(("failed", "retrying")) or e.result_id is None}
            for e in entries]
    return render_template("worklist.html", rows=rows, sort=sort, sorts=SORTS, node=node)
