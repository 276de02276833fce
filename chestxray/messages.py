"""What the entry points tell a user in more than one place: how to get a model, and the one usage error."""
from __future__ import annotations

import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]  # the commands below run from the project folder


def interpreter() -> str:
    """The Python running this process as a user would type it in the project folder: `.venv/bin/python` after
    `make run` (whose venv has torch; a bare `python` may not), its full path when outside the project."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        return str(path)


TRAIN_COMMAND = f"{interpreter()} Model_Training/train.py --data-dir /path/to/nih --output chestxray_model_resnet50.pth"
POINT_COMMAND = f"{interpreter()} main.py --checkpoint PATH"


class UsageError(ValueError):
    """A bad command-line value or combination; the message says what to change."""
