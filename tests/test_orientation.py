"""Orientation check: fitted without labels on copies of real NIH images, it flags mirrored and rotated films (never
refusing them), stays quiet on most upright ones, travels in the checkpoint (weights_only) and in the ONNX JSON, and
reaches the Prediction and its JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.data import XrayDataset, collate_batch, load_index
from chestxray.imaging import read_xray
from chestxray.predictor import Predictor
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY, Trust
from chestxray.trust.orientation import (
    CLASSES,
    MIRRORED,
    ROTATED,
    UPRIGHT,
    Orientation,
    OrientationError,
    collect_orientation,
    fit_orientation,
    transformed,
)


def _sample(nih_dir):
    """The sample's 128 px images, split by patient: (images to fit on, held-out images of other patients)."""
    index = load_index(nih_dir, allow_missing=True)
    small = index[index["path"].astype(str).str.contains(r"[/\\]images_128[/\\]")].sort_values("image")
    patients = np.sort(small["patient"].unique())
    fit = small[small["patient"].isin(patients[: int(len(patients) * 0.7)])].reset_index(drop=True)
    held = small[~small["patient"].isin(fit["patient"])].reset_index(drop=True)
    return fit, held


@pytest.fixture(scope="module")
def oriented_checkpoint(tmp_path_factory, tiny_checkpoint, nih_dir):
    """The tiny checkpoint with an orientation check fitted on ~150 real images' five copies -> (path, held-out)."""
    model, meta, _ = load_checkpoint(tiny_checkpoint)
    fit, held = _sample(nih_dir)
    loader = torch.utils.data.DataLoader(XrayDataset(fit, meta.labels, build_transform(meta)), batch_size=50,
                                         collate_fn=collate_batch)
    features, classes, n = collect_orientation(model, loader, "cpu", build_normalize(meta))
    assert n == len(fit) and features.shape[0] == len(CLASSES) * n
    obj = safe_torch_load(tiny_checkpoint)
    obj[TRUST_KEY] = Trust(orientation=fit_orientation(features, classes, n_images=n)).to_dict()
    path = tmp_path_factory.mktemp("orientation") / "oriented.pth"
    torch.save(obj, path)
    return path, held


def _rates(predictor: Predictor, images: list[np.ndarray]) -> dict[str, float]:
    judged = [p.orientation for p in predictor.predict_batch(images, heatmaps=False)]
    return {name: judged.count(name) / len(judged) for name in (UPRIGHT, MIRRORED, ROTATED)}


def test_mirrored_and_rotated_images_are_flagged_not_refused(oriented_checkpoint):
    path, held = oriented_checkpoint
    predictor = Predictor.from_checkpoint(path, device="cpu", allow_untrusted=True)
    images = [read_xray(p) for p in held["path"]]
    assert len(images) >= 50
    upright = _rates(predictor, images)
    mirrored = _rates(predictor, [np.ascontiguousarray(np.fliplr(a)) for a in images])
    rotated = _rates(predictor, [np.ascontiguousarray(np.rot90(a, k)) for a in images for k in (1, 2, 3)])
    # Measured here: 89 % of upright films pass, 76 % of mirrored and 99 % of rotated ones are flagged (a random
    # trunk at 64 px, ~150 fitting images: the thumbnail carries the check). Before it existed, 0 % were flagged.
    assert upright[UPRIGHT] >= 0.8
    assert mirrored[MIRRORED] >= 0.65
    assert rotated[ROTATED] >= 0.9
    # A flag is a remark, not a refusal: the flipped film still gets its probabilities and its calls.
    flipped = predictor.predict(np.ascontiguousarray(np.fliplr(images[0])))
    assert set(flipped.probabilities) == set(predictor.labels) and set(flipped.calls) == set(predictor.labels)
    answer = flipped.to_dict()
    assert answer["orientation"] == flipped.orientation in (UPRIGHT, MIRRORED, ROTATED)


def test_without_orientation_data_the_answer_says_none(tiny_predictor, nih_dir):
    image = read_xray(nih_dir / "images" / "00000001_000.png")
    prediction = tiny_predictor.predict(image)
    assert prediction.orientation is None and prediction.to_dict()["orientation"] is None


def test_orientation_travels_weights_only_and_as_json_lists(oriented_checkpoint):
    path, _ = oriented_checkpoint
    raw = torch.load(path, weights_only=True)  # the checkpoint contract: tensors and plain data only
    _, meta, _ = load_checkpoint(path)
    trust = Trust.from_checkpoint(raw, meta.labels)
    assert trust.orientation is not None and trust.orientation.classes == CLASSES
    # The ONNX export embeds the trust entry as JSON: lists instead of tensors read back to the same head.
    as_json = json.loads(json.dumps({k: v.tolist() if isinstance(v, torch.Tensor) else v
                                     for k, v in raw[TRUST_KEY]["orientation"].items()}))
    again = Orientation.from_dict(as_json)
    features = np.random.default_rng(0).normal(size=(5, trust.orientation.dims))
    np.testing.assert_allclose(again.probabilities(features), trust.orientation.probabilities(features), atol=1e-6)


def test_the_onnx_export_carries_the_orientation_check(oriented_checkpoint, tmp_path):
    from Model_Training import export

    path, held = oriented_checkpoint
    out = tmp_path / "oriented.onnx"
    assert export.main(export.get_args_parser().parse_args(["--checkpoint", str(path), "--out", str(out)])) == 0
    eager = Predictor.from_checkpoint(path, device="cpu", allow_untrusted=True)
    onnx = Predictor.from_checkpoint(out, device="cpu", backend="onnx", allow_untrusted=True)
    assert onnx.trust.orientation is not None and onnx.trust.orientation.classes == eager.trust.orientation.classes
    images = [read_xray(p) for p in held["path"][:8]]
    images += [np.ascontiguousarray(np.fliplr(a)) for a in images[:4]]
    assert [p.orientation for p in onnx.predict_batch(images, heatmaps=False)] == \
        [p.orientation for p in eager.predict_batch(images, heatmaps=False)]


def test_an_orientation_head_of_the_wrong_width_is_refused_at_load(oriented_checkpoint, tmp_path):
    from chestxray.meta import CheckpointError

    obj = safe_torch_load(oriented_checkpoint[0])
    entry = obj[TRUST_KEY]["orientation"]
    for key in ("mean", "scale"):
        entry[key] = entry[key][:-1]
    entry["coef"] = entry["coef"][:, :-1]
    torch.save(obj, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="orientation check reads"):
        Predictor.from_checkpoint(tmp_path / "narrow.pth", device="cpu")


def test_head_is_a_softmax_over_the_classes_sklearn_fitted():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(len(CLASSES)), 40)
    x = rng.normal(size=(len(y), 6)) + np.eye(len(CLASSES), 6)[y] * 3
    head = fit_orientation(x, y, c=1.0)
    mean, sd = x.mean(axis=0), x.std(axis=0)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / sd, y)
    np.testing.assert_allclose(head.probabilities(x), reference.predict_proba((x - mean) / sd), atol=1e-5)
    assert head.judge(x[y == 1]).count(MIRRORED) > 35 and head.judge(x[y == 3]).count(ROTATED) > 35


def test_transformed_copies_are_flips_and_quarter_turns():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(transformed(x, "mirrored")[..., 0], x[..., -1])
    assert torch.equal(transformed(x, "rotated 180"), x.flip(-1).flip(-2))
    assert torch.equal(transformed(transformed(x, "rotated 90"), "rotated 270"), x)
    with pytest.raises(OrientationError, match="unknown orientation class"):
        transformed(x, "sideways")


@pytest.mark.parametrize("change, message", [
    ({"coef": torch.zeros(3, 2)}, "inconsistent shapes"), ({"format": 9}, "format"),
    ({"classes": ["mirrored", "upright"]}, "must start with"), ({"scale": torch.zeros(4)}, "non-positive"),
])
def test_malformed_orientation_data_are_refused(change, message):
    good = Orientation(CLASSES[:2], torch.zeros(4), torch.ones(4), torch.zeros(2, 4), torch.zeros(2)).to_dict()
    Orientation.from_dict(good)
    with pytest.raises(OrientationError, match=message):
        Orientation.from_dict({**good, **change})
