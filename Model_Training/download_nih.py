"""Download the NIH ChestX-ray14 images (112,120 PNGs in 12 archives) without Kaggle, into the layout train.py reads.

    python Model_Training/download_nih.py --to /data/nih                  (~45 GB of archives + ~45 GB of images)
    python Model_Training/download_nih.py --to /data/nih --delete-archives   (~45 GB + one archive at a time)
    python Model_Training/download_nih.py --to /data/nih --check             (count the images; name what is missing)

Fetches the archives the NIH lists in its own batch_download_zips.py (https://nihcc.app.box.com/v/ChestXray-NIHCC),
in order, as DIR/archives/images_001.tar.gz ... images_012.tar.gz, and extracts each into DIR/images_NNN/images/*.png
(the NIH/Kaggle layout). The official metadata bundled with this repository (samples/nih-metadata: Data_Entry,
BBox_List, train_val_list, test_list) is written, decompressed, to DIR. Then:

    python Model_Training/train.py --data-dir DIR --check-data ...

Stop it at any point (Ctrl-C, a lost connection, a reboot) and run the same command again: a partial download
resumes where it stopped (HTTP Range), a network error is retried with back-off, an archive is kept only once it
reads as a complete gzip tar, and a folder is marked finished (images_NNN/.done) only after its extraction.
Finished archives are never fetched again. Uses only the standard library and tqdm.
"""
from __future__ import annotations

import argparse
import csv
import errno
import gzip
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
BASE_URL = "https://nihcc.box.com/shared/static"
# The ids of NIH's batch_download_zips.py, in its order: images_001 ... images_012.
ARCHIVE_IDS = (
    "vfk49d74nhbxq3nqjg0900w5nvkorp5c", "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", "f1t00wrtdk94satdfb9olcolqx20z2jp",
    "0aowwzs5lhjrceb3qp67ahp0rd1l1etg", "v5e3goj22zr6h8tzualxfsqlqaygfbsn", "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
    "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj",
    "l6nilvfa9cg3s28tqv1qc1olm3gnz54p", "hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "ioqwiy20ihqwyr8pf4c24eazhh281pbu",
)
# Used for the disk-space check only when the server does not tell an archive's size: ~4,999 images in the first
# archive, 10,000 in the next ten, 7,121 in the last, at about 0.4 MB per PNG (45 GB in all).
ESTIMATED_BYTES = (2_000_000_000,) + (4_000_000_000,) * 10 + (2_850_000_000,)
METADATA_FILES = ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt")
DATA_ENTRY = METADATA_FILES[0]
DONE = ".done"
CHUNK = 1 << 20
USER_AGENT = "chestxray-download_nih/1 (+python urllib)"
# A transient HTTP status is retried; any other 4xx (403, 404: a moved or withdrawn link) stops that archive at once.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class DownloadError(RuntimeError):
    """An archive could not be fetched, verified or extracted; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    number: int  # 1 ... 12
    url: str

    @property
    def name(self) -> str:
        return f"images_{self.number:03d}"


def archives(base_url: str) -> list[Archive]:
    """The 12 NIH archives with their URLs under base_url, in order."""
    return [Archive(i + 1, f"{base_url.rstrip('/')}/{archive_id}.gz") for i, archive_id in enumerate(ARCHIVE_IDS)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--to", required=True, help="the data folder to fill; pass it to train.py as --data-dir (required)")
    add("--check", action="store_true", help="only count the PNGs under --to against its Data_Entry CSV and name "
        "the missing ones (default: off)")
    add("--delete-archives", action="store_true", help="delete each archive once it is extracted: needs ~45 GB "
        "free instead of ~90 GB, but a damaged image then means downloading its archive again (default: keep)")
    add("--retries", type=int, default=10, help="attempts per archive after a network error that made no progress "
        "(default: %(default)s)")
    add("--backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time up to 5 "
        "minutes (default: %(default)s)")
    add("--timeout", type=float, default=60.0, help="seconds without data before a connection counts as lost "
        "(default: %(default)s)")
    add("--base-url", default=BASE_URL, help="where the archives are, <base-url>/<NIH id>.gz; for a mirror or a "
        "test server (default: %(default)s)")
    add("--metadata-dir", default=str(ROOT / "samples" / "nih-metadata"), help="folder with the NIH metadata "
        "files (.csv/.txt, or .gz) to copy beside the images (default: the copy bundled in this repository)")
    add("--no-progress", action="store_true", help="no progress bars (default: bars)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# HTTP


def _request(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_range_total(value: str | None) -> int | None:
    """The total size in a Content-Range header ('bytes 0-99/1234' or 'bytes */1234'), or None."""
    match = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def remote_size(url: str, timeout: float) -> int | None:
    """The archive's size in bytes as the server tells it (a one-byte Range request), or None if it does not."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Range": "bytes=0-0"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status == 206:
                return _content_range_total(resp.headers.get("Content-Range"))
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUS
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        return False  # our own disk, not the network: retrying will not help
    return isinstance(exc, (OSError, http.client.HTTPException))  # URLError, resets, timeouts, short reads


def _fetch_once(url: str, part: Path, have: int, timeout: float, on_bytes: Callable[[int], None]) -> int:
    """One request for the bytes of `url` after the `have` already in `part`, appended to it -> the final size.
    Raises what the connection raised (download() decides whether to retry) or DownloadError for an answer that
    does not fit the partial file."""
    try:
        resp = _request(url, have, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left after `have`: complete if the server's size agrees
            total = _content_range_total(exc.headers.get("Content-Range"))
            if total == have:
                return have
            part.unlink()  # our partial file is longer than the archive: it is not this archive
            raise DownloadError(f"{url}: the partial download ({have} bytes) does not match the server's "
                                f"archive ({total} bytes); it was deleted, run again") from None
        raise
    with resp:
        if have and resp.status == 200:  # the server ignored Range: start again from the beginning
            have = 0
            part.unlink()
        elif resp.status == 206:
            start = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:
                raise DownloadError(f"{url}: the server answered a resume at byte {have} with "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else None
        with open(part, "ab") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                have += len(chunk)
                on_bytes(len(chunk))
    # http.client returns a short body without an error when the peer closes early; compare ourselves.
    if expected is not None and have < expected:
        raise ConnectionError(f"connection closed after {have} of {expected} bytes")
    return have


def download(url: str, part: Path, retries: int, backoff: float, timeout: float,
             on_bytes: Callable[[int], None] = lambda n: None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Fetch url into `part`, resuming from its current size with HTTP Range -> the final size in bytes.

    Retries a lost connection, a timeout, a short body or a transient HTTP status with exponential back-off; the
    retry count resets whenever bytes arrived. Raises DownloadError once `retries` attempts in a row made no
    progress, or at once for a non-transient HTTP status (e.g. 404).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        before = have
        try:
            return _fetch_once(url, part, have, timeout, on_bytes)
        except DownloadError:
            raise
        except Exception as exc:
            if not _transient(exc):
                if isinstance(exc, urllib.error.HTTPError):
                    raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; the link may have moved: check "
                                        "https://nihcc.app.box.com/v/ChestXray-NIHCC or use --base-url") from None
                raise
            have = part.stat().st_size if part.exists() else 0
            failures = 0 if have > before else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: {exc} ({retries} retries without progress); {have} bytes are kept "
                                    f"in {part}, run again to resume") from None
            sleep(min(backoff * 2 ** max(failures - 1, 0), 300.0))


# ----------------------------------------------------------------------------------------------------------------
# Archives


def _safe_member(member: tarfile.TarInfo) -> bool:
    path = Path(member.name)
    return (member.isfile() or member.isdir()) and not path.is_absolute() and ".." not in path.parts


def verify_archive(path: Path) -> int:
    """Read the whole gzip tar once -> its number of PNG files. Raises DownloadError if it is cut short or damaged.

    The gzip stream is read to its end, so its CRC-32 and length trailer are checked too (a tar can look complete
    while the gzip stream is cut), and every member must be a plain file or folder inside the archive.
    """
    pngs = 0
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                for member in tar:
                    if not _safe_member(member):
                        raise DownloadError(f"{path.name}: member {member.name!r} is not a plain file inside the "
                                            "archive; refusing to extract it")
                    pngs += member.isfile() and member.name.lower().endswith(".png")
            while gz.read(CHUNK):  # the rest of the stream (tar padding), up to the gzip trailer
                pass
    except (OSError, EOFError, tarfile.TarError, gzip.BadGzipFile) as exc:
        raise DownloadError(f"{path.name} is not a complete gzip tar archive ({exc}); it was set aside, run again "
                            "to download it anew") from None
    if pngs == 0:
        raise DownloadError(f"{path.name} holds no PNG images; it is not an NIH image archive")
    return pngs


def extract(archive: Path, folder: Path) -> int:
    """Extract a verified archive into folder (the NIH archives hold images/*.png) -> the number of files.

    Uses tarfile's "data" filter, which refuses links out of the folder, absolute paths and device files.
    Re-extracting over a partial earlier extraction simply rewrites its files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar if _safe_member(m)]
        tar.extractall(folder, members=members, filter="data")
    return sum(m.isfile() for m in members)


def copy_metadata(metadata_dir: Path, out: Path) -> list[str]:
    """Write the NIH metadata files found in metadata_dir (plain or .gz) to out, decompressed -> the names written.

    A file already in `out` with the same bytes is left alone; writes are atomic (temporary file + rename).
    """
    written = []
    for name in METADATA_FILES:
        plain, packed = metadata_dir / name, metadata_dir / f"{name}.gz"
        if plain.is_file():
            data = plain.read_bytes()
        elif packed.is_file():
            data = gzip.decompress(packed.read_bytes())
        else:
            continue
        target = out / name
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            continue
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(name)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Check


def read_image_names(csv_path: Path) -> list[str]:
    """The Image Index column of a Data_Entry CSV (its first column), in file order."""
    with open(csv_path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if not header or header[0].strip() != "Image Index":
            raise DownloadError(f"{csv_path} is not an NIH Data_Entry CSV (its first column is not 'Image Index')")
        return [row[0].strip() for row in rows if row and row[0].strip()]


def find_pngs(folder: Path) -> set[str]:
    """The names of all .png files below folder (any depth; hidden folders skipped)."""
    found = set()
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.update(name for name in files if name.lower().endswith(".png") and not name.startswith("."))
    return found


def check(out: Path) -> tuple[list[str], int]:
    """Compare the PNGs under `out` with its Data_Entry -> (missing names in CSV order, number expected)."""
    csv_path = out / DATA_ENTRY
    if not csv_path.is_file():
        raise DownloadError(f"no {DATA_ENTRY} in {out}; run without --check first (it copies the metadata)")
    expected = read_image_names(csv_path)
    present = find_pngs(out)
    return [name for name in expected if name not in present], len(expected)


def report_check(out: Path, items: list[Archive]) -> int:
    """Print the result of check(out) and which archives are unfinished -> exit code (0 complete, 1 not)."""
    missing, expected = check(out)
    unfinished = [a.name for a in items if not (out / a.name / DONE).is_file()]
    if not missing:
        print(f"check: all {expected:,} images of {DATA_ENTRY} are under {out}")
        return 0
    (out / "missing.txt").write_text("\n".join(missing) + "\n")
    shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
    print(f"check: {len(missing):,} of the {expected:,} images of {DATA_ENTRY} are missing under {out}: {shown}; "
          f"the full list is in {out / 'missing.txt'}", file=sys.stderr)
    if unfinished:
        print(f"check: archives not finished: {', '.join(unfinished)}; run without --check to fetch them",
              file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------------------------
# Main


def check_disk_space(out: Path, pending: list[tuple[Archive, int]], delete_archives: bool) -> int:
    """Raise DownloadError unless `out` has room for the pending (archive, bytes still to fetch) -> bytes needed.

    Extracted PNGs take about as much room as their archive (PNG does not compress further). Without
    --delete-archives every archive stays, so the need is archives + images; with it, the images plus the
    largest single archive.
    """
    fetch = [left for _, left in pending]
    images = sum(size for _, size in pending)
    need = images + (max(fetch, default=0) if delete_archives else sum(fetch))
    free = shutil.disk_usage(out).free
    if free < need:
        hint = "" if delete_archives else ", or pass --delete-archives to keep only one archive at a time"
        raise DownloadError(f"{out} has {free / 1e9:.1f} GB free but the download needs about {need / 1e9:.1f} GB; "
                            f"free some space or choose another --to{hint}")
    return need


def _check_args(args: argparse.Namespace) -> None:
    for ok, message in ((args.retries >= 0, f"--retries must be 0 or more, got {args.retries}"),
                        (args.backoff >= 0, f"--backoff must be 0 or more, got {args.backoff}"),
                        (args.timeout > 0, f"--timeout must be positive, got {args.timeout}"),
                        (args.base_url.startswith(("http://", "https://")),
                         f"--base-url must be an http(s) URL, got {args.base_url!r}")):
        if not ok:
            raise DownloadError(message)


def fetch_archive(item: Archive, size: int | None, out: Path, args: argparse.Namespace, overall: tqdm) -> None:
    """Download (resuming), verify, extract and mark one archive of `size` bytes (None: unknown)."""
    folder = out / item.name
    archive = out / "archives" / f"{item.name}.tar.gz"
    part = archive.with_name(archive.name + ".part")
    if not archive.is_file():
        have = part.stat().st_size if part.exists() else 0
        with tqdm(desc=item.name, total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  leave=False, position=1, disable=args.no_progress) as bar:

            def on_bytes(n: int) -> None:
                bar.update(n)
                overall.update(n)

            download(item.url, part, args.retries, args.backoff, args.timeout, on_bytes)
        try:
            verify_archive(part)
        except DownloadError:
            part.replace(part.with_name(f"{item.name}.tar.gz.bad"))  # kept for a look; the next run starts anew
            raise
        os.replace(part, archive)  # from here on, the archive is known to be complete
    tqdm.write(f"{item.name}: extracting {archive.name} into {folder}")
    files = extract(archive, folder)
    marker = {"archive": archive.name, "url": item.url, "files": files, "bytes": archive.stat().st_size}
    tmp = folder / f"{DONE}.tmp"
    tmp.write_text(json.dumps(marker) + "\n")
    os.replace(tmp, folder / DONE)  # written last: a folder without it is extracted again on the next run
    if args.delete_archives:
        archive.unlink()
    tqdm.write(f"{item.name}: {files:,} files extracted, done")


def main(args: argparse.Namespace) -> int:
    """Download, verify and extract the missing archives, or --check -> exit code (0 complete, 1 not, 2 bad input)."""
    out = Path(args.to).expanduser()
    try:
        _check_args(args)
        items = archives(args.base_url)
        out.mkdir(parents=True, exist_ok=True)
        written = copy_metadata(Path(args.metadata_dir), out)
        if written:
            print(f"metadata: wrote {', '.join(written)} to {out}", flush=True)
        if not (out / DATA_ENTRY).is_file():
            raise DownloadError(f"no {DATA_ENTRY} (or .gz) in --metadata-dir {args.metadata_dir}")
        if args.check:
            return report_check(out, items)

        todo = [a for a in items if not (out / a.name / DONE).is_file()]
        if not todo:
            print(f"all {len(items)} archives are already extracted in {out}")
            return report_check(out, items)
        pending = []
        for item in todo:
            archive = out / "archives" / f"{item.name}.tar.gz"
            part = archive.with_name(archive.name + ".part")
            size = archive.stat().st_size if archive.is_file() else remote_size(item.url, args.timeout)
            have = archive.stat().st_size if archive.is_file() else part.stat().st_size if part.exists() else 0
            pending.append((item, size, max((size or ESTIMATED_BYTES[item.number - 1]) - have, 0)))
        need = check_disk_space(out, [(item, left) for item, _, left in pending], args.delete_archives)
        left = sum(left for _, _, left in pending)
        print(f"{len(todo)} of {len(items)} archives to finish: {left / 1e9:.1f} GB to download, about "
              f"{need / 1e9:.1f} GB of disk needed; safe to stop (Ctrl-C) and rerun at any time", flush=True)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failed = []
    try:
        with tqdm(desc="all archives", total=left, unit="B", unit_scale=True, unit_divisor=1024, position=0,
                  disable=args.no_progress) as overall:
            for item, size, _ in pending:
                try:
                    fetch_archive(item, size, out, args, overall)
                except (DownloadError, tarfile.TarError) as exc:
                    failed.append(item.name)
                    print(f"error: {item.name}: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("stopped; run the same command again to resume (finished archives and partial downloads are kept)",
              file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} archive(s) not finished: {', '.join(failed)}. Run the same command again to retry "
              "them; finished archives are kept.", file=sys.stderr)
        return 1
    return report_check(out, items)


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
