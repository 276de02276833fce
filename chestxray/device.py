"""Where to run: one rule for the CLI, evaluation and the web app (training adds its per-rank GPU choice)."""
from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """A CUDA device was asked for but none is available (the scripts add their flag advice)."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cpu' / 'cuda' as asked. Raises DeviceUnavailable without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} was asked for but no CUDA GPU is available; use the CPU or 'auto'")
    return torch.device(device)
