"""The DICOM node's flags and limits, apart from the node: main.py adds the --dicom-* flags to its own at every start,
while the node itself (pynetdicom, pydicom, highdicom: about half a second to import) is loaded only when --dicom-port
asks for it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chestxray.imaging import MAX_INFLATED_BYTES

DEFAULT_AET = "CXR_AI"
# The node's limits (docs/RELIABILITY.md, "The DICOM node"; each has a --dicom-* flag):
MAX_DATASET_BYTES = MAX_INFLATED_BYTES  # one C-STORE data set: more than any image the reader would decode needs
MAX_PENDING = 500  # received images and unsent results kept on disk; beyond it C-STOREs get 0xA700
MAX_PENDING_BYTES = 4 * 2**30  # the same, in bytes on disk
MAX_ASSOCIATIONS = 10  # connections at once; silent ones are evicted so that one slot stays free for a newcomer
MAX_PER_PEER = 4  # connections at once from one address
CONNECT_TIMEOUT = 5.0  # seconds a new connection may take to ask for an association (and to negotiate or release)
DEFAULT_SPOOL = Path(__file__).resolve().parents[2] / "instance" / "dicom-spool"  # in the project root


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
    group.add_argument("--dicom-spool", default=None,
                       help="folder keeping received images and unsent results until they are delivered, so a "
                            "restart loses none; made 0700, it holds patient data (default: dicom-spool in "
                            "--instance-dir, else instance/dicom-spool)")
    group.add_argument("--dicom-max-pending", type=int, default=MAX_PENDING,
                       help="images and unsent results the spool may hold; beyond it C-STOREs are refused with "
                            "0xA700 (out of resources) and the sender keeps them (default: %(default)s)")
    group.add_argument("--dicom-max-pending-mb", type=float, default=MAX_PENDING_BYTES / 2**20,
                       help="the same limit in MiB on disk (default: %(default)s)")
    group.add_argument("--dicom-max-dataset-mb", type=float, default=MAX_DATASET_BYTES / 2**20,
                       help="largest C-STORE data set accepted, checked before decoding; larger ones get 0xA700 "
                            "(default: %(default).0f)")
    group.add_argument("--dicom-max-associations", type=int, default=MAX_ASSOCIATIONS,
                       help="connections at once; connections that have not asked for an association are evicted, "
                            "oldest first, so one slot stays free (default: %(default)s)")
    group.add_argument("--dicom-max-per-peer", type=int, default=MAX_PER_PEER,
                       help="connections at once from one IP address (default: %(default)s)")
    group.add_argument("--dicom-connect-timeout", type=float, default=CONNECT_TIMEOUT,
                       help="seconds a new connection may take to ask for an association (default: %(default)s)")


def spool_folder(args: argparse.Namespace) -> Path:
    """The default spool: dicom-spool in main.py's --instance-dir (beside the secret key), else DEFAULT_SPOOL."""
    instance = getattr(args, "instance_dir", None)
    return Path(instance) / "dicom-spool" if instance else DEFAULT_SPOOL
