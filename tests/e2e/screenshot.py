"""Make docs/screenshot-result.png: the result page for a real NIH image, rendered by headless Chromium.

    .venv/bin/python tests/e2e/screenshot.py [--image PATH] [--arch resnet18] [--image-size 384] [--out PATH]

Uses --checkpoint when given (the README's picture: a ResNet-18 trained on the 937-image sample), else a randomly
initialised checkpoint (tests/support/checkpoints.py), whose numbers and heatmaps show only the layout. A random
ResNet-18 spreads its probabilities over (0, 1) as the fixture's head bias intends; a random ResNet-50's large
logits pin most of them at 0% or 100%, which makes a less readable picture.
Also writes the upload page to docs/screenshot-upload.png, and into --screens-dir (docs/screens/) the desktop
(1400 px) and phone (390 px) result pages, the batch page and page 1 of the PDF report (pdftoppm, from
poppler-utils), with a README.md captioning each with the model that produced it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from livesite import ROOT, import_support, launch_chromium, run_server

support = import_support()
NIH_PNG, make_checkpoint = support.data.NIH_PNG, support.checkpoints.make_checkpoint


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
    parser.add_argument("--screens-dir", default=str(ROOT / "docs" / "screens"),
                        help="folder for the desktop, phone, batch and PDF pictures and their captions "
                             "(default: %(default)s)")
    parser.add_argument("--batch", nargs="+", default=[str(NIH_PNG), str(support.data.DICOM_MONO2),
                                                       str(support.data.OTHER_CXR_DIR / "2c35005f.jpg")],
                        help="files for the batch picture (default: the NIH PNG, a DICOM and a JPEG)")
    return parser


def model_caption(card: dict) -> str:
    """One sentence naming the model that made the pictures, from its model card."""
    training = card.get("training") or {}
    auroc = training.get("val_mean_auroc")
    quality = f", validation mean AUROC {auroc:.2f}" if isinstance(auroc, (int, float)) else ""
    data = training.get("data") or "training data not recorded"
    epochs = training.get("epochs", "?")
    return f"Made by a {card['arch']} at {card['image_size']} px ({data}, {epochs} epochs{quality})."


def capture_screens(browser, base: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Desktop and phone result pages, the batch page and PDF page 1 into --screens-dir; returns (file, caption)."""
    out = Path(args.screens_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    desktop = browser.new_page(viewport={"width": 1400, "height": 900})
    desktop.goto(base + "/")
    desktop.set_input_files("#file", args.image)
    with desktop.expect_navigation():
        desktop.click("#submit")
    desktop.wait_for_load_state("networkidle")
    result = desktop.url
    desktop.screenshot(path=out / "result-desktop.png", full_page=True)
    shots.append(("result-desktop.png", "The result page at 1400 px."))
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(result)
    phone.wait_for_load_state("networkidle")
    phone.screenshot(path=out / "result-phone.png", full_page=True)
    shots.append(("result-phone.png", "The same result at a phone's 390 px: no sideways scrolling."))
    desktop.goto(base + "/")
    desktop.set_input_files("#file", args.batch)
    with desktop.expect_navigation():
        desktop.click("#submit")
    desktop.wait_for_load_state("networkidle")
    desktop.screenshot(path=out / "batch.png", full_page=True)
    shots.append(("batch.png", f"The batch page for {len(args.batch)} files: names, summary, sorting, CSV."))
    report = out / "report.pdf"
    report.write_bytes(desktop.request.get(result.split("?")[0] + "/report.pdf").body())
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm:
        subprocess.run([pdftoppm, "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", str(report),
                        str(out / "report-page1")], check=True)
        shots.append(("report-page1.png", "Page 1 of the PDF report (`/results/<id>/report.pdf`), at 80 dpi."))
    report.unlink()
    return shots


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
            shots = capture_screens(browser, base, args)
            with urllib.request.urlopen(base + "/api/model") as response:
                caption = model_caption(json.load(response))
            browser.close()
    lines = ["# Screenshots", "", f"Made with `tests/e2e/screenshot.py` in headless Chromium. {caption}"]
    if not args.checkpoint:
        lines.append("The model is randomly initialised (a test fixture): the pictures show the layout, not results.")
    lines.append("")
    for name, text in shots:
        lines += [f"![{text}]({name})", "", f"*{text} {caption}*", ""]
    (Path(args.screens_dir) / "README.md").write_text("\n".join(lines))
    print(f"wrote {args.out}, {args.upload_out} and {len(shots)} pictures in {args.screens_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
