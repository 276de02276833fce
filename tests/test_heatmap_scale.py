"""Heatmaps that say what they show: perceptual colormap, own vs shared scale, empty maps, legend."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from chestxray.cam import COLORMAP, has_support, heatmap_image, normalize_map, shared_peak, with_legend


def test_colormap_is_perceptually_uniform_and_monotone_in_lightness():
    assert COLORMAP in ("inferno", "magma", "cividis")
    rgb = colormaps[COLORMAP](np.linspace(0, 1, 64))[:, :3]
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # reads in greyscale: lightness rises with the value
    assert np.all(np.diff(luma) > 0)


def test_own_and_shared_scale():
    maps = np.array([[[0.0, 1.0], [0.5, -1.0]], [[0.0, 4.0], [2.0, -3.0]]], dtype=np.float32)
    assert shared_peak(maps) == 4.0
    np.testing.assert_allclose(normalize_map(maps[0]), [[0, 1], [0.5, 0]])
    np.testing.assert_allclose(normalize_map(maps[0], peak=shared_peak(maps)), [[0, 0.25], [0.125, 0]])
    np.testing.assert_allclose(normalize_map(maps[1], peak=shared_peak(maps)), [[0, 1], [0.5, 0]])


def test_map_without_positive_evidence_has_no_support_and_no_hotspot():
    empty = -np.abs(np.random.default_rng(0).normal(size=(4, 4))).astype(np.float32)
    assert not has_support(empty) and has_support(empty + 10)
    layer = np.asarray(heatmap_image(empty, 16, 16))
    assert layer[..., 3].max() == 0  # fully transparent: nothing drawn as if it were a hotspot


def test_legend_adds_a_colour_bar_below_the_image():
    from PIL import Image

    image = Image.new("RGB", (200, 100), "gray")
    out = with_legend(image, "Effusion, each map scaled to its own peak")
    assert out.width == 200 and out.height > 100
    bar = np.asarray(out)[103 + 2, 10:190].astype(int)
    assert bar[-1].sum() > bar[0].sum()  # dark (no evidence) on the left, bright (peak) on the right
