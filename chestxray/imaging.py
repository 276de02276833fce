"""Read any chest X-ray (PNG, JPEG or DICOM; path, bytes or file object) into one 2-D float32 array in [0, 1].

One function, `read_xray`, is used by training, the command line and the web app, so every entry point sees the
same pixels. Every kind of bad input raises `InvalidImage` with a message a user can act on. Values from DICOM
headers other than pixel-encoding attributes are never put in a message or returned (they may identify a patient).
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 60_000_000  # decompression-bomb limit, checked from the header before any pixel is decoded
MIN_SIDE = 32
ACCEPTED = "PNG, JPEG or DICOM"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # noqa: UP007 (a runtime alias)


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
    suffix = Path(filename).suffix.lower()[:12] if filename else ""
    other = next((name for signature, name in OTHER_SIGNATURES if data.startswith(signature)), None)
    if other:
        raise UnsupportedFormat(f"unsupported file type ({other}): expected {ACCEPTED}")
    if filename and suffix not in IMAGE_SUFFIXES:
        kind = f"'{suffix}'" if suffix else "a file without extension"
        raise UnsupportedFormat(f"unsupported file type ({kind}): expected {ACCEPTED}")
    named = f": the file is named '{suffix}' but does not hold {ACCEPTED} data" if suffix else f": expected {ACCEPTED}"
    raise InvalidImage(f"not a readable image{named}")


def read_xray(source: Source) -> np.ndarray:
    """Read an X-ray from a path, bytes or binary file object -> (H, W) float32 in [0, 1], 0 = black.

    PNG (8/16-bit; gray, RGB, RGBA, palette) and JPEG (gray, RGB, CMYK) go through Pillow; DICOM (MONOCHROME1/2,
    any transfer syntax pydicom can decode) through pydicom. Raises InvalidImage for anything else.
    """
    data = _read_bytes(source)
    if not data:
        raise InvalidImage("the file is empty")
    if is_dicom(data):
        image = _read_dicom(data)
    else:
        image = _read_pillow(data)
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise InvalidImage(f"the image is {w}x{h} pixels; at least {MIN_SIDE} pixels on each side are needed")
    if not np.isfinite(image).all():
        raise InvalidImage("the image contains non-numeric (NaN or infinite) pixel values")
    return image


def _read_bytes(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImage(f"no such file: {path}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidImage(f"cannot read {path}: {exc.strerror or exc}") from None
    if hasattr(source, "read"):
        return source.read()
    raise TypeError(f"read_xray expects a path, bytes or a binary file object, not {type(source).__name__}")


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


def _read_pillow(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
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
        _check_size(*im.size)
        try:
            im.load()
            if im.format in ("JPEG", "MPO"):
                im = ImageOps.exif_transpose(im)  # phone photos of films carry an orientation tag
            return _pillow_to_gray(im)
        except InvalidImage:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise InvalidImage(f"the {im.format} file is truncated or corrupt") from None


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


def _read_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
        # pydicom drops a truncated element with a warning instead of raising.
        if any("end of file" in str(w.message).lower() for w in caught):
            raise InvalidImage("the DICOM file is truncated or corrupt")
    except InvalidImage:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidImage("the DICOM file is truncated or corrupt") from None
    except Exception:  # pydicom raises assorted errors on malformed headers; none may escape as a 500
        raise InvalidImage("the DICOM file is truncated or corrupt") from None

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = getattr(ds.get("SOPClassUID"), "name", "") or ""
        if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class:
            raise InvalidImage("the DICOM file is truncated or corrupt: it describes an image but holds no pixel data")
        raise InvalidImage(
            "the DICOM file has no pixel data (it is not an image, e.g. a structured report or a presentation state)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidImage(
            f"unsupported DICOM photometric interpretation {photometric or '(missing)'!r}: "
            "expected a grayscale radiograph (MONOCHROME1 or MONOCHROME2)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except (AttributeError, TypeError, ValueError):
        raise InvalidImage("the DICOM file lacks the image size or bit depth attributes") from None
    _check_size(cols, rows * frames)
    if frames > 1:
        raise InvalidImage(f"the DICOM file holds {frames} frames; export a single radiograph")
    if not 1 <= bits_stored <= 32:
        raise InvalidImage(f"the DICOM file has an invalid BitsStored ({bits_stored})")

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = ds.pixel_array
    except NotImplementedError:
        name = getattr(syntax, "name", None) or str(syntax)
        raise InvalidImage(
            f"unsupported DICOM transfer syntax {name}: re-export the image uncompressed or as JPEG"
        ) from None
    except RuntimeError as exc:
        # pydicom raises RuntimeError when no installed decoder handles the syntax.
        if "transfer syntax" in str(exc).lower() or "plugin" in str(exc).lower():
            name = getattr(syntax, "name", None) or str(syntax)
            raise InvalidImage(f"unsupported DICOM transfer syntax {name}: re-export it uncompressed") from None
        raise InvalidImage("the DICOM pixel data is truncated or corrupt") from None
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
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        bounds = apply_modality_lut(np.array([lo_stored, hi_stored], dtype=pixels.dtype), ds).astype(np.float64)
    except Exception:
        raise InvalidImage("the DICOM Modality LUT or Rescale Slope/Intercept is invalid") from None
    lo, hi = float(bounds.min()), float(bounds.max())

    image = _apply_voi(values, ds, lo, hi)
    if photometric == "MONOCHROME1":
        image = 1.0 - image  # MONOCHROME1: the minimum value is white
    return image.astype(np.float32)


def _first_value(value) -> float:
    # Multi-valued windows list alternatives; the first is the default view (PS3.3 C.11.2.1.2).
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _apply_voi(values: np.ndarray, ds, lo: float, hi: float) -> np.ndarray:
    """Map modality values to [0, 1] with the VOI LUT or the first window when present, else the stored range."""
    from pydicom.pixels import apply_voi

    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        try:
            item = voi_seq[0]
            bits = int(item.LUTDescriptor[2])
            out = apply_voi(values, ds, index=0).astype(np.float64)
            return np.clip(out / float(2**bits - 1), 0.0, 1.0)
        except Exception:
            raise InvalidImage("the DICOM VOI LUT is invalid") from None

    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        try:
            center, width = _first_value(center), _first_value(width)
        except (TypeError, ValueError, IndexError):
            raise InvalidImage("the DICOM window center/width is not a number") from None
        if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
            raise InvalidImage(f"the DICOM window is invalid (width {width:g}); a window width must be at least 1")
        # Linear window function, DICOM PS3.3 C.11.2.1.2.1, mapped to [0, 1].
        return np.clip((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5, 0.0, 1.0)

    if hi <= lo:
        raise InvalidImage("the DICOM pixel range is empty")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
