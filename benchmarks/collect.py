"""Assemble BENCHMARKS.md from the figures each benchmark wrote under benchmarks/results/."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["predict.md", "web.md", "cache.md", "load.md", "load_healthz.md", "memory.md", "cpu.md", "int8.md",
         "batch.md", "web-onnx.md", "load-onnx.md", "gpu.md", "scope_time.md", "scope.md", "calibration.md",
         "startup.md"]
HEADER = """# Benchmarks

Timings are measured as ratios against a baseline run side by side in the same process (or the same server), on
this project's machine: 2 CPU cores, no GPU, shared with other work, so absolute figures are noisy and only the
ratios are compared with the goals. They are never assertions in the test suite. Re-run them all, one after the
other, with `make bench` (or `bash benchmarks/run_all.sh`); each script's own command is given with its figures.
"""


def main() -> None:
    parts = [HEADER]
    for name in ORDER:
        path = ROOT / "benchmarks" / "results" / name
        if path.exists():
            text = path.read_text().strip()
            if text.startswith("# "):  # demote each file's title one level
                text = "#" + text
            parts.append(text)
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
