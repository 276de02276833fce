"""Where to run: one rule for the CLI, evaluation and the web app (training adds its per-rank GPU choice)."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeviceUnavailable(RuntimeError):
    """A CUDA device was asked for but none is available (the scripts add their flag advice)."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cpu' / 'cuda' as asked. Raises DeviceUnavailable without a GPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} was asked for but no CUDA GPU is available; use the CPU or 'auto'")
    return torch.device(device)


def cuda_ruled_out() -> bool:
    """True when this machine certainly has no CUDA GPU, found without importing torch: Linux without the NVIDIA
    driver (/proc/driver/nvidia). False means "ask torch" (resolve_device), never "there is one"."""
    return sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia")
