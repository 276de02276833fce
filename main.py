"""Web app: upload chest X-rays (PNG, JPEG or DICOM), see every label's probability and heatmap. Not for clinical use.

    python main.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 5000] [--results-dir DIR] [--retention N]

A thin entry point: parse the flags, build the app with chestxray.web.create_app, serve it with waitress (and a
DICOM node beside it, chestxray.pacs, when --dicom-port is given). The upload itself, its file name and any DICOM
header are never written to disk.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from chestxray.batching import MAX_BATCH
from chestxray.checkpoint import CheckpointError
from chestxray.messages import TRAIN_COMMAND
from chestxray.pacs import options as dicom_options
from chestxray.predictor import BACKEND_HELP, BACKENDS
from chestxray.store import StoreError
from chestxray.web import LOOPBACK_HOSTS, create_app, http, worklist
from chestxray.web.checkpoints import choose_checkpoint, default_checkpoint

ROOT = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"checkpoint file (default: $CXR_CHECKPOINT, else {default_checkpoint()}; when neither "
                        "is there, a demo model trained on the bundled sample)")
    parser.add_argument("--models-dir", default=None,
                        help="folder of checkpoints (*.pth) listed on /api/models, e.g. base and adapted models "
                        "(Model_Training/adapt.py) (default: none)")
    parser.add_argument("--model", default=None,
                        help="serve this checkpoint of --models-dir, by file name; switching models is a restart "
                        "with another --model (default: --checkpoint's rules)")
    parser.add_argument("--no-demo", action="store_true",
                        help="with no checkpoint given or found, start without a model instead of serving the demo "
                        "model (default: build it once into .cache/demo_model.pth and serve it)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=f"{BACKEND_HELP} (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--allow-untrusted", action="store_true",
                        help="call findings even when the checkpoint lacks validation evidence or scope statistics; "
                        "every answer then carries a visible warning (default: off: such labels say 'not "
                        "validated - no call')")
    parser.add_argument("--results-dir", default=str(ROOT / "static" / "results"),
                        help="folder for saved results (default: %(default)s)")
    parser.add_argument("--retention", type=int, default=200, help="keep the newest N results (default: %(default)s)")
    parser.add_argument("--min-age", type=float, default=600,
                        help="seconds a result is kept whatever the retention, so one client cannot flush another's "
                             "new results (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=50, help="request size limit (default: %(default)s)")
    parser.add_argument("--max-analyses", type=int, default=2,
                        help="images analysed at once; up to THREADS - MAX_ANALYSES - 1 more requests wait, the rest "
                             "get 503 with Retry-After, and one thread stays free for /healthz (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help=f"images of concurrent analyses gathered into one forward pass at most; 1 runs each on "
                             f"its own (default: {MAX_BATCH} on CUDA, 1 on a CPU, where batching measured no gain)")
    parser.add_argument("--instance-dir", default=str(ROOT / "instance"),
                        help="folder keeping the secret key across restarts, made 0600 on first start, unless "
                             "$CXR_SECRET_KEY is set (default: %(default)s)")
    parser.add_argument("--database", default=None,
                        help="results database URL, e.g. postgresql://USER:PASSWORD@HOST/DB to share one between app "
                        "servers (default: DATABASE in <instance-dir>/config.toml, else an SQLite file "
                        "<instance-dir>/results.sqlite3)")
    parser.add_argument("--trusted-hosts", default=None,
                        help="comma-separated host names the app answers to, as clients type them (e.g. "
                        "cxr.hospital.example); any other Host header gets 400 (default: localhost, 127.0.0.1 and "
                        "--host when it names one address)")
    parser.add_argument("--public-url", default=None,
                        help="the app's address as clients reach it, e.g. https://cxr.hospital.example; absolute "
                        "URLs in the API and the CSV are built from it (default: the request's trusted host)")
    http.add_server_arguments(parser)
    dicom_options.add_arguments(parser)
    return parser


def trusted_hosts(args: argparse.Namespace) -> list[str]:
    """--trusted-hosts as a list, else the loopback names plus --host when it names one address (not 0.0.0.0)."""
    if args.trusted_hosts:
        return [name.strip() for name in args.trusted_hosts.split(",") if name.strip()]
    bound = [] if args.host in ("0.0.0.0", "::", "") or ":" in args.host else [args.host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *bound]))


def main(args: argparse.Namespace) -> int:
    """Build the app once and serve it with waitress until interrupted; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.checkpoint = choose_checkpoint(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = {
        "MODELS_DIR": args.models_dir,
        "CHECKPOINT": args.checkpoint,
        "DEVICE": args.device,
        "BACKEND": args.backend,
        "ALLOW_UNTRUSTED": args.allow_untrusted,
        "RESULTS_DIR": args.results_dir,
        "RETENTION": args.retention,
        "RESULT_MIN_AGE": args.min_age,
        "MAX_ANALYSES": max(1, min(args.max_analyses, args.threads - 1)),
        "ANALYSIS_QUEUE": max(0, args.threads - args.max_analyses - 1),
        "MAX_BATCH": args.max_batch,
        "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024),
        "INSTANCE_PATH": args.instance_dir,
        "TRUSTED_HOSTS": trusted_hosts(args),
        "PUBLIC_URL": args.public_url,
        "DATABASE": args.database,
    }
    try:
        app = create_app(config)
    except StoreError as exc:  # a database URL that is wrong or unreachable: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictor = app.extensions["chestxray"].predictor
    server = http.make_server(app, args)
    model = (f"{predictor.meta.arch} at {predictor.meta.image_size} px from {args.checkpoint}"
             if predictor else "none loaded (see the warning above); predictions answer 503")
    if predictor and predictor.model_card()["demo"]:
        model = f"DEMO ({model}; its answers are meaningless; train a real one with: {TRAIN_COMMAND})"
    try:
        node = worklist.start_node(app, args)
    except (ValueError, OSError) as exc:
        server.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for url in http.listening_urls(server):
        print(f"Serving the chest X-ray app on {url}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
