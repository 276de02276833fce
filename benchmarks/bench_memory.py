"""Peak memory of read_xray per hostile upload kind (goal: at most 1 GB above idle for any single input).

    .venv/bin/python benchmarks/bench_memory.py [--out benchmarks/results/memory.md]

Each input is generated from the real sample images (tests/support/hostile.py) and read in a fresh interpreter; the
figure is its peak resident size (ru_maxrss) minus the peak after a warm-up read of a small file of the same format. The
bombs are the large variants of the corpus kinds (what an unbounded reader would need is in the "unbounded" column,
as measured unbounded, or the bomb's declared size), followed by the largest inputs that are accepted.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, support
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

from chestxray.imaging import MAX_DECODED_PIXELS

hostile = importlib.import_module(f"{support.__name__}.hostile")  # the corpus generators, from the tests' helpers


def largest_png() -> bytes:
    """A real radiograph as a 5000 x 5000 16-bit PNG: the largest one accepted."""
    side = int(MAX_DECODED_PIXELS**0.5)
    gray = np.asarray(Image.fromarray(hostile.real_gray(1024)).resize((side, side)), dtype=np.uint16) * 257
    return hostile.encode(Image.fromarray(gray), "PNG")


BEFORE_3GB = "~3 GB + parse (7 GB for 3.7 MB unbounded)"
KINDS = {
    "DICOM deflate bomb, 3 GB inflated": (lambda: hostile.deflate_bomb(3072), BEFORE_3GB),
    "DICOM JPEG declaring 24000x24000 (header 256x256)": (lambda: hostile.codestream_bomb(JPEGBaseline8Bit),
                                                          "3.4 GB, 45 s"),
    "DICOM JPEG 2000 declaring 24000x24000": (lambda: hostile.codestream_bomb(JPEG2000Lossless), "3.5 GB, 8 s"),
    "DICOM JPEG-LS declaring 24000x24000": (lambda: hostile.codestream_bomb(JPEGLSLossless), "3.5 GB, 188 s"),
    "DICOM RLE bomb, 1.5 GB decoded": (lambda: hostile.rle_bomb(1536), "1.5 GB"),
    "blank 60 MP PNG (58 KB)": (hostile.blank_png, "0.7 GB, 4 s"),
    "progressive JPEG, 2500 scans (0.9 MB)": (hostile.progressive_jpeg_with_many_scans, "14 s of CPU"),
    "30 MP JPEG (accepted, decoded at half size)": (hostile.large_jpeg, "-"),
    "25 MP 16-bit PNG (largest accepted)": (largest_png, "-"),
    "25 MP 16-bit windowed DICOM (largest accepted)": (hostile.largest_dicom, "-"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.md",
                        help="where to write the Markdown table")
    args = parser.parse_args()
    lines = ["# Peak memory per upload kind", "",
             f"`python benchmarks/bench_memory.py` on {platform.machine()} (Python {platform.python_version()}), "
             f"{datetime.date.today()}: each input read by `read_xray` in a fresh interpreter; peak resident size "
             "(VmHWM, reset after a warm-up read of the same format) minus the size before the read. The "
             "goal: at most 1 GB above idle for any single input.", "",
             "| input | upload | peak above idle | answer | unbounded reader |", "|---|---|---|---|---|"]
    worst = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, (make, unbounded) in KINDS.items():
            data = make()
            start = time.perf_counter()
            measured = hostile.peak_memory(data, Path(folder))
            seconds = time.perf_counter() - start
            above = measured["peak"] - measured["idle"]
            worst = max(worst, above)
            answer = "read" if measured["message"] is None else "refused: " + measured["message"].split(";")[0]
            lines.append(f"| {name} | {len(data) / 2**20:.2f} MB | {above / 2**20:.0f} MB | {answer} | {unbounded} |")
            print(lines[-1], f"({seconds:.1f} s with interpreter start)", flush=True)
    lines += ["", f"Worst case: **{worst / 2**20:.0f} MB** above idle (goal <= 1024 MB)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return 0 if worst <= 2**30 else 1


if __name__ == "__main__":
    sys.exit(main())
