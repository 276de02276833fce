"""Model_Training/download_nih.py against a loopback HTTP server (no internet): 12 small tar.gz archives made from the
bundled sample, served with Range support, one connection dropped mid-transfer and one archive cut short. The
download resumes, refuses the cut archive, finishes on a rerun without fetching finished archives again, and leaves
a folder that the training code's data checks accept."""
from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chestxray.data import XrayDataset, has_official_lists, load_index, make_splits
from chestxray.data import find_unreadable as data_find_unreadable
from chestxray.labels import LABELS
from Model_Training import download_nih, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_NIH = ROOT / "samples" / "nih"
SAMPLE_METADATA = ROOT / "samples" / "nih-metadata"


def sample_images() -> list[Path]:
    return sorted((p for p in SAMPLE_NIH.rglob("*.png")), key=lambda p: p.name)


def make_archive(paths: list[Path]) -> bytes:
    """A gzip tar laid out like the NIH archives: images/<name>.png."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=f"images/{path.name}")
    return buffer.getvalue()


class ArchiveServer:
    """http.server in a thread serving {url path: bytes} with single-range requests, a request log and faults.

    `disconnect_after[path] = n`: the next response for path declares its full length but the connection closes
    after n body bytes (once).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.disconnect_after: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output quiet
                pass

            def do_GET(self) -> None:
                server.log.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(body) - 1, 200
                if self.headers.get("Range"):
                    first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                    start = int(first)
                    end = min(int(last), len(body) - 1) if last else len(body) - 1
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                chunk = body[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                cut = server.disconnect_after.pop(self.path, None) if len(chunk) > 1 else None
                self.wfile.write(chunk if cut is None else chunk[:cut])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/static"

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloads(self, archive_id: str) -> list[str | None]:
        """The Range headers of the requests for one archive, leaving out the one-byte size probes."""
        return [r for p, r in self.log if p == f"/static/{archive_id}.gz" and r != "bytes=0-0"]


@pytest.fixture(scope="module")
def archives() -> list[bytes]:
    """The bundled sample's NIH images in 12 archives, in name order like the NIH's."""
    paths = sample_images()
    per = -(-len(paths) // 12)
    return [make_archive(paths[i * per:(i + 1) * per]) for i in range(12)]


@pytest.fixture()
def metadata_dir(tmp_path) -> Path:
    """Metadata for a download of the sample: its own Data_Entry rows, the bundled official lists and boxes."""
    folder = tmp_path / "metadata"
    folder.mkdir()
    shutil.copy(SAMPLE_NIH / "labels.csv", folder / "Data_Entry_2017_v2020.csv")
    for name in ("train_val_list.txt.gz", "test_list.txt.gz", "BBox_List_2017.csv.gz"):
        shutil.copy(SAMPLE_METADATA / name, folder / name)
    return folder


def run(out: Path, server: ArchiveServer, metadata_dir: Path, *extra: str) -> int:
    argv = ["--to", str(out), "--base-url", server.base_url, "--metadata-dir", str(metadata_dir),
            "--backoff", "0", "--retries", "2", "--timeout", "10", "--no-progress", *extra]
    return download_nih.main(download_nih.get_args_parser().parse_args(argv))


def files_of(archive_id: str, data: bytes) -> dict[str, bytes]:
    return {f"/static/{archive_id}.gz": data}


def test_download_resumes_refuses_a_cut_archive_and_finishes_on_rerun(archives, metadata_dir, tmp_path, capsys):
    ids = download_nih.ARCHIVE_IDS
    served = {}
    for archive_id, data in zip(ids, archives):
        served.update(files_of(archive_id, data))
    cut_id, drop_id = ids[2], ids[0]
    served[f"/static/{cut_id}.gz"] = archives[2][: len(archives[2]) // 2]  # images_003 cut in half, length honest
    out = tmp_path / "nih"
    with ArchiveServer(served) as server:
        drop_at = len(archives[0]) // 3
        server.disconnect_after[f"/static/{drop_id}.gz"] = drop_at
        assert run(out, server, metadata_dir) == 1
        err = capsys.readouterr().err
        assert "images_003" in err and "not a complete gzip tar" in err and "Run the same command again" in err
        # images_001 lost its connection after a third and resumed from exactly there, without starting over
        assert server.downloads(drop_id) == [None, f"bytes={drop_at}-"]
        done = sorted(p.parent.name for p in out.glob(f"images_*/{download_nih.DONE}"))
        assert done == [f"images_{i:03d}" for i in range(1, 13) if i != 3]
        assert not (out / "images_003").exists() and not (out / "archives" / "images_003.tar.gz").exists()
        assert (out / "archives" / "images_003.tar.gz.bad").is_file()
        assert run(out, server, metadata_dir, "--check") == 1
        assert "images_003" in capsys.readouterr().err

        server.files[f"/static/{cut_id}.gz"] = archives[2]  # the server is fixed; rerun
        server.log.clear()
        assert run(out, server, metadata_dir) == 0
        assert {p for p, _ in server.log} == {f"/static/{cut_id}.gz"}  # finished archives were not fetched again
        assert "all 283 images" in capsys.readouterr().out

    # the NIH layout, byte-identical images, the metadata beside them
    sources = sample_images()
    per = -(-len(sources) // 12)
    for i, source in enumerate(sources):
        assert (out / f"images_{i // per + 1:03d}" / "images" / source.name).read_bytes() == source.read_bytes()
    assert (out / "Data_Entry_2017_v2020.csv").read_bytes() == (SAMPLE_NIH / "labels.csv").read_bytes()
    for name in ("train_val_list.txt", "test_list.txt", "BBox_List_2017.csv"):
        assert (out / name).read_bytes() == gzip.decompress((SAMPLE_METADATA / f"{name}.gz").read_bytes())
    assert run(out, server, metadata_dir, "--check") == 0

    # the training code accepts the folder: every labelled image found and readable, the official split applies
    index = load_index(out)
    assert len(index) == 283 and index["path"].notna().all()
    assert has_official_lists(out)
    splits = make_splits(index, out)
    assert sum(len(splits[k]) for k in ("train", "val", "calibration")) == 283 and len(splits["test"]) == 0
    assert data_find_unreadable(XrayDataset(index, LABELS, lambda x: x)) == []
    args = train.get_args_parser().parse_args([
        "--data-dir", str(out), "--check-data", "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
        "--limit", "8", "--no-pretrained", "--device", "cpu", "--workers", "0", "--no-progress",
        "--output", str(tmp_path / "smoke.pth"), "--run-dir", str(tmp_path / "run")])
    assert train.main(args) == 0
    assert "0 unreadable" in capsys.readouterr().out


def test_a_killed_run_resumes_its_partial_file_and_its_extraction(archives, metadata_dir, tmp_path, capsys):
    ids = download_nih.ARCHIVE_IDS
    served = {k: v for i, data in zip(ids, archives) for k, v in files_of(i, data).items()}
    out = tmp_path / "nih"
    with ArchiveServer(served) as server:
        assert run(out, server, metadata_dir) == 0
        # as if killed: images_005 halfway through its download, images_007 halfway through its extraction
        shutil.rmtree(out / "images_005")
        (out / "archives" / "images_005.tar.gz").unlink()
        (out / "archives" / "images_005.tar.gz.part").write_bytes(archives[4][:1000])
        (out / "images_007" / download_nih.DONE).unlink()
        victim = sorted((out / "images_007" / "images").iterdir())[0]
        original = victim.read_bytes()
        victim.write_bytes(original[:100])
        server.log.clear()
        assert run(out, server, metadata_dir, "--delete-archives") == 0
        assert server.downloads(ids[4]) == ["bytes=1000-"]
        assert server.downloads(ids[6]) == []  # re-extracted from the archive on disk
        assert victim.read_bytes() == original
        # --delete-archives removed the archives it finished with this time, and only those
        assert not (out / "archives" / "images_005.tar.gz").exists()
        assert not (out / "archives" / "images_007.tar.gz").exists()
        assert (out / "archives" / "images_001.tar.gz").is_file()
    capsys.readouterr()


def test_check_names_missing_images(archives, metadata_dir, tmp_path, capsys):
    out = tmp_path / "nih"
    served = {k: v for i, data in zip(download_nih.ARCHIVE_IDS, archives) for k, v in files_of(i, data).items()}
    with ArchiveServer(served) as server:
        assert run(out, server, metadata_dir) == 0
        gone = sorted((out / "images_004" / "images").iterdir())[:2]
        for path in gone:
            path.unlink()
        capsys.readouterr()
        assert run(out, server, metadata_dir, "--check") == 1
    err = capsys.readouterr().err
    assert "2 of the 283 images" in err and all(p.name in err for p in gone)
    assert (out / "missing.txt").read_text().split() == [p.name for p in gone]


def test_a_withdrawn_link_fails_at_once_with_a_hint(archives, metadata_dir, tmp_path, capsys):
    served = {k: v for i, data in zip(download_nih.ARCHIVE_IDS[1:], archives[1:]) for k, v in files_of(i, data).items()}
    with ArchiveServer(served) as server:
        assert run(tmp_path / "nih", server, metadata_dir) == 1
        assert len(server.downloads(download_nih.ARCHIVE_IDS[0])) == 1  # a 404 is not retried
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "--base-url" in err and "images_001" in err


def test_not_enough_disk_space_stops_before_downloading(archives, metadata_dir, tmp_path, capsys, monkeypatch):
    served = {k: v for i, data in zip(download_nih.ARCHIVE_IDS, archives) for k, v in files_of(i, data).items()}
    monkeypatch.setattr(download_nih.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with ArchiveServer(served) as server:
        assert run(tmp_path / "nih", server, metadata_dir) == 2
        assert all(r == "bytes=0-0" for _, r in server.log)  # only the size probes
    err = capsys.readouterr().err
    assert "GB free" in err and "--delete-archives" in err
    assert not list((tmp_path / "nih").glob("archives/*"))


def test_disk_need_with_and_without_deleting_archives(tmp_path):
    pending = [(download_nih.Archive(i, "u"), size) for i, size in ((1, 100), (2, 300), (3, 200))]
    assert download_nih.check_disk_space(tmp_path, pending, delete_archives=False) == 600 + 600
    assert download_nih.check_disk_space(tmp_path, pending, delete_archives=True) == 600 + 300


@pytest.mark.parametrize("damage", ["cut inside the tar", "gzip trailer missing", "gzip CRC wrong", "not gzip"])
def test_verify_refuses_damaged_archives(tmp_path, damage):
    data = make_archive(sample_images()[:3])
    damaged = {
        "cut inside the tar": data[: len(data) // 2],
        "gzip trailer missing": data[:-8],  # the tar itself may still read to its end
        "gzip CRC wrong": data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:],
        "not gzip": b"<html>Box says: file not found</html>",
    }[damage]
    path = tmp_path / "a.tar.gz"
    path.write_bytes(damaged)
    with pytest.raises(download_nih.DownloadError, match="not a complete gzip tar"):
        download_nih.verify_archive(path)
    path.write_bytes(data)
    assert download_nih.verify_archive(path) == 3


def test_verify_refuses_members_outside_the_folder(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(sample_images()[0], arcname="../escape.png")
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(download_nih.DownloadError, match="not a plain file inside the archive"):
        download_nih.verify_archive(path)
