"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs on the CPU with tiny sizes and reports ok.

The real check runs on a GPU machine (bash benchmarks/gpu_check.sh); this keeps the script from rotting between
those runs. It times nothing that is asserted, so the script's commands (train.py, its kill and resume, torchrun's
launcher, export.py, predictions.py) run as processes forked from a Python with PyTorch already imported
(tests/support/forked.py stands in for the subprocess module the script uses); torchrun's workers start anew."""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from support import forked
from support.data import ROOT

STEPS = ("1. environment", "2. data folder", "3. training from the cache", "4. pure-compute ceiling", "5. loader",
         "6. --resume after a kill", "7. torchrun and DDP", "8a. ONNX export", "8b. predictions.py, both backends",
         "9. web POST, both backends")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow(90)
def test_dry_run_runs_every_step(tmp_path, monkeypatch):
    gpu_check = _load_gpu_check()
    monkeypatch.setattr(gpu_check, "subprocess", forked)
    out = tmp_path / "gpu.md"
    rc = gpu_check.main(gpu_check.get_args_parser().parse_args(
        ["--dry-run", "--work", str(tmp_path / "work"), "--out", str(out)]))
    report = out.read_text()
    for name in STEPS:
        assert f"## {name}: ok" in report, report
    assert rc == 0
    assert "dry-run" in report
    # The figures the lead reads on the GPU are there (numbers, not placeholders).
    assert re.search(r"training images/s from the cache \(best epoch after the first\) \| \*\*[0-9.]+\*\*", report)
    assert re.search(r"pure-compute ceiling images/s .*\| \*\*[0-9.]+\*\*", report)
    assert re.search(r"training / ceiling \| \*\*[0-9]+%\*\*", report)
    assert "epochs in history.csv after the resume | [1, 2, 3]" in report
    assert "'world_size': 1" in report and "'ddp_steps': 3" in report
    for backend in ("torch", "onnx"):
        assert re.search(rf"predictions.py, backend {backend} \| exit code 0, 8/8 results on cpu", report)
        assert re.search(rf"POST /api/predict, backend {backend} \| median [0-9.]+ ms over 3 posts on cpu, status "
                         r"codes \[200\]", report)
    assert re.search(r"max \|Δprobability\| torch vs onnx .* \| [0-9.e+-]+ \|", report)
