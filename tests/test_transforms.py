"""Preprocessing: the per-image stage (uint8, augmentation) and the per-batch stage (normalisation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from support.data import NIH_PNG
from torchvision.transforms.v2 import functional as TF

from chestxray.checkpoint import Meta
from chestxray.imaging import read_xray
from chestxray.transforms import build_normalize, build_transform, preprocess, random_grey_curve, to_uint8_square

META = Meta.new(arch="resnet18", image_size=128)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_xray(NIH_PNG)


def test_per_image_stage_resizes_to_uint8(image):
    x = build_transform(META)(image)
    assert x.shape == (1, 128, 128) and x.dtype == torch.uint8
    # Independent: torchvision's antialiased resize of the float image, rounded to 8 bits.
    expected = TF.resize(torch.from_numpy(image)[None], [128, 128], antialias=True)
    expected = (expected * 255).round().clamp(0, 255).to(torch.uint8)
    assert (x.int() - expected.int()).abs().max() <= 1
    cached = to_uint8_square(x[0], 128)
    assert torch.equal(cached, x)  # a cached uint8 image at the right size passes unchanged


def test_non_square_images_are_squashed_whole():
    wide = np.zeros((60, 120), dtype=np.float32)
    wide[:, 60:] = 1.0  # right half white
    x = build_transform(Meta.new(arch="resnet18", image_size=64))(wide)[0].float()
    assert x.shape == (64, 64)
    assert x[:, :28].max() == 0 and x[:, 36:].min() == 255  # nothing cropped: the halves stay halves


def test_training_augmentation_is_light_random_and_seeded(image):
    plain = build_transform(META)(image)[0].float()
    train = build_transform(META, train=True)
    torch.manual_seed(0)
    a = train(image)[0].float()
    torch.manual_seed(0)
    b = train(image)[0].float()
    c = train(image)[0].float()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (128, 128)
    coarse = torch.nn.functional.avg_pool2d(plain[None], 8).flatten()
    for augmented in (a, c):
        moved = torch.nn.functional.avg_pool2d(augmented[None], 8).flatten()
        corr = np.corrcoef(moved.numpy(), coarse.numpy())[0, 1]
        assert 0.5 < corr < 0.999  # the anatomy moved a little (black corners included), not scrambled


def test_no_horizontal_flip_unless_asked():
    # A bright left half must stay on the left through 20 augmentations: the heart stays on its side.
    half = np.zeros((128, 128), dtype=np.float32)
    half[:, :64] = 1.0
    torch.manual_seed(0)
    train = build_transform(META, train=True)
    assert all(train(half)[0, :, :64].float().mean() > train(half)[0, :, 64:].float().mean() for _ in range(20))
    flip = build_transform(META, train=True, hflip=True)
    sides = [bool(flip(half)[0, :, :64].float().mean() > 127) for _ in range(40)]
    assert any(sides) and not all(sides)


def test_grey_level_augmentation_is_a_monotone_curve_in_training_only(image):
    meta = Meta.new(arch="resnet18", image_size=64)
    plain = build_transform(meta)(image)
    # Outside training the strength changes nothing: evaluation, calibration and trust fitting see the plain image.
    assert torch.equal(build_transform(meta, train=False, intensity=0.5)(image), plain)
    # In training, the same seed draws the same affine first, so the curve is the only difference: one output
    # grey level per input grey level, in the same order, and the grey levels do move.
    for seed in range(5):
        torch.manual_seed(seed)
        moved = build_transform(meta, train=True)(image)
        torch.manual_seed(seed)
        curved = build_transform(meta, train=True, intensity=0.5)(image)
        assert curved.shape == (1, 64, 64) and curved.dtype == torch.uint8
        pairs = torch.unique(torch.stack([moved.flatten(), curved.flatten()]), dim=1)
        assert torch.unique(pairs[0]).numel() == pairs.shape[1]  # a function of the input grey level
        assert torch.all(torch.diff(pairs[1].int()) >= 0)  # that keeps the order (unique sorts by the input)
        assert not torch.equal(curved, moved)


def test_random_grey_curve_range_and_strength():
    torch.manual_seed(0)
    assert random_grey_curve(0.0) == list(range(256))  # strength 0: the identity
    for strength in (0.3, 0.6):
        curves = np.array([random_grey_curve(strength) for _ in range(200)])
        assert curves.min() >= 0 and curves.max() <= 255 and np.all(np.diff(curves, axis=1) >= 0)
        spread = curves[:, 255] - curves[:, 0]  # contrast b in [1 - s, 1 + s]: washed out down to 255 (1 - s) ...
        assert spread.min() >= np.floor(255 * (1 - strength)) - 1 and (spread < 255 * (1 - strength / 2)).any()
        assert spread.max() == 255  # ... or a narrower window, clipped at both ends
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            build_transform(META, train=True, intensity=bad)


def test_per_batch_stage_normalises_into_three_channels():
    meta = Meta.new(arch="resnet18", image_size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    batch = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = build_normalize(meta)(batch)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expected = TF.normalize(batch.float().div(255).expand(-1, 3, -1, -1), [0.1, 0.2, 0.3], [0.5, 0.25, 0.125])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="N, 1, S, S"):
        build_normalize(meta)(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_preprocess_is_both_stages(image, tiny_predictor):
    meta = tiny_predictor.meta
    x = preprocess(meta, image)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    # The two stages composed by hand, without augmentation ...
    torch.testing.assert_close(x, build_normalize(meta)(build_transform(meta, train=False)(image).unsqueeze(0)))
    # ... and independently: torchvision's resize to 8 bits, then the checkpoint's mean/std on three channels.
    side = meta.image_size
    resized = TF.resize(torch.from_numpy(image)[None, None], [side, side], antialias=True)
    resized = (resized * 255).round().clamp(0, 255).div(255).expand(-1, 3, -1, -1)
    expected = TF.normalize(resized, list(meta.mean), list(meta.std))
    one_level = 1 / 255 / min(meta.std)  # the uint8 rounding may differ by one level
    torch.testing.assert_close(x, expected, atol=one_level + 1e-5, rtol=0)
    assert (x - expected).abs().mean() < one_level / 10  # and rarely does
    torch.testing.assert_close(tiny_predictor.preprocess(image), x)  # the app's path is this one
