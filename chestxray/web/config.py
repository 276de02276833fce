"""Web-app settings that must outlive one server process: the secret key that signs sessions and CSRF tokens.

A key made afresh on each start invalidates every open upload form at each restart ("The form could not be
verified"). So the key comes from $CXR_SECRET_KEY, or from <instance folder>/secret_key, which the first start
creates (mode 0600, like an SSH private key) and every later start reads.
"""
from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

SECRET_KEY_ENV = "CXR_SECRET_KEY"
SECRET_KEY_FILE = "secret_key"
MIN_KEY_CHARS = 16  # a shorter key could be guessed; token_hex(32) gives 64
MAKE_KEY = 'python -c "import secrets; print(secrets.token_hex(32))"'


def secret_key(instance_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> str:
    """$CXR_SECRET_KEY if set, else the key in <instance_path>/secret_key, created (0600, 64 hex chars) if missing.

    Raises ValueError for a key shorter than MIN_KEY_CHARS or a key file others can read or write (the message
    says how to fix it); OSError when the instance folder cannot be created or read.
    """
    environ = os.environ if environ is None else environ
    if environ.get(SECRET_KEY_ENV):
        key = environ[SECRET_KEY_ENV].strip()
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"${SECRET_KEY_ENV} is too short ({len(key)} characters, at least {MIN_KEY_CHARS} "
                             f"needed): make one with {MAKE_KEY}")
        return key
    folder = Path(instance_path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / SECRET_KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return _read_key_file(path)


def _create_key_file(path: Path) -> None:
    # Write the whole key to a private temporary file, then hard-link it into place: the link fails if another
    # process got there first, so two servers starting at once agree on one key and neither can read a half-written
    # file (a plain open(O_EXCL) + write would let the second reader see an empty file).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it meanwhile: use theirs
    finally:
        os.unlink(tmp)


def _read_key_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"the secret key file {path} can be read or written by other users (mode {mode:04o}): "
                         f"run  chmod 600 {path}  (or delete it and a new key is made on the next start)")
    key = path.read_text().strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"the secret key file {path} holds {len(key)} characters, at least {MIN_KEY_CHARS} needed: "
                         f"delete it and a new key is made on the next start, or set ${SECRET_KEY_ENV}")
    return key
