"""The PACS side of the DICOM node's tests: Debian's Orthanc on loopback, dcmtk's storescu as the X-ray machine,
real NIH radiographs as small DX files, and the analyse callback built on today's Predictor."""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from chestxray.pacs.node import Analysis, Received
from chestxray.reporting.dicom import ReportContent
from support.data import NIH_PNG
from support.hostile import SECRET_ID, SECRET_INSTITUTION, SECRET_NAME

ORTHANC = shutil.which("Orthanc")
STORESCU = shutil.which("storescu")
if not (ORTHANC and STORESCU and shutil.which("echoscu")):
    raise RuntimeError("the PACS tests need Debian's orthanc and dcmtk: run `make pacs` "
                       "(apt-get install orthanc dcmtk)")

NODE_AET, PACS_AET, MODEL_NAME = "CXR_AI", "ORTHANC", "resnet18 tiny test model"
WAIT = 180  # seconds: generous, the machine is shared; no test asserts a duration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Analyser:
    """The node's analyse callback: today's Predictor; counts how often each SOP instance is analysed."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.count: Counter[str] = Counter()
        self.syntax: dict[str, str] = {}  # the transfer syntax each instance arrived in
        self.lock = threading.Lock()

    def __call__(self, received: Received) -> Analysis:
        ds = pydicom.dcmread(io.BytesIO(received.data), stop_before_pixels=True)  # the syntax as it arrived
        prediction = self.predictor.predict_batch([received.dicom.image], formats=["DICOM"])[0]
        with self.lock:
            self.count[str(ds.SOPInstanceUID)] += 1
            self.syntax[str(ds.SOPInstanceUID)] = ds.file_meta.TransferSyntaxUID
        return Analysis(result_id=uuid.uuid4().hex[:12], in_scope=ds.get("Modality") in ("CR", "DX"),
                        content=ReportContent.from_prediction(prediction, model_name=MODEL_NAME))


def radiograph(path: Path, size: int = 64, study: str | None = None) -> pydicom.Dataset:
    """A real NIH radiograph as a small uncompressed DX file with patient data filled in (new UIDs); written to path."""
    pixels = np.asarray(Image.open(NIH_PNG).convert("L").resize((size, size), Image.Resampling.BILINEAR))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.InstitutionName = SECRET_NAME, SECRET_ID, SECRET_INSTITUTION
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19010203", "F", "20260101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 1, 1, ["L", "F"]
    ds.ImageType, ds.PresentationIntentType = ["ORIGINAL", "PRIMARY"], "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def storescu(port: int, *files: Path, aet: str = "XRAY_ROOM_1", propose: str = "-xy",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """dcmtk's storescu, as an X-ray machine would send; -xy proposes JPEG baseline (the compressed sample) too."""
    return subprocess.run([STORESCU, propose, "-aet", aet, "-aec", NODE_AET, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=WAIT)


class Orthanc:
    """Debian's Orthanc on loopback with a generated configuration; REST helpers for the checks."""

    def __init__(self, folder: Path, node_port: int, dicom_port: int, extra: dict | None = None) -> None:
        self.http_port, self.dicom_port = free_port(), dicom_port
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "test-pacs", "DicomAet": PACS_AET, "DicomPort": dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {"cxrai": [NODE_AET, "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "StableAge": 1, "LogExportedResources": False,
        } | (extra or {})
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}") from None
                time.sleep(0.2)

    def request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=WAIT) as response:
            return response.read()

    def get(self, path: str):
        return json.loads(self.request(path))

    def post(self, path: str, data: bytes | str):
        return json.loads(self.request(path, data if isinstance(data, bytes) else data.encode(), "POST"))

    def study_instances(self, study_uid: str) -> list[dict]:
        """The instances Orthanc holds in the study with this Study Instance UID (empty when none)."""
        found = [item for item in self.post("/tools/lookup", study_uid) if item["Type"] == "Study"]
        if not found:
            return []
        return [self.get(f"/instances/{item['ID']}/simplified-tags") | {"ID": item["ID"]}
                for item in self.get(f"/studies/{found[0]['ID']}/instances")]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
