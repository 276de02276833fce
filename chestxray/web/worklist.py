"""The DICOM worklist page (/worklist): images the DICOM node received, newest first or by highest probability.

A small Blueprint of its own; create_app registers it, and `start_node` starts the DICOM node the --dicom-* flags ask
for and hangs it on app.extensions["dicom_node"].
The worklist holds no patient data: result id, received time, modality, scope, calls, top probability, send status.
"""
from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, current_app, render_template, request, url_for

from chestxray.web.views import no_model_message

if TYPE_CHECKING:
    from chestxray.pacs.node import DicomNode

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


def start_node(app: Flask, args: argparse.Namespace) -> DicomNode | None:
    """Start the DICOM node the --dicom-* flags ask for, sharing the app's model and results store; None without.

    Raises ValueError for bad flags or a missing model, OSError when the port cannot be bound.
    """
    if args.dicom_port is None:
        return None
    from chestxray.pacs import node as dicom_node  # pynetdicom, pydicom, highdicom: only a node's start pays for them

    state = app.extensions["chestxray"]
    if state.predictor is None:
        raise ValueError("the DICOM node needs a loaded model: " + no_model_message(state.error))
    monitor = app.extensions.get("chestxray.monitor")
    # Every outcome gets a row: analyses (answered or failed) through the analyser, refusals at reception here.
    on_refusal = functools.partial(monitor.refused_at_reception, "dicom") if monitor is not None else None
    node = dicom_node.node_from_args(args, dicom_node.analyser(state.predictor, app.extensions["chestxray.results"],
                                                                 monitor), on_refusal)
    app.extensions["dicom_node"] = node.start()  # logs "DICOM node <AET> listening on <host>:<port>"
    return node
