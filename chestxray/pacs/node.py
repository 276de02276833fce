"""A DICOM node on pynetdicom: receives chest X-rays from a modality or a PACS, analyses them, sends results back.

- C-ECHO; C-STORE SCP for Computed Radiography, Digital X-Ray (for presentation and for processing), Secondary
  Capture and CT Image Storage (CT is accepted so a PACS forwarding a whole study does not see failures; the analysis
  marks it out of scope). Other SOP classes are refused at association negotiation (abstract syntax not supported).
- Transfer syntaxes: those chestxray.imaging decodes (uncompressed, deflated, JPEG baseline/extended/lossless,
  JPEG 2000, RLE). A file the reader refuses gets 0xC000 (cannot understand) and one log line with the reader's
  message, which never holds header values.
- A received image is parsed once (chestxray.imaging.read_dicom: its header and image) and answered 0x0000 only
  once it is stored durably in the spool (fsync'ed, renamed into place); one worker thread then calls
  `analyse(Received) -> Analysis` (given at construction, so this module knows nothing of Flask) with that parse.
  A data set over max_dataset_bytes (refused before decoding, never held whole), a spool at its
  limits (max_pending items or max_pending_bytes), a disk that cannot be written, or a results store that cannot
  save all answer 0xA700 (out of resources): the sender keeps the image and retries, nothing is lost silently.
- Every C-STORE refused at reception is reported to `on_refusal(outcome, reason)` when given (the app records it in
  the results database): outcome "refused" when the input is at fault, "failed" when the node is (no
  room, a disk or results store that cannot save); reason is one of REFUSALS' fixed categories, never header text.
- With a destination, each in-scope result (Secondary Capture + Comprehensive SR, chestxray.reporting.dicom) is
  written to the spool's outbox and sent from a separate thread; while the destination is down one result probes
  with back-off, the others wait on disk, and the log gets one line when it goes down and one when it comes back.
  A restart resumes every image and result the spool holds.
- Connections: at most max_associations at once and max_per_peer from one address; one that has not asked for an
  association within connect_timeout is closed, and silent ones are evicted first so a newcomer always finds a slot.
  The called AE title must be the node's own. Control characters in pynetdicom's log records are escaped.
- Patient identifiers are kept only in the spool (0700) until the result is delivered; the worklist and the logs
  hold the result id, times, modality, scope, calls, probabilities and send status.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from chestxray.imaging import InvalidImage, UnsupportedFormat, read_dicom
from chestxray.reporting.dicom import ReportContent, build_secondary_capture, build_structured_report
from chestxray.service import ParsedDicom, analyse_and_store

from .options import (  # noqa: F401 (the node's limits, re-exported)
    CONNECT_TIMEOUT,
    DEFAULT_AET,
    DEFAULT_SPOOL,
    MAX_ASSOCIATIONS,
    MAX_DATASET_BYTES,
    MAX_PENDING,
    MAX_PENDING_BYTES,
    MAX_PER_PEER,
    add_arguments,
    spool_folder,
)

log = logging.getLogger("dicom_node")

RADIOGRAPH_SOP_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                          DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
STORAGE_SOP_CLASSES = RADIOGRAPH_SOP_CLASSES + (CTImageStorage,)
# The transfer syntaxes chestxray.imaging decodes with pydicom + pylibjpeg (see requirements.txt).
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                     JPEG2000Lossless, JPEG2000, RLELossless)
SEND_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SUCCESSFUL_STORE = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings (the object was stored)
# Why a C-STORE was refused at reception: (outcome for the results database, reason). Fixed words only: nothing of
# the data set (a name, an ID, a UID, a file name) may reach on_refusal.
REFUSALS = {
    "too large": ("refused", "data set over the size limit (0xA700)"),
    "undecodable": ("refused", "data set cannot be decoded (0xC000)"),
    "sop class": ("refused", "SOP class does not match (0xA900)"),
    "unsupported": ("refused", "unsupported format (0xC000)"),
    "unreadable": ("refused", "unreadable image (0xC000)"),
    "spool full": ("failed", "out of resources: spool full (0xA700)"),
    "disk": ("failed", "out of resources: spool cannot be written (0xA700)"),
    "store failing": ("failed", "out of resources: results cannot be saved (0xA700)"),
}

RESULT_SOURCE = "dicom-node"  # the results store's retention key for received images
CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM's CS value representation (PS3.5 6.2)
RETRY_DELAYS = (2.0, 5.0, 15.0, 60.0, 300.0)  # seconds before each retry: a PACS restart takes about a minute
# Received images handed to the worker in memory (bytes + header + decoded image), so each is parsed once; beyond
# this the worker reads the spooled file again (and always after a restart), so a backlog never fills the memory.
MAX_HELD_BYTES = 256 * 2**20
SENDER_THREAD = "dicom-send"
# pynetdicom's messages when an association it requested fails (transport.py, acse.py), logged once per attempt.
REQUESTOR_FAILURES = ("Association request failed", "TCP Initialisation Error", "Association Rejected", "Result: ",
                      "Reason: ", "Association Aborted", "Aborting Association",
                      "Received an invalid A-ASSOCIATE response")
MAX_PDU_BYTES = 2**20  # one PDU; we advertise 16 kB, and association requests are a few kB


@dataclass(frozen=True)
class Received:
    """One received image as `analyse` gets it: the bytes as received and spooled, and their one parse."""

    data: bytes
    dicom: ParsedDicom

    @classmethod
    def parse(cls, data: bytes) -> Received:
        """Parse the data set once (header and image). Raises InvalidImage (UnsupportedFormat) as read_xray does."""
        header, image = read_dicom(data)
        return cls(data, ParsedDicom(header, image))

    @property
    def held_bytes(self) -> int:
        return len(self.data) + self.dicom.image.nbytes


@dataclass(frozen=True)
class Analysis:
    """What `analyse(received)` returns: the saved result's id, whether the image is in scope, its content.

    Out-of-scope results are listed but nothing is sent back and no finding is shown.
    """

    result_id: str
    in_scope: bool
    content: ReportContent


@dataclass(frozen=True)
class WorklistEntry:
    """One received image, without patient data. received: ISO 8601 UTC; top_probability in [0, 1] or None."""

    result_id: str | None
    received: str
    modality: str
    in_scope: bool | None
    calls: tuple[str, ...]
    top_probability: float | None
    send_status: str


@dataclass(frozen=True)
class Destination:
    """Where results are sent: a PACS's AE title, host and port."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """'AET@HOST:PORT' -> Destination. Raises ValueError with the expected form."""
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and aet and host and port.isdigit() and 0 < int(port) < 65536 and len(aet) <= 16):
            raise ValueError(f"--dicom-send expects AET@HOST:PORT (AE title of at most 16 characters), e.g. "
                             f"ORTHANC@127.0.0.1:4242; got {text!r}")
        return cls(aet, host, int(port))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


class SpoolFull(Exception):
    """The spool holds as many images and unsent results as its limits allow (count or bytes)."""


class Spool:
    """Received images and unsent results on disk, so that nothing acknowledged is lost to a crash or a restart.

    root/incoming/NAME.dcm: a received image not yet analysed; root/outbox/NAME/: a result's Secondary Capture and SR
    (sc.dcm, sr.dcm, sent in that order) and entry.json (its worklist entry, no patient data). Every file is written
    to a temporary name, fsync'ed and renamed, so a crash leaves a whole item or none. Bounded: at most `max_items`
    items and `max_bytes` bytes together; `reserve` raises SpoolFull beyond either. The folder is made 0700: it holds
    patient data until the results are delivered.
    """

    def __init__(self, root: str | os.PathLike, max_items: int = MAX_PENDING,
                 max_bytes: int = MAX_PENDING_BYTES) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"the spool needs room for at least one item; got {max_items} items, {max_bytes} bytes")
        self.root = Path(root)
        self.max_items, self.max_bytes = max_items, max_bytes
        self.incoming, self.outbox, self.tmp = self.root / "incoming", self.root / "outbox", self.root / "tmp"
        for folder in (self.root, self.incoming, self.outbox, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # halves of items a crash interrupted
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # item name -> bytes on disk
        self._reserved = 0  # bytes promised to writes in progress (their items are counted in _sizes as 0)
        for path in self.images():
            self._sizes[path.stem] = path.stat().st_size
        for path in self.results():
            self._sizes[path.name] = sum(f.stat().st_size for f in path.iterdir())

    def images(self) -> list[Path]:
        """Received images still to analyse, oldest first."""
        return sorted(self.incoming.glob("*.dcm"))

    def results(self) -> list[Path]:
        """Unsent results (folders), oldest first."""
        return sorted(p for p in self.outbox.iterdir() if (p / "entry.json").is_file())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def used(self) -> tuple[int, int]:
        """(items, bytes) held or reserved."""
        with self._lock:
            return len(self._sizes), sum(self._sizes.values()) + self._reserved

    def reserve(self, name: str, size: int) -> None:
        """Count a new item of `size` bytes against the limits. Raises SpoolFull (nothing counted)."""
        with self._lock:
            used = sum(self._sizes.values()) + self._reserved
            if len(self._sizes) >= self.max_items or used + size > self.max_bytes:
                raise SpoolFull(f"{len(self._sizes)} items, {used / 2**20:.0f} MiB held (limits {self.max_items} "
                                f"items, {self.max_bytes / 2**20:.0f} MiB)")
            self._sizes[name] = 0
            self._reserved += size

    def _settle(self, name: str, reserved: int, size: int | None) -> None:
        with self._lock:
            self._reserved -= reserved
            if size is None:
                self._sizes.pop(name, None)
            else:
                self._sizes[name] = size

    def put_image(self, name: str, data: bytes) -> Path:
        """Store a received image durably under incoming/. Raises SpoolFull, or OSError (a full or read-only disk)."""
        self.reserve(name, len(data))
        path = self.incoming / f"{name}.dcm"
        try:
            _write_durably(path, data, self.tmp)
        except BaseException:
            self._settle(name, len(data), None)
            raise
        self._settle(name, len(data), len(data))
        return path

    def put_result(self, name: str, image: Path, datasets: Sequence[Dataset], entry: dict) -> Path:
        """Replace the received image `image` by its result (outbox/NAME/: sc.dcm, sr.dcm, entry.json), durably.

        The result takes the image's place in the count, so a full spool never refuses a finished analysis.
        Raises OSError (the image stays).
        """
        folder = self.tmp / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        try:
            for filename, dataset in zip(("sc.dcm", "sr.dcm"), datasets, strict=True):
                buffer = io.BytesIO()
                dataset.save_as(buffer, enforce_file_format=True)
                _write_durably(folder / filename, buffer.getvalue(), None)
            _write_durably(folder / "entry.json", json.dumps(entry).encode(), None)
            target = self.outbox / name
            os.replace(folder, target)
            _fsync_folder(self.outbox)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        image.unlink(missing_ok=True)
        _fsync_folder(self.incoming)
        self._settle(name, 0, sum(f.stat().st_size for f in target.iterdir()))
        return target

    def remove(self, path: Path) -> None:
        """Forget an item: a received image (analysed, nothing to send) or a result folder (sent or given up)."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        self._settle(path.stem if path.suffix == ".dcm" else path.name, 0, None)


def _write_durably(path: Path, data: bytes, tmp: Path | None) -> None:
    """Write, fsync, rename into place (and fsync the folder when `tmp` is given): whole or absent after a crash."""
    part = (tmp or path.parent) / f".{path.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if tmp is not None:
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StateLog:
    """One log line when a condition starts and one when it ends (with how often it occurred meanwhile).

    A dead destination or a full spool would otherwise log one line per attempt or per refused image.
    """

    def __init__(self, start: str, end: str) -> None:
        self.start, self.end = start, end
        self.count = 0
        self.since = 0.0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.count > 0

    def hit(self, *args) -> None:
        with self._lock:
            if not self.count:
                self.since = time.monotonic()
                log.warning(self.start, *args)
            self.count += 1

    def clear(self, *args) -> None:
        with self._lock:
            if self.count:
                log.warning(self.end, self.count, time.monotonic() - self.since, *args)
            self.count = 0


class _CappedBuffer(io.BytesIO):
    """A C-STORE data set buffer that keeps at most `limit` bytes: beyond it, it drops what it holds and counts.

    pynetdicom appends each received fragment to the message's buffer and decodes nothing until the message is
    complete, so the handler can refuse an oversized data set without having held or decoded more than the limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    @property
    def overflowed(self) -> bool:
        return self.received > self.limit

    def write(self, data) -> int:
        self.received += len(data)
        if self.received > self.limit:
            if self.tell():
                self.seek(0)
                self.truncate()
            return len(data)
        return super().write(data)


@dataclass
class _Connection:
    """A TCP connection the node accepted: its socket, peer address, when; its association once pynetdicom made it."""

    sock: object
    address: str
    since: float
    assoc: object = None
    evicted: bool = False

    def alive(self) -> bool:
        if self.evicted:
            return False
        if self.assoc is None:  # accepted, pynetdicom's thread not yet made (a moment)
            return time.monotonic() - self.since < 10
        if self.assoc.ident is not None and not self.assoc.is_alive():
            return False
        # pynetdicom's thread outlives a connection the peer closed while it waits (up to connect_timeout) for an
        # A-ASSOCIATE-RQ; its transport drops the socket at once.
        transport = self.assoc.dul.socket
        return transport is not None and transport.socket is not None and transport.socket.fileno() != -1

    def silent(self) -> bool:
        """No A-ASSOCIATE-RQ received yet."""
        return self.assoc is None or self.assoc.requestor.primitive is None


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's server with the node's connection limits applied when a TCP connection is accepted."""

    node: DicomNode  # set on a subclass made per node, so it is there before the first connection

    def verify_request(self, request, client_address) -> bool:
        return self.node._admit(request, client_address)


@dataclass
class _SendJob:
    number: int
    folder: Path
    files: list[Path]  # still to send; the first one failed last time
    attempt: int = 1
    due: float = 0.0


class DicomNode:
    """C-ECHO/C-STORE SCP + analysis worker + result sender. start() returns at once; stop() joins everything.

    Every limit is a named setting (docs/RELIABILITY.md, "The DICOM node"): max_dataset_bytes per C-STORE;
    max_pending images and unsent results (and max_pending_bytes of them) in the spool; max_associations at once,
    max_per_peer from one address; connect_timeout for a new connection to ask for an association. spool: the folder
    keeping received images and unsent results across restarts (None: a temporary folder, removed by stop()).
    on_refusal(outcome, reason): called once per C-STORE refused at reception, with a REFUSALS entry.
    """

    def __init__(self, analyse: Callable[[Received], Analysis], *, aet: str = DEFAULT_AET, host: str = "127.0.0.1",
                 port: int = 11112, allow: Iterable[str] | None = None, send_to: Destination | None = None,
                 spool: str | os.PathLike | None = None, max_pending: int = MAX_PENDING,
                 max_pending_bytes: int = MAX_PENDING_BYTES, max_dataset_bytes: int = MAX_DATASET_BYTES,
                 max_associations: int = MAX_ASSOCIATIONS, max_per_peer: int = MAX_PER_PEER,
                 connect_timeout: float = CONNECT_TIMEOUT, retry_delays: Sequence[float] = RETRY_DELAYS,
                 worklist_size: int = 1000, timeout: float = 30.0,
                 on_refusal: Callable[[str, str], None] | None = None) -> None:
        if not 1 <= len(aet) <= 16:
            raise ValueError(f"a DICOM AE title has 1 to 16 characters; got {aet!r}")
        if max_dataset_bytes < 1 or max_associations < 2 or not 1 <= max_per_peer or connect_timeout <= 0:
            raise ValueError("the DICOM node needs max_dataset_bytes >= 1, max_associations >= 2 (one is kept for a "
                             "newcomer), max_per_peer >= 1 and connect_timeout > 0")
        if not retry_delays or min(retry_delays) <= 0:
            raise ValueError(f"retry delays must be positive seconds; got {tuple(retry_delays)}")
        self.analyse = analyse
        self.on_refusal = on_refusal
        self.aet = aet
        self.host = host
        self.port = port
        self.allow = tuple(allow or ())
        self.send_to = send_to
        self.max_dataset_bytes = max_dataset_bytes
        self.max_associations, self.max_per_peer = max_associations, max_per_peer
        self.connect_timeout = connect_timeout
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        self._own_spool = spool is None
        self.spool = Spool(tempfile.mkdtemp(prefix="cxr-dicom-spool-") if spool is None else spool,
                           max_pending, max_pending_bytes)
        # Spooled images for the worker, with their parse while under MAX_HELD_BYTES; bounded by the spool.
        self._incoming: queue.Queue[tuple[Path, Received | None] | None] = queue.Queue()
        self._held = 0  # bytes of the Received in _incoming (under _lock)
        self._entries: deque[WorklistEntry] = deque(maxlen=worklist_size)  # bounded: oldest entries drop off
        self._by_number: dict[int, WorklistEntry] = {}
        self._lock = threading.Condition()
        self._jobs: list[_SendJob] = []  # unsent results, oldest first
        self._next_try = 0.0  # while the destination is down, no send before this (monotonic seconds)
        self._failures = 0  # consecutive connection-level failures
        self._store_failing = False  # the results store could not save the last result: refuse until it can
        self._down = _StateLog("destination %s is unreachable (%s): results are kept and retried with back-off",
                               "destination reachable again after %d failed attempt(s) over %.0f s; sending %d "
                               "held result(s)")
        self._full = _StateLog("refusing C-STOREs with 0xA700 (out of resources): %s",
                               "accepting C-STOREs again after refusing %d over %.0f s")
        self._connections: list[_Connection] = []
        self._refused_connections = 0
        self._stopping = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1 + max((_number(p) for p in (*self.spool.images(),
                                                                         *self.spool.results())), default=0))
        _quiet_pynetdicom()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> DicomNode:
        """Bind and serve in background threads; resume what the spool holds from a previous run.

        Raises OSError when the port is taken (pick another --dicom-port).
        """
        for path in self.spool.images():
            self._incoming.put((path, None))
        for folder in self.spool.results():
            self._resume(folder)
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.require_called_aet = True  # a C-STORE meant for another AE is refused, not analysed
        ae.acse_timeout = self.connect_timeout  # also the wait for a new connection's A-ASSOCIATE-RQ
        ae.dimse_timeout = ae.network_timeout = self.timeout
        # The node's own admission (_admit) enforces max_associations; pynetdicom's limit is set far above it so
        # that evicted silent connections, whose threads linger up to connect_timeout, never turn a peer away.
        ae.maximum_associations = 100 * self.max_associations
        server_class = type("NodeServer", (_GatedServer,), {"node": self})
        # ae.start_server without blocking, but with our server class (pynetdicom's make_server takes one).
        self._server = ae.make_server((self.host, self.port), server_class=server_class,
                                      evt_handlers=[(evt.EVT_C_STORE, self._handle_store),
                                                    (evt.EVT_CONN_OPEN, self._on_connection)])
        ae._servers.append(self._server)  # as start_server does: shutdown() removes it
        threading.Thread(target=self._server.serve_forever, name="dicom-accept", daemon=True).start()
        self.port = self._server.server_address[1]  # the real port when 0 asked for a free one
        self._threads = [threading.Thread(target=self._analyse_loop, name="dicom-analyse", daemon=True),
                         threading.Thread(target=self._send_loop, name=SENDER_THREAD, daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("DICOM node %s listening on %s:%d%s; %d image(s) and %d result(s) resumed from %s", self.aet,
                 self.host, self.port, f", sending results to {self.send_to}" if self.send_to else "",
                 self._incoming.qsize(), len(self._jobs), self.spool.root)
        return self

    def stop(self) -> None:
        """Stop accepting and join the threads; what is unanalysed or unsent stays in the spool for the next start."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        self._incoming.put(None)
        for thread in self._threads:
            thread.join(timeout=self.timeout)
        images, results = len(self.spool.images()), len(self._jobs)
        if self._own_spool:
            shutil.rmtree(self.spool.root, ignore_errors=True)
        if images or results:
            log.warning("DICOM node stopped with %d image(s) unanalysed and %d result(s) unsent%s", images, results,
                        "" if self._own_spool else f", kept in {self.spool.root} for the next start")

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """Block until every received image is analysed and every result sent or finally failed; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.spool):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def worklist(self) -> list[WorklistEntry]:
        """Entries newest first (a snapshot: safe to iterate while images arrive)."""
        with self._lock:
            return list(reversed(self._entries))

    # -- admission (pynetdicom's server thread and association threads) --------------------------------------------

    def _admit(self, sock, client_address) -> bool:
        """Accept a TCP connection unless its address holds max_per_peer already or every slot is taken.

        Connections that have not asked for an association are evicted oldest first when a newcomer needs the slot:
        a peer that talks DICOM asks at once, so silent connections can never take every slot.
        """
        address = str(client_address[0])
        with self._lock:
            self._connections = [c for c in self._connections if c.alive()]
            if sum(c.address == address for c in self._connections) >= self.max_per_peer:
                self._refused_connections += 1
                return False
            if len(self._connections) >= self.max_associations - 1:
                silent = [c for c in self._connections if c.silent()]
                if len(self._connections) >= self.max_associations and not silent:
                    self._refused_connections += 1
                    return False
                if silent:
                    oldest = min(silent, key=lambda c: c.since)
                    oldest.evicted = True
                    with contextlib.suppress(OSError):
                        oldest.sock.shutdown(socket.SHUT_RDWR)
            self._connections.append(_Connection(sock, address, time.monotonic()))
        return True

    def _on_connection(self, event) -> None:
        """EVT_CONN_OPEN: bound what the new association may hold (one PDU, one capped data set)."""
        assoc = event.assoc
        with self._lock:
            for connection in self._connections:
                if connection.sock is assoc.dul.socket.socket:
                    connection.assoc = assoc
        transport = assoc.dul.socket
        recv = transport.recv

        def bounded_recv(size: int):
            # A PDU's length comes from the peer: refuse one larger than anything a conforming peer sends (we
            # advertise a maximum PDU of ae.maximum_pdu_size) before allocating it.
            if size > MAX_PDU_BYTES:
                raise OSError(f"a PDU of {size} bytes, over the {MAX_PDU_BYTES} byte limit")
            return recv(size)

        transport.recv = bounded_recv
        dimse = assoc.dimse
        receive = dimse.receive_primitive

        def bounded_receive(primitive) -> None:
            if dimse.message is None:
                dimse.message = DIMSEMessage()
                dimse.message.data_set = _CappedBuffer(self.max_dataset_bytes)
            receive(primitive)

        dimse.receive_primitive = bounded_receive

    # -- reception (pynetdicom's association threads) --------------------------------------------------------------

    def _handle_store(self, event) -> int:
        """C-STORE: refuse what is too large or cannot be kept; store the image durably; then answer success.

        Never raises (pynetdicom would abort the association).
        """
        buffer = getattr(event.request, "DataSet", None)
        if isinstance(buffer, _CappedBuffer) and buffer.overflowed:
            log.warning("refused an image from %s: its data set is %.0f MiB, over the %.0f MiB limit (nothing "
                        "decoded)", _caller(event), buffer.received / 2**20, self.max_dataset_bytes / 2**20)
            return self._refuse(OUT_OF_RESOURCES, "too large")
        if self._store_failing:
            self._full.hit("the results store cannot save results (see the error above)")
            return self._refuse(OUT_OF_RESOURCES, "store failing")
        items, held = self.spool.used()
        if items >= self.spool.max_items or held >= self.spool.max_bytes:
            self._full.hit(f"{items} image(s) and unsent result(s) held, the limit is {self.spool.max_items} "
                           f"({self.spool.max_bytes / 2**20:.0f} MiB)")
            return self._refuse(OUT_OF_RESOURCES, "spool full")
        received = self._parse(event)
        if not isinstance(received, Received):
            return received  # the refusal's status
        modality = _code_string(received.dicom.header.get("Modality", ""))  # read (and checked) by _parse
        name = f"{next(self._numbers):012d}-{modality if modality != '?' else ''}-{uuid.uuid4().hex[:8]}"
        try:
            path = self.spool.put_image(name, received.data)
        except SpoolFull as exc:
            self._full.hit(str(exc))
            return self._refuse(OUT_OF_RESOURCES, "spool full")
        except OSError as exc:
            # A full or read-only disk: the sender keeps the image and retries; nothing is acknowledged unsaved.
            log.error("refused an image from %s: it cannot be stored in %s (%s)", _caller(event), self.spool.root,
                      exc.strerror or type(exc).__name__)
            return self._refuse(OUT_OF_RESOURCES, "disk")
        if len(self.spool) < self.spool.max_items:
            self._full.clear()
        with self._lock:
            in_memory = self._held + received.held_bytes <= MAX_HELD_BYTES
            if in_memory:
                self._held += received.held_bytes
        self._incoming.put((path, received if in_memory else None))
        return SUCCESS

    def _parse(self, event) -> Received | int:
        """The C-STORE's data set parsed once (header and image), or the status refusing it (logged, reported)."""
        try:
            data = event.encoded_dataset(include_meta=True)  # the bytes as sent, not decoded by pynetdicom
        except Exception:
            log.warning("refused an image from %s: its data set cannot be decoded", _caller(event))
            return self._refuse(CANNOT_UNDERSTAND, "undecodable")
        try:
            # The one parse, here rather than only in the worker, so the sender learns now that the file is
            # unreadable; the worker gets it with the image (Received).
            received = Received.parse(data)
        except InvalidImage as exc:
            # imaging's messages never hold header values (they may identify a patient): safe to log.
            log.warning("refused a DICOM image from %s: %s", _caller(event), exc)
            return self._refuse(CANNOT_UNDERSTAND, "unsupported" if isinstance(exc, UnsupportedFormat)
                                else "unreadable")
        except Exception as exc:
            log.warning("refused a DICOM image from %s: %s while reading", _caller(event), type(exc).__name__)
            return self._refuse(CANNOT_UNDERSTAND, "unreadable")
        try:
            header = received.dicom.header
            sop_class = str(header.get("SOPClassUID", ""))
            _code_string(header.get("Modality", ""))
        except Exception:
            log.warning("refused an image from %s: its data set cannot be decoded", _caller(event))
            return self._refuse(CANNOT_UNDERSTAND, "undecodable")
        if sop_class != str(event.context.abstract_syntax):
            log.warning("refused an image from %s: its SOP class does not match the negotiated one", _caller(event))
            return self._refuse(DOES_NOT_MATCH_SOP_CLASS, "sop class")
        return received

    def _refuse(self, status: int, why: str) -> int:
        """Report a refusal at reception to on_refusal (REFUSALS[why]) and return the status; never raises."""
        if self.on_refusal is not None:
            try:
                self.on_refusal(*REFUSALS[why])
            except Exception as exc:  # recording is bookkeeping: the sender still gets its status
                log.error("a refused C-STORE could not be recorded: %s", type(exc).__name__)
        return status

    # -- analysis (one worker thread) ------------------------------------------------------------------------------

    def _analyse_loop(self) -> None:
        while not self._stopping.is_set():
            item = self._incoming.get()
            if item is None:
                break
            path, parsed = item
            delays = iter(self.retry_delays)
            delay = next(delays)
            while not self._stopping.is_set() and not self._analyse_one(path, parsed):
                # The results store cannot save: keep the image, refuse new ones, try again with back-off.
                self._stopping.wait(delay)
                delay = next(delays, delay)
            if parsed is not None:
                with self._lock:
                    self._held -= parsed.held_bytes

    def _analyse_one(self, path: Path, parsed: Received | None = None) -> bool:
        """Analyse a spooled image (parsed at reception, else read from the spool now) and queue its result; False
        when the result could not be saved (retry later)."""
        number, received, modality = _number(path), _received_time(path), _modality(path)
        try:
            parsed = parsed or Received.parse(path.read_bytes())
            analysis = self.analyse(parsed)
        except OSError as exc:
            if not self._store_failing:
                log.error("received image #%d: its result cannot be saved (%s); the image is kept and new ones are "
                          "refused until saving works", number, exc.strerror or type(exc).__name__)
            self._store_failing = True
            return False
        except Exception as exc:  # one bad image must not stop the node; the type is logged, never the data
            log.error("analysis of received image #%d failed: %s", number, type(exc).__name__)
            self._add(number, WorklistEntry(None, received, modality, None, (), None,
                                            f"not sent: analysis failed ({type(exc).__name__})"))
            self.spool.remove(path)
            return True
        if self._store_failing:
            log.warning("results can be saved again; accepting C-STOREs")
            self._store_failing = False
        content = analysis.content
        top = max(content.probabilities.values(), default=None)
        entry = WorklistEntry(
            result_id=analysis.result_id, received=received, modality=modality,
            in_scope=analysis.in_scope, calls=content.positive if analysis.in_scope else (),
            top_probability=top, send_status="not sent: no destination configured")
        if not analysis.in_scope:
            entry = replace(entry, send_status="not sent: out of scope")
        elif self.send_to is not None:
            try:
                source = parsed.dicom.header
                datasets = [build_secondary_capture(source, content), build_structured_report(source, content)]
            except Exception as exc:
                log.error("result %s: building the DICOM result failed: %s", analysis.result_id, type(exc).__name__)
                self._add(number, replace(entry, send_status=f"failed: cannot build ({type(exc).__name__})"))
                self.spool.remove(path)
                return True
            entry = replace(entry, send_status="queued")
            try:
                folder = self.spool.put_result(path.stem, path, datasets, asdict(entry))
            except OSError as exc:
                log.error("result %s cannot be kept for sending (%s); the image is kept and analysed again later",
                          analysis.result_id, exc.strerror or type(exc).__name__)
                self._store_failing = True
                return False
            self._add(number, entry)
            self._queue_send(folder)
            return True
        self._add(number, entry)
        self.spool.remove(path)
        return True

    def _add(self, number: int, entry: WorklistEntry) -> None:
        with self._lock:
            if len(self._entries) == self._entries.maxlen:
                self._by_number.pop(next(iter(self._by_number)), None)
            self._entries.append(entry)
            self._by_number[number] = entry

    def _set_status(self, number: int, status: str) -> None:
        with self._lock:
            old = self._by_number.get(number)
            if old is None:
                return  # dropped off the bounded worklist meanwhile
            new = replace(old, send_status=status)
            self._by_number[number] = new
            for i in range(len(self._entries) - 1, -1, -1):
                if self._entries[i] is old:
                    self._entries[i] = new
                    break

    # -- sending (one sender thread) -------------------------------------------------------------------------------

    def _resume(self, folder: Path) -> None:
        """Queue a result left unsent by a previous run (its worklist entry comes back from entry.json)."""
        try:
            fields = json.loads((folder / "entry.json").read_text())
            entry = WorklistEntry(**{**fields, "calls": tuple(fields["calls"]), "send_status": "queued (resumed)"})
        except (OSError, ValueError, TypeError, KeyError):
            log.error("unsent result %s in the spool is unreadable; it is left there", folder.name)
            return
        self._add(_number(folder), entry)
        self._queue_send(folder)

    def _queue_send(self, folder: Path) -> None:
        files = [folder / name for name in ("sc.dcm", "sr.dcm") if (folder / name).exists()]
        with self._lock:
            self._jobs.append(_SendJob(_number(folder), folder, files))
            self._lock.notify_all()

    def _next_job(self) -> _SendJob | None:
        """The oldest job that is due, waiting for it; None when stopping. Call with the lock held."""
        while not self._stopping.is_set():
            now = time.monotonic()
            due = [job for job in self._jobs if job.due <= now]
            if due and now >= self._next_try:
                return due[0]
            waits = [job.due for job in self._jobs]
            wake = max(self._next_try, min(waits)) if waits else None
            self._lock.wait(None if wake is None else max(0.01, wake - now))
        return None

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                job = self._next_job()
            if job is None:
                return
            self._set_status(job.number, "sending" if job.attempt == 1 else f"sending (attempt {job.attempt})")
            error, connected = self._send(job)
            if error is None:
                self._sent(job)
            elif not connected:
                # The destination is down: one line when it goes down, none per attempt; every job waits behind
                # this one, which probes with back-off.
                self._failures += 1
                delay = self.retry_delays[min(self._failures, len(self.retry_delays)) - 1]
                self._down.hit(self.send_to, error)
                self._next_try = time.monotonic() + delay
                self._set_status(job.number, f"retrying in {delay:g} s (attempt {job.attempt} failed: {error})")
                job.attempt += 1
            elif job.attempt <= len(self.retry_delays):
                # The destination answered but refused this result: retry it on its own schedule, others go on.
                delay = self.retry_delays[job.attempt - 1]
                log.warning("sending result #%d to %s failed (%s); retry %d in %g s", job.number, self.send_to,
                            error, job.attempt, delay)
                self._set_status(job.number, f"retrying in {delay:g} s (attempt {job.attempt} failed: {error})")
                job.attempt += 1
                job.due = time.monotonic() + delay
            else:
                log.error("sending result #%d to %s failed after %d attempts: %s", job.number, self.send_to,
                          job.attempt, error)
                self._set_status(job.number, f"failed after {job.attempt} attempts: {error}")
                self._finish(job)

    def _sent(self, job: _SendJob) -> None:
        self._set_status(job.number, "sent")
        held = len(self._jobs)
        self._finish(job)
        if self._failures:
            self._down.clear(held)
            self._failures = 0
            self._next_try = 0.0

    def _finish(self, job: _SendJob) -> None:
        with self._lock:
            self._jobs.remove(job)
        self.spool.remove(job.folder)  # the patient module goes with it

    def _send(self, job: _SendJob) -> tuple[str | None, bool]:
        """C-STORE the job's remaining files in one association.

        Returns (None, True) on success, else (a short reason, whether an association was made: False means the
        destination is unreachable, True that it answered and refused).
        """
        assert self.send_to is not None
        ae = AE(ae_title=self.aet)
        for sop_class in (SecondaryCaptureImageStorage, ComprehensiveSRStorage):
            ae.add_requested_context(sop_class, list(SEND_SYNTAXES))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        try:
            assoc = ae.associate(self.send_to.host, self.send_to.port, ae_title=self.send_to.aet)
        except Exception as exc:
            return f"cannot connect ({type(exc).__name__})", False
        if not assoc.is_established:
            return ("association rejected" if assoc.is_rejected else "no association (is the PACS running?)"), False
        try:
            while job.files:
                status = assoc.send_c_store(pydicom.dcmread(job.files[0]))
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    return "no response", False
                if code not in SUCCESSFUL_STORE:
                    return f"store status 0x{code:04X}", True
                job.files.pop(0)
        except Exception as exc:
            return f"connection lost ({type(exc).__name__})", False
        finally:
            if assoc.is_established:
                assoc.release()
        return None, True


def _number(path: Path) -> int:
    """The receipt number at the start of a spool item's name (000000000042-DX-1a2b3c4d -> 42)."""
    return int(path.name.split("-", 1)[0])


def _modality(path: Path) -> str:
    parts = path.stem.split("-")
    return parts[1] if len(parts) == 3 and parts[1] else "?"


def _received_time(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


class _EscapeControl(logging.Filter):
    """Escape control characters (CR, LF, ESC...) in a record's message and drop its traceback.

    pynetdicom puts peer-chosen text (AE titles, UIDs) into its messages; a newline there forges a log line. A
    traceback from its reader threads carries nothing an operator needs and may carry received bytes. pynetdicom's
    records of a failed outgoing association are dropped: it logs two or three lines per failed attempt, and the
    node's sender (the process's only requestor) logs the destination's state changes itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and str(record.msg).startswith(REQUESTOR_FAILURES):
            return False
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__})"
        record.msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


_ESCAPE = _EscapeControl()


def _quiet_pynetdicom() -> None:
    # pynetdicom's debug and info records carry UIDs and, in its debug handlers, whole datasets: keep them out.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its info records name the study's UIDs
    # Filters act on the logger a record is made by, not on its parents: add ours to each pynetdicom logger.
    names = [name for name in logging.root.manager.loggerDict if name == "pynetdicom" or
             name.startswith("pynetdicom.")]
    for name in (*names, log.name):
        logger = logging.getLogger(name)
        if _ESCAPE not in logger.filters:
            logger.addFilter(_ESCAPE)


def _code_string(value) -> str:
    """A DICOM code string (Modality) as shown and logged: 'CR', or '?' for anything but A-Z, 0-9, space, '_'."""
    text = str(value or "").strip()
    return text if CODE_STRING.fullmatch(text) else "?"


def _caller(event) -> str:
    # The calling AE title and address identify a device, not a patient; printable characters only (no log forging).
    requestor = event.assoc.requestor
    title = "".join(c if c.isprintable() else "?" for c in str(requestor.ae_title))[:16]
    return f"{title}@{requestor.address}"


def node_from_args(args: argparse.Namespace, analyse: Callable[[Received], Analysis],
                   on_refusal: Callable[[str, str], None] | None = None) -> DicomNode | None:
    """A DicomNode from the --dicom-* flags (not started), or None without --dicom-port; on_refusal as in
    DicomNode. Raises ValueError."""
    if args.dicom_port is None:
        return None
    if not 0 <= args.dicom_port < 65536:
        raise ValueError(f"--dicom-port must be in 0..65535, got {args.dicom_port}")
    allow = [aet.strip() for aet in args.dicom_allow.split(",") if aet.strip()]
    send_to = Destination.parse(args.dicom_send) if args.dicom_send else None
    return DicomNode(analyse, aet=args.dicom_aet, host=args.dicom_host, port=args.dicom_port, allow=allow,
                     send_to=send_to, spool=args.dicom_spool or spool_folder(args), max_pending=args.dicom_max_pending,
                     max_pending_bytes=int(args.dicom_max_pending_mb * 2**20),
                     max_dataset_bytes=int(args.dicom_max_dataset_mb * 2**20),
                     max_associations=args.dicom_max_associations, max_per_peer=args.dicom_max_per_peer,
                     connect_timeout=args.dicom_connect_timeout, on_refusal=on_refusal)


def model_name(predictor) -> str:
    """A short model name for Series Descriptions: 'ChestX-ray14 <arch> <size>px'."""
    return f"ChestX-ray14 {predictor.meta.arch} {predictor.meta.image_size}px"


def analyser(predictor, store, monitor=None) -> Callable[[Received], Analysis]:
    """The web app's analyse callback: chestxray.service.analyse_and_store on the parsed image, as for an upload (no
    patient data is saved), under the retention source RESULT_SOURCE.

    predictor: a chestxray Predictor; store: a chestxray.results.ResultStore (save returns the record with its "id").
    In scope: a radiograph SOP class (CR, DX, SC) and, where the prediction has it, the in-scope check's verdict.
    The check refuses only when it says False: in_scope None (a checkpoint without scope statistics) is no verdict.
    monitor: a chestxray.web.monitoring.Monitor recording each analysis in the results database (None: not
    recorded; technical facts only: the header's patient data never reaches the database).
    """
    name = model_name(predictor)

    def analyse(received: Received) -> Analysis:
        # One retention source for everything the node receives: a flood from a modality loses its own oldest
        # results first, never the web uploads' (chestxray.results counts retention per source).
        stored = analyse_and_store(predictor, store, received.dicom, source=RESULT_SOURCE, channel="dicom",
                                   monitor=monitor)
        prediction = stored.prediction
        in_scope = str(received.dicom.header.get("SOPClassUID", "")) in RADIOGRAPH_SOP_CLASSES and \
            getattr(prediction, "in_scope", None) is not False
        return Analysis(result_id=stored.record["id"], in_scope=in_scope,
                        content=ReportContent.from_prediction(prediction, model_name=name))

    return analyse
