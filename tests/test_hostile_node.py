"""Hostile peers and failing storage against the DICOM node (chestxray/pacs/node.py), with real sockets on 127.0.0.1.

A dead destination, silent connections, an oversized data set, a full disk, a results store that cannot save,
control characters in an AE title and a wrong called AE title. Every wait is bounded; nothing here asserts a
duration. The node's limits are named settings (docs/RELIABILITY.md, "The DICOM node").
"""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation
from support.pacs import NODE_AET, PACS_AET, WAIT, Analyser, Orthanc, free_port, radiograph, storescu

from chestxray.pacs import node as dicom_node
from chestxray.pacs.node import Destination, DicomNode

OUT_OF_RESOURCES = 0xA700


def send(port: int, datasets: list[pydicom.Dataset], aet: str = "XRAY_ROOM_1",
         called: str = NODE_AET) -> list[int | None]:
    """C-STORE each data set in one association (as a modality does); the status of each, None when unanswered."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    try:
        return [int(s.Status) if "Status" in s else None for s in map(assoc.send_c_store, datasets)]
    finally:
        assoc.release()


def echo(port: int, aet: str = "XRAY_ROOM_1", called: str = NODE_AET) -> bool:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = WAIT
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def images(folder: Path, count: int, study: str | None = None) -> list[pydicom.Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    return [radiograph(folder / f"{i:03d}.dcm", study=study) for i in range(count)]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---------------------------------------------------------------- a dead destination: bounded, persistent, quiet

def test_with_the_destination_down_the_node_holds_a_bounded_spool_refuses_the_rest_and_delivers_all_it_accepted(
        tiny_predictor, tmp_path):
    """The load check, small: 4 senders x 6 images while the PACS is down; at most max_pending are accepted (the
    rest get 0xA700); the node is stopped and started again; the PACS comes up; every accepted image's SC and SR
    is in Orthanc, none lost, none twice. (benchmarks/bench_node.py runs it with 1,000 images.)"""
    analyser = Analyser(tiny_predictor)
    pacs_port, spool = free_port(), tmp_path / "spool"
    sent = [images(tmp_path / f"room{i}", 6, study=generate_uid()) for i in range(4)]
    statuses: list[list[int | None]] = [[] for _ in sent]
    destination = Destination(PACS_AET, "127.0.0.1", pacs_port)
    with DicomNode(analyser, aet=NODE_AET, port=0, send_to=destination, spool=spool, max_pending=7,
                   retry_delays=(0.2,)) as node:
        def room(i: int) -> None:
            statuses[i] = send(node.port, sent[i], aet=f"XRAY_ROOM_{i}")

        threads = [threading.Thread(target=room, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert all(len(s) == 6 for s in statuses)
        flat = [code for codes in statuses for code in codes]
        assert set(flat) <= {0x0000, OUT_OF_RESOURCES}, flat
        accepted = {ds.SOPInstanceUID for ds, code in zip((d for room in sent for d in room), flat, strict=True)
                    if code == 0x0000}
        assert len(accepted) == 7 and flat.count(OUT_OF_RESOURCES) == 24 - 7
        wait_for(lambda: len(node.spool.results()) == 7, "every accepted image analysed, its result on disk")
    orthanc = None
    try:
        (tmp_path / "orthanc").mkdir()
        orthanc = Orthanc(tmp_path / "orthanc", free_port(), pacs_port)
        with DicomNode(analyser, aet=NODE_AET, port=0, send_to=destination, spool=spool,
                       retry_delays=(0.2,)) as node:
            assert node.wait_idle(WAIT)
            assert {e.send_status for e in node.worklist()} == {"sent"} and len(node.worklist()) == 7
        stored = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.get("/instances")]
    finally:
        if orthanc is not None:
            orthanc.stop()
    assert len(stored) == 2 * len(accepted)
    sources = {item["ReferencedSOPInstanceUID"] for tags in stored if "SourceImageSequence" in tags
               for item in tags["SourceImageSequence"]}
    assert sources == accepted, "one SC per accepted image"
    assert set(analyser.count.values()) == {1}, "every accepted image analysed once, across the restart"
    assert not list(spool.glob("*/*")), "the spool is empty once everything is delivered"


def test_a_dead_destination_logs_when_it_goes_down_and_when_it_comes_back_not_each_attempt(
        tiny_predictor, tmp_path, caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger="dicom_node"), \
            DicomNode(Analyser(tiny_predictor), port=0, send_to=Destination("LATE", "127.0.0.1", port),
                      retry_delays=(0.02,)) as node:
        assert send(node.port, images(tmp_path, 3)) == [0, 0, 0]
        wait_for(lambda: node.worklist() and "attempt 30" in node.worklist()[-1].send_status,
                 "30 failed attempts")
        scp = AE(ae_title="LATE")
        scp.add_supported_context(dicom_node.SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        scp.add_supported_context(dicom_node.ComprehensiveSRStorage, ExplicitVRLittleEndian)
        server = scp.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
        try:
            assert node.wait_idle(WAIT)
        finally:
            server.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node" and r.levelno >= logging.WARNING]
    assert len([m for m in lines if "unreachable" in m]) == 1, lines
    back = [m for m in lines if "reachable again" in m]
    assert len(back) == 1 and "sending 3 held result(s)" in back[0], lines
    assert len(lines) == 2, lines


# ---------------------------------------------------------------- connections

def closed_by_the_node(sockets: list[socket.socket], expected: int = 0, within: float = 10.0) -> int:
    """How many of these connections the node has closed (recv sees the end, or a reset, within half a second),
    counted again until at least `expected` are or `within` seconds pass: on a loaded machine a close the node made
    at once can reach the client late. A closed socket keeps reading as closed, so counting again is safe."""
    deadline = time.monotonic() + within
    while True:
        closed = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        if closed >= expected or time.monotonic() > deadline:
            return closed


def test_silent_connections_from_one_address_cannot_take_every_slot(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), port=0, max_associations=10, max_per_peer=3,
                   connect_timeout=60) as node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(10)]
        try:
            # Beyond the per-peer limit the server closes the connection at once: recv sees the end.
            assert closed_by_the_node(silent, expected=10 - 3) == 10 - 3
            # The three silent ones still open hold no slot a modality needs (this one comes from the same address
            # only because the test has one; a modality has its own).
            for sock in silent:
                sock.close()
            assert echo(node.port)
        finally:
            for sock in silent:
                sock.close()


def test_silent_connections_are_evicted_so_a_modality_always_finds_a_slot(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), port=0, max_associations=4, max_per_peer=50,
                   connect_timeout=60) as node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(20)]
        try:
            assert closed_by_the_node(silent, expected=20 - 3) >= 20 - 3, "silent connections beyond max_associations - 1 evicted"
            for _ in range(3):
                assert echo(node.port)
        finally:
            for sock in silent:
                sock.close()


def test_a_connection_that_never_asks_for_an_association_is_closed_after_connect_timeout(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), port=0, connect_timeout=0.5) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.settimeout(WAIT)
            assert sock.recv(1) == b"", "the node closed the silent connection"


def test_the_called_ae_title_must_be_the_nodes_own(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), aet=NODE_AET, port=0) as node:
        assert echo(node.port, called=NODE_AET)
        assert not echo(node.port, called="OTHER_NODE")


# ---------------------------------------------------------------- an oversized data set

def test_an_oversized_data_set_is_refused_before_decoding_and_never_held_whole(tiny_predictor, tmp_path):
    """storescu (another process) sends 32 MiB to a node with a 4 MiB limit: 0xA700, and the node's own
    allocations (traced in this process) stay within a few times the limit, not the data set's size."""
    analyser = Analyser(tiny_predictor)
    big = radiograph(tmp_path / "big.dcm")
    side = 4096
    big.Rows = big.Columns = side
    big.BitsAllocated, big.BitsStored, big.HighBit = 16, 16, 15
    big.PixelData = np.random.default_rng(0).integers(0, 4096, (side, side), dtype=np.uint16).tobytes()  # 32 MiB
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    small = radiograph(tmp_path / "small.dcm")
    limit = 4 * 2**20
    with DicomNode(analyser, port=0, max_dataset_bytes=limit) as node:
        tracemalloc.start()
        try:
            result = storescu(node.port, tmp_path / "big.dcm", extra=("-v",))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr[-2000:]
        assert peak < 3 * limit, f"the node allocated {peak / 2**20:.0f} MiB at its peak"
        assert send(node.port, [small]) == [0x0000], "the node goes on"
        assert node.wait_idle(WAIT)
    assert dict(analyser.count) == {small.SOPInstanceUID: 1}


def test_a_pdu_claiming_more_than_the_pdu_limit_closes_the_connection_before_it_is_read(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), port=0) as node, \
            socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(WAIT)
        # An A-ASSOCIATE-RQ PDU header claiming 600 MB: the node closes instead of reading (and keeping) it.
        sock.sendall(bytes([0x01, 0x00]) + (600 * 2**20).to_bytes(4, "big") + b"\x00" * 1024)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert echo(node.port)


# ---------------------------------------------------------------- storage that fails

def test_a_full_disk_gets_a_failure_status_and_the_sender_retries_later(tiny_predictor, tmp_path, monkeypatch):
    analyser = Analyser(tiny_predictor)
    sent = images(tmp_path, 2)
    full = threading.Event()
    write = dicom_node._write_durably

    def disk(path: Path, data: bytes, tmp: Path | None) -> None:
        if full.is_set():
            Path("/dev/full").write_bytes(data)  # the kernel's ENOSPC
        write(path, data, tmp)

    monkeypatch.setattr(dicom_node, "_write_durably", disk)
    refusals = []  # what the app records in the results database (test_monitoring_web checks the rows)
    with DicomNode(analyser, port=0, spool=tmp_path / "spool", on_refusal=lambda *r: refusals.append(r)) as node:
        full.set()
        assert send(node.port, sent) == [OUT_OF_RESOURCES] * 2
        assert refusals == [("failed", "out of resources: spool cannot be written (0xA700)")] * 2
        full.clear()
        assert send(node.port, sent) == [0x0000] * 2, "the sender's retry is accepted once there is room"
        assert node.wait_idle(WAIT)
    assert dict(analyser.count) == {ds.SOPInstanceUID: 1 for ds in sent}


def test_a_results_store_that_cannot_save_keeps_the_image_and_refuses_new_ones_until_it_can(tiny_predictor,
                                                                                             tmp_path):
    inner = Analyser(tiny_predictor)
    read_only = threading.Event()
    attempts: list[str] = []

    def analyse(received):
        if read_only.is_set():
            attempts.append("refused")
            raise OSError(errno.EROFS, "Read-only file system")  # what ResultStore.save raises there
        return inner(received)

    first, second = images(tmp_path, 2)
    read_only.set()
    refusals = []
    with DicomNode(analyse, port=0, retry_delays=(0.05,), on_refusal=lambda *r: refusals.append(r)) as node:
        assert send(node.port, [first]) == [0x0000], "stored durably in the spool before the answer"
        wait_for(lambda: attempts, "an analysis that cannot save")
        assert send(node.port, [second]) == [OUT_OF_RESOURCES]
        assert refusals == [("failed", "out of resources: results cannot be saved (0xA700)")]
        read_only.clear()
        assert node.wait_idle(WAIT)
        assert send(node.port, [second]) == [0x0000]
        assert node.wait_idle(WAIT)
    assert dict(inner.count) == {first.SOPInstanceUID: 1, second.SOPInstanceUID: 1}, "nothing lost"


# ---------------------------------------------------------------- logs

def association_request(calling: bytes, called: bytes = NODE_AET.encode()) -> bytes:
    """An A-ASSOCIATE-RQ PDU with raw AE title bytes (pynetdicom's own encoder, then the fields replaced)."""
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title, primitive.called_ae_title = "A" * 16, "B" * 16
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    primitive.maximum_length_received = 16382
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = pdu.encode()
    return data.replace(b"A" * 16, calling.ljust(16)[:16]).replace(b"B" * 16, called.ljust(16)[:16])


def test_control_characters_in_an_ae_title_never_reach_the_logs(tiny_predictor, caplog):
    forged = b"X\nFORGED: admin\x1b["
    with caplog.at_level(logging.DEBUG), DicomNode(Analyser(tiny_predictor), port=0) as node, \
            socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(WAIT)
        sock.sendall(association_request(forged))
        with contextlib.suppress(ConnectionResetError):  # the node may abort rather than reject
            while sock.recv(4096):
                pass
    messages = [r.getMessage() for r in caplog.records]
    assert any("FORGED" in m for m in messages), "pynetdicom logged the title (escaped)"
    assert not [m for m in messages if "\n" in m or "\x1b" in m or "\r" in m], messages
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks from pynetdicom's threads"

