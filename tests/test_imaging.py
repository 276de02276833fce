"""read_xray: every real sample reads correctly; every kind of bad input raises InvalidImage with a useful message."""
from __future__ import annotations

import csv
import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from support.data import DICOM_MONO1, DICOM_MONO2, HAVE_SHARED, NIH_DIR, NIH_PNG, OTHER_CXR_DIR, shared, shared_path
from support.hostile import (
    CORPUS,
    blank_png,
    codestream_bomb,
    corrupted_sop_class_length,
    deflate_bomb,
    encode,
    large_jpeg,
    largest_dicom,
    peak_memory,
    phi_strings,
    photometric_swallowing_phi,
    progressive_jpeg_with_many_scans,
    real_gray,
    rle_bomb,
    small_dicom,
)
from support.hostile import dicom_bytes as _dicom_bytes
from support.hostile import png_header_only as _png_header_only

from chestxray.imaging import (
    MAX_DECODED_PIXELS,
    MAX_INFLATED_BYTES,
    MAX_JPEG_SCANS,
    MAX_PIXELS,
    InvalidImage,
    UnsupportedFormat,
    read_dicom,
    read_xray,
    sniff,
)

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
@pytest.mark.slow(6)
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


def forbid_decoding(monkeypatch) -> None:
    """From here on any Pillow decode fails the test: the checks under test must refuse the file from its header
    alone. Call it after the test data is made (making it decodes)."""

    def no_load(self):
        raise AssertionError(f"decoded a {self.format} image that should have been refused before decoding")

    monkeypatch.setattr(Image.Image, "load", no_load)


def test_bomb_is_refused_before_decoding(monkeypatch):
    # The header check must come first: decoding is never attempted.
    forbid_decoding(monkeypatch)
    side = int(np.sqrt(MAX_PIXELS)) + 10
    with pytest.raises(InvalidImage, match="megapixel"):
        read_xray(_png_header_only(side, side))


def test_missing_path_is_invalid_image(tmp_path):
    with pytest.raises(InvalidImage, match="no such file"):
        read_xray(tmp_path / "nope.png")
    with pytest.raises(InvalidImage, match="no such file"):
        read_xray(Path(tmp_path))


# ---- bombs, patient data in error paths, malformed headers, bounded work ---------------------------------


def test_dicom_bombs_are_refused_before_decoding(monkeypatch):
    # The codestream's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) and the RLE runs are checked first:
    # no decoder ever sees the bomb.
    def no_decode(self):
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
    for syntax in (JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless):
        with pytest.raises(InvalidImage, match="24000x24000 image but its header says 256x256"):
            read_xray(codestream_bomb(syntax))
    with pytest.raises(InvalidImage, match="RLE pixel data decodes to more bytes"):
        read_xray(rle_bomb())


def test_codestreams_that_match_their_header_still_decode():
    # The same generator with the true size: the check refuses only a mismatch. Independent: pydicom's decoding.
    for syntax in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        ds = small_dicom()
        ds.compress(syntax)
        image = read_xray(_dicom_bytes(ds))
        np.testing.assert_allclose(image, ds.pixel_array / 255.0, atol=1e-6)


def test_a_small_deflated_dicom_reads_like_its_uncompressed_twin():
    ds = small_dicom()
    plain = read_xray(_dicom_bytes(ds))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = _dicom_bytes(ds)
    assert data[132:].find(b"1.2.840.10008.1.2.1.99") > 0  # really written deflated
    np.testing.assert_array_equal(read_xray(data), plain)
    np.testing.assert_allclose(plain, real_gray(256) / 255.0, atol=1e-6)


def test_deflate_bomb_is_refused_by_its_inflated_size():
    with pytest.raises(InvalidImage, match=f"inflates to over {MAX_INFLATED_BYTES // 2**20} MB"):
        read_xray(deflate_bomb(MAX_INFLATED_BYTES // 2**20 + 2))


def test_progressive_jpeg_scans_are_counted_before_decoding(monkeypatch):
    data = progressive_jpeg_with_many_scans(scans=MAX_JPEG_SCANS, side=256)  # 5 own scans + 100 repeats
    forbid_decoding(monkeypatch)
    with pytest.raises(InvalidImage, match=f"more than {MAX_JPEG_SCANS} scans"):
        read_xray(data)


def test_an_ordinary_progressive_jpeg_reads_like_pillow_decodes_it():
    data = encode(Image.fromarray(real_gray()), "JPEG", progressive=True)
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(im.convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(read_xray(data), expected)


def test_large_jpeg_is_decoded_at_a_reduced_size():
    data = large_jpeg()  # 6000 x 5000 = 30 MP, over MAX_DECODED_PIXELS
    image = read_xray(data)
    assert image.shape == (2500, 3000) and image.size <= MAX_DECODED_PIXELS
    # Independent: the full decode, averaged over 2 x 2 blocks (the DCT's scaling differs a little from a box filter).
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(im.reduce(2), dtype=np.float32) / 255
    assert np.abs(image - full).mean() < 0.01


def test_png_over_the_decode_budget_is_refused_before_decoding(monkeypatch):
    data = blank_png()  # 8000 x 7500, 58 KB: cost 0.7 GB and 4 s when decoded
    forbid_decoding(monkeypatch)
    with pytest.raises(InvalidImage, match=f"over the {MAX_DECODED_PIXELS // 1_000_000} megapixel limit for PNG"):
        read_xray(data)


def test_dicom_over_the_decode_budget_is_refused():
    ds = small_dicom()
    ds.Rows = ds.Columns = 5100  # 26 MP: under the 60 MP header limit, over the decode budget
    with pytest.raises(InvalidImage, match="megapixel limit for DICOM"):
        read_xray(_dicom_bytes(ds))


def test_nan_window_center_is_named_as_the_problem():
    ds = small_dicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is not a valid DS: that is the point
        ds.WindowCenter, ds.WindowWidth = "NaN", 100
    with pytest.raises(InvalidImage) as err:
        read_xray(_dicom_bytes(ds))
    assert "window center" in str(err.value) and "width" not in str(err.value)


@pytest.mark.parametrize("attrs", [
    {"VOILUTFunction": "SIGMOID", "WindowCenter": 2000, "WindowWidth": 1500},
    {"VOILUTFunction": "LINEAR_EXACT", "WindowCenter": 1000, "WindowWidth": 800},
    {"RescaleSlope": -1, "RescaleIntercept": 4095, "WindowCenter": 2500, "WindowWidth": 1000},
], ids=["sigmoid", "linear-exact", "negative-slope"])
def test_window_functions_match_pydicom(attrs):
    from pydicom.pixels import apply_modality_lut

    gray12 = np.round(real_gray() / 255.0 * 4095).astype(np.uint16)
    ds = _dicom_from(gray12, 12, **attrs)
    image = read_xray(_dicom_bytes(ds))
    expected = apply_voi_lut(apply_modality_lut(gray12, ds), ds, prefer_lut=False)
    # pydicom's output spans the stored range mapped through the rescale: [0, 4095] for these images.
    lo, hi = sorted(apply_modality_lut(np.array([0, 4095]), ds))
    np.testing.assert_allclose(image, (expected - lo) / (hi - lo) if "RescaleSlope" not in attrs
                               else (expected - hi) / (lo - hi), atol=1e-5)


def test_photometric_message_never_quotes_the_header_value():
    ds = small_dicom()
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(InvalidImage) as err:
        read_xray(_dicom_bytes(ds))
    message = str(err.value)
    assert "MONOCHROME1 or MONOCHROME2" in message and "RGB" not in message


@pytest.mark.parametrize("make", [corrupted_sop_class_length, photometric_swallowing_phi],
                         ids=["SOPClassUID length", "PhotometricInterpretation length"])
def test_corrupted_length_dicom_leaks_no_patient_data(make, caplog, capfd):
    data = make()
    secrets = phi_strings()
    assert sum(s.encode() in data for s in secrets) >= 10  # the file really carries them
    logging.getLogger("pydicom").setLevel(logging.DEBUG)  # the most pydicom would ever say
    try:
        with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(InvalidImage) as err:
                read_xray(data)
    finally:
        logging.getLogger("pydicom").setLevel(logging.NOTSET)
    out, errors = capfd.readouterr()
    seen = "\n".join([str(err.value), caplog.text, out, errors, *(str(w.message) for w in caught)])
    assert [s for s in secrets if s in seen] == []


def test_concurrent_dicom_reads_leak_no_warnings(capfd):
    # warnings.catch_warnings is process-wide: overlapping captures in threads could let one thread's warnings
    # through to stderr, or leave a capture installed. Reads hold a lock around their capture.
    data = corrupted_sop_class_length()

    def read(_) -> str:
        with pytest.raises(InvalidImage) as err:
            read_xray(data)
        return str(err.value)

    with ThreadPoolExecutor(4) as pool:
        messages = list(pool.map(read, range(16)))
    assert set(messages) == {"the DICOM file is truncated or corrupt: its header could not be parsed"}
    out, errors = capfd.readouterr()
    assert [s for s in phi_strings() if s in out + errors] == []
    with warnings.catch_warnings(record=True) as caught:  # warnings still work normally afterwards
        warnings.simplefilter("always")
        warnings.warn("after the reads", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the reads"]


@pytest.mark.parametrize("kind", [
    "DICOM with VR ZZ on Columns", "DICOM with BitsAllocated as a 2-byte UL",
    "DICOM with a bad VR on PhotometricInterpretation", "JPEG with a corrupt EXIF block",
])
def test_lazily_failing_headers_are_invalid_image(kind):
    # Unguarded, these escape as NotImplementedError, BytesLengthException and struct.error.
    with pytest.raises(InvalidImage, match=CORPUS[kind].message):
        read_xray(CORPUS[kind].make())


# Peak memory: each bomb read in a fresh interpreter, its peak resident size (ru_maxrss) compared with the size
# after a warm-up read of the same format. The bombs here are larger than the corpus's (which stay under the web
# tests' 1 MB upload limit) so that an unbounded reader would need well over the 1 GB allowed; the child's
# address space is capped so that such a reader fails fast instead of swapping the machine.
MEMORY_LIMIT = 2**30  # peak memory for any single input: at most 1 GB above idle
MEMORY_KINDS = {
    "deflate bomb (3 GB inflated)": (lambda: deflate_bomb(3072), "decompression bomb"),
    "JPEG 24000x24000 in DICOM": (lambda: codestream_bomb(JPEGBaseline8Bit), "header says"),
    "JPEG 2000 24000x24000 in DICOM": (lambda: codestream_bomb(JPEG2000Lossless), "header says"),
    "JPEG-LS 24000x24000 in DICOM": (lambda: codestream_bomb(JPEGLSLossless), "header says"),
    "RLE bomb (1.5 GB decoded)": (lambda: rle_bomb(1536), "RLE"),
    "blank 60 MP PNG": (blank_png, "megapixel"),
    "progressive JPEG, 2500 scans": (progressive_jpeg_with_many_scans, "scans"),
    "30 MP JPEG (valid)": (large_jpeg, None),
    "25 MP 16-bit windowed DICOM (the largest valid)": (largest_dicom, None),
}
@pytest.mark.parametrize("kind", list(MEMORY_KINDS))
def test_peak_memory_of_each_bomb_is_bounded(kind, tmp_path):
    make, message = MEMORY_KINDS[kind]
    data = make()
    measured = peak_memory(data, tmp_path)
    if message is None:
        assert measured["message"] is None
    else:
        assert message in (measured["message"] or "")
    assert measured["peak"] - measured["idle"] <= MEMORY_LIMIT, measured


def test_file_size_limit_is_checked_before_reading(tmp_path):
    sparse = tmp_path / "huge.dcm"
    with sparse.open("wb") as f:  # 12 GB on paper, nothing on disk: read_bytes would need 12 GB of memory
        f.truncate(12 * 2**30)
    with pytest.raises(InvalidImage, match="larger than the 50 MB limit per image"):
        read_xray(sparse, max_bytes=50 * 2**20)
    data = NIH_PNG.read_bytes()
    for source in (data, io.BytesIO(data), NIH_PNG):
        with pytest.raises(InvalidImage, match="limit per image"):
            read_xray(source, max_bytes=len(data) - 1)
        assert read_xray(source if not isinstance(source, io.BytesIO) else io.BytesIO(data),
                         max_bytes=len(data)).shape == (1024, 1024)


@pytest.mark.parametrize(("filename", "shown"), [("scan.s\u202egv", ".sgv"), ("scan.\u202egvs", ".gvs"),
                                               ("a\\b.s\x00vg", ".svg"), ("x/y.s\u200fvg", ".svg")])
def test_sniff_messages_never_echo_control_or_bidi_characters(filename, shown):
    with pytest.raises(UnsupportedFormat) as err:
        sniff(b"<svg xmlns='http://www.w3.org/2000/svg'/>", filename)
    message = str(err.value)
    assert all(ch.isprintable() for ch in message), ascii(message)
    assert f"('{shown}')" in message


@pytest.mark.parametrize("path", [DICOM_MONO2, DICOM_MONO1])
def test_read_dicom_gives_read_xrays_image_and_the_header_from_one_parse(path, monkeypatch):
    data = path.read_bytes()
    expected = read_xray(data)
    parses = []
    dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append(a) or dcmread(*a, **k))
    header, image = read_dicom(data)
    assert len(parses) == 1 and np.array_equal(image, expected)
    assert header.SOPInstanceUID == dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert "PixelData" not in header  # only the header is kept: the pixels are in the image


@pytest.mark.parametrize("data, message", [(NIH_PNG.read_bytes(), "not a DICOM file"), (b"", "empty")])
def test_read_dicom_refuses_what_is_not_dicom(data, message):
    with pytest.raises(InvalidImage, match=message):
        read_dicom(data)
