"""Shared fixtures: paths to the real sample data in ../shared/data and a session-scoped tiny checkpoint.

Area-specific fixtures live in the test modules that use them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
NIH_DIR = SHARED_DATA / "nih"
OTHER_CXR_DIR = SHARED_DATA / "other-cxr"
METADATA_DIR = SHARED_DATA / "nih-metadata"
NIH_PNG = NIH_DIR / "images" / "00000001_000.png"  # 1024 px, Cardiomegaly
DICOM_MONO2 = OTHER_CXR_DIR / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DICOM_MONO1 = OTHER_CXR_DIR / "Fake_MONOHR1.dcm"

if not NIH_DIR.is_dir():
    raise RuntimeError(f"the shared test data is missing: {NIH_DIR} (set CXR_SHARED_DATA to its folder)")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    return NIH_DIR


@pytest.fixture(scope="session")
def other_cxr_dir() -> Path:
    return OTHER_CXR_DIR


@pytest.fixture(scope="session")
def metadata_dir() -> Path:
    return METADATA_DIR


def make_checkpoint(path: Path, arch: str = "resnet18", image_size: int = 64, labels=None, seed: int = 0,
                    bias_spread: float = 3.0, thresholds=None) -> Path:
    """Save a randomly initialised checkpoint whose head bias spreads the probabilities over (0, 1)."""
    from chestxray.checkpoint import Meta, model_from_meta, save_checkpoint
    from chestxray.labels import LABELS

    torch.manual_seed(seed)
    labels = tuple(labels or LABELS)
    meta = Meta.new(arch=arch, labels=labels, image_size=image_size, thresholds=thresholds,
                    training={"data": "random init (test fixture)", "epochs": 0,
                              "val_auroc": {name: 0.5 for name in labels}, "date": "2026-11-25"})
    model = model_from_meta(meta)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.linspace(-bias_spread, bias_spread, len(labels)))
    save_checkpoint(path, model, meta, {"note": "test fixture"})
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-18 (same head) checkpoint at 64 px, random weights, biased head: fast and deterministic."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint):
    from predictions import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
