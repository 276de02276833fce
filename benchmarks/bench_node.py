"""Load check of the DICOM node with its destination down: bounded memory, refusals with a failure status, and
every accepted image's result delivered once the destination returns (counted in Orthanc).

    .venv/bin/python benchmarks/bench_node.py [--images 1000] [--senders 4] [--max-pending 200] [--size 512]
        [--out benchmarks/results/node.md]

Starts `python main.py --dicom-port P --dicom-send ORTHANC@127.0.0.1:Q` (a random-weight ResNet-18 at 224 px) with
nothing listening on Q, then:
1. one image, then reads the server's resident memory (VmRSS): the baseline;
2. --senders threads send --images real NIH radiographs (as DX files, --size px, patient data filled in) in one
   association each, recording every C-STORE status, while a watcher samples the server's VmRSS (the peak);
3. starts Debian's Orthanc on Q and waits until the node's spool is empty;
4. counts, in Orthanc, the Secondary Captures and SRs and which images they reference.
Goals: only 0x0000 and 0xA700 answered; at most --max-pending accepted; the peak within the documented bound
(baseline + max_associations x max data set, docs/RELIABILITY.md); every accepted image has its SC and SR in
Orthanc, and nothing else is there. Exit code 0 when all are met. Only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, livesite

sys.path.insert(0, str(ROOT / "tests"))  # support.pacs (Orthanc, radiograph) lives with the tests
import pydicom  # noqa: E402
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE  # noqa: E402
from support.checkpoints import make_checkpoint  # noqa: E402
from support.pacs import Orthanc, radiograph  # noqa: E402

from chestxray.pacs import node as dicom_node  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="C-STOREs in all (default: %(default)s)")
    parser.add_argument("--senders", type=int, default=4, help="sending machines at once (default: %(default)s)")
    parser.add_argument("--max-pending", type=int, default=200,
                        help="the node's --dicom-max-pending (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="radiograph side in pixels (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for delivery (default: "
                        "%(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "node.md"),
                        help="markdown file for the figures (default: %(default)s)")
    return parser


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def send(port: int, files: list[Path], aet: str, statuses: list) -> None:
    ae = AE(ae_title=aet)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=dicom_node.DEFAULT_AET)
    try:
        for path in files:
            if not assoc.is_established:  # refused, or lost: the rest is counted unanswered (None)
                statuses.append(None)
                continue
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        if assoc.is_established:
            assoc.release()


def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-node-"))
    checkpoint = make_checkpoint(tmp / "model.pth", image_size=224)
    folders = [tmp / f"room{i}" for i in range(args.senders)]
    per = [args.images // args.senders + (i < args.images % args.senders) for i in range(args.senders)]
    uids: dict[str, Path] = {}
    for folder, count in zip(folders, per, strict=True):
        folder.mkdir()
        for j in range(count):
            ds = radiograph(folder / f"{j:04d}.dcm", size=args.size)
            uids[str(ds.SOPInstanceUID)] = folder / f"{j:04d}.dcm"
    warm = tmp / "warm.dcm"
    radiograph(warm, size=args.size)
    node_port, pacs_port = livesite.free_port(), livesite.free_port()
    spool = tmp / "spool"
    procs = []

    def launch(cmd, **kwargs):
        proc = livesite.popen_logged(cmd, **kwargs)
        procs.append(proc)
        return proc

    flags = ["--dicom-port", str(node_port), "--dicom-send", f"ORTHANC@127.0.0.1:{pacs_port}", "--dicom-spool",
             str(spool), "--dicom-max-pending", str(args.max_pending), "--allow-untrusted"]
    (tmp / "results").mkdir()
    orthanc = None
    with livesite.run_server(checkpoint, tmp / "results", extra_args=flags, launch=launch):
        pid = procs[0].pid
        statuses: list[list] = [[] for _ in folders]
        warm_status: list = []
        send(node_port, [warm], "WARM_UP", warm_status)
        time.sleep(2)
        baseline = rss_mib(pid)
        peak, stop = [baseline], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak.append(rss_mib(pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(node_port, sorted(f.iterdir()), f"XRAY_ROOM_{i}", statuses[i]))
                   for i, f in enumerate(folders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sending = time.monotonic() - started
        held = rss_mib(pid)
        by_path = {path: uid for uid, path in uids.items()}
        accepted = {by_path[path] for folder, codes in zip(folders, statuses, strict=True)
                    for path, code in zip(sorted(folder.iterdir()), codes, strict=True) if code == 0}
        if warm_status == [0]:  # the warm-up image waits in the spool too
            accepted.add(str(pydicom.dcmread(warm, stop_before_pixels=True).SOPInstanceUID))
        codes = [c for s in statuses for c in s]
        (tmp / "orthanc").mkdir()
        orthanc = Orthanc(tmp / "orthanc", node_port, pacs_port)
        started = time.monotonic()
        try:
            while any(any((spool / part).iterdir()) for part in ("incoming", "outbox")):
                if time.monotonic() - started > args.timeout:
                    break
                time.sleep(1)
            delivery = time.monotonic() - started
            stop.set()
            watcher.join()
            stored = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.get("/instances")]
        finally:
            orthanc.stop()
        log = tmp / f"server-{livesite_port(procs)}.log"
    references = [item["ReferencedSOPInstanceUID"] for tags in stored for item in tags.get("SourceImageSequence", [])]
    srs = [tags for tags in stored if "SourceImageSequence" not in tags]
    lines = [line for line in log.read_text(errors="replace").splitlines() if "dicom_node" in line]
    bound = baseline + (dicom_node.MAX_ASSOCIATIONS * dicom_node.MAX_DATASET_BYTES + dicom_node.MAX_HELD_BYTES) / 2**20
    checks = {
        "only 0x0000 and 0xA700 answered": set(codes) <= {0x0000, 0xA700} and len(codes) == args.images,
        f"at most {args.max_pending} accepted (warm-up included)": len(accepted) <= args.max_pending,
        "peak memory within the documented bound": max(peak) <= bound,
        "every accepted image's SC in Orthanc, once": sorted(references) == sorted(accepted),
        "one SR per accepted image": len(srs) == len(accepted),
    }
    rows = [
        ("C-STOREs sent (senders)", f"{len(codes)} ({args.senders})"),
        ("answered 0x0000 (accepted; + the warm-up image)", codes.count(0x0000)),
        ("answered 0xA700 (out of resources)", codes.count(0xA700)),
        ("other answers", len(codes) - codes.count(0x0000) - codes.count(0xA700)),
        ("sending took", f"{sending:.0f} s"),
        ("server RSS after warm-up (baseline)", f"{baseline:.0f} MiB"),
        ("server RSS peak while refusing / holding", f"{max(peak):.0f} MiB (+{max(peak) - baseline:.0f} MiB)"),
        ("server RSS with every result held on disk", f"{held:.0f} MiB"),
        ("documented bound", f"{bound:.0f} MiB (baseline + {dicom_node.MAX_ASSOCIATIONS} x "
                             f"{dicom_node.MAX_DATASET_BYTES / 2**20:.0f} MiB + "
                             f"{dicom_node.MAX_HELD_BYTES / 2**20:.0f} MiB of parsed images for the worker)"),
        ("delivery after Orthanc started", f"{delivery:.0f} s"),
        ("in Orthanc: SC / SR", f"{len(references)} / {len(srs)}"),
        ("node log lines (warnings and errors) during the run", len([x for x in lines if " WARNING " in x or
                                                                    " ERROR " in x])),
    ]
    text = ["# DICOM node load check (destination down, then back)", "",
            f"`python benchmarks/bench_node.py --images {args.images} --senders {args.senders} --max-pending "
            f"{args.max_pending} --size {args.size}`; ResNet-18 at 224 px, random weights, CPU; radiographs "
            f"{args.size} px DX.", "", "| figure | value |", "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows), "", "| goal | met |", "|---|---|",
            *(f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in checks.items()), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    return 0 if all(checks.values()) else 1


def livesite_port(procs) -> int:
    """The web port the server was started with (its log file is named after it)."""
    cmd = procs[0].args
    return int(cmd[cmd.index("--port") + 1])


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
