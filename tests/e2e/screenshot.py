"""Make docs/screenshot-result.png: the result page for a real NIH image, rendered by headless Chromium.

    .venv/bin/python tests/e2e/screenshot.py [--image PATH] [--arch resnet18] [--image-size 384] [--out PATH]

Uses --checkpoint when given (the README's picture: a ResNet-18 trained on the 937-image sample), else a randomly
initialised checkpoint (tests/conftest.make_checkpoint), whose numbers and heatmaps show only the layout. A random
ResNet-18 spreads its probabilities over (0, 1) as the fixture's head bias intends; a random ResNet-50's large
logits pin most of them at 0% or 100%, which makes a less readable picture.
Also writes the upload page to docs/screenshot-upload.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from livesite import ROOT, conftest_module, launch_chromium, run_server

conftest = conftest_module()
NIH_PNG, make_checkpoint = conftest.NIH_PNG, conftest.make_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(NIH_PNG), help="X-ray to upload (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None,
                        help="a trained checkpoint to show (default: a random one made with --arch/--image-size)")
    parser.add_argument("--arch", default="resnet18", help="checkpoint architecture (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=384, help="checkpoint input size (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot-result.png"), help="PNG to write")
    parser.add_argument("--upload-out", default=str(ROOT / "docs" / "screenshot-upload.png"), help="PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width (default: %(default)s)")
    parser.add_argument("--height", type=int, default=900, help="viewport height (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Upload the image through the real page and save a full-page screenshot; returns the exit code."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
            Path(tmp) / "model.pth", arch=args.arch, image_size=args.image_size)
        with run_server(checkpoint, Path(tmp) / "results") as base, sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(base + "/")
            page.set_input_files("#file", args.image)
            page.screenshot(path=args.upload_out, full_page=True)
            with page.expect_navigation():
                page.click("#submit")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"wrote {args.out} and {args.upload_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
