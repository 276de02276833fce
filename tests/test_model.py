"""The model: LSE pooling, the trunks, features()/head(), and the offline ImageNet-weights error."""
from __future__ import annotations

import math

import pytest
import torch

from chestxray.model import ARCHS, LSEPool2d, PretrainedWeightsUnavailable, build_model


def test_lse_pool_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    r = 10.0
    expected = torch.log(torch.exp(r * x).mean(dim=(2, 3))) / r  # Wang et al. 2017, eq. (1), naive form
    got = LSEPool2d(r)(x)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_lse_pool_lies_between_mean_and_max_and_approaches_them():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 6, 6)
    mean, peak = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    pooled = LSEPool2d(10)(x)
    assert torch.all(pooled >= mean - 1e-5) and torch.all(pooled <= peak + 1e-5)
    torch.testing.assert_close(LSEPool2d(1e-3)(x), mean, atol=2e-3, rtol=0)
    torch.testing.assert_close(LSEPool2d(1e4)(x), peak, atol=1e-3, rtol=0)


def test_lse_pool_is_stable_for_large_activations_and_float32_under_autocast():
    x = torch.full((1, 2, 4, 4), 300.0)  # exp(10 * 300) overflows any float type
    assert torch.allclose(LSEPool2d(10)(x), torch.full((1, 2), 300.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LSEPool2d(10)(torch.randn(1, 3, 4, 4).bfloat16() * 5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_trunk_gives_logits_and_splits_into_features_and_head(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_labels=14).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, 1024, 2, 2)
    assert logits.shape == (2, 14)
    torch.testing.assert_close(model.head(features), logits)
    assert model.transition.in_channels == ARCHS[arch][2]


def test_head_shape_follows_the_label_count_and_kernel():
    model = build_model("resnet18", num_labels=8, lse_r=5.0, transition_kernel=1)
    assert model.classifier.out_features == 8
    assert model.transition.kernel_size == (1, 1)
    assert model.pool.r == 5.0
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg16", 14)
    with pytest.raises(ValueError, match="odd"):
        build_model("resnet18", 14, transition_kernel=2)


def test_seed_architecture_is_resnet50_with_2048_to_1024_transition():
    model = build_model("resnet50", 14)
    assert (model.transition.in_channels, model.transition.out_channels) == (2048, 1024)
    assert model.pool.r == 10.0 and model.classifier.in_features == 1024


def test_pretrained_weights_offline_give_a_clear_error(monkeypatch, tmp_path):
    # An empty hub cache: the weights are not cached, and this machine cannot download them.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        build_model("resnet18", 14, pretrained=True)
    message = str(err.value)
    assert "pretrained=False" in message and str(tmp_path) in message and "resnet18" in message
    assert "--" not in message  # the core names no command-line flag; train.py adds its own advice


def test_no_sigmoid_inside_the_model():
    model = build_model("resnet18", 3).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-20.0, 0.0, 20.0]))
        model.classifier.weight.zero_()
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.tolist() == [[-20.0, 0.0, 20.0]]
    assert not math.isclose(torch.sigmoid(logits)[0, 0].item(), 0.5, abs_tol=0.1)


def test_model_archs_are_the_ones_meta_accepts():
    from chestxray.meta import ARCH_NAMES

    assert sorted(ARCHS) == sorted(ARCH_NAMES)
