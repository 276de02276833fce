"""Preprocessing, defined here only: build_transform (per image, CPU) then build_normalize (per batch, on the device).

Per image, in DataLoader workers or the server thread:
  (H, W) float image in [0, 1] (imaging.read_xray) or uint8 (the resized cache)
  -> resize to meta.image_size x meta.image_size (antialiased bilinear in float; the whole image, no crop)
  -> 8-bit (1, S, S) uint8, the form the resized cache stores, so cached and uncached inputs are identical
  -> [train only] small random rotation / scale / translation (Pillow, nearest neighbour), optional horizontal flip.
Per batch, on the model's device:
  (N, 1, S, S) uint8 -> float / 255 -> gray replicated to 3 channels -> normalised with meta.mean / meta.std.

Why two stages: a float 3-channel 512 px image is 3 MB; passing uint8 single-channel images from the workers and
normalising on the device makes the loader about 13x faster from the cache (benchmarks/results/cache.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .meta import Meta


def to_tensor01(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) image, float in [0, 1] or uint8 -> (1, H, W) float32 tensor in [0, 1]."""
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {tuple(t.shape)}")
    return t.unsqueeze(0)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) float -> (C, size, size), antialiased bilinear; a no-op when already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return TF.resize(image, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def to_uint8_square(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) image (float in [0, 1] or uint8) -> (1, size, size) uint8; uint8 already at size passes unchanged."""
    t = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if t.dtype == torch.uint8 and tuple(t.shape) == (size, size):
        return t.unsqueeze(0)
    x = resize_square(to_tensor01(t), size)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class XrayTransform:
    """Per-image stage: (H, W) image -> (1, S, S) uint8 tensor (see the module docstring)."""

    size: int
    train: bool = False
    hflip: bool = False

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = to_uint8_square(image, self.size)
        if not self.train:
            return x
        # Light augmentation only: radiographs are taken in a standard pose. No flip by default (it puts the heart
        # on the wrong side). Nearest-neighbour Pillow affine on 8-bit data: 0.3 ms at 512 px against 2.4 ms
        # bilinear and ~8 ms for a float grid_sample, which made the loader, not the GPU, the bottleneck; for
        # rotations of a few degrees it moves no pixel by more than half a pixel from where bilinear puts it.
        pil = Image.fromarray(x[0].numpy(), mode="L")
        pil = v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05),
                              interpolation=v2.InterpolationMode.NEAREST)(pil)
        if self.hflip:
            pil = v2.RandomHorizontalFlip()(pil)
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).unsqueeze(0)


@dataclass(frozen=True)
class Normalize:
    """Per-batch stage: (N, 1, S, S) uint8 (or float in [0, 1]) -> (N, 3, S, S) float32, normalised."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, S, S) batch, got shape {tuple(batch.shape)}")
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # broadcasting replicates the gray channel into 3


def build_transform(meta: Meta, train: bool = False, hflip: bool = False) -> XrayTransform:
    """The per-image stage a checkpoint was trained with (train=True adds augmentation)."""
    return XrayTransform(meta.image_size, train=train, hflip=hflip)


def build_normalize(meta: Meta) -> Normalize:
    """The per-batch stage: the checkpoint's mean/std."""
    return Normalize(tuple(meta.mean), tuple(meta.std))


def preprocess(meta: Meta, image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Both stages for one image, no augmentation: (H, W) image -> (1, 3, S, S) float32 on `device`."""
    return build_normalize(meta)(build_transform(meta)(image).unsqueeze(0).to(device))
