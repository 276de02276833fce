"""In-scope check: Mahalanobis distance against scikit-learn, limit, plain-data round trip, one forward pass."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from chestxray.trust.scope import (
    CONTRAST,
    IMAGE_PART,
    IMAGE_STATS,
    QUANTILES,
    ScopeError,
    ScopeStats,
    collect_outputs,
    fit_scope,
    image_statistics,
    layout_statistics,
    pooled_features,
)


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
    assert stats.mean.dtype == np.float32 and stats.precision.dtype == np.float32
    assert stats.to_dict()["mean"].dtype == torch.float32  # a checkpoint holds tensors (torch.load(weights_only=True))
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
    # thumbnail-like and histogram/contrast-like spreads, then the quantile columns this method does not read
    scales = np.r_[np.ones(64), np.full(17, 0.01), np.ones(IMAGE_STATS - IMAGE_PART)]
    train_img, val_img = rng.normal(size=(400, IMAGE_STATS)) * scales, rng.normal(size=(1000, IMAGE_STATS)) * scales
    stats = fit_scope(train, "mahalanobis+image", train_img, val, val_img, 99.0)
    # Each part: Ledoit-Wolf on the standardised training data (sklearn), distances in standardised units.
    part_train, part_val = train_img[:, :IMAGE_PART], val_img[:, :IMAGE_PART]
    sd, sd_img = train.std(axis=0), part_train.std(axis=0)
    feat = np.sqrt(LedoitWolf().fit(train / sd).mahalanobis(val / sd))
    img = np.sqrt(LedoitWolf().fit(part_train / sd_img).mahalanobis(part_val / sd_img))
    expected = np.maximum(feat / stats.feature_scale, img / stats.image_scale)
    np.testing.assert_allclose(stats.score(val, val_img), expected, rtol=1e-3)
    assert stats.feature_scale == pytest.approx(np.percentile(feat, 99.0), rel=1e-3)
    odd = val_img[:20].copy()
    odd[:, CONTRAST] += 0.1  # features as usual, only the small-spread "contrast" off by 10 of its sds: out
    stats = stats.with_limit(stats.score(val, val_img))
    assert not stats.in_scope(stats.score(val[:20], odd)).any()
    with pytest.raises(ScopeError, match="image statistics"):
        stats.score(val)
    buf = io.BytesIO()
    torch.save(stats.to_dict(), buf)
    buf.seek(0)
    again = ScopeStats.from_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(again.score(val, val_img), stats.score(val, val_img))


def _stats(images: np.ndarray) -> np.ndarray:
    """(N, S, S) grey images in [0, 1] -> image_statistics with ImageNet channel-0 normalisation."""
    x = (torch.as_tensor(images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) - 0.485) / 0.229
    return image_statistics(x, 0.485, 0.229)


def _nih_64(nih_dir, n: int) -> np.ndarray:
    """n real NIH films at 64 px: the sample's 64 px copies, then its 128 px copies made 64 px."""
    from PIL import Image
    paths = [*sorted(nih_dir.rglob("images_64/**/*.png")), *sorted(nih_dir.rglob("images_128/**/*.png"))][:n]
    assert len(paths) == n, f"{nih_dir} has {len(paths)} images at 64 or 128 px, the test needs {n}"
    return np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
                     for p in paths])


def test_layout_statistics_match_numpy_and_ignore_exposure_and_orientation(nih_dir):
    films = _nih_64(nih_dir, 4)
    got = layout_statistics(_stats(films))
    for film, row in zip(films, got):  # numpy on the same film: 8x8 block means, mirror correlation, quantiles
        thumb = film.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        t = thumb - thumb.mean()
        symmetry = max((t * t[:, ::-1]).sum(), (t * t[::-1, :]).sum()) / (t * t).sum()
        coarse = t.std() / (film.std(ddof=1) * 0.229)  # in the normalised units the statistics are read in
        low, high = np.quantile(film, [0.01, 0.99])
        quantiles = np.quantile(np.clip((film - low) / (high - low), 0, 1), QUANTILES)
        np.testing.assert_allclose(row, np.r_[symmetry, coarse, quantiles], rtol=1e-3, atol=1e-4)
    assert (got[:, 0] > 0.2).all() and (got[:, 1] > 0.5).all()  # films: symmetric, mostly coarse layout
    # A washed-out copy (a third of the contrast, lifted), a mirrored and a rotated copy: the same statistics.
    for changed in (0.3 + films / 3, films[:, :, ::-1], np.rot90(films, 1, axes=(1, 2)), np.rot90(films, 2, (1, 2))):
        np.testing.assert_allclose(layout_statistics(_stats(np.ascontiguousarray(changed))), got,
                                   rtol=2e-3, atol=2e-3)
    flat = layout_statistics(_stats(np.full((1, 64, 64), 0.5, np.float32)))
    assert flat[0, 0] == 0 and flat[0, 1] == 0  # nothing to correlate, no layout: far from every film


def test_layout_method_refuses_photos_and_textures_but_keeps_washed_out_films(nih_dir):
    """The input part alone (the features part is given in-distribution features): fitted on real NIH films, it
    refuses scikit-image's textures, documents and object photos and accepts held-out films, washed out or not.
    (Portraits such as `camera` and `astronaut` are near-symmetric with a full grey range: those are left to the
    features part, which refuses them on the demo model; BENCHMARKS.md.)"""
    import skimage.data
    from skimage.transform import resize

    films = _nih_64(nih_dir, 120)
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(120, 16))
    train, val, held = films[:80], films[80:100], films[100:]
    stats = fit_scope(pooled[:80], "mahalanobis+layout", _stats(train), pooled[80:100], _stats(val), 100.0)
    stats = stats.with_limit(stats.score(pooled[80:100], _stats(val)), 100.0)
    assert stats.needs_images and stats.image_mean.shape == (2 + len(QUANTILES),)
    photos = []
    for name in ("grass", "gravel", "brick", "text", "coins", "moon"):
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        image = image.mean(axis=2) if image.ndim == 3 else image
        photos.append(resize(image / image.max(), (64, 64), anti_aliasing=True))
    photos = np.stack(photos).astype(np.float32)
    in_distribution = pooled[100:100 + len(photos)]
    assert not stats.in_scope(stats.score(in_distribution, _stats(photos))).any()
    accepted = stats.in_scope(stats.score(pooled[100:], _stats(held)))
    washed = stats.in_scope(stats.score(pooled[100:], _stats(0.35 + held / 2)))
    assert accepted.mean() >= 0.8, accepted
    np.testing.assert_array_equal(washed, accepted)  # exposure changes nothing
    buf = io.BytesIO()  # stored as plain tensors and numbers, and scored the same after loading
    torch.save(stats.to_dict(), buf)
    buf.seek(0)
    again = ScopeStats.from_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(again.score(pooled[100:], _stats(held)), stats.score(pooled[100:], _stats(held)))
