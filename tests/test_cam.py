"""Heatmaps: the one-pass maps equal pytorch-grad-cam's GradCAM; they differ between labels; overlays."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from support.data import NIH_PNG

from chestxray.cam import (
    class_activation_maps,
    grad_cam_trunk,
    heatmap_image,
    normalize_map,
    overlay,
    predict_with_maps,
    upsample_map,
)
from chestxray.checkpoint import Meta, model_from_meta
from chestxray.imaging import read_xray
from chestxray.transforms import preprocess

SIZE = 256  # 8 x 8 maps: enough structure for a meaningful correlation, fast on a CPU


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    meta = Meta.new(arch="resnet18", image_size=SIZE)
    model = model_from_meta(meta).eval()
    x = preprocess(meta, read_xray(NIH_PNG))
    return model, x


def _like_grad_cam_package(raw: np.ndarray, size: int) -> np.ndarray:
    """pytorch-grad-cam's post-processing: ReLU, shift to 0, divide by max, resize to the input."""
    cam = np.maximum(raw, 0)
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    return upsample_map(cam, size, size)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_one_pass_maps_equal_grad_cam_on_the_transition_layer(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        logits, maps = predict_with_maps(model, x)
    torch.testing.assert_close(logits, model(x))  # the same forward pass gives the probabilities
    assert maps.shape == (1, 14, SIZE // 32, SIZE // 32)
    checked = 0
    with GradCAM(model=model, target_layers=[model.transition]) as reference:
        for c in range(14):
            theirs = reference(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0]
            ours = _like_grad_cam_package(maps[0, c].numpy(), SIZE)
            if theirs.max() == 0:  # an all-negative map is zero in both
                assert ours.max() == 0
                continue
            assert _corr(ours, theirs) >= 0.999, c
            checked += 1
    assert checked >= 7


def test_raw_maps_equal_the_gradient_formula(model_and_input):
    """Grad-CAM's unrectified sum sum_k mean_ij(dy_c/dA_k) A_k equals W_c . A / (h w) exactly."""
    model, x = model_and_input
    features = model.features(x).detach().requires_grad_(True)
    logits = model.head(features)
    maps = class_activation_maps(model, features).detach()
    for c in (0, 5, 13):
        (grad,) = torch.autograd.grad(logits[0, c], features, retain_graph=True)
        expected = (grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1)[0]
        torch.testing.assert_close(maps[0, c], expected.detach(), rtol=1e-4, atol=1e-6)


def test_maps_differ_between_labels(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        _, maps = predict_with_maps(model, x)
    flat = maps[0].flatten(1).numpy()
    corr = np.corrcoef(flat)
    off_diagonal = corr[~np.eye(14, dtype=bool)]
    # A "CAM" built from one weight vector for all labels (e.g. a BatchNorm weight) would give corr == 1 everywhere.
    assert off_diagonal.min() < 0.9
    assert np.ptp(flat, axis=0).max() > 0


def test_grad_cam_on_the_trunk_matches_the_package(model_and_input):
    model, x = model_and_input
    model.zero_grad(set_to_none=True)
    ours_all = grad_cam_trunk(model, x)
    assert ours_all.shape == (1, 14, SIZE // 32, SIZE // 32)
    assert not any(p.grad is not None for p in model.parameters())  # only the head was differentiated
    with GradCAM(model=model, target_layers=[model.trunk[-1]]) as reference:
        for c in (0, 3, 9):
            theirs = reference(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0]
            ours = _like_grad_cam_package(ours_all[0, c].numpy(), SIZE)
            if theirs.max() == 0:
                assert ours.max() == 0
            else:
                assert _corr(ours, theirs) >= 0.999


def test_no_hooks_and_thread_safe(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        expected = predict_with_maps(model, x)[1]
    results = [None] * 4

    def work(i):
        with torch.no_grad():
            results[i] = predict_with_maps(model, x)[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.allclose(r, expected, atol=1e-6) for r in results)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks


def test_normalize_and_overlay():
    cam = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(normalize_map(cam), [[0, 0], [1 / 3, 1]])
    assert normalize_map(-np.ones((2, 2))).max() == 0
    image = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    out = overlay(image, cam, alpha=0.5)
    assert out.size == (64, 48) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    # The hot corner (bottom right) is red-dominated in the jet colour map; the cold one is not.
    assert pixels[-1, -1, 0] > pixels[-1, -1, 2] and pixels[0, 0, 2] >= pixels[0, 0, 0]
    plain = np.asarray(overlay(image, cam, alpha=0.0))
    np.testing.assert_array_equal(plain[..., 0], np.round(image * 255).astype(np.uint8))
    layer = heatmap_image(cam, 48, 64)
    assert layer.mode == "RGBA" and np.asarray(layer)[0, 0, 3] == 0 and np.asarray(layer)[-1, -1, 3] == 255
    with pytest.raises(ValueError):
        overlay(image, cam, alpha=2)
