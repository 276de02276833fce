"""The results database in tests: a real PostgreSQL server started once per test process (Debian's postgresql
package, which `make test` installs), and a fresh database per test on it or on SQLite."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.livesite import free_port

PG_USER = "postgres"  # Debian's package creates this account; initdb refuses to run as root


def pg_program(name: str) -> str:
    """A PostgreSQL server program: on PATH, else the newest /usr/lib/postgresql/<version>/bin (Debian keeps them
    off PATH). Fails the test with what to install when there is none."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        pytest.fail(f"PostgreSQL's {name} is missing: `make test` installs Debian's postgresql package "
                    "(apt-get install postgresql)")
    return candidates[-1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """initdb + pg_ctl start in a temporary folder on a free loopback port, trust authentication, fsync off (a test
    server); yields its base URL postgresql://postgres@127.0.0.1:PORT and removes everything afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", PG_USER, "--"] if as_root else []
    if as_root:  # the server runs as the postgres user, who must own its folder
        account = pwd.getpwnam(PG_USER)
        os.chown(folder, account.pw_uid, account.pw_gid)
    os.chmod(folder, 0o700)
    data, log = folder / "data", folder / "server.log"
    port = free_port()
    subprocess.run([*prefix, pg_program("initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "-E", "UTF8",
                    "--locale=C", "--no-sync"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    try:
        subprocess.run([*prefix, pg_program("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        options, "start"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        pytest.fail(f"PostgreSQL did not start:\n{log.read_text() if log.exists() else '(no log)'}")
    try:
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_program("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: str) -> str:
    """A new, empty database on the server; its URL."""
    import psycopg

    name = f"cxr_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def postgres_fixture() -> Iterator[str]:
    """Session fixture body: the PostgreSQL server's base URL (modules bind it with pytest.fixture)."""
    with postgres_server() as url:
        yield url


def database_fixture(request, tmp_path) -> str:
    """Fixture body parametrized over "sqlite" and "postgresql": a fresh database URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite3'}"
    return create_database(request.getfixturevalue("postgres"))
