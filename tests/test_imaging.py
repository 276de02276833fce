"""read_xray: every real sample reads correctly; every kind of bad input raises InvalidImage with a useful message."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_MONO1, DICOM_MONO2, HAVE_SHARED, NIH_DIR, NIH_PNG, OTHER_CXR_DIR, shared, shared_path
from hostile import dicom_bytes as _dicom_bytes
from hostile import png_header_only as _png_header_only
from hostile import real_gray
from PIL import Image
from pydicom.pixels import apply_voi_lut

from chestxray.imaging import MAX_PIXELS, InvalidImage, read_xray

SECRET = "DOE^JANE_SECRET"


def _manifest(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return [{**row, "folder": folder} for row in csv.DictReader(f)]


def _other_cxr_cases() -> list:
    """The bundled other-cxr files, then the shared corpus's others (16 in all: RGBA PNG, RGB JPEG, non-square)."""
    cases = [pytest.param(row, id=row["file"]) for row in _manifest(OTHER_CXR_DIR)]
    bundled = {row.values[0]["file"] for row in cases}
    if HAVE_SHARED:
        cases += [pytest.param(row, id=f"shared/{row['file']}", marks=shared)
                  for row in _manifest(shared_path("other-cxr")) if row["file"] not in bundled]
    else:
        cases.append(pytest.param(None, id="shared/other-cxr", marks=shared))
    return cases


@pytest.mark.parametrize("row", _other_cxr_cases())
def test_every_other_cxr_file_reads(row):
    path = row["folder"] / row["file"]
    image = read_xray(path)
    assert image.dtype == np.float32 and image.ndim == 2
    assert image.shape == (int(row["height"]), int(row["width"]))
    assert 0.0 <= image.min() < image.max() <= 1.0
    if row["format"] != "DICOM":
        # Independent reading: Pillow's own grayscale conversion.
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB").convert("L"), dtype=np.float32) / 255
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6


def _assert_reads_as_gray_values(files: list[Path]) -> None:
    for path in files:
        image = read_xray(path)
        with Image.open(path) as im:
            # R = G = B in every NIH file (README), so channel 0 is the gray value, RGBA or not.
            expected = np.asarray(im, dtype=np.float32)
        expected = (expected[..., 0] if expected.ndim == 3 else expected) / 255
        assert image.shape == expected.shape, path
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6, path


def test_every_nih_sample_image_reads_as_its_gray_values():
    files = sorted(NIH_DIR.rglob("*.png"))
    assert len(files) == len((NIH_DIR / "labels.csv").read_text().splitlines()) - 1 == 283
    _assert_reads_as_gray_values(files)


@shared
def test_every_shared_nih_image_reads_as_its_gray_values():
    files = sorted(shared_path("nih").rglob("*.png"))
    assert len(files) == 937
    _assert_reads_as_gray_values(files)


@pytest.mark.parametrize("path", [
    pytest.param(NIH_DIR / "images_64" / "00000004_000.png", id="bundled-64px"),
    pytest.param(shared_path("nih", "images", "00000100_000.png"), id="shared-1024px", marks=shared),
])
def test_rgba_png_reads_as_gray(path):
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    image = read_xray(path)
    assert image.shape == rgba.shape[:2]
    np.testing.assert_allclose(image, rgba[..., 0] / 255, atol=1e-6)


def test_bytes_file_object_and_path_agree():
    data = NIH_PNG.read_bytes()
    a, b, c = read_xray(NIH_PNG), read_xray(data), read_xray(io.BytesIO(data))
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_monochrome1_is_the_inverse_of_its_monochrome2_twin():
    mono2, mono1 = read_xray(DICOM_MONO2), read_xray(DICOM_MONO1)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # MONOCHROME2 pixels against pydicom's own decoding (8 bits stored).
    expected = pydicom.dcmread(DICOM_MONO2).pixel_array / 255.0
    np.testing.assert_allclose(mono2, expected, atol=1e-6)


def test_16bit_png_keeps_its_contrast(tmp_path):
    gray8 = real_gray()
    gray16 = gray8.astype(np.uint16) * 257  # full 16-bit range
    path = tmp_path / "x16.png"
    Image.fromarray(gray16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    image = read_xray(path)
    np.testing.assert_allclose(image, gray8 / 255.0, atol=1e-5)
    assert image.max() - image.min() > 0.9


def _dicom_from(gray: np.ndarray, bits_stored: int, **attrs) -> pydicom.Dataset:
    ds = pydicom.dcmread(DICOM_MONO2)
    ds.set_pixel_data(gray, photometric_interpretation=attrs.pop("photometric", "MONOCHROME2"), bits_stored=bits_stored)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_uncompressed_12bit_dicom_respects_bits_stored():
    gray8 = real_gray()
    gray12 = np.round(gray8 / 255.0 * 4095).astype(np.uint16)
    image = read_xray(_dicom_bytes(_dicom_from(gray12, 12)))
    # Scaled by 4095 (BitsStored), not 65535 (the 16-bit container): contrast intact.
    np.testing.assert_allclose(image, gray8 / 255.0, atol=1 / 4095)


def test_12bit_dicom_with_rescale_and_window_matches_pydicom():
    gray12 = np.round(real_gray() / 255.0 * 4095).astype(np.uint16)
    ds = _dicom_from(gray12, 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=500, WindowWidth=2000)
    image = read_xray(_dicom_bytes(ds))
    # Independent: pydicom's modality + VOI LUT, scaled by its output range.
    from pydicom.pixels import apply_modality_lut

    expected = apply_voi_lut(apply_modality_lut(gray12, ds), ds, prefer_lut=False)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.9999
    assert (image == 0).any() and (image == 1).any()  # the window clips both ends


def test_12bit_monochrome1_dicom_is_inverted():
    gray12 = np.round(real_gray() / 255.0 * 4095).astype(np.uint16)
    mono2 = read_xray(_dicom_bytes(_dicom_from(gray12, 12)))
    mono1 = read_xray(_dicom_bytes(_dicom_from(gray12, 12, photometric="MONOCHROME1")))
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "RGB"])
def test_other_modes_read_close_to_gray(tmp_path, mode):
    gray8 = real_gray()
    im = Image.fromarray(gray8).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    image = read_xray(path)
    assert np.abs(image - gray8 / 255.0).mean() < 0.02


def test_dicom_patient_data_never_in_errors_or_logs(caplog):
    ds = pydicom.dcmread(DICOM_MONO2)
    ds.PatientName, ds.PatientID = SECRET, SECRET
    del ds.PixelData
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(InvalidImage) as err:
            read_xray(_dicom_bytes(ds))
    assert SECRET not in str(err.value) and SECRET not in caplog.text


# ---- bad input: the whole hostile corpus is in test_hostile.py; here, what it cannot show --------------------------


def test_bomb_is_refused_before_decoding(monkeypatch):
    # The header check must come first: decoding is never attempted.
    def no_load(self):
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(Image.Image, "load", no_load)
    side = int(np.sqrt(MAX_PIXELS)) + 10
    with pytest.raises(InvalidImage, match="megapixel"):
        read_xray(_png_header_only(side, side))


def test_missing_path_is_invalid_image(tmp_path):
    with pytest.raises(InvalidImage, match="no such file"):
        read_xray(tmp_path / "nope.png")
    with pytest.raises(InvalidImage, match="no such file"):
        read_xray(Path(tmp_path))
