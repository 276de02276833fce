"""In-scope check: Mahalanobis distance against scikit-learn, limit, plain-data round trip, one forward pass."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from chestxray.scope import ScopeError, ScopeStats, collect_outputs, fit_scope, pooled_features


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 3.0, 16))
    train = rng.multivariate_normal(np.arange(16) / 4, cov, size=400).astype(np.float32)
    val = rng.multivariate_normal(np.arange(16) / 4, cov, size=1000).astype(np.float32)
    return train, val


def test_distance_equals_sklearn_ledoit_wolf(gaussian):
    train, val = gaussian
    stats = fit_scope(train)
    lw = LedoitWolf().fit(train.astype(np.float64))
    # sklearn's mahalanobis() returns squared distances.
    np.testing.assert_allclose(stats.score(val) ** 2, lw.mahalanobis(val.astype(np.float64)), rtol=1e-4)
    assert stats.mean.dtype == torch.float32 and stats.precision.dtype == torch.float32
    assert stats.n_fit == 400


def test_limit_is_the_validation_percentile_and_far_points_are_out(gaussian):
    train, val = gaussian
    stats = fit_scope(train)
    scores = stats.score(val)
    stats = stats.with_limit(scores, 99.0)
    assert stats.limit == pytest.approx(np.percentile(scores, 99.0))
    assert stats.in_scope(scores).mean() == pytest.approx(0.99, abs=0.002)
    far = val[:50] + 6.0  # shifted by several standard deviations in every feature
    assert not stats.in_scope(stats.score(far)).any()


def test_in_scope_needs_a_limit(gaussian):
    with pytest.raises(ScopeError, match="limit"):
        fit_scope(gaussian[0]).in_scope(np.array([1.0]))


def test_round_trip_through_weights_only_load(gaussian):
    train, val = gaussian
    stats = fit_scope(train, "mahalanobis-l2")
    stats = stats.with_limit(stats.score(val))
    buf = io.BytesIO()
    torch.save({"scope": stats.to_dict()}, buf)
    buf.seek(0)
    loaded = ScopeStats.from_dict(torch.load(buf, weights_only=True)["scope"])
    np.testing.assert_array_equal(loaded.score(val), stats.score(val))
    assert loaded.limit == stats.limit and loaded.method == "mahalanobis-l2"


def test_l2_variant_ignores_feature_scale(gaussian):
    train, val = gaussian
    stats = fit_scope(train, "mahalanobis-l2")
    np.testing.assert_allclose(stats.score(val * 3.0), stats.score(val), rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("precision"), "lack"),
    (lambda d: d.update(precision=torch.zeros(3, 3)), "must be"),
    (lambda d: d.update(mean=torch.full((16,), float("nan"))), "NaN"),
    (lambda d: d.update(method="knn"), "unknown scope method"),
    (lambda d: d.update(format=9), "format"),
])
def test_malformed_statistics_are_refused(gaussian, change, message):
    d = fit_scope(gaussian[0]).to_dict()
    change(d)
    with pytest.raises(ScopeError, match=message):
        ScopeStats.from_dict(d)


def test_wrong_channel_count_and_too_few_images(gaussian):
    stats = fit_scope(gaussian[0])
    with pytest.raises(ScopeError, match="channels"):
        stats.score(np.zeros((2, 8), np.float32))
    with pytest.raises(ScopeError, match="at least 2"):
        fit_scope(np.zeros((1, 16), np.float32))


def test_pooled_features_come_from_the_same_forward_pass(tiny_checkpoint):
    from chestxray.checkpoint import load_checkpoint
    from chestxray.transforms import build_normalize

    model, meta, _ = load_checkpoint(tiny_checkpoint)
    images = torch.randint(0, 256, (5, 1, 64, 64), dtype=torch.uint8)
    loader = [(images[:3], torch.zeros(3, 14), torch.arange(3)), (images[3:], torch.zeros(2, 14), torch.arange(3, 5))]
    normalize = build_normalize(meta)
    logits, pooled, _, indices, thumbs = collect_outputs(model, loader, "cpu", normalize)
    with torch.no_grad():
        x = normalize(images)
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pooled, model.features(x).mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert pooled.shape == (5, 1024) and list(indices) == [0, 1, 2, 3, 4]
    with torch.no_grad():  # the thumbnail: the normalised input's first channel averaged over 8 x 8 blocks of 8 px
        expected = normalize(images)[:, 0].reshape(5, 8, 8, 8, 8).mean(dim=(2, 4)).reshape(5, 64)
    np.testing.assert_allclose(thumbs[:, :64], expected.numpy(), rtol=1e-5, atol=1e-6)
    values = (normalize(images)[:, 0] * 0.229 + 0.485).clamp(0, 1).reshape(5, -1).numpy()
    hist = np.stack([np.histogram(v, bins=16, range=(0, 1))[0] for v in values]) / values.shape[1]
    np.testing.assert_allclose(thumbs[:, 64:80], hist, atol=1e-6)  # numpy's histogram, 16 bins of [0, 1]
    np.testing.assert_allclose(thumbs[:, 80], values.std(axis=1, ddof=1), rtol=1e-4)
    with pytest.raises(ScopeError):
        pooled_features(torch.zeros(2, 3))


def test_image_variant_takes_the_larger_scaled_part(gaussian):
    train, val = gaussian
    rng = np.random.default_rng(5)
    scales = np.r_[np.ones(64), np.full(17, 0.01)]  # thumbnail-like and histogram/contrast-like spreads
    train_img, val_img = rng.normal(size=(400, 81)) * scales, rng.normal(size=(1000, 81)) * scales
    stats = fit_scope(train, "mahalanobis+image", train_img, val, val_img, 99.0)
    # Each part: Ledoit-Wolf on the standardised training data (sklearn), distances in standardised units.
    sd, sd_img = train.std(axis=0), train_img.std(axis=0)
    feat = np.sqrt(LedoitWolf().fit(train / sd).mahalanobis(val / sd))
    img = np.sqrt(LedoitWolf().fit(train_img / sd_img).mahalanobis(val_img / sd_img))
    expected = np.maximum(feat / stats.feature_scale, img / stats.image_scale)
    np.testing.assert_allclose(stats.score(val, val_img), expected, rtol=1e-3)
    assert stats.feature_scale == pytest.approx(np.percentile(feat, 99.0), rel=1e-3)
    odd = val_img[:20].copy()
    odd[:, -1] += 0.1  # features as usual, only the small-spread "contrast" off by 10 of its sds: out
    stats = stats.with_limit(stats.score(val, val_img))
    assert not stats.in_scope(stats.score(val[:20], odd)).any()
    with pytest.raises(ScopeError, match="image statistics"):
        stats.score(val)
    buf = io.BytesIO()
    torch.save(stats.to_dict(), buf)
    buf.seek(0)
    again = ScopeStats.from_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(again.score(val, val_img), stats.score(val, val_img))
