"""The web app's secret key outlives a restart: $CXR_SECRET_KEY, else <instance folder>/secret_key made 0600 once."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from chestxray.web.config import MIN_KEY_CHARS, SECRET_KEY_ENV, SECRET_KEY_FILE, secret_key


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_start_creates_a_private_key_file_and_later_starts_reuse_it(tmp_path):
    instance = tmp_path / "instance"  # does not exist yet
    first = secret_key(instance, environ={})
    path = instance / SECRET_KEY_FILE
    assert mode(path) == 0o600 and mode(instance) == 0o700
    assert path.read_text().strip() == first and len(first) == 64 and int(first, 16) >= 0
    assert secret_key(instance, environ={}) == first  # the "restart"
    assert [p.name for p in instance.iterdir()] == [SECRET_KEY_FILE]  # no temporary file left behind


def test_separate_instance_folders_get_different_keys(tmp_path):
    assert secret_key(tmp_path / "a", environ={}) != secret_key(tmp_path / "b", environ={})


def test_environment_wins_over_the_file(tmp_path):
    secret_key(tmp_path, environ={})
    key = "k" * MIN_KEY_CHARS
    assert secret_key(tmp_path, environ={SECRET_KEY_ENV: f" {key}\n"}) == key
    assert secret_key(tmp_path, environ={SECRET_KEY_ENV: ""}) == (tmp_path / SECRET_KEY_FILE).read_text().strip()


def test_environment_key_from_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_KEY_ENV, "e" * 40)
    assert secret_key(tmp_path) == "e" * 40
    assert not (tmp_path / SECRET_KEY_FILE).exists()  # nothing written when the environment gives the key


def test_short_environment_key_is_refused_with_how_to_make_one(tmp_path):
    with pytest.raises(ValueError, match=r"too short .*secrets.token_hex"):
        secret_key(tmp_path, environ={SECRET_KEY_ENV: "short"})


@pytest.mark.parametrize("file_mode", [0o644, 0o660, 0o606])
def test_key_file_others_can_access_is_refused(tmp_path, file_mode):
    path = tmp_path / SECRET_KEY_FILE
    path.write_text("x" * 64)
    path.chmod(file_mode)
    with pytest.raises(ValueError, match=r"chmod 600"):
        secret_key(tmp_path, environ={})


def test_empty_key_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / SECRET_KEY_FILE
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="delete it"):
        secret_key(tmp_path, environ={})


def test_servers_starting_at_once_agree_on_one_key(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: secret_key(tmp_path / "instance", environ={}), range(32)))
    assert len(keys) == 1
    assert sorted(p.name for p in (tmp_path / "instance").iterdir()) == [SECRET_KEY_FILE]
