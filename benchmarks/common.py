"""What the benchmarks share: a timer, the model arguments and the NIH sample's location, and from the tests
tests/e2e/livesite.py (run/stop a server) and the tests' support package (data paths, make_checkpoint). tests/ is
not an installed package, so livesite is loaded by path and support through livesite, only when first asked for."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NIH_IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"


def timed(fn) -> float:
    """Seconds one call of fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_args_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the model options every CPU benchmark takes: --arch and --image-size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="model trunk (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="input size (default: %(default)s)")
    return parser


def add_out_argument(parser: argparse.ArgumentParser, filename: str) -> None:
    """--out: the markdown file for the figures, by default benchmarks/results/<filename>."""
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / filename),
                        help="markdown file for the figures (default: %(default)s)")


def write_report(lines: list[str], out: str | Path) -> str:
    """The figures' markdown lines, printed and written to `out` (its folder made) -> the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text


def __getattr__(name: str):
    """livesite and support, loaded on first use so that the other benchmarks do not import the tests' helpers."""
    if name == "livesite":
        spec = importlib.util.spec_from_file_location("livesite", ROOT / "tests" / "e2e" / "livesite.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["livesite"] = module
        spec.loader.exec_module(module)
    elif name == "support":
        module = __getattr__("livesite").import_support()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module
