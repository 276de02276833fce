"""Preprocessing, defined here only: build_transform (per image, CPU) then build_normalize (per batch, on the device).

Per image, in DataLoader workers or the server thread:
  (H, W) float image in [0, 1] (imaging.read_xray) or uint8 (the resized cache)
  -> resize to meta.image_size x meta.image_size (antialiased bilinear in float; the whole image, no crop)
  -> 8-bit (1, S, S) uint8, the form the resized cache stores, so cached and uncached inputs are identical
  -> [train only] small random rotation / scale / translation (Pillow, nearest neighbour), optional horizontal flip,
     optional random grey-level curve (gamma, contrast, brightness as one 256-entry lookup table).
Per batch, on the model's device:
  (N, 1, S, S) uint8 -> float / 255 -> gray replicated to 3 channels -> normalised with meta.mean / meta.std.

The resize (resized_uint8) and the normalisation of a NumPy batch are NumPy and Pillow: the ONNX server runs them
without torch. XrayTransform returns torch tensors (DataLoader workers) and imports torch when first called.

Why two stages: a float 3-channel 512 px image is 3 MB; passing uint8 single-channel images from the workers and
normalising on the device makes the loader about 13x faster from the cache (benchmarks/results/cache.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .meta import Meta

if TYPE_CHECKING:
    import torch


def resized_uint8(image: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """(H, W) image (float in [0, 1] or uint8) -> (size, size) uint8: antialiased bilinear in float (Pillow's
    resampling, which torchvision's antialiased resize follows), rounded to 8 bits; uint8 already at size passes
    unchanged. Raises ValueError for an image that is not (H, W)."""
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {tuple(a.shape)}")
    if a.dtype == np.uint8 and a.shape == (size, size):
        return a
    a = a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a.astype(np.float32, copy=False)
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a), mode="F").resize((size, size), Image.BILINEAR))
    return np.clip(np.round(a * np.float32(255.0)), 0, 255).astype(np.uint8)


def to_uint8_square(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) image (float in [0, 1] or uint8) -> (1, size, size) uint8 tensor: resized_uint8 as a tensor."""
    import torch

    return torch.from_numpy(np.array(resized_uint8(image, size))).unsqueeze(0)


def random_grey_curve(strength: float) -> list[int]:
    """A random 256-entry lookup table: v -> a + b * v ** gamma on [0, 1], clipped, for Image.point.

    gamma is log-uniform in [e^-strength, e^strength]; the contrast b uniform in [1 - strength, 1 + strength]; the
    offset a keeps the curve inside [0, 1] when b < 1 (a washed-out film) and clips both ends when b > 1 (a narrower
    window). Draws from torch's generator, so the DataLoader's per-worker seeds apply. Raises ValueError for a
    strength outside [0, 1).
    """
    if not 0 <= strength < 1:
        raise ValueError(f"the grey-level augmentation strength must lie in [0, 1), got {strength}")
    import torch

    u = torch.rand(3, dtype=torch.float64).tolist()
    gamma = float(np.exp(strength * (2 * u[0] - 1)))
    b = 1 + strength * (2 * u[1] - 1)
    a = min(0.0, 1 - b) + u[2] * abs(1 - b)
    v = np.linspace(0.0, 1.0, 256) ** gamma
    return np.clip(np.rint(255 * (a + b * v)), 0, 255).astype(np.uint8).tolist()


@dataclass(frozen=True)
class XrayTransform:
    """Per-image stage: (H, W) image -> (1, S, S) uint8 tensor (see the module docstring)."""

    size: int
    train: bool = False
    hflip: bool = False
    intensity: float = 0.0  # grey-level augmentation strength (random_grey_curve); 0 = none

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = to_uint8_square(image, self.size)
        if not self.train:
            return x
        import torch
        from torchvision.transforms import v2

        # Light augmentation only: radiographs are taken in a standard pose. No flip by default (it puts the heart
        # on the wrong side). Nearest-neighbour Pillow affine on 8-bit data: 0.3 ms at 512 px against 2.4 ms
        # bilinear and ~8 ms for a float grid_sample, which made the loader, not the GPU, the bottleneck; for
        # rotations of a few degrees it moves no pixel by more than half a pixel from where bilinear puts it.
        pil = Image.fromarray(x[0].numpy(), mode="L")
        pil = v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05),
                              interpolation=v2.InterpolationMode.NEAREST)(pil)
        if self.hflip:
            pil = v2.RandomHorizontalFlip()(pil)
        if self.intensity:
            # Exposure and contrast differ between sites; one lookup table on 8-bit data costs a few microseconds.
            pil = pil.point(random_grey_curve(self.intensity))
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).unsqueeze(0)


@dataclass(frozen=True)
class Normalize:
    """Per-batch stage: (N, 1, S, S) uint8 (or float in [0, 1]) -> (N, 3, S, S) float32, normalised."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """A tensor stays on its device (a NumPy batch gives a NumPy array, computed with the same float32 steps)."""
        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, S, S) batch, got shape {tuple(batch.shape)}")
        if isinstance(batch, np.ndarray):
            x = batch.astype(np.float32)
            x = x / np.float32(255.0) if batch.dtype == np.uint8 else x
            mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
            return (x - mean) / np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        import torch

        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # broadcasting replicates the gray channel into 3


def build_transform(meta: Meta, train: bool = False, hflip: bool = False, intensity: float = 0.0) -> XrayTransform:
    """The per-image stage a checkpoint was trained with (train=True adds augmentation; hflip and intensity act only
    then). Raises ValueError for an intensity outside [0, 1)."""
    if not 0 <= intensity < 1:
        raise ValueError(f"the grey-level augmentation strength must lie in [0, 1), got {intensity}")
    return XrayTransform(meta.image_size, train=train, hflip=hflip, intensity=intensity)


def build_normalize(meta: Meta) -> Normalize:
    """The per-batch stage: the checkpoint's mean/std."""
    return Normalize(tuple(meta.mean), tuple(meta.std))


def preprocess(meta: Meta, image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Both stages for one image, no augmentation: (H, W) image -> (1, 3, S, S) float32 on `device`."""
    return build_normalize(meta)(build_transform(meta)(image).unsqueeze(0).to(device))
