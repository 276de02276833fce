"""The DICOM node (chestxray/pacs/node.py) against a real PACS: Debian's Orthanc (started here on loopback), dcmtk's
storescu as the X-ray machine.

The analyse callback is built on today's Predictor with the tiny checkpoint; "in scope" is a field it returns (here:
the modality is CR or DX) until the in-scope check of the web app lands.
"""
from __future__ import annotations

import io
import logging
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from support import forked
from support.data import DICOM_MONO1, DICOM_MONO2
from support.hostile import SECRET_ID, SECRET_INSTITUTION, SECRET_NAME, identified_dicom
from support.pacs import (
    MODEL_NAME,
    NODE_AET,
    PACS_AET,
    WAIT,
    Analyser,
    Orthanc,
    free_port,
    radiograph,
    storescu,
)

from chestxray.labels import LABELS
from chestxray.pacs.node import Analysis, Destination, DicomNode

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))
SECRETS = (SECRET_NAME, SECRET_ID, SECRET_INSTITUTION)


@pytest.fixture(scope="module")
def pacs(tiny_predictor, tmp_path_factory):
    """A node sending to an Orthanc that knows the node as modality 'cxrai'. Yields (node, orthanc, analyser)."""
    analyser = Analyser(tiny_predictor)
    dicom_port = free_port()
    node = DicomNode(analyser, aet=NODE_AET, port=0, send_to=Destination(PACS_AET, "127.0.0.1", dicom_port),
                     retry_delays=(1.0, 2.0, 4.0)).start()
    orthanc = None
    try:
        orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), node.port, dicom_port)
        yield node, orthanc, analyser
    finally:
        node.stop()
        if orthanc is not None:
            orthanc.stop()


def by_result(node: DicomNode) -> dict[str, object]:
    return {entry.result_id: entry for entry in node.worklist()}


def check_results_in_study(orthanc: Orthanc, source: pydicom.Dataset, expected_instances: int,
                           results: int = 1) -> None:
    """Orthanc holds `results` SC and SR pairs from the node in the source's study, with the expected tags."""
    instances = orthanc.study_instances(source.StudyInstanceUID)
    assert len(instances) == expected_instances, [i["SOPClassUID"] for i in instances]
    ours = [i for i in instances if i["SOPInstanceUID"] != source.SOPInstanceUID]
    assert sorted(i["SOPClassUID"] for i in ours) == sorted([SecondaryCaptureImageStorage, ComprehensiveSRStorage]
                                                             * results)
    for tags in ours:
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["PatientID"] == source.PatientID and tags["PatientName"] == str(source.PatientName)
        assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID
        assert MODEL_NAME in tags["SeriesDescription"]
    sc = next(i for i in ours if i["SOPClassUID"] == SecondaryCaptureImageStorage)
    assert sc["Modality"] == "OT"
    # Orthanc decodes the stored SC to a PNG: proof another reader than pydicom decodes our pixels.
    preview = Image.open(io.BytesIO(orthanc.request(f"/instances/{sc['ID']}/preview")))
    rows, columns = int(sc["Rows"]), int(sc["Columns"])
    assert preview.size == (columns, rows)
    # The radiograph keeps its size (a small one gets a taller canvas for the text panel).
    assert rows >= source.Rows and columns > source.Columns
    stored = pydicom.dcmread(io.BytesIO(orthanc.request(f"/instances/{sc['ID']}/file")))
    assert stored.pixel_array.shape == (rows, columns, 3)
    np.testing.assert_array_equal(np.asarray(preview.convert("RGB")), stored.pixel_array)
    sr = next(i for i in ours if i["SOPClassUID"] == ComprehensiveSRStorage)
    report = pydicom.dcmread(io.BytesIO(orthanc.request(f"/instances/{sr['ID']}/file")))
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in report.ContentSequence]
    assert set(LABELS) <= set(names)
    image = next(item for item in report.ContentSequence if item.ValueType == "IMAGE")
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_the_node_answers_c_echo(pacs):
    node, _, _ = pacs
    result = subprocess.run(["echoscu", "-aec", NODE_AET, "127.0.0.1", str(node.port)], capture_output=True,
                            text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr


def test_storescu_radiographs_come_back_to_the_pacs_as_sc_and_sr_in_their_study(pacs, tmp_path, caplog):
    node, orthanc, analyser = pacs
    caplog.set_level(logging.DEBUG)
    made = radiograph(tmp_path / "dx.dcm", size=96)
    files = [DICOM_MONO2, DICOM_MONO1, tmp_path / "dx.dcm"]  # the shared sample's two CR files + a DX
    before = set(by_result(node))
    result = storescu(node.port, *files)
    assert result.returncode == 0, result.stderr
    assert node.wait_idle(WAIT)
    new = [entry for rid, entry in by_result(node).items() if rid not in before]
    assert len(new) == 3
    assert all(e.send_status == "sent" and e.in_scope for e in new), new
    assert sorted(e.modality for e in new) == ["CR", "CR", "DX"]
    for entry in new:
        assert entry.top_probability is not None and 0 <= entry.top_probability <= 1
        assert set(entry.calls) <= set(LABELS)
    shared = pydicom.dcmread(DICOM_MONO2, stop_before_pixels=True)
    # The MONOCHROME1 copy keeps the original's UIDs: two results for one source instance, both kept.
    assert pydicom.dcmread(DICOM_MONO1, stop_before_pixels=True).SOPInstanceUID == shared.SOPInstanceUID
    check_results_in_study(orthanc, shared, expected_instances=4, results=2)
    check_results_in_study(orthanc, made, expected_instances=2)
    # dcmtk's own SR reader accepts the report Orthanc stored.
    sr = next(i for i in orthanc.study_instances(made.StudyInstanceUID) if i["Modality"] == "SR")
    (tmp_path / "sr.dcm").write_bytes(orthanc.request(f"/instances/{sr['ID']}/file"))
    dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=WAIT)
    assert dump.returncode == 0 and "Cardiomegaly" in dump.stdout and "Probability" in dump.stdout, dump.stderr
    # Privacy: patient data went back to the PACS inside DICOM, and nowhere else.
    for secret in (*SECRETS, str(shared.PatientID)):
        assert secret not in caplog.text and secret not in repr(node.worklist())


def test_a_study_pushed_by_the_pacs_comes_back_with_results(pacs, tmp_path):
    node, orthanc, analyser = pacs
    source = radiograph(tmp_path / "push.dcm", size=64)
    uploaded = orthanc.post("/instances", (tmp_path / "push.dcm").read_bytes())
    study = uploaded["ParentStudy"]
    before = len(node.worklist())
    # What an auto-forward rule does: Orthanc's C-STORE SCU sends the study to the node.
    orthanc.post("/modalities/cxrai/store", study)
    assert node.wait_idle(WAIT)
    assert analyser.count[source.SOPInstanceUID] == 1
    assert len(node.worklist()) == before + 1 and node.worklist()[0].send_status == "sent"
    check_results_in_study(orthanc, source, expected_instances=3)


@pytest.mark.slow(6)
def test_the_pacs_guides_orthanc_auto_forward_sends_new_radiographs_and_does_not_loop(tiny_predictor, tmp_path):
    """docs/PACS.md's Lua script: an image stored in Orthanc goes to the node; the results stored back are not sent."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "PACS.md").read_text()
    lua = guide.split("```lua\n", 1)[1].split("```", 1)[0]
    assert "SendToModality" in lua
    (tmp_path / "forward.lua").write_text(lua)
    analyser = Analyser(tiny_predictor)
    dicom_port = free_port()
    with DicomNode(analyser, port=0, send_to=Destination(PACS_AET, "127.0.0.1", dicom_port)) as node:
        orthanc = Orthanc(tmp_path, node.port, dicom_port, {"LuaScripts": [str(tmp_path / "forward.lua")]})
        try:
            source = radiograph(tmp_path / "new.dcm")
            orthanc.post("/instances", (tmp_path / "new.dcm").read_bytes())
            deadline = time.monotonic() + WAIT
            while len(orthanc.study_instances(source.StudyInstanceUID)) < 3:
                assert time.monotonic() < deadline, orthanc.study_instances(source.StudyInstanceUID)
                time.sleep(0.2)
            assert node.wait_idle(WAIT)
            time.sleep(2)  # room for a loop to show: a forwarded result would be analysed again
            assert node.wait_idle(WAIT)
            check_results_in_study(orthanc, source, expected_instances=3)
        finally:
            orthanc.stop()
    assert dict(analyser.count) == {source.SOPInstanceUID: 1}


def test_a_ct_slice_is_received_but_out_of_scope_and_nothing_is_sent(pacs):
    node, orthanc, analyser = pacs
    ct = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    result = storescu(node.port, CT_SMALL)
    assert result.returncode == 0, result.stderr
    assert node.wait_idle(WAIT)
    assert analyser.count[ct.SOPInstanceUID] >= 1
    entry = node.worklist()[0]
    assert entry.modality == "CT" and entry.in_scope is False and entry.calls == ()
    assert entry.send_status == "not sent: out of scope"
    assert orthanc.study_instances(ct.StudyInstanceUID) == []


def garbage(path: Path) -> pydicom.Dataset:
    """A well-formed header whose pixel data is cut short: the reader refuses it."""
    ds = identified_dicom()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = b"\x00" * 100  # 1024 x 1024 declared
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_garbage_and_unsupported_sop_classes_get_failure_statuses_and_the_node_keeps_serving(pacs, tmp_path, caplog):
    node, _, analyser = pacs
    caplog.set_level(logging.DEBUG)
    analysed = sum(analyser.count.values())
    bad = garbage(tmp_path / "garbage.dcm")
    ae = AE(ae_title="XRAY_ROOM_2")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        # MR is refused at negotiation: presentation context result 3, "abstract syntax not supported" (PS3.8 9.3.3.2).
        refused = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == MRImageStorage]
        assert len(refused) == 1 and refused[0].result == 0x03
        status = assoc.send_c_store(bad)
        assert status.Status == 0xC000  # cannot understand
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    # The same through storescu: failures reported, the node unhurt.
    mr = storescu(node.port, MR_SMALL)
    assert mr.returncode != 0 and "No presentation context" in mr.stderr
    garbage_run = storescu(node.port, tmp_path / "garbage.dcm", extra=("-v",))
    assert garbage_run.returncode != 0 and "Received Store Response (Error: CannotUnderstand)" in garbage_run.stderr
    echo = subprocess.run(["echoscu", "-aec", NODE_AET, "127.0.0.1", str(node.port)], capture_output=True, timeout=WAIT)
    assert echo.returncode == 0
    assert node.wait_idle(WAIT) and sum(analyser.count.values()) == analysed
    refusals = [r.getMessage() for r in caplog.records if r.name == "dicom_node" and "refused" in r.getMessage()]
    assert refusals and all("truncated or corrupt" in message for message in refusals)
    assert not [s for s in (*SECRETS, bad.SOPInstanceUID) if s in caplog.text]


def test_only_allowed_calling_ae_titles_may_connect(tiny_predictor):
    with DicomNode(Analyser(tiny_predictor), port=0, allow=["XRAY_ROOM_1", "PACS"]) as node:
        def echo(aet: str) -> int:
            return subprocess.run(["echoscu", "-aet", aet, "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                                  capture_output=True, timeout=WAIT).returncode
        assert echo("XRAY_ROOM_1") == 0 and echo("PACS") == 0
        assert echo("INTRUDER") != 0


def test_a_failed_send_is_retried_in_the_background_and_then_succeeds(tiny_predictor, tmp_path):
    """The PACS is down at first: the status shows the retry, reception goes on, and the result arrives later."""
    port = free_port()
    received: list[pydicom.Dataset] = []
    with DicomNode(Analyser(tiny_predictor), port=0, send_to=Destination("LATE_PACS", "127.0.0.1", port),
                   retry_delays=(0.5,) * 200) as node:
        first = radiograph(tmp_path / "a.dcm")
        assert storescu(node.port, tmp_path / "a.dcm").returncode == 0
        deadline = time.monotonic() + WAIT
        while not node.worklist() or not node.worklist()[0].send_status.startswith("retrying"):
            assert time.monotonic() < deadline, node.worklist()
            time.sleep(0.1)
        # Reception is not blocked by the pending send.
        radiograph(tmp_path / "b.dcm")
        assert storescu(node.port, tmp_path / "b.dcm").returncode == 0
        # Now the PACS comes up.
        scp = AE(ae_title="LATE_PACS")
        scp.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        scp.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
        server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda event: received.append(event.dataset) or 0x0000)])
        try:
            assert node.wait_idle(WAIT)
        finally:
            server.shutdown()
        assert [e.send_status for e in node.worklist()] == ["sent", "sent"]
    assert len(received) == 4 and first.StudyInstanceUID in {ds.StudyInstanceUID for ds in received}


def test_a_result_the_destination_keeps_refusing_ends_as_failed_on_the_worklist(tiny_predictor, tmp_path):
    """The destination answers, but refuses the result (a failure status): retried on its schedule, then given up.

    (A destination that cannot be reached is different: its results wait, see test_hostile_node.py.)"""
    port = free_port()
    scp = AE(ae_title="PICKY_PACS")
    scp.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    scp.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA900)])
    try:
        with DicomNode(Analyser(tiny_predictor), port=0, send_to=Destination("PICKY_PACS", "127.0.0.1", port),
                       retry_delays=(0.1, 0.1)) as node:
            radiograph(tmp_path / "a.dcm")
            assert storescu(node.port, tmp_path / "a.dcm").returncode == 0
            assert node.wait_idle(WAIT)
            status = node.worklist()[0].send_status
            assert not list(node.spool.outbox.iterdir()), "a result given up is not kept"
    finally:
        server.shutdown()
    assert status.startswith("failed after 3 attempts") and "store status 0xA900" in status


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow(5)
def test_four_machines_sending_25_images_each_at_once_lose_nothing(tiny_predictor, tmp_path):
    analyser = Analyser(tiny_predictor)
    folders = []
    for machine in range(4):
        folder = tmp_path / f"machine{machine}"
        folder.mkdir()
        study = generate_uid()
        for i in range(25):
            radiograph(folder / f"{i:02d}.dcm", study=study)
        folders.append(folder)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for f in folders for p in f.iterdir()}
    assert len(sent) == 100
    with DicomNode(analyser, port=0) as node:
        # Warm up (first-call allocations), then measure the growth over the 100 images.
        warm = tmp_path / "warm.dcm"
        radiograph(warm)
        assert storescu(node.port, warm).returncode == 0 and node.wait_idle(WAIT)
        baseline = rss_bytes()
        results: list[subprocess.CompletedProcess] = [None] * 4  # type: ignore[list-item]

        def send(i: int) -> None:
            results[i] = storescu(node.port, *sorted(folders[i].iterdir()), aet=f"XRAY_ROOM_{i}")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
        assert node.wait_idle(WAIT)
        growth = rss_bytes() / baseline - 1
        entries = node.worklist()
    counts = {uid: analyser.count[uid] for uid in sent}
    assert set(counts.values()) == {1}, "every image analysed exactly once"
    assert len(entries) == 101 and len({e.result_id for e in entries}) == 101
    assert growth < 0.20, f"RSS grew by {growth:.0%}"


@pytest.mark.parametrize("syntax, option", [
    (ImplicitVRLittleEndian, "-xi"), (DeflatedExplicitVRLittleEndian, "-xd"), (RLELossless, "-xr"),
    (JPEG2000Lossless, "-xv"),
])
def test_each_transfer_syntax_the_reader_decodes_is_accepted(tiny_predictor, tmp_path, syntax, option):
    """storescu sends the file in its own transfer syntax (compressed ones encoded here with pydicom)."""
    analyser = Analyser(tiny_predictor)
    ds = radiograph(tmp_path / "plain.dcm")
    if syntax.is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "sent.dcm", enforce_file_format=True)
    with DicomNode(analyser, port=0) as node:
        result = storescu(node.port, tmp_path / "sent.dcm", propose=option)
        assert result.returncode == 0, result.stderr
        assert node.wait_idle(WAIT)
        assert node.worklist()[0].send_status == "not sent: no destination configured"
    assert analyser.count[ds.SOPInstanceUID] == 1 and analyser.syntax[ds.SOPInstanceUID] == syntax


@pytest.mark.parametrize("text, expected", [
    ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
    ("PACS@pacs.example.org:104", Destination("PACS", "pacs.example.org", 104)),
])
def test_destination_parses_aet_at_host_colon_port(text, expected):
    assert Destination.parse(text) == expected and str(expected) == text


@pytest.mark.parametrize("text", ["ORTHANC", "127.0.0.1:4242", "@host:1", "A@host", "A@host:0", "A@host:x",
                                  "A_VERY_LONG_AE_TITLE_X@host:104"])
def test_a_bad_destination_says_the_expected_form(text):
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        Destination.parse(text)


def test_a_full_spool_answers_out_of_resources_so_the_sender_keeps_the_image(tiny_predictor, tmp_path):
    gate = threading.Event()
    inner = Analyser(tiny_predictor)

    def slow(received) -> Analysis:
        gate.wait(WAIT)  # the worker is busy until the test opens the gate
        return inner(received)

    images = [radiograph(tmp_path / f"{i}.dcm") for i in range(3)]
    with DicomNode(slow, port=0, max_pending=2, timeout=2.0) as node:
        ae = AE(ae_title="XRAY_ROOM_3")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            # The worker holds the first, the spool the second, the third finds no room.
            statuses = [assoc.send_c_store(ds).Status for ds in images]
        finally:
            assoc.release()
        gate.set()
        assert node.wait_idle(WAIT)
    assert statuses == [0x0000, 0x0000, 0xA700]
    assert dict(inner.count) == {images[0].SOPInstanceUID: 1, images[1].SOPInstanceUID: 1}


# ---------------------------------------------------------------- the web app's side: main.py --dicom-port


def identified_file(path: Path) -> pydicom.Dataset:
    """The real CR with patient data filled in (tests/support/hostile.py), new UIDs, written to path."""
    ds = identified_dicom()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return ds


def leaked(blob: str | bytes) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [s for s in SECRETS if s.encode() in data]


@pytest.fixture
def web(tiny_checkpoint, tmp_path):
    """The web app with a DICOM node started as main.py starts it (flags parsed by main's parser)."""
    import main
    from chestxray.web import create_app, worklist

    app = create_app({"TESTING": True, "CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cpu",
                           "SECRET_KEY": "test", "RESULTS_DIR": str(tmp_path / "results"),
                           "INSTANCE_PATH": str(tmp_path / "instance")})
    args = main.get_args_parser().parse_args(["--dicom-port", "0", "--dicom-aet", NODE_AET,
                                              "--instance-dir", str(tmp_path / "instance")])
    node = worklist.start_node(app, args)
    try:
        yield app, node
    finally:
        node.stop()


def test_a_received_image_is_saved_like_an_upload_and_listed_on_the_worklist(web, tmp_path, caplog):
    app, node = web
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    assert "Nothing received yet" in client.get("/worklist").get_data(as_text=True)
    identified_file(tmp_path / "cr.dcm")
    radiograph(tmp_path / "dx.dcm")
    ct = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    for path in (tmp_path / "cr.dcm", tmp_path / "dx.dcm", CT_SMALL):
        assert storescu(node.port, path).returncode == 0
    assert node.wait_idle(WAIT)
    entries = node.worklist()
    assert [e.modality for e in entries] == ["CT", "DX", "CR"]  # newest first
    assert [e.in_scope for e in entries] == [False, True, True] and entries[0].calls == ()
    store = app.extensions["chestxray.results"]
    page = client.get("/worklist")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for entry in entries:
        # The same saved result as an upload: its page and JSON answer.
        record = store.load(entry.result_id)
        assert [row["label"] for row in record["labels"]] == list(LABELS)
        assert record["source"] == "dicom-node"  # its own retention source, never an address or a patient
        assert client.get(f"/results/{entry.result_id}").status_code == 200
        assert client.get(f"/api/results/{entry.result_id}").status_code == 200
        assert f'href="/results/{entry.result_id}"' in html
        assert entry.send_status == "not sent: no destination configured" or not entry.in_scope
    # Newest first by default; by the highest probability on request.
    positions = [html.index(e.result_id) for e in entries]
    assert positions == sorted(positions)
    by_probability = client.get("/worklist?sort=probability").get_data(as_text=True)
    ordered = sorted(entries, key=lambda e: -e.top_probability)
    positions = [by_probability.index(e.result_id) for e in ordered]
    assert positions == sorted(positions)
    assert ct.Modality in html and "out of scope" in html
    # Privacy: nothing from the header on the pages, in the results folder or in the logs.
    everything = [html.encode(), by_probability.encode(), caplog.text.encode()]
    everything += [p.read_bytes() for p in Path(app.config["RESULTS_DIR"]).rglob("*") if p.is_file()]
    everything += [client.get(f"/api/results/{e.result_id}").data for e in entries]
    assert not [leaked(blob) for blob in everything if leaked(blob)]


def test_a_failed_send_is_visible_on_the_worklist(tiny_checkpoint, tmp_path):
    from chestxray.web import create_app

    app = create_app({"TESTING": True, "CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cpu",
                           "SECRET_KEY": "test", "RESULTS_DIR": str(tmp_path / "results"),
                           "INSTANCE_PATH": str(tmp_path / "instance")})
    from chestxray.pacs.node import analyser

    state = app.extensions["chestxray"]
    with DicomNode(analyser(state.predictor, app.extensions["chestxray.results"]), port=0,
                   send_to=Destination("NOBODY", "127.0.0.1", free_port()), retry_delays=(0.1,)) as node:
        app.extensions["dicom_node"] = node
        radiograph(tmp_path / "dx.dcm")
        assert storescu(node.port, tmp_path / "dx.dcm").returncode == 0
        deadline = time.monotonic() + WAIT  # the destination stays down: the result waits in the spool
        while not (node.worklist() and node.worklist()[0].send_status.startswith("retrying")):
            assert time.monotonic() < deadline, node.worklist()
            time.sleep(0.05)
        html = app.test_client().get("/worklist").get_data(as_text=True)
    assert 'class="problem"' in html and "retrying in" in html and "no association" in html


@pytest.mark.parametrize("flags, message", [
    (["--dicom-send", "ORTHANC:4242"], "AET@HOST:PORT"),
    (["--dicom-aet", "A_TITLE_LONGER_THAN_16"], "1 to 16 characters"),
    (["--checkpoint", "missing.pth"], "the DICOM node needs a loaded model"),
])
def test_main_refuses_bad_dicom_settings_and_says_why(tiny_checkpoint, tmp_path, capsys, flags, message):
    import main

    args = main.get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--port", "0", "--device", "cpu",
                                              "--results-dir", str(tmp_path), "--dicom-port", "0",
                                              "--instance-dir", str(tmp_path / "instance"), *flags])
    assert main.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow(7)
def test_a_real_server_with_a_dicom_node_never_shows_patient_data(tiny_checkpoint, tmp_path):
    """python main.py --dicom-port: receive an identified image, open the worklist and the result; read the console."""
    import re
    import sys

    root = Path(__file__).resolve().parents[1]
    console = tmp_path / "console.log"
    cmd = [sys.executable, str(root / "main.py"), "--checkpoint", str(tiny_checkpoint), "--port", "0",
           "--results-dir", str(tmp_path / "results"), "--device", "cpu", "--dicom-port", "0",
           "--dicom-send", f"{PACS_AET}@127.0.0.1:{free_port()}", "--instance-dir", str(tmp_path / "instance")]
    proc = forked.popen(cmd, cwd=root, stdout=console)
    try:
        deadline = time.monotonic() + WAIT
        while not (re.search(r"listening on 127\.0\.0\.1:(\d+)", console.read_text())
                   and re.search(r"http://127\.0\.0\.1:(\d+)/", console.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, console.read_text()
            time.sleep(0.2)
        text = console.read_text()
        dicom_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
        http_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", text).group(1))
        url = f"http://127.0.0.1:{http_port}"
        identified_file(tmp_path / "cr.dcm")
        garbage(tmp_path / "garbage.dcm")
        assert storescu(dicom_port, tmp_path / "cr.dcm").returncode == 0
        assert storescu(dicom_port, tmp_path / "garbage.dcm").returncode != 0
        while "/results/" not in (html := urllib.request.urlopen(url + "/worklist", timeout=WAIT).read().decode()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rid = re.search(r'href="/results/([0-9a-f]{32})"', html).group(1)
        pages = [html, urllib.request.urlopen(f"{url}/results/{rid}", timeout=WAIT).read().decode()]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    output = console.read_text()
    assert "refused" in output  # the garbage file's log line is there, without patient data
    assert not leaked(output) and not [leaked(p) for p in pages if leaked(p)]
    files = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert files and not [p for p in files if leaked(p.read_bytes())]


@pytest.mark.parametrize("verdict, expected", [(None, True), (True, True), (False, False)])
def test_the_analyser_refuses_a_radiograph_only_when_the_in_scope_check_says_so(tiny_predictor, tmp_path, verdict,
                                                                                 expected):
    """in_scope None (a checkpoint without scope statistics) is no verdict: a DX radiograph stays in scope."""
    from types import SimpleNamespace

    from chestxray.pacs.node import Received, analyser

    radiograph(tmp_path / "dx.dcm")
    real = tiny_predictor.predict((tmp_path / "dx.dcm").read_bytes())
    prediction = SimpleNamespace(**{name: getattr(real, name) for name in dir(real) if not name.startswith("__")})
    prediction.in_scope = verdict
    predictor = SimpleNamespace(predict_batch=lambda images, formats: [prediction],
                                meta=getattr(tiny_predictor, "meta", None))
    store = SimpleNamespace(save=lambda pred, source, protect: {"id": "r1"})
    received = Received.parse((tmp_path / "dx.dcm").read_bytes())
    assert analyser(predictor, store)(received).in_scope is expected


def test_a_received_image_is_parsed_once_from_reception_to_its_dicom_result(tiny_predictor, tmp_path, monkeypatch):
    """The node reads a C-STORE's data set once (header and image) and hands that parse on: to the model, to the
    results database's image facts and to the Secondary Capture + SR it builds; pynetdicom never decodes it."""
    import pynetdicom.events

    from chestxray.pacs.node import analyser
    from chestxray.results import ResultStore
    from chestxray.store import image_facts

    radiograph(tmp_path / "dx.dcm")
    parses, facts = [], []
    dcmread, decode = pydicom.dcmread, pynetdicom.events.decode
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append("pydicom") or dcmread(*a, **k))
    monkeypatch.setattr(pynetdicom.events, "decode", lambda *a, **k: parses.append("pynetdicom") or decode(*a, **k))

    class Monitor:
        def answered(self, prediction, source, started, data, result_id):
            facts.append(image_facts(data, prediction.to_dict()["format"]))

        def refused(self, source, started, exc):
            raise AssertionError(f"the image was refused: {exc}")

    analyse = analyser(tiny_predictor, ResultStore(tmp_path / "results", 10), Monitor())
    down = Destination("DOWN", "127.0.0.1", free_port())  # nothing listens: results are built and kept, not sent
    with DicomNode(analyse, port=0, send_to=down, retry_delays=(60.0,)) as node:
        assert storescu(node.port, tmp_path / "dx.dcm").returncode == 0
        deadline = time.monotonic() + WAIT
        while not node.worklist() and time.monotonic() < deadline:
            time.sleep(0.05)
        entry = node.worklist()[0]
    assert entry.result_id and not entry.send_status.startswith("failed"), entry.send_status  # SC + SR were built
    assert facts == [{"bit_depth": 8, "photometric": "MONOCHROME2"}]
    assert parses == ["pydicom"]


def test_over_the_memory_budget_the_worker_reads_the_image_back_from_the_spool(tiny_predictor, tmp_path, monkeypatch):
    from chestxray.pacs import node as dicom_node

    monkeypatch.setattr(dicom_node, "MAX_HELD_BYTES", 0)  # nothing is handed over in memory
    analyser = Analyser(tiny_predictor)
    ds = radiograph(tmp_path / "dx.dcm")
    with DicomNode(analyser, port=0) as node:
        assert storescu(node.port, tmp_path / "dx.dcm").returncode == 0
        assert node.wait_idle(WAIT)
        entry = node.worklist()[0]
    assert analyser.count[ds.SOPInstanceUID] == 1 and entry.result_id
    assert entry.send_status == "not sent: no destination configured"
