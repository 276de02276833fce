"""The hostile-input corpus through read_xray and predictions.py: clear errors, no tracebacks, nothing left behind."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support import forked
from support.data import ROOT
from support.hostile import CORPUS, SECRET_ID, SECRET_INSTITUTION, SECRET_NAME

from chestxray.imaging import ACCEPTED, InvalidImage, read_xray

# Kinds that imaging.sniff refuses from their content before any decoding (the web app answers 415 for them): the
# CLI gives sniff's message too, naming the type found.
UNSUPPORTED = {"animated GIF": "(GIF)", "multi-page TIFF": "(TIFF)", "SVG with script": "('.svg')",
               "HTML with script": "('.html')", "PDF": "(PDF)", "ZIP": "(ZIP)"}


def cli_message(kind: str) -> str:
    """The message (or a fragment of it) predictions.py gives for an invalid corpus kind."""
    if kind in UNSUPPORTED:
        return f"unsupported file type {UNSUPPORTED[kind]}: expected {ACCEPTED}"
    return CORPUS[kind].message


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


@pytest.mark.slow(20)
def test_predictions_cli_on_the_corpus(tiny_checkpoint, tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    expected = {}
    for i, (kind, case) in enumerate(CORPUS.items()):
        name = _safe_name(i, case.filename)
        (inputs / name).write_bytes(case.make())
        expected[name] = kind
    files = [str(p) for p in sorted(inputs.iterdir())]
    result = forked.run(
        [sys.executable, "predictions.py", *files, "--checkpoint", str(tiny_checkpoint), "--out", str(out),
         "--device", "cpu", "--heatmaps", "positive", "--allow-untrusted"],  # positive only: 25-60 MP images
        cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1  # some images failed
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(CORPUS)
    written = set()
    for record in records:
        kind = expected[Path(record["image"]).name]
        if CORPUS[kind].valid:
            assert "error" not in record, record
            probs = np.array([row["probability"] for row in record["labels"]])
            assert probs.shape == (14,) and ((probs >= 0) & (probs <= 1)).all()
            assert record["heatmaps"], record  # the tiny model calls several labels on every image
            written |= {Path(p).parent for p in record["heatmaps"].values()}
        else:
            assert cli_message(kind) in record["error"], record
            assert set(record) == {"image", "error"}
    # Heatmap folders only for the valid images: nothing left behind for a refused file.
    assert {p for p in out.iterdir()} == written
    for secret in (SECRET_NAME, SECRET_ID, SECRET_INSTITUTION):
        assert secret not in result.stdout and secret not in result.stderr
