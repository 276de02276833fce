"""Random-weight checkpoints for tests and benchmarks: real files in the checkpoint format, made in a second."""
from __future__ import annotations

from pathlib import Path


def make_checkpoint(path: Path, arch: str = "resnet18", image_size: int = 64, labels=None, seed: int = 0,
                    bias_spread: float = 3.0, thresholds=None, training: dict | None = None) -> Path:
    """Save a randomly initialised checkpoint whose head bias spreads the probabilities over (0, 1)."""
    import torch

    from chestxray.checkpoint import Meta, model_from_meta, save_checkpoint
    from chestxray.labels import LABELS

    torch.manual_seed(seed)
    labels = tuple(labels or LABELS)
    meta = Meta.new(arch=arch, labels=labels, image_size=image_size, thresholds=thresholds,
                    training={"data": "random init (test fixture)", "epochs": 0,
                              "val_auroc": {name: 0.5 for name in labels}, "date": "2026-11-25",
                              **(training or {})})
    model = model_from_meta(meta)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.linspace(-bias_spread, bias_spread, len(labels)))
    save_checkpoint(path, model, meta, {"note": "test fixture"})
    return path
