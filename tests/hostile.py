"""The hostile-input corpus: every kind of file people throw at the tool, generated in memory (no stored blobs).

Each Case makes its bytes from real images in ../shared/data where a real image is needed. `valid` cases must be
predicted normally; the others must be refused with an InvalidImage / 4xx whose message contains `message`.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from conftest import DICOM_MONO2, NIH_PNG
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECRET_NAME = "DOE^JANE_SECRET_42"
SECRET_ID = "PID-SECRET-98765"
SECRET_INSTITUTION = "Secret General Hospital"


@dataclass(frozen=True)
class Case:
    filename: str
    make: Callable[[], bytes]
    valid: bool
    message: str = ""  # a fragment of the error message (invalid cases)
    content_type: str = "application/octet-stream"


def real_gray(size: int = 256) -> np.ndarray:
    """A real NIH radiograph, 8-bit gray, size x size."""
    with Image.open(NIH_PNG) as im:
        return np.asarray(im.convert("L").resize((size, size)))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def identified_dicom() -> pydicom.Dataset:
    """The real JPEG-compressed CR DICOM with distinctive patient-identifying fields filled in."""
    ds = pydicom.dcmread(DICOM_MONO2)
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.PatientBirthDate = "19010203"
    ds.AccessionNumber = "ACC-SECRET-555"
    ds.InstitutionName = SECRET_INSTITUTION
    return ds


def dicom_variant(change: Callable[[pydicom.Dataset], None]) -> Callable[[], bytes]:
    def make() -> bytes:
        ds = identified_dicom()
        change(ds)
        return dicom_bytes(ds)

    return make


def _no_pixels(ds):
    del ds.PixelData


def _mpeg2(ds):
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML


def _rgb(ds):
    ds.PhotometricInterpretation = "RGB"


def _absurd_window(ds):
    ds.WindowCenter, ds.WindowWidth = 128, 0


def _huge_rows(ds):
    ds.Rows, ds.Columns = 65535, 65535


def structured_report() -> bytes:
    """A DICOM Basic Text SR: a valid DICOM file that is not an image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.InstitutionName = SECRET_INSTITUTION
    ds.preamble = b"\x00" * 128
    return dicom_bytes(ds)


def animated_gif() -> bytes:
    frames = [Image.fromarray(real_gray(64)), Image.fromarray(255 - real_gray(64))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    frames = [Image.fromarray(real_gray(64)), Image.fromarray(255 - real_gray(64))]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("image.png", encode(Image.fromarray(real_gray(64)), "PNG"))
    return buf.getvalue()


def jpeg_with_exif_rotation() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return encode(Image.fromarray(real_gray(128)[:, :96]), "JPEG", exif=exif.tobytes())


def png_bytes() -> bytes:
    return encode(Image.fromarray(real_gray(128)), "PNG")


CORPUS: dict[str, Case] = {
    "empty file": Case("empty.png", lambda: b"", False, "empty", "image/png"),
    "random bytes named .png": Case("noise.png", lambda: np.random.default_rng(1).bytes(4096), False,
                                    "not a readable image", "image/png"),
    "truncated PNG": Case("cut.png", lambda: NIH_PNG.read_bytes()[:20_000], False, "truncated", "image/png"),
    "truncated JPEG": Case("cut.jpg", lambda: encode(Image.fromarray(real_gray()), "JPEG")[:3000], False,
                           "truncated", "image/jpeg"),
    "truncated DICOM": Case("cut.dcm", lambda: DICOM_MONO2.read_bytes()[:40_000], False, "truncated",
                            "application/dicom"),
    "DICOM cut inside its header": Case("head.dcm", lambda: dicom_bytes(identified_dicom())[:600], False,
                                        "truncated", "application/dicom"),
    "PNG bomb (100000x100000 header)": Case("bomb.png", lambda: png_header_only(100_000, 100_000), False,
                                           "megapixel", "image/png"),
    "DICOM bomb (65535x65535 header)": Case("bomb.dcm", dicom_variant(_huge_rows), False, "megapixel",
                                           "application/dicom"),
    "1x1 image": Case("dot.png", lambda: encode(Image.new("L", (1, 1)), "PNG"), False, "at least 32", "image/png"),
    "16-bit PNG at full range": Case("x16.png", lambda: encode(
        Image.fromarray(real_gray().astype(np.uint16) * 257), "PNG"), True, "", "image/png"),
    "CMYK JPEG": Case("cmyk.jpg", lambda: encode(Image.fromarray(real_gray()).convert("CMYK"), "JPEG"), True, "",
                      "image/jpeg"),
    "palette PNG": Case("palette.png", lambda: encode(Image.fromarray(real_gray()).convert("P"), "PNG"), True, "",
                        "image/png"),
    "JPEG with EXIF rotation": Case("rotated.jpg", jpeg_with_exif_rotation, True, "", "image/jpeg"),
    "animated GIF": Case("anim.gif", animated_gif, False, "unsupported image format GIF", "image/gif"),
    "multi-page TIFF": Case("pages.tiff", multipage_tiff, False, "unsupported image format TIFF", "image/tiff"),
    "SVG with script": Case("x.svg", lambda: (
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script><rect width="64" height="64"/></svg>'),
        False, "not a readable image", "image/svg+xml"),
    "HTML with script": Case("x.html", lambda: b"<html><body><script>alert(document.cookie)</script></body></html>",
                             False, "not a readable image", "text/html"),
    "PDF": Case("scan.pdf", lambda: b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
                False, "not a readable image", "application/pdf"),
    "ZIP": Case("images.zip", zip_file, False, "not a readable image", "application/zip"),
    "DICOM without pixel data": Case("nopix.dcm", dicom_variant(_no_pixels), False, "no pixel data",
                                     "application/dicom"),
    "DICOM with unsupported transfer syntax": Case("mpeg.dcm", dicom_variant(_mpeg2), False, "transfer syntax",
                                                   "application/dicom"),
    "DICOM structured report (not an image)": Case("report.dcm", structured_report, False, "no pixel data",
                                                   "application/dicom"),
    "DICOM with absurd window": Case("window.dcm", dicom_variant(_absurd_window), False, "window",
                                     "application/dicom"),
    "DICOM with RGB photometric": Case("rgb.dcm", dicom_variant(_rgb), False, "photometric", "application/dicom"),
    "DICOM with patient data (valid)": Case("patient.dcm", lambda: dicom_bytes(identified_dicom()), True, "",
                                            "application/dicom"),
    "text named .dcm": Case("notes.dcm", lambda: b"PatientName=" + SECRET_NAME.encode(), False,
                            "not a readable image", "application/dicom"),
    "hostile file name (../, NUL, non-ASCII)": Case("../../etc/\x00passwd-\u00e9\u4e2d.png", png_bytes, True, "",
                                                    "image/png"),
}
