"""Small file helpers used across the project: atomic writes, strict JSON (NaN/inf -> null), and the check of a
versioned plain-data record read back from a checkpoint or a JSON file.

Written by hand because they are a few lines each; every module that writes a file a crash must not leave half
written (checkpoints, training state, history, the image cache, saved results) goes through `atomic_write`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | bytes | str,
                 backup: str | os.PathLike | None = None, fsync: bool = False) -> Path:
    """Write `path` via a temporary file in its folder and os.replace: readers see the old or the new file, never half.

    `write` is bytes, a str (UTF-8), or a callable given the open binary file. With `backup`, the file being replaced
    is first renamed to it (once the new one is safely on disk). A failed write leaves `path` as it was, removes the
    temporary file, and re-raises (an OSError names `path`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode("utf-8"))
            elif isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # name the file being written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex, read now."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_file_sha256(path: str | os.PathLike) -> str:
    """file_sha256, computed once per file version (path, size, modification time) in this process: a checkpoint's
    digest names its export and its model version in the results database. Not for checks a changed file must not
    pass unseen (use file_sha256)."""
    st = os.stat(path)
    return _sha256_of_version(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed atomic_write(path) left beside `path`; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def number_row(obj: list | tuple) -> bool:
    """True for a list or tuple of Python floats alone (a scope's precision matrix holds a million in rows of them):
    converted in one pass, with no call per number."""
    return all(type(v) is float for v in obj)


def to_json_data(obj: Any) -> Any:
    """Recursively make plain JSON data: NaN/inf -> None, numpy scalars/arrays -> Python numbers/lists, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): to_json_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if number_row(obj):
            return [v if math.isfinite(v) else None for v in obj]
        return [to_json_data(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_data(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of to_json_data(obj): allow_nan=False guarantees no NaN token slips through."""
    return json.dumps(to_json_data(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write strict, indented JSON atomically."""
    return atomic_write(path, dumps_json(obj, indent=2) + "\n")


def check_record(record: Any, what: str, version: int, keys: Iterable[str], error: type[Exception],
                 refit: str = "") -> None:
    """Check a record written by a to_dict(): a mapping whose "format" is `version` and that holds every key.

    Raises `error` naming what is wrong ("the calibration record lacks ['slope']"), followed by `refit`, the way to
    write it again, where a key is missing.
    """
    if not isinstance(record, Mapping):
        raise error(f"the {what} record must be a dict, got {type(record).__name__}")
    if record.get("format") != version:
        raise error(f"the {what} record has format {record.get('format')!r}; this version reads {version}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise error(f"the {what} record lacks {missing}" + (f"; {refit}" if refit else ""))


def is_tensor(obj: Any) -> bool:
    """True for a torch tensor, asked without importing torch (nothing is a tensor before torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def float32_array(value: Any, what: str, error: type[Exception]) -> np.ndarray:
    """A record's array (a tensor as torch.save stores it, or nested lists as an ONNX file's JSON holds them) ->
    a float32 NumPy copy. Raises `error` naming `what` when it is not an array of numbers."""
    try:
        if is_tensor(value):
            value = value.detach().cpu().float().numpy()
        return np.array(value, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{what} must be an array of numbers, got {type(value).__name__}") from None


def float32_tensor(array: np.ndarray) -> Any:
    """A float32 torch tensor copy of `array`, for a record that torch.load(weights_only=True) must read (torch is
    imported here, when a record is written, not when one is read)."""
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32))


# What a spreadsheet (Excel, LibreOffice, Google Sheets) reads as the start of a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text and never evaluates: a string starting with = + - @ TAB or CR gets a
    leading ' (OWASP's rule), unless it is a plain number ("-0.5"). Other values pass unchanged."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


class SpreadsheetWriter:
    """csv.writer(file, **kwargs) whose rows go through spreadsheet_cell: file names, error messages and reader
    names come from users, and a file named =HYPERLINK(...) must not become a live link in the exported table."""

    def __init__(self, file: IO[str], **kwargs: Any) -> None:
        self._writer = csv.writer(file, **kwargs)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([spreadsheet_cell(value) for value in row])
