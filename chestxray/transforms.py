"""build_transform(meta, train): the ONLY place preprocessing is defined.

(H, W) float32 image in [0, 1] (from imaging.read_xray, or uint8 from the resized cache)
  -> resize to meta.image_size x meta.image_size (antialiased bilinear; the whole image, no crop)
  -> [train only] small random rotation / scale / translation, optional horizontal flip
  -> gray replicated to 3 channels -> normalised with meta.mean / meta.std -> (3, S, S) float32 tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .checkpoint import Meta


def to_tensor01(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) image, float in [0, 1] or uint8 -> (1, H, W) float32 tensor in [0, 1]."""
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
    if t.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {tuple(t.shape)}")
    return t.unsqueeze(0)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), antialiased bilinear; a no-op when already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return TF.resize(image, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


@dataclass(frozen=True)
class XrayTransform:
    """Callable (H, W) image -> (3, S, S) normalised tensor; see the module docstring."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool = False
    hflip: bool = False

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = resize_square(to_tensor01(image), self.size)
        if self.train:
            # Light augmentation only: radiographs are acquired in a standard pose. No flip by default,
            # as it puts the heart on the wrong side.
            x = v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05))(x)
            if self.hflip:
                x = v2.RandomHorizontalFlip()(x)
        x = x.expand(3, -1, -1)
        return TF.normalize(x, list(self.mean), list(self.std))


def build_transform(meta: Meta, train: bool = False, hflip: bool = False) -> XrayTransform:
    """The preprocessing a checkpoint was trained with (train=True adds augmentation)."""
    return XrayTransform(meta.image_size, tuple(meta.mean), tuple(meta.std), train=train, hflip=hflip)
