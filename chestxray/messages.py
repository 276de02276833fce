"""What the entry points tell a user in more than one place: how to get a model, and the one usage error."""
from __future__ import annotations

TRAIN_COMMAND = "python Model_Training/train.py --data-dir /path/to/nih --output chestxray_model_resnet50.pth"
POINT_COMMAND = "python main.py --checkpoint PATH"


class UsageError(ValueError):
    """A bad command-line value or combination; the message says what to change."""
