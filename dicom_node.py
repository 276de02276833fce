"""A DICOM node on pynetdicom: receives chest X-rays from a modality or a PACS, analyses them, sends results back.

- C-ECHO; C-STORE SCP for Computed Radiography, Digital X-Ray (for presentation and for processing), Secondary
  Capture and CT Image Storage (CT is accepted so a PACS forwarding a whole study does not see failures; the analysis
  marks it out of scope). Other SOP classes are refused at association negotiation (abstract syntax not supported).
- Transfer syntaxes: those chestxray.imaging decodes (uncompressed, deflated, JPEG baseline/extended/lossless,
  JPEG 2000, RLE). A file the reader refuses gets 0xC000 (cannot understand) and one log line with the reader's
  message, which never holds header values.
- Received images go to a bounded queue; one worker thread calls `analyse(dataset_bytes) -> Analysis` (given at
  construction, so this module knows nothing of Flask). A full queue answers 0xA700 (out of resources): the sender
  keeps the image and retries, nothing is lost silently.
- With a destination, each in-scope result goes back as a Secondary Capture + Comprehensive SR (chestxray.dicom_out)
  from a separate sender thread that retries with back-off, so a slow or absent PACS never blocks reception.
- Patient identifiers stay in memory only as long as the sender needs them; the worklist and the logs hold the result
  id, times, modality, scope, calls, probabilities and send status.
"""
from __future__ import annotations

import argparse
import heapq
import io
import itertools
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

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
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from chestxray.dicom_out import ReportContent, build_secondary_capture, build_structured_report
from chestxray.imaging import InvalidImage, read_xray

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

DEFAULT_AET = "CXR_AI"
RESULT_SOURCE = "dicom-node"  # the results store's retention key for received images
CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM's CS value representation (PS3.5 6.2)
RETRY_DELAYS = (2.0, 5.0, 15.0, 60.0, 300.0)  # seconds before each retry: a PACS restart takes about a minute


@dataclass(frozen=True)
class Analysis:
    """What `analyse(dataset_bytes)` returns: the saved result's id, whether the image is in scope, its content.

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


@dataclass
class _Received:
    number: int
    received: str
    modality: str
    data: bytes


@dataclass
class _SendJob:
    number: int
    datasets: list[Dataset]  # still to send; the first one failed last time
    attempt: int = 1


class DicomNode:
    """C-ECHO/C-STORE SCP + analysis worker + result sender. start() returns at once; stop() joins everything."""

    def __init__(self, analyse: Callable[[bytes], Analysis], *, aet: str = DEFAULT_AET, host: str = "127.0.0.1",
                 port: int = 11112, allow: Iterable[str] | None = None, send_to: Destination | None = None,
                 queue_size: int = 16, retry_delays: Sequence[float] = RETRY_DELAYS, worklist_size: int = 1000,
                 timeout: float = 30.0) -> None:
        if not 1 <= len(aet) <= 16:
            raise ValueError(f"a DICOM AE title has 1 to 16 characters; got {aet!r}")
        self.analyse = analyse
        self.aet = aet
        self.host = host
        self.port = port
        self.allow = tuple(allow or ())
        self.send_to = send_to
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        # Bounded in images: 16 large uncompressed DX files are ~300 MB; a full queue pushes back on the sender.
        self._queue: queue.Queue[_Received | None] = queue.Queue(maxsize=queue_size)
        self._entries: deque[WorklistEntry] = deque(maxlen=worklist_size)  # bounded: oldest entries drop off
        self._by_number: dict[int, WorklistEntry] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Condition()
        self._busy = 0  # images received and not yet analysed, plus results not yet finally sent or failed
        self._sends: list[tuple[float, int, _SendJob]] = []  # heap by due time
        self._stopping = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []
        # pynetdicom's debug and info records carry UIDs and, in its debug handlers, whole datasets: keep them out.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> DicomNode:
        """Bind and serve in background threads. Raises OSError when the port is taken (pick another --dicom-port)."""
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._handle_store)])
        self.port = self._server.server_address[1]  # the real port when 0 asked for a free one
        self._threads = [threading.Thread(target=self._analyse_loop, name="dicom-analyse", daemon=True),
                         threading.Thread(target=self._send_loop, name="dicom-send", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("DICOM node %s listening on %s:%d%s", self.aet, self.host, self.port,
                 f", sending results to {self.send_to}" if self.send_to else "")
        return self

    def stop(self) -> None:
        """Stop accepting, finish nothing more, join the threads (images still queued are dropped with a log line)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        for thread in self._threads:
            thread.join(timeout=self.timeout)
        if self._queue.qsize() or self._sends:
            log.warning("DICOM node stopped with %d image(s) unanalysed and %d result(s) unsent",
                        self._queue.qsize(), len(self._sends))

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """Block until every received image is analysed and every result sent or finally failed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def worklist(self) -> list[WorklistEntry]:
        """Entries newest first (a snapshot: safe to iterate while images arrive)."""
        with self._lock:
            return list(reversed(self._entries))

    # -- reception (pynetdicom's association threads) --------------------------------------------------------------

    def _handle_store(self, event) -> int:
        """C-STORE: check the image is readable, queue it, answer at once. Never raises (pynetdicom would abort)."""
        try:
            data = event.encoded_dataset(include_meta=True)
            dataset = event.dataset
            sop_class = str(dataset.get("SOPClassUID", ""))
            modality = _code_string(dataset.get("Modality", ""))
        except Exception:
            log.warning("refused an image from %s: its data set cannot be decoded", _caller(event))
            return CANNOT_UNDERSTAND
        if sop_class != str(event.context.abstract_syntax):
            log.warning("refused an image from %s: its SOP class does not match the negotiated one", _caller(event))
            return DOES_NOT_MATCH_SOP_CLASS
        try:
            # Decoded here, not only in the worker, so the sender learns now that the file is unreadable.
            read_xray(data)
        except InvalidImage as exc:
            # imaging's messages never hold header values (they may identify a patient): safe to log.
            log.warning("refused a %s image from %s: %s", modality or "DICOM", _caller(event), exc)
            return CANNOT_UNDERSTAND
        except Exception as exc:
            log.warning("refused a %s image from %s: %s while reading", modality or "DICOM", _caller(event),
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        item = _Received(next(self._numbers), _now(), modality, data)
        with self._lock:
            self._busy += 1
        try:
            # Back-pressure: wait a while for room, then answer "out of resources" so the sender keeps the image.
            self._queue.put(item, timeout=self.timeout)
        except queue.Full:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()
            log.warning("refused an image from %s: the analysis queue is full", _caller(event))
            return OUT_OF_RESOURCES
        return SUCCESS

    # -- analysis (one worker thread) ------------------------------------------------------------------------------

    def _analyse_loop(self) -> None:
        while not self._stopping.is_set():
            item = self._queue.get()
            if item is None:
                break
            try:
                self._analyse_one(item)
            finally:
                item.data = b""
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _analyse_one(self, item: _Received) -> None:
        try:
            analysis = self.analyse(item.data)
        except Exception as exc:  # one bad image must not stop the node; the type is logged, never the data
            log.error("analysis of received image #%d failed: %s", item.number, type(exc).__name__)
            self._add(item.number, WorklistEntry(None, item.received, item.modality, None, (), None,
                                                 f"not sent: analysis failed ({type(exc).__name__})"))
            return
        content = analysis.content
        top = max(content.probabilities.values(), default=None)
        entry = WorklistEntry(
            result_id=analysis.result_id, received=item.received, modality=item.modality,
            in_scope=analysis.in_scope, calls=content.calls if analysis.in_scope else (),
            top_probability=top, send_status="not sent: no destination configured")
        if not analysis.in_scope:
            entry = replace(entry, send_status="not sent: out of scope")
        elif self.send_to is not None:
            try:
                source = pydicom.dcmread(io.BytesIO(item.data), stop_before_pixels=True)
                datasets = [build_secondary_capture(source, content), build_structured_report(source, content)]
            except Exception as exc:
                log.error("result %s: building the DICOM result failed: %s", analysis.result_id, type(exc).__name__)
                self._add(item.number, replace(entry, send_status=f"failed: cannot build ({type(exc).__name__})"))
                return
            entry = replace(entry, send_status="queued")
            self._add(item.number, entry)
            with self._lock:
                self._busy += 1  # released when the send succeeds or finally fails
                heapq.heappush(self._sends, (time.monotonic(), item.number, _SendJob(item.number, datasets)))
                self._lock.notify_all()
            return
        self._add(item.number, entry)

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

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping.is_set() and (not self._sends or self._sends[0][0] > time.monotonic()):
                    self._lock.wait(self._sends[0][0] - time.monotonic() if self._sends else None)
                if self._stopping.is_set():
                    return
                _, _, job = heapq.heappop(self._sends)
            self._set_status(job.number, "sending" if job.attempt == 1 else f"sending (attempt {job.attempt})")
            error = self._send(job)
            if error is None:
                self._set_status(job.number, "sent")
            elif job.attempt <= len(self.retry_delays) and not self._stopping.is_set():
                delay = self.retry_delays[job.attempt - 1]
                log.warning("sending result #%d to %s failed (%s); retry %d in %g s", job.number, self.send_to,
                            error, job.attempt, delay)
                self._set_status(job.number, f"retrying in {delay:g} s (attempt {job.attempt} failed: {error})")
                job.attempt += 1
                with self._lock:
                    heapq.heappush(self._sends, (time.monotonic() + delay, job.number, job))
                    self._lock.notify_all()
                continue
            else:
                log.error("sending result #%d to %s failed after %d attempts: %s", job.number, self.send_to,
                          job.attempt, error)
                self._set_status(job.number, f"failed after {job.attempt} attempts: {error}")
            job.datasets = []  # the patient module goes with them
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    def _send(self, job: _SendJob) -> str | None:
        """C-STORE the job's remaining datasets in one association; None on success, else a short reason."""
        assert self.send_to is not None
        ae = AE(ae_title=self.aet)
        for sop_class in (SecondaryCaptureImageStorage, ComprehensiveSRStorage):
            ae.add_requested_context(sop_class, list(SEND_SYNTAXES))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        try:
            assoc = ae.associate(self.send_to.host, self.send_to.port, ae_title=self.send_to.aet)
        except Exception as exc:
            return f"cannot connect ({type(exc).__name__})"
        if not assoc.is_established:
            return "association rejected" if assoc.is_rejected else "no association (is the PACS running?)"
        try:
            while job.datasets:
                status = assoc.send_c_store(job.datasets[0])
                code = int(status.Status) if "Status" in status else None
                if code not in SUCCESSFUL_STORE:
                    return "no response" if code is None else f"store status 0x{code:04X}"
                job.datasets.pop(0)
        except Exception as exc:
            return f"connection lost ({type(exc).__name__})"
        finally:
            if assoc.is_established:
                assoc.release()
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _code_string(value) -> str:
    """A DICOM code string (Modality) as shown and logged: 'CR', or '?' for anything but A-Z, 0-9, space, '_'."""
    text = str(value or "").strip()
    return text if CODE_STRING.fullmatch(text) else "?"


def _caller(event) -> str:
    # The calling AE title and address identify a device, not a patient; printable characters only (no log forging).
    requestor = event.assoc.requestor
    title = "".join(c if c.isprintable() else "?" for c in str(requestor.ae_title))[:16]
    return f"{title}@{requestor.address}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --dicom-* flags (main.py adds them to its own)."""
    group = parser.add_argument_group("DICOM node (receive from a modality or PACS, send results back)")
    group.add_argument("--dicom-port", type=int, default=None,
                       help="listen for DICOM (C-ECHO, C-STORE) on this port, e.g. 11112 (default: no DICOM node)")
    group.add_argument("--dicom-host", default="127.0.0.1",
                       help="address to bind the DICOM node to (default: %(default)s; 0.0.0.0 for the network)")
    group.add_argument("--dicom-aet", default=DEFAULT_AET, help="this node's AE title (default: %(default)s)")
    group.add_argument("--dicom-allow", default="",
                       help="comma-separated calling AE titles allowed to connect (default: any)")
    group.add_argument("--dicom-send", default=None, metavar="AET@HOST:PORT",
                       help="send each result as Secondary Capture + SR to this PACS (default: send nothing)")


def node_from_args(args: argparse.Namespace, analyse: Callable[[bytes], Analysis]) -> DicomNode | None:
    """A DicomNode from the --dicom-* flags (not started), or None without --dicom-port. Raises ValueError."""
    if args.dicom_port is None:
        return None
    if not 0 <= args.dicom_port < 65536:
        raise ValueError(f"--dicom-port must be in 0..65535, got {args.dicom_port}")
    allow = [aet.strip() for aet in args.dicom_allow.split(",") if aet.strip()]
    send_to = Destination.parse(args.dicom_send) if args.dicom_send else None
    return DicomNode(analyse, aet=args.dicom_aet, host=args.dicom_host, port=args.dicom_port, allow=allow,
                     send_to=send_to)


def model_name(predictor) -> str:
    """A short model name for Series Descriptions: 'ChestX-ray14 <arch> <size>px'."""
    return f"ChestX-ray14 {predictor.meta.arch} {predictor.meta.image_size}px"


def analyser(predictor, store) -> Callable[[bytes], Analysis]:
    """The web app's analyse callback: predict like an upload, save the result in `store` (no patient data).

    predictor: a chestxray Predictor; store: a chestxray.results.ResultStore (save returns the record with its "id").
    In scope: a radiograph SOP class (CR, DX, SC) and, where the prediction has it, the in-scope check's verdict.
    The check refuses only when it says False: in_scope None (a checkpoint without scope statistics) is no verdict.
    """
    name = model_name(predictor)

    def analyse(data: bytes) -> Analysis:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        prediction = predictor.predict(data)
        # One retention source for everything the node receives: a flood from a modality loses its own oldest
        # results first, never the web uploads' (chestxray.results counts retention per source).
        record = store.save(prediction, source=RESULT_SOURCE)
        in_scope = str(header.get("SOPClassUID", "")) in RADIOGRAPH_SOP_CLASSES and \
            getattr(prediction, "in_scope", None) is not False
        return Analysis(result_id=record["id"], in_scope=in_scope,
                        content=ReportContent.from_prediction(prediction, model_name=name))

    return analyse
