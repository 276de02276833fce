"""The test data: the real sample bundled in samples/ and the larger shared data set when it is there.

Every test runs on the bundled sample (samples/nih, samples/other-cxr, samples/nih-metadata), so the suite passes
on any fresh clone. Tests that need more real data than the bundle holds are marked `shared`: they use
../shared/data (or $CXR_SHARED_DATA) when it is there and are skipped with a one-line reason when it is not
(conftest.py's hooks; with CXR_REQUIRE_SHARED=1 a skip fails the run).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = ROOT / "samples"
NIH_DIR = SAMPLES / "nih"
OTHER_CXR_DIR = SAMPLES / "other-cxr"
METADATA_DIR = SAMPLES / "nih-metadata"  # the official NIH metadata, gzipped
DATA_ENTRY_CSV = METADATA_DIR / "Data_Entry_2017_v2020.csv.gz"  # all 112,120 rows
BBOX_CSV = METADATA_DIR / "BBox_List_2017.csv.gz"  # all 984 boxes
NIH_PNG = NIH_DIR / "images" / "00000001_000.png"  # 1024 px, byte-identical to the NIH file, Cardiomegaly
DICOM_MONO2 = OTHER_CXR_DIR / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DICOM_MONO1 = OTHER_CXR_DIR / "Fake_MONOHR1.dcm"

SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAVE_SHARED = (SHARED_DATA / "nih").is_dir()
REQUIRE_SHARED = os.environ.get("CXR_REQUIRE_SHARED", "") not in ("", "0")
SHARED_REASON = f"needs the shared data set in {SHARED_DATA} (not in the repository; set CXR_SHARED_DATA)"
# For tests that need more data than the bundle: skipped without the shared data set, failed under CI.
shared = pytest.mark.shared


def shared_path(*parts: str) -> Path:
    """A path under the shared data set (whether or not it exists: mark the test `shared`)."""
    return SHARED_DATA.joinpath(*parts)
