"""The hostile-input corpus through read_xray and predictions.py: clear errors, no tracebacks, nothing left behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from hostile import CORPUS, SECRET_ID, SECRET_INSTITUTION, SECRET_NAME

from chestxray.imaging import InvalidImage, read_xray


def test_corpus_has_at_least_25_kinds():
    assert len(CORPUS) >= 25
    assert sum(not c.valid for c in CORPUS.values()) >= 18


@pytest.mark.parametrize("kind", list(CORPUS))
def test_read_xray_on_the_corpus(kind):
    case = CORPUS[kind]
    if case.valid:
        image = read_xray(case.make())
        assert image.ndim == 2 and 0 <= image.min() <= image.max() <= 1
    else:
        with pytest.raises(InvalidImage) as err:
            read_xray(case.make())
        message = str(err.value)
        assert case.message in message
        for secret in (SECRET_NAME, SECRET_ID, SECRET_INSTITUTION):
            assert secret not in message


def _safe_name(i: int, filename: str) -> str:
    suffix = Path(filename.replace("\x00", "")).suffix or ".bin"
    return f"{i:02d}-\u00e9\u4e2d{suffix}"  # non-ASCII names on disk


def test_predictions_cli_on_the_corpus(tiny_checkpoint, tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    expected = {}
    for i, case in enumerate(CORPUS.values()):
        name = _safe_name(i, case.filename)
        (inputs / name).write_bytes(case.make())
        expected[name] = case
    files = [str(p) for p in sorted(inputs.iterdir())]
    result = subprocess.run(
        [sys.executable, "predictions.py", *files, "--checkpoint", str(tiny_checkpoint), "--out", str(out),
         "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1  # some images failed
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(CORPUS)
    written = set()
    for record in records:
        case = expected[Path(record["image"]).name]
        if case.valid:
            assert "error" not in record, record
            probs = np.array(list(record["probabilities"].values()))
            assert probs.shape == (14,) and ((probs >= 0) & (probs <= 1)).all()
            written |= {Path(p).parent for p in record["heatmaps"].values()}
        else:
            assert case.message in record["error"], record
            assert set(record) == {"image", "error"}
    # Heatmap folders only for the valid images: nothing left behind for a refused file.
    assert {p for p in out.iterdir()} == written
    for secret in (SECRET_NAME, SECRET_ID, SECRET_INSTITUTION):
        assert secret not in result.stdout and secret not in result.stderr
