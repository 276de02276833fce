"""Where to run: one rule for the CLI, evaluation and the web app (training adds its per-rank GPU choice)."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cpu' / 'cuda' as asked. Raises RuntimeError for cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)
