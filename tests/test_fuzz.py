"""A structure-aware fuzzer over read_xray: real DICOM, PNG and JPEG bytes mutated (byte flips, truncation,
element-length corruption, PNG chunk and JPEG segment edits) must give an image or InvalidImage, never anything else.

hypothesis runs a fixed, derandomized number of cases per format (the same ones on every run, about 20 s in all),
so CI stays repeatable; raise FUZZ_EXAMPLES locally to search longer.
"""
from __future__ import annotations

import functools
import os
import re
import struct
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.hostile import dicom_bytes, encode, png_bytes, real_gray, small_dicom

from chestxray.imaging import InvalidImage, read_xray

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def seeds() -> dict[str, bytes]:
    """Real images in each format and DICOM encoding the reader handles."""
    out = {"PNG": png_bytes(), "PNG 16-bit": encode(Image.fromarray(real_gray(96).astype(np.uint16) * 257), "PNG"),
           "JPEG": encode(Image.fromarray(real_gray(96)), "JPEG"),
           "progressive JPEG": encode(Image.fromarray(real_gray(96)), "JPEG", progressive=True)}
    for name, syntax in [("DICOM", None), ("DICOM RLE", pydicom.uid.RLELossless),
                         ("DICOM JPEG-LS", pydicom.uid.JPEGLSLossless),
                         ("DICOM JPEG 2000", pydicom.uid.JPEG2000Lossless),
                         ("DICOM deflated", pydicom.uid.DeflatedExplicitVRLittleEndian)]:
        ds = small_dicom(64)
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax is not None:
            ds.compress(syntax)
        out[name] = dicom_bytes(ds)
    return out


# Offsets of explicit-VR element headers (tag, 2-letter VR): the places where a length means something.
_SHORT_VR = rb"AE|AS|AT|CS|DA|DS|DT|FL|FD|IS|LO|LT|PN|SH|SL|SS|ST|TM|UI|UL|US"
_LONG_VR = rb"OB|OD|OF|OL|OW|SQ|UC|UN|UR|UT"


def dicom_lengths(data: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, its size in bytes) of every explicit-VR element header found in `data`."""
    found = [(m.start() + 6, 2) for m in re.finditer(rb"(?s)..[\x00-\x7f\xfe\xff].(?:" + _SHORT_VR + rb")", data)]
    found += [(m.start() + 8, 4) for m in re.finditer(rb"(?s)..[\x00-\x7f\xfe\xff].(?:" + _LONG_VR + rb")\x00\x00",
                                                      data)]
    return found or [(132, 2)]


def png_chunks(data: bytes) -> list[int]:
    """Offsets of every chunk (its length field) in a PNG."""
    offsets, pos = [], 8
    while pos + 8 <= len(data):
        offsets.append(pos)
        pos += 12 + struct.unpack(">I", data[pos:pos + 4])[0]
    return offsets


def jpeg_segments(data: bytes) -> list[int]:
    """Offsets of the marker segments (with a length) before the first scan's data."""
    offsets, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        offsets.append(pos)
        if data[pos + 1] == 0xDA:
            break
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return offsets


@st.composite
def mutated(draw, kind: str) -> bytes:
    """A seed of `kind` with one to three structure-aware mutations."""
    data = bytearray(seeds()[kind])
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        how = draw(st.sampled_from(["flip", "truncate", "insert", "length", "structure"]))
        if how == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        elif how == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif how == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind.startswith("DICOM"):  # corrupt the length of an element, or make it huge / odd / undefined
            at, size = draw(st.sampled_from(dicom_lengths(bytes(data))))
            value = draw(st.sampled_from([0, 1, 3, 0xFFFF, 0xFFFFFFFF, None]))
            value = draw(st.integers(0, 2 ** (8 * size) - 1)) if value is None else value % 2 ** (8 * size)
            data[at:at + size] = value.to_bytes(size, "little")
        elif kind.startswith("PNG"):  # edit a chunk: its length, its type, or its data (with a valid CRC)
            chunks = png_chunks(bytes(data))
            if not chunks:
                continue
            at = draw(st.sampled_from(chunks))
            length = struct.unpack(">I", data[at:at + 4])[0]
            if how == "length":
                data[at:at + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
            elif length and at + 12 + length <= len(data):
                i = draw(st.integers(0, length - 1))
                data[at + 8 + i] = draw(st.integers(0, 255))
                crc = zlib.crc32(bytes(data[at + 4:at + 8 + length]))
                data[at + 8 + length:at + 12 + length] = struct.pack(">I", crc)
        else:  # JPEG: a segment's length, or a byte of its body (SOF sizes, table counts, scan parameters)
            segments = jpeg_segments(bytes(data))
            if not segments:
                continue
            at = draw(st.sampled_from(segments))
            if how == "length":
                data[at + 2:at + 4] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
            else:
                length = struct.unpack(">H", data[at + 2:at + 4])[0]
                i = at + 4 + draw(st.integers(0, max(length - 3, 0)))
                if i < len(data):
                    data[i] = draw(st.integers(0, 255))
    return bytes(data)


def check(data: bytes) -> None:
    try:
        image = read_xray(data)
    except InvalidImage:
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert 0.0 <= image.min() <= image.max() <= 1.0


@pytest.mark.parametrize("kind", list(seeds()))
def test_mutated_files_give_an_image_or_invalid_image(kind):
    check(seeds()[kind])  # the seed itself reads

    @FUZZ
    @given(mutated(kind))
    def fuzz(data: bytes) -> None:
        check(data)

    fuzz()
