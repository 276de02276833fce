"""Read any chest X-ray (PNG, JPEG or DICOM; path, bytes or file object) into one 2-D float32 array in [0, 1].

One function, `read_xray`, is used by training, the command line and the web app, so every entry point sees the
same pixels. Every kind of bad input raises `InvalidImage` with a message a user can act on: `read_xray` is the one
boundary, and no other exception leaves it. Values from DICOM headers other than pixel-encoding numbers are never
put in a message or returned, and pydicom's own warnings and log records (which quote raw header bytes, patient
data included) are captured and dropped on every read.

Work per image is bounded before decoding: header pixel counts, the size a Deflate stream may inflate to, the
dimensions a JPEG / JPEG-LS / JPEG 2000 / RLE codestream inside a DICOM really holds, and the number of scans of a
progressive JPEG are all checked first; large JPEGs are decoded at a reduced size.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MAX_PIXELS = 60_000_000  # decompression-bomb limit, checked from the header before any pixel is decoded
# The most pixels ever decoded at full size. The model reads at most 512 px a side, NIH images are 1 MP and a large
# CR or DR plate 9-18 MP (43 cm at 100 um is 4300 px a side); 25 MP keeps those whole while a single decode stays
# a few hundred MB. JPEGs above it are decoded at 1/2, 1/4 or 1/8 size (the DCT allows it, Pillow's `draft`);
# PNG and DICOM pixels cannot be decoded reduced, so they are refused above it.
MAX_DECODED_PIXELS = 25_000_000
# A Deflate-compressed DICOM data set may inflate to at most this: 32-bit pixels at the budget plus 16 MiB of header.
MAX_INFLATED_BYTES = MAX_DECODED_PIXELS * 4 + 16 * 2**20
# Each scan of a progressive JPEG is a pass over the whole image; encoders write about 10. Thousands of tiny scans
# in a 1 MB file kept a worker busy for 48 s when unbounded.
MAX_JPEG_SCANS = 100
MIN_SIDE = 32
ACCEPTED = "PNG, JPEG or DICOM"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # noqa: UP007 (a runtime alias)
T = TypeVar("T")


class InvalidImage(ValueError):
    """The input is not a chest X-ray image this tool can read; the message says why and what to do."""


class UnsupportedFormat(InvalidImage):
    """The input is a file of another type (GIF, PDF, ZIP, a web page, ...): the web app answers 415 for it."""


# Content signatures of formats people upload by mistake; recognised so the message names them.
OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"%PDF", "PDF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF (WebP)"), (b"PK\x03\x04", "ZIP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
)


def sniff(data: bytes, filename: str = "") -> str:
    """'PNG', 'JPEG' or 'DICOM' from the content (the name never decides).

    Raises UnsupportedFormat for a known other format, or for unknown content under a non-image name;
    InvalidImage for unknown content named like an image (.png, .dcm, ...), or an empty file.
    """
    if not data:
        raise InvalidImage("the file is empty")
    if is_dicom(data):
        return "DICOM"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    # The name is the client's: only printable characters of its suffix are kept (no NUL, no U+202E bidi override
    # that would make ".gpj.exe" read as ".exe.jpg" where the message is shown).
    printable = "".join(ch for ch in filename.replace("\\", "/").rsplit("/", 1)[-1] if ch.isprintable())
    suffix = Path(printable).suffix.lower()[:12] if printable else ""
    other = next((name for signature, name in OTHER_SIGNATURES if data.startswith(signature)), None)
    if other:
        raise UnsupportedFormat(f"unsupported file type ({other}): expected {ACCEPTED}")
    if filename and suffix not in IMAGE_SUFFIXES:
        kind = f"'{suffix}'" if suffix else "a file without extension"
        raise UnsupportedFormat(f"unsupported file type ({kind}): expected {ACCEPTED}")
    named = f": the file is named '{suffix}' but does not hold {ACCEPTED} data" if suffix else f": expected {ACCEPTED}"
    raise InvalidImage(f"not a readable image{named}")


def read_xray(source: Source, max_bytes: int | None = None) -> np.ndarray:
    """Read an X-ray from a path, bytes or binary file object -> (H, W) float32 in [0, 1], 0 = black.

    PNG (8/16-bit; gray, RGB, RGBA, palette) and JPEG (gray, RGB, CMYK) go through Pillow; DICOM (MONOCHROME1/2,
    any transfer syntax pydicom can decode) through pydicom. A JPEG over MAX_DECODED_PIXELS comes back reduced by
    2, 4 or 8. A file over `max_bytes` is refused before it is read. Raises InvalidImage for anything else, and
    nothing but InvalidImage.
    """
    data = read_bytes(source, max_bytes)
    if not data:
        raise InvalidImage("the file is empty")
    if is_dicom(data):
        return read_dicom(data)[1]
    return _checked(_decoded(_read_pillow, data, "image"))


def read_dicom(data: bytes) -> tuple[Dataset, np.ndarray]:
    """Parse DICOM bytes once -> (its header: the data set without its pixel data, the (H, W) float32 image in
    [0, 1] that read_xray gives), so a caller that needs both (the DICOM node: the image for the model, the header
    for its reply) never parses the file twice. Raises InvalidImage as read_xray does, also for non-DICOM bytes."""
    if not data:
        raise InvalidImage("the file is empty")
    if not is_dicom(data):
        raise InvalidImage("not a DICOM file (no DICM preamble)")
    header, image = _decoded(_read_dicom, data, "DICOM")
    return header, _checked(image)


def _decoded(decode: Callable[[bytes], T], data: bytes, kind: str) -> T:
    """decode(data), with every decoder error turned into InvalidImage."""
    try:
        return decode(data)
    except InvalidImage:
        raise
    except MemoryError:
        raise InvalidImage("the image is too large to decode in the memory available; export it smaller") from None
    except Exception:
        # Decoders and lazily parsed DICOM elements raise assorted errors on malformed files (NotImplementedError for
        # an unknown VR, struct.error from an EXIF tag, pydicom's BytesLengthException, ...). None may escape as a
        # crash; the exception's own text is dropped because it may quote header bytes.
        raise InvalidImage(f"the {kind} file is truncated or corrupt") from None


def _checked(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise InvalidImage(f"the image is {w}x{h} pixels; at least {MIN_SIDE} pixels on each side are needed")
    if not np.isfinite(image).all():
        raise InvalidImage("the image contains non-numeric (NaN or infinite) pixel values")
    return image


def read_bytes(source: Source, max_bytes: int | None = None) -> bytes:
    """The bytes of a path, bytes or binary file object. Raises InvalidImage for a missing or unreadable file, or
    one over `max_bytes` (checked from the size on disk before reading)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImage(f"no such file: {path}")
        try:
            if max_bytes is not None:  # the size on disk first: a 12 GB sparse file is never read
                _check_bytes(path.stat().st_size, max_bytes)
            with path.open("rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as exc:
            raise InvalidImage(f"cannot read {path}: {exc.strerror or exc}") from None
    elif hasattr(source, "read"):
        data = source.read() if max_bytes is None else source.read(max_bytes + 1)
    else:
        raise TypeError(f"read_xray expects a path, bytes or a binary file object, not {type(source).__name__}")
    if max_bytes is not None:
        _check_bytes(len(data), max_bytes)
    return data




def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InvalidImage(
            f"the file is larger than the {max_bytes / 2**20:g} MB limit per image; export it smaller "
            "(or raise the limit)"
        )


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (the only DICOM form accepted)."""
    # Part 10 files carry "DICM" after a 128-byte preamble; that is the only DICOM form we accept.
    return len(data) >= 132 and data[128:132] == b"DICM"


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidImage(
            f"the image claims {width}x{height} pixels, over the {MAX_PIXELS // 1_000_000} megapixel limit "
            "(a decompression bomb or a wrongly exported file); export it at a normal resolution"
        )


def _check_decoded_size(width: int, height: int, fmt: str) -> None:
    if width * height > MAX_DECODED_PIXELS:
        raise InvalidImage(
            f"the {fmt} image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), over the "
            f"{MAX_DECODED_PIXELS // 1_000_000} megapixel limit for {fmt} (the model reads at most 512 pixels a "
            "side); export it at a lower resolution or as JPEG"
        )


# ---------------------------------------------------------------------------------------------- PNG and JPEG


# Process-wide warning state (warnings.catch_warnings) is not thread-safe before Python 3.14: two overlapping
# captures can leave another thread's capture installed for good, or let a warning through to stderr. Every read
# that captures warnings holds this lock; the captured regions are header parsing and one image's decode.
_WARNINGS_LOCK = threading.Lock()


def _read_pillow(data: bytes) -> np.ndarray:
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Our own MAX_PIXELS check below is stricter; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImage(
            f"the image header claims too many pixels (over the {MAX_PIXELS // 1_000_000} megapixel limit)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage(f"not a readable image: expected {ACCEPTED}") from None
    with im:
        if im.format not in ("PNG", "JPEG", "MPO"):
            raise InvalidImage(f"unsupported image format {im.format}: expected {ACCEPTED}")
        fmt = "PNG" if im.format == "PNG" else "JPEG"
        width, height = im.size
        _check_size(width, height)
        if fmt == "JPEG":
            _check_scans(_jpeg_header(data)[2])
            scale = next((s for s in (1, 2, 4, 8) if (width // s) * (height // s) <= MAX_DECODED_PIXELS), 8)
            if scale > 1:
                im.draft(None, (width // scale, height // scale))  # decode at 1/scale size inside the DCT
        else:
            _check_decoded_size(width, height, fmt)
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise InvalidImage(f"the {fmt} file is truncated or corrupt") from None
        if fmt == "JPEG":
            try:
                im = ImageOps.exif_transpose(im)  # phone photos of films carry an orientation tag
            except Exception:  # struct.error, TypeError, ... from a malformed EXIF block
                raise InvalidImage(
                    "the JPEG file's EXIF block is corrupt (its orientation cannot be applied); "
                    "re-save the image without EXIF data"
                ) from None
        return _pillow_to_gray(im)


def _pillow_to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":
        # Pillow opens 16-bit grayscale PNGs as 32-bit "I" in some versions; values are still 0..65535.
        arr = np.asarray(im, dtype=np.float64)
        return np.clip(arr / 65535.0, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        raise InvalidImage("floating-point images are not supported: expected an 8- or 16-bit PNG or JPEG")
    if mode == "L":
        return np.asarray(im, dtype=np.float32) / 255.0
    if mode in ("P", "PA", "1", "LA", "RGBA", "CMYK", "YCbCr", "RGB", "RGBX", "LAB", "HSV"):
        if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        # Alpha is dropped, not composited: NIH's RGBA PNGs have alpha 255 everywhere and the gray values
        # are what the radiograph holds.
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    raise InvalidImage(f"unsupported pixel mode {mode}: expected a grayscale or colour PNG or JPEG")


# JPEG (ISO/IEC 10918-1) and JPEG-LS (14495-1) start-of-frame markers; JPEG-LS uses SOF55 (0xF7).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
# After a scan's header comes entropy-coded data, in which 0xFF is followed by 0x00 (JPEG stuffing), a restart
# marker 0xD0-0xD7, or a byte below 0x80 (JPEG-LS bit stuffing); the next real marker is 0xFF + 0xC0..0xFE.
_NEXT_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")


def _jpeg_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(width, height, number of scans) of the first image of a JPEG or JPEG-LS codestream; -1 for an unknown size.

    Read from the markers alone, without decoding; a truncated stream gives what was found before the cut. Written
    by hand because no decoder exposes the scan count before decoding every scan (pydicom's own parser is private
    and stops at the frame header).
    """
    width = height = -1
    scans, pos, end = 0, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image: a second image (MPO, thumbnails) is not ours to count
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers, no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= end and width < 0:
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
        pos += 2 + length
        if marker == 0xDA:  # start of scan: skip its entropy-coded data
            scans += 1
            if scans > MAX_JPEG_SCANS:
                break
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return width, height, scans


def _check_scans(scans: int) -> None:
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(
            f"the JPEG data has more than {MAX_JPEG_SCANS} scans (a progressive JPEG this fragmented takes minutes "
            "to decode); re-save it as a baseline JPEG or a PNG"
        )


def _j2k_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG 2000 codestream's SIZ marker (ISO/IEC 15444-1 A.5.1); (-1, -1) if absent."""
    start = bytes(data[:4096]).find(b"\xff\x4f\xff\x51")  # SOC then SIZ, after a JP2 box header if any
    if start < 0 or start + 24 > len(data):
        return -1, -1
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", bytes(data[start + 8:start + 24]))
    return xsiz - xosiz, ysiz - yosiz


# ------------------------------------------------------------------------------------------------------- DICOM


class _DropWhileReading(logging.Filter):
    """Drops pydicom's log records made by a thread inside `_pydicom_quiet` (they quote raw header bytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "active", False)


_QUIET = threading.local()
_DROP = _DropWhileReading()


@contextmanager
def _pydicom_quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Capture pydicom's warnings and drop its log records for this read; yields the captured warnings.

    pydicom's warnings quote the raw bytes of a malformed element, which with a corrupted length include the
    neighbouring elements (PatientName, PatientID, ...): they must reach neither stderr nor a log.
    """
    # A filter on a logger only sees records made on that logger, so every pydicom.* logger gets it.
    for name in ["pydicom", *[n for n in list(logging.root.manager.loggerDict) if n.startswith("pydicom.")]]:
        logger = logging.getLogger(name)
        if _DROP not in logger.filters:
            logger.addFilter(_DROP)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _QUIET.active = True
        try:
            yield caught
        finally:
            _QUIET.active = False


def _read_dicom(data: bytes) -> tuple[Dataset, np.ndarray]:
    import pydicom

    with _pydicom_quiet() as caught:
        data = _inflate_if_deflated(data)
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception:  # InvalidDicomError, EOFError, struct.error, ...: pydicom raises assorted errors
            raise InvalidImage("the DICOM file is truncated or corrupt") from None
        # pydicom drops a truncated element, or one whose length runs past the file, with a warning instead of
        # raising; any warning while parsing the header means its elements cannot be trusted.
        if any("end of file" in str(w.message).lower() for w in caught):
            raise InvalidImage("the DICOM file is truncated or corrupt")
        image = _dicom_pixels(ds, caught)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)  # the header is what callers keep; the pixels (and pydicom's cached array) go
    return ds, image



def _element(ds, keyword: str, default=None):
    """ds.<keyword> (or `default`), converted now: pydicom parses values lazily, so a bad VR or length raises here."""
    try:
        return ds.get(keyword, default)
    except Exception:
        raise InvalidImage(
            f"the DICOM header is corrupt: its {keyword} element cannot be read; re-export the image"
        ) from None


def _dicom_pixels(ds, caught: list[warnings.WarningMessage]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    _require_pixel_data(ds, caught)
    photometric = str(_element(ds, "PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # The value itself is never quoted: with a corrupted length it holds the following elements' bytes.
        raise InvalidImage(
            "unsupported DICOM photometric interpretation (0028,0004) (missing, colour or corrupt): "
            "expected a grayscale radiograph (MONOCHROME1 or MONOCHROME2)"
        )
    rows, cols, bits_stored, bits_allocated, signed, samples = _pixel_geometry(ds)

    syntax = _check_decoder(ds)
    if syntax.is_compressed:
        _check_codestream(ds, syntax, rows, cols, bits_allocated, samples)
    try:
        pixels = ds.pixel_array
    except NotImplementedError:
        raise InvalidImage(
            f"the DICOM pixel data uses a feature of {_syntax_name(syntax)} that the installed decoders do not "
            "support: re-export the image uncompressed"
        ) from None
    except Exception:
        raise InvalidImage("the DICOM pixel data is truncated or corrupt") from None
    if pixels.ndim != 2:
        raise InvalidImage(f"the DICOM pixel data has shape {pixels.shape}; expected one grayscale frame")

    # Stored range given BitsStored (a 12-bit image in a 16-bit container is 0..4095, not 0..65535).
    if signed:
        lo_stored, hi_stored = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo_stored, hi_stored = 0, 2**bits_stored - 1
    try:
        # float32 holds any 24-bit value exactly; at the 25 MP budget every full-size float64 copy costs 200 MB.
        values = apply_modality_lut(pixels, ds).astype(np.float32, copy=False)
        bounds = apply_modality_lut(np.array([lo_stored, hi_stored], dtype=pixels.dtype), ds).astype(np.float64)
    except Exception:
        raise InvalidImage("the DICOM Modality LUT or Rescale Slope/Intercept is invalid") from None
    del pixels
    lo, hi = float(bounds.min()), float(bounds.max())

    image = _apply_voi(values, ds, lo, hi).astype(np.float32, copy=False)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, image, out=image)  # MONOCHROME1: the minimum value is white
    return image


def _require_pixel_data(ds, caught: list[warnings.WarningMessage]) -> None:
    """InvalidImage saying why when the data set holds no pixel data: a corrupt header, a truncated image or
    not an image at all."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = getattr(_element(ds, "SOPClassUID"), "name", "") or ""
        if caught:  # pydicom complained about the elements it read (a wrong length shifts every later one)
            raise InvalidImage("the DICOM file is truncated or corrupt: its header could not be parsed")
        if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class:
            raise InvalidImage("the DICOM file is truncated or corrupt: it describes an image but holds no pixel data")
        raise InvalidImage(
            "the DICOM file has no pixel data (it is not an image, e.g. a structured report or a presentation state)"
        )


def _pixel_geometry(ds) -> tuple[int, int, int, int, bool, int]:
    """(rows, cols, bits stored, bits allocated, signed, samples per pixel) of a single frame within the decode
    budget; InvalidImage when they are missing or invalid, too large, or there is more than one frame."""
    rows, cols = _element(ds, "Rows"), _element(ds, "Columns")
    frames, bits_allocated = _element(ds, "NumberOfFrames", 1), _element(ds, "BitsAllocated")
    bits_stored, representation = _element(ds, "BitsStored", bits_allocated), _element(ds, "PixelRepresentation", 0)
    samples = _element(ds, "SamplesPerPixel", 1)
    try:
        rows, cols, bits_stored, bits_allocated = int(rows), int(cols), int(bits_stored), int(bits_allocated)
        frames, signed, samples = int(frames or 1), int(representation) == 1, int(samples or 1)
    except (TypeError, ValueError):
        raise InvalidImage("the DICOM file lacks the image size or bit depth attributes") from None
    _check_size(cols, rows * frames)
    if frames > 1:
        raise InvalidImage(f"the DICOM file holds {frames} frames; export a single radiograph")
    _check_decoded_size(cols, rows, "DICOM")
    if not 1 <= bits_stored <= 32 or bits_allocated not in (1, 8, 16, 32, 64):
        raise InvalidImage(f"the DICOM file has an invalid BitsStored ({bits_stored}) or BitsAllocated")
    return rows, cols, bits_stored, bits_allocated, signed, samples


def _syntax_name(syntax) -> str:
    # Only a registered transfer syntax is named; an unknown UID is raw header text and is not quoted.
    return syntax.name if getattr(syntax, "is_transfer_syntax", False) else "an unknown transfer syntax"


def _check_decoder(ds):
    """The data set's transfer syntax UID, once an installed decoder for it is known to exist."""
    from pydicom.pixels import get_decoder

    try:
        syntax = ds.file_meta.TransferSyntaxUID
    except Exception:
        raise InvalidImage("the DICOM file meta information lacks its transfer syntax; re-export the image") from None
    try:
        available = get_decoder(syntax).is_available
    except Exception:  # NotImplementedError for a syntax pydicom has no decoder class for
        available = False
    if not available:
        raise InvalidImage(
            f"unsupported DICOM transfer syntax {_syntax_name(syntax)}: re-export the image uncompressed or as JPEG"
        )
    return syntax


def _check_codestream(ds, syntax, rows: int, cols: int, bits_allocated: int, samples: int) -> None:
    """Refuse compressed pixel data that would decode to more than its header's Rows x Columns promise.

    Decoders allocate what the codestream declares, not what the DICOM header says: a 2.6 KB JPEG 2000 frame
    declaring 24000 x 24000 inside a 256 x 256 header cost 3.8 GB without this check.
    """
    import pydicom
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        raise InvalidImage("the DICOM pixel data is truncated or corrupt") from None
    uid = pydicom.uid
    if syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
        width, height, scans = _jpeg_header(frame)
        _check_scans(scans)
    elif syntax in uid.JPEG2000TransferSyntaxes:
        width, height = _j2k_size(frame)
    elif syntax in uid.RLETransferSyntaxes:
        _check_rle(frame, rows * cols, samples * max(bits_allocated // 8, 1))
        return
    else:
        return
    if (width, height) != (cols, rows):
        raise InvalidImage(
            f"the DICOM pixel data holds a {width}x{height} image but its header says {cols}x{rows} (a "
            "decompression bomb or a corrupt file); re-export the image"
        )


def _check_rle(frame: bytes, segment_bytes: int, segments: int) -> None:
    """Refuse an RLE frame (DICOM PS3.5 G) whose segments decode to more than Rows x Columns bytes each.

    pydicom's decoder expands a whole segment before checking its length, and PackBits expands 64-fold: a 10 MB
    file decoded to 640 MB. The runs are summed here first, stopping as soon as a segment is too long.
    """
    bomb = InvalidImage(
        "the DICOM RLE pixel data decodes to more bytes than its header's size allows (a decompression bomb or a "
        "corrupt file); re-export the image"
    )
    if len(frame) < 64:
        raise InvalidImage("the DICOM pixel data is truncated or corrupt")
    header = struct.unpack("<16I", frame[:64])
    count = header[0]
    if count != segments:
        raise bomb if count > segments else InvalidImage("the DICOM pixel data is truncated or corrupt")
    offsets = [*header[1:count + 1], len(frame)]
    limit = segment_bytes + 1  # a segment may carry one byte of padding
    for start, stop in zip(offsets, offsets[1:]):
        segment = frame[start:stop]
        decoded = pos = 0
        size = len(segment)
        if 64 * size <= limit * 2:  # even all-replicate runs (2 bytes -> 128) cannot exceed the limit
            continue
        while pos < size and decoded <= limit:
            n = segment[pos]
            if n < 128:  # the next n + 1 bytes literally
                decoded += n + 1
                pos += n + 2
            elif n > 128:  # the next byte 257 - n times
                decoded += 257 - n
                pos += 2
            else:
                pos += 1
        if decoded > limit:
            raise bomb


def _inflate_if_deflated(data: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian file rewritten as Explicit VR Little Endian; other files unchanged.

    pydicom inflates the whole data set with zlib.decompress, unbounded: a 3.7 MB upload became 7 GB.
    Here it is inflated to at most MAX_INFLATED_BYTES; a stream that goes on is refused.
    """
    meta_end, elements = _file_meta(data)
    syntax = elements.get(_SYNTAX_TAG, (b"UI", b""))[1].rstrip(b"\x00 ")
    if syntax != b"1.2.840.10008.1.2.1.99":
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        dataset = inflater.decompress(memoryview(data)[meta_end:], MAX_INFLATED_BYTES + 1)
    except zlib.error:
        raise InvalidImage("the DICOM file is truncated or corrupt: its deflated data set cannot be inflated") from None
    if len(dataset) > MAX_INFLATED_BYTES:
        raise InvalidImage(
            f"the deflated DICOM data set inflates to over {MAX_INFLATED_BYTES // 2**20} MB, more than an image "
            f"within the {MAX_DECODED_PIXELS // 1_000_000} megapixel limit needs (a decompression bomb); re-export "
            "the image uncompressed"
        )
    # The same file meta, saying Explicit VR Little Endian (the inflated form of the same data set).
    elements[_SYNTAX_TAG] = (b"UI", b"1.2.840.10008.1.2.1\x00")
    elements.pop((2, 0), None)
    meta = b"".join(_explicit_element(tag, vr, value) for tag, (vr, value) in sorted(elements.items()))
    return data[:132] + _explicit_element((2, 0), b"UL", struct.pack("<I", len(meta))) + meta + dataset


_SYNTAX_TAG = (0x0002, 0x0010)
# Explicit VRs whose length field is 4 bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _explicit_element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", *tag, vr, len(value)) + value
    return struct.pack("<HH2sH", *tag, vr, len(value)) + value


def _file_meta(data: bytes) -> tuple[int, dict[tuple[int, int], tuple[bytes, bytes]]]:
    """(offset after the file meta, {(group, element): (VR, value)}) of a Part 10 file's group-2 elements.

    The file meta is always Explicit VR Little Endian, whatever the data set's transfer syntax (PS3.10 7.1).
    """
    pos, elements = 132, {}
    while pos + 8 <= len(data):
        group, element = struct.unpack("<HH", data[pos:pos + 4])
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            (length,) = struct.unpack("<I", data[pos + 8:pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", data[pos + 6:pos + 8])
            start = pos + 8
        elements[(group, element)] = (vr, data[start:start + length])
        pos = start + length
    return pos, elements


def _first_value(value) -> float:
    # Multi-valued windows list alternatives; the first is the default view (PS3.3 C.11.2.1.2).
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _apply_voi(values: np.ndarray, ds, lo: float, hi: float) -> np.ndarray:
    """Map modality values to [0, 1] through pydicom's VOI LUT or first window when present, else the stored range."""
    from pydicom.pixels import apply_voi_lut

    if _element(ds, "VOILUTSequence"):
        try:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            return _rescaled(out, 0.0, float(2**bits - 1))
        except Exception:
            raise InvalidImage("the DICOM VOI LUT is invalid") from None

    center, width = _element(ds, "WindowCenter"), _element(ds, "WindowWidth")
    if center is not None and width is not None:
        try:
            center, width = _first_value(center), _first_value(width)
        except (TypeError, ValueError, IndexError):
            raise InvalidImage("the DICOM window center/width is not a number") from None
        if not math.isfinite(center):
            raise InvalidImage("the DICOM window center is not a finite number (NaN or infinite); fix or remove it")
        if not math.isfinite(width) or width < 1:
            raise InvalidImage(f"the DICOM window is invalid (width {width:g}); a window width must be at least 1")
        try:
            # pydicom maps values below the window to its output minimum and above it to its maximum, so the two
            # infinities give the output range (which depends on BitsStored, rescaling and the VOI LUT function).
            ends = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False)
            out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        except Exception:
            raise InvalidImage("the DICOM window or its VOI LUT Function is invalid") from None
        y_min, y_max = float(ends[0]), float(ends[1])
        if not (math.isfinite(y_min) and math.isfinite(y_max)) or y_min == y_max:
            raise InvalidImage("the DICOM window gives an empty output range")
        return _rescaled(out, y_min, y_max)

    if hi <= lo:
        raise InvalidImage("the DICOM pixel range is empty")
    return _rescaled(values, lo, hi)


def _rescaled(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(values - lo) / (hi - lo) clipped to [0, 1], as float32, in place where `values` is already float32."""
    out = values.astype(np.float32, copy=False)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)
