"""Heatmaps: all-label class activation maps from the forward pass, optional Grad-CAM on the trunk, overlays.

Why one pass is enough: with LSE pooling followed by a linear layer, d logit_c / d A_k(i,j) = W_ck softmax_ij(r A_k)
and the softmax sums to 1 over (i,j), so Grad-CAM's channel weight mean_ij(dy_c/dA_k) is W_ck / (h w) and
Grad-CAM at the transition layer is ReLU(W_c . A) / (h w): the class activation map (Zhou et al. 2016), for all
labels in one einsum, with no backward pass and no hooks (safe to call from several threads).
Written by hand because no library exploits this; pytorch-grad-cam is the independent check in the tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from .model import ChestXrayNet

# torch is imported inside the functions that run the model; the rendering below is NumPy, so the ONNX server
# draws heatmaps without it.


def class_activation_maps(model: ChestXrayNet, features: torch.Tensor) -> torch.Tensor:
    """A (N, 1024, h, w) -> raw maps (N, L, h, w) float32, W_c . A / (h w) (before ReLU); equals Grad-CAM's sum."""
    import torch

    weight = model.classifier.weight.float()
    h, w = features.shape[-2:]
    return torch.einsum("lc,nchw->nlhw", weight, features.float()) / (h * w)


def predict_with_maps(model: ChestXrayNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: x (N, 3, S, S) -> (logits (N, L), raw maps (N, L, h, w))."""
    features = model.features(x)
    return model.head(features), class_activation_maps(model, features)


def grad_cam_trunk(model: ChestXrayNet, x: torch.Tensor, label_indices: list[int] | None = None) -> torch.Tensor:
    """Grad-CAM on the trunk's last block: x (N, 3, S, S) -> (N, K, h, w) float32 >= 0 (K labels, default all).

    The trunk runs once without gradients; its output becomes a leaf and only the head is backpropagated.
    """
    import torch

    labels = list(range(model.classifier.out_features)) if label_indices is None else list(label_indices)
    with torch.no_grad():
        trunk_out = model.trunk(x)
    with torch.enable_grad():
        leaf = trunk_out.detach().float().requires_grad_(True)
        logits = model.head(model.transition(leaf))
        maps = []
        for c in labels:
            (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            maps.append(torch.relu((alpha * leaf).sum(dim=1)))
    return torch.stack(maps, dim=1).detach()


# Perceptually uniform, reads in greyscale and for colour-blind viewers (matplotlib's inferno), unlike jet.
COLORMAP = "inferno"


def normalize_map(cam: np.ndarray | torch.Tensor, peak: float | None = None) -> np.ndarray:
    """ReLU then scale to [0, 1]: by the map's own maximum, or by `peak` (one scale shared by several maps).

    (h, w) float32; an all-negative map becomes all zeros (no region supports the finding).
    """
    m = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    if peak is None:
        peak = float(m.max()) if m.size else 0.0
    return np.clip(m / peak, 0.0, 1.0) if peak > 0 else m


def has_support(cam: np.ndarray | torch.Tensor) -> bool:
    """True when some region has positive evidence (a value > 0); an all-<=0 map supports the finding nowhere."""
    return bool(np.asarray(cam, dtype=np.float32).max(initial=0.0) > 0.0)


def shared_peak(maps: np.ndarray | torch.Tensor) -> float:
    """The largest positive value over all maps (L, h, w): one scale for all labels (raw CAM values share units)."""
    return float(np.maximum(np.asarray(maps, dtype=np.float32), 0.0).max(initial=0.0))


def _bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32 matrix of 1-D bilinear interpolation with half-pixel centres, as
    torch.nn.functional.interpolate(align_corners=False) computes it: source = (i + 0.5) * in / out - 0.5, clamped
    at 0, between its floor and the next pixel (the last pixel repeats)."""
    src = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * np.float32(size_in / size_out)
                     - np.float32(0.5), np.float32(0.0))
    low = np.minimum(src.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low.astype(np.float32)
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(weights, (rows, low), np.float32(1.0) - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample_map(cam: np.ndarray | torch.Tensor, height: int, width: int) -> np.ndarray:
    """(h, w) map -> (height, width) float32, bilinear (half-pixel centres, like cv2.resize and torch's
    interpolate with align_corners=False): one small matrix product per axis."""
    m = np.asarray(cam, dtype=np.float32)
    return _bilinear_weights(m.shape[0], height) @ m @ _bilinear_weights(m.shape[1], width).T


def _colormap(name: str):
    from matplotlib import colormaps  # imported at the first picture drawn, not at every import of this module

    return colormaps[name]


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, colormap: str = COLORMAP,
            peak: float | None = None) -> Image.Image:
    """Blend a heatmap over an X-ray: image (H, W) in [0, 1], cam (h, w) raw -> RGB PIL image (W x H).

    peak: None scales the map to its own maximum; a number puts several maps on one scale (see shared_peak).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = image.shape
    heat = upsample_map(normalize_map(cam, peak), h, w)
    colour = _colormap(colormap)(np.clip(heat, 0, 1))[..., :3]
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    blended = (1 - alpha) * gray + alpha * colour
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), mode="RGB")


def heatmap_image(cam: np.ndarray, height: int, width: int, colormap: str = COLORMAP,
                  peak: float | None = None) -> Image.Image:
    """The colour-mapped heatmap alone, RGBA with opacity following the heat (for a CSS-blended layer)."""
    heat = upsample_map(normalize_map(cam, peak), height, width)
    rgba = _colormap(colormap)(np.clip(heat, 0, 1))
    rgba[..., 3] = np.clip(heat, 0, 1)
    return Image.fromarray(np.round(rgba * 255).astype(np.uint8), mode="RGBA")


def with_legend(image: Image.Image, caption: str, colormap: str = COLORMAP) -> Image.Image:
    """The image with a colour bar and `caption` below it (what the colours mean), as an RGB PIL image.

    The bar runs from 0 (no evidence, left) to 1 (the scale's peak, right); the caption names the scale.
    """
    from PIL import ImageDraw, ImageFont

    w, h = image.size
    bar_h, text_h = max(8, h // 40), 14
    out = Image.new("RGB", (w, h + bar_h + 2 * text_h + 6), "white")
    out.paste(image.convert("RGB"), (0, 0))
    ramp = _colormap(colormap)(np.linspace(0, 1, max(w - 20, 2)))[None, :, :3]
    bar = Image.fromarray(np.round(np.repeat(ramp, bar_h, axis=0) * 255).astype(np.uint8), mode="RGB")
    out.paste(bar, (10, h + 3))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    draw.text((10, h + bar_h + 4), "0: no evidence", fill="black", font=font)
    right = "peak: strongest evidence"
    draw.text((w - 10 - draw.textlength(right, font=font), h + bar_h + 4), right, fill="black", font=font)
    draw.text((10, h + bar_h + text_h + 4), caption, fill="black", font=font)
    return out
