"""The hostile-input corpus: every kind of file people throw at the tool, generated in memory (no stored blobs).

Each Case makes its bytes from real images in ../shared/data where a real image is needed. `valid` cases must be
predicted normally; the others must be refused with an InvalidImage / 4xx whose message contains `message`.
The generators of the bombs take their size as an argument, so the memory tests can build larger ones than the
corpus (whose files stay under the 1 MB upload limit of the web tests). Makers that cost more than a few
milliseconds are cached: the corpus is built many times per test session.
"""
from __future__ import annotations

import functools
import io
import json
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from support.data import DICOM_MONO2, NIH_PNG, ROOT

SECRET_NAME = "DOE^JANE_SECRET_42"
SECRET_ID = "PID-SECRET-98765"
SECRET_INSTITUTION = "Secret General Hospital"
# More identifying elements, filled in by identified_dicom() so that a corrupted length swallows some of them
# whichever element it is on (SOPClassUID's neighbours, PhotometricInterpretation's, ...).
MORE_PHI = {
    "ReferringPhysicianName": "DR^REFERRING_SECRET",
    "StudyDescription": "CHEST SECRET-STUDY-314",
    "OtherPatientIDs": "OPID-SECRET-2718",
    "PatientAddress": "12 Secret Lane, Hiddenville",
    "RequestingPhysician": "DR^REQUESTING_SECRET",
    "AdmissionID": "ADM-SECRET-1618",
}


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
    for keyword, value in MORE_PHI.items():
        setattr(ds, keyword, value)
    return ds


def phi_strings() -> tuple[str, ...]:
    """Every identifying string identified_dicom() carries (the name also as its given-name part)."""
    ds = identified_dicom()
    birth = ds.PatientBirthDate
    return (SECRET_NAME, SECRET_NAME.split("^")[1], SECRET_ID, birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
            ds.AccessionNumber, SECRET_INSTITUTION, *MORE_PHI.values())


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


def _nan_window_center(ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is not a valid DS: that is the point
        ds.WindowCenter, ds.WindowWidth = "NaN", 100


def small_dicom(size: int = 256) -> pydicom.Dataset:
    """identified_dicom() re-encoded as an uncompressed size x size 8-bit MONOCHROME2 image of the same radiograph."""
    ds = identified_dicom()
    ds.set_pixel_data(real_gray(size), photometric_interpretation="MONOCHROME2", bits_stored=8)
    return ds


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    """data with the one occurrence of `old` replaced by `new` (refuses an ambiguous patch)."""
    assert data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def element_header(group: int, element: int, vr: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr


def dicom_with_bad_vr(group: int, element: int, vr: bytes, new_vr: bytes) -> Callable[[], bytes]:
    """A DICOM whose element (group, element) is re-labelled with another VR (the length stays): parsed lazily."""
    return lambda: patched(dicom_bytes(identified_dicom()), element_header(group, element, vr),
                           element_header(group, element, new_vr))


def dicom_with_length(group: int, element: int, vr: bytes, length: int | Callable[[bytes, int], int]) -> bytes:
    """identified_dicom() with the 2-byte length of element (group, element) overwritten (int or f(data, value_at))."""
    data = dicom_bytes(identified_dicom())
    at = data.index(element_header(group, element, vr))
    value = length(data, at + 8) if callable(length) else length
    return data[:at + 6] + struct.pack("<H", value) + data[at + 8:]


def corrupted_sop_class_length() -> bytes:
    """SOPClassUID (0008,0016) claiming 1 KB: its value swallows the patient data after it, and parsing derails."""
    return dicom_with_length(0x0008, 0x0016, b"UI", 0x0400)


def photometric_swallowing_phi() -> bytes:
    """PhotometricInterpretation (0028,0004) whose length runs up to the pixel data, swallowing RequestingPhysician,
    AdmissionID and every element between: the data set still parses, with that junk as the photometric value."""
    return dicom_with_length(0x0028, 0x0004, b"CS",
                             lambda data, value_at: data.index(element_header(0x7FE0, 0x0010, b"OB")) - value_at)


def _meta_length(data: bytes) -> int:
    """Where the data set starts in a Part 10 file written by pydicom (its file meta group length is at 140)."""
    return 144 + struct.unpack("<I", data[140:144])[0]


@functools.cache
def deflate_bomb(inflated_mb: int = 200) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of a real image with a private element of `inflated_mb` MiB of
    zeros before the pixel data: a few KB per inflated MB (1 MiB of zeros deflates to about 1 KB)."""
    ds = small_dicom()
    ds.private_block(0x0009, "HOSTILE", create=True).add_new(0x00, "OB", b"PLACEHLD")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = dicom_bytes(ds)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated = dicom_bytes(ds)
    body = plain[_meta_length(plain):]
    cut = body.index(b"PLACEHLD")
    head = body[:cut - 4] + struct.pack("<I", inflated_mb * 2**20)
    # After a full flush the stream is byte-aligned and refers to nothing before it, so one deflated MiB of zeros
    # can be repeated as it is.
    first, zeros, last = (zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) for _ in range(3))
    stream = first.compress(head) + first.flush(zlib.Z_FULL_FLUSH)
    stream += (zeros.compress(bytes(2**20)) + zeros.flush(zlib.Z_FULL_FLUSH)) * inflated_mb
    stream += last.compress(body[cut + 8:]) + last.flush()
    return deflated[:_meta_length(deflated)] + stream


def _first_frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@functools.cache
def codestream_bomb(syntax: str, claimed: int = 24000) -> bytes:
    """A real 256 x 256 image compressed with `syntax` (a JPEG, JPEG-LS or JPEG 2000 UID) inside a DICOM whose
    header says 256 x 256, its codestream header edited to declare claimed x claimed."""
    ds = small_dicom()
    if syntax == pydicom.uid.JPEGBaseline8Bit:  # pydicom has no JPEG encoder: Pillow's stream, encapsulated
        ds.PixelData = encapsulate([encode(Image.fromarray(real_gray(256)), "JPEG")])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    frame = bytearray(_first_frame(ds))
    if syntax in pydicom.uid.JPEG2000TransferSyntaxes:
        siz = frame.index(b"\xff\x51")
        frame[siz + 6:siz + 14] = struct.pack(">II", claimed, claimed)  # Xsiz, Ysiz (no offsets)
    else:
        sof = re.search(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf\xf7]", bytes(frame)).start()
        frame[sof + 5:sof + 9] = struct.pack(">HH", claimed, claimed)  # height, width
    ds.PixelData = encapsulate([bytes(frame)])
    return dicom_bytes(ds)


@functools.cache
def rle_bomb(decoded_mb: int = 25) -> bytes:
    """A real 256 x 256 RLE DICOM whose one segment goes on with replicate runs (2 bytes -> 128 bytes each) to
    decode to about `decoded_mb` MiB, 400 times the 64 KiB its header promises."""
    ds = small_dicom()
    ds.compress(pydicom.uid.RLELossless)
    frame = _first_frame(ds)
    ds.PixelData = encapsulate([frame + b"\x81\x00" * (decoded_mb * 2**20 // 128)])
    return dicom_bytes(ds)


@functools.cache
def progressive_jpeg_with_many_scans(scans: int = 2500, side: int = 4096) -> bytes:
    """A progressive JPEG (a real image in the corner of a black side x side canvas) with its smallest scan repeated
    `scans` times: under 1 MB, yet each scan is a pass over all the image's blocks (12 s to decode unbounded)."""
    canvas = np.zeros((side, side), np.uint8)
    canvas[:64, :64] = real_gray(64)
    data = encode(Image.fromarray(canvas), "JPEG", progressive=True, quality=90)
    # Each scan with the table segments before it: from the end of one scan's entropy-coded data to the end of the
    # next one's (the next marker after a scan is 0xFF then 0xC0-0xCF or 0xD8-0xFE: not stuffing, not a restart).
    ends, pos = [], data.index(b"\xff\xda")
    while (sos := data.find(b"\xff\xda", pos)) >= 0:
        ends.append(re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]").search(data, sos + 2).start())
        pos = ends[-1]
    eoi = data.rindex(b"\xff\xd9")
    smallest = min((data[a:b] for a, b in zip(ends, ends[1:])), key=len)  # a refinement scan and its tables
    return data[:eoi] + smallest * scans + data[eoi:]


def jpeg_with_bad_exif_type() -> bytes:
    """A JPEG rotated by EXIF whose ImageWidth tag has type BYTE: exif_transpose fails re-encoding it (struct.error)."""
    entries = [(0x0100, 1, 1, b"\x06\x00\x00\x00"), (0x0112, 3, 1, b"\x06\x00\x00\x00")]  # (tag, type, count, value)
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI4s", *e) for e in entries) + bytes(4)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd
    return encode(Image.fromarray(real_gray(128)[:, :96]), "JPEG", exif=exif)


@functools.cache
def blank_png(width: int = 8000, height: int = 7500) -> bytes:
    """A valid all-black 8-bit gray PNG: 60 MP in about 60 KB."""
    return encode(Image.new("L", (width, height)), "PNG", optimize=False)


@functools.cache
def large_jpeg(width: int = 6000, height: int = 5000) -> bytes:
    """A real radiograph in the corner of a black 30 MP canvas: over the decode budget, read at half size."""
    canvas = Image.new("L", (width, height))
    canvas.paste(Image.fromarray(real_gray(1024)), (0, 0))
    return encode(canvas, "JPEG", quality=85)


@functools.cache
def largest_dicom() -> bytes:
    """A real radiograph as a 5000 x 5000 16-bit (12 stored) windowed DICOM: the largest one accepted."""
    side = 5000  # chestxray.imaging.MAX_DECODED_PIXELS = 25 MP
    gray = np.asarray(Image.fromarray(real_gray(1024)).resize((side, side)), dtype=np.uint16) * 16
    ds = small_dicom()
    ds.set_pixel_data(gray, photometric_interpretation="MONOCHROME2", bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 3000
    return dicom_bytes(ds)


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
    # Decompression bombs inside DICOM and JPEG, patient data in error paths, malformed headers.
    "DICOM deflate bomb (200 MB of zeros)": Case("deflate.dcm", deflate_bomb, False, "decompression bomb",
                                                "application/dicom"),
    "DICOM JPEG declaring 24000x24000 in a 256x256 header": Case(
        "jpeg-bomb.dcm", lambda: codestream_bomb(pydicom.uid.JPEGBaseline8Bit), False, "header says",
        "application/dicom"),
    "DICOM JPEG 2000 declaring 24000x24000 in a 256x256 header": Case(
        "j2k-bomb.dcm", lambda: codestream_bomb(pydicom.uid.JPEG2000Lossless), False, "header says",
        "application/dicom"),
    "DICOM JPEG-LS declaring 24000x24000 in a 256x256 header": Case(
        "jls-bomb.dcm", lambda: codestream_bomb(pydicom.uid.JPEGLSLossless), False, "header says",
        "application/dicom"),
    "DICOM RLE bomb (decodes 400 times its header's size)": Case("rle-bomb.dcm", rle_bomb, False, "RLE",
                                                                 "application/dicom"),
    "DICOM with a corrupted SOPClassUID length": Case("sop-length.dcm", corrupted_sop_class_length, False,
                                                      "truncated or corrupt", "application/dicom"),
    "DICOM with patient data swallowed into PhotometricInterpretation": Case(
        "pi-length.dcm", photometric_swallowing_phi, False, "photometric", "application/dicom"),
    "DICOM with VR ZZ on Columns": Case("zz.dcm", dicom_with_bad_vr(0x0028, 0x0011, b"US", b"ZZ"), False,
                                        "Columns element cannot be read", "application/dicom"),
    "DICOM with BitsAllocated as a 2-byte UL": Case("ul.dcm", dicom_with_bad_vr(0x0028, 0x0100, b"US", b"UL"), False,
                                                    "BitsAllocated element cannot be read", "application/dicom"),
    "DICOM with a bad VR on PhotometricInterpretation": Case(
        "pi-vr.dcm", dicom_with_bad_vr(0x0028, 0x0004, b"CS", b"QQ"), False,
        "PhotometricInterpretation element cannot be read", "application/dicom"),
    "DICOM with NaN window center": Case("nan-window.dcm", dicom_variant(_nan_window_center), False,
                                         "window center", "application/dicom"),
    "JPEG with a corrupt EXIF block": Case("bad-exif.jpg", jpeg_with_bad_exif_type, False, "EXIF", "image/jpeg"),
    "progressive JPEG with 2500 scans": Case("scans.jpg", progressive_jpeg_with_many_scans, False, "scans",
                                             "image/jpeg"),
    "blank 60 MP PNG": Case("blank.png", blank_png, False, "megapixel", "image/png"),
    "30 MP JPEG (decoded at half size)": Case("large.jpg", large_jpeg, True, "", "image/jpeg"),
    "hostile file name (../, NUL, non-ASCII)": Case("../../etc/\x00passwd-\u00e9\u4e2d.png", png_bytes, True, "",
                                                    "image/png"),
}


# Peak memory of one read: read_xray in a fresh interpreter, after a warm-up read of a small file of the same format
# (imports done, decoder plugins loaded). Linux's peak resident size (VmHWM) is reset then (writing 5 to
# /proc/self/clear_refs; ru_maxrss cannot be reset, and importing torch alone peaks higher than most reads), so
# peak - idle is what the read itself added. The child's address space is capped 3 GB above its size, so an
# unbounded reader fails fast instead of swapping the machine.
_CHILD = """
import gc, json, re, resource, sys
from pathlib import Path
from chestxray.imaging import InvalidImage, read_xray
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
read_xray(Path(sys.argv[2]))
gc.collect()
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 3 * 2**30, resource.RLIM_INFINITY))
Path("/proc/self/clear_refs").write_text("5")
idle = status("VmRSS")
try:
    read_xray(Path(sys.argv[1]))
    message = None
except InvalidImage as exc:
    message = str(exc)
print(json.dumps({"idle": idle, "peak": status("VmHWM"), "message": message}))
"""


def peak_memory(data: bytes, folder: Path) -> dict:
    """{"idle": bytes, "peak": bytes, "message": InvalidImage's message or None} of read_xray(data), in a child."""
    path, warm_up = folder / "input.bin", folder / "warm-up.bin"
    path.write_bytes(data)
    if data[128:132] == b"DICM":
        warm_up.write_bytes(dicom_bytes(small_dicom()))
    else:
        warm_up.write_bytes(encode(Image.fromarray(real_gray()), "PNG" if data[1:4] == b"PNG" else "JPEG"))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(warm_up)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)
