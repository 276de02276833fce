"""ONNX export and the ONNX Runtime backend: same numbers as PyTorch on real images, self-describing files that
refuse to load when their metadata is missing or wrong, and the int8 quality gate on a model trained on the sample."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from support.checkpoints import make_checkpoint
from support.data import NIH_DIR, shared, shared_path

import Model_Training.export as export
import Model_Training.train as train
from chestxray.cam import predict_with_maps
from chestxray.checkpoint import CheckpointError, Meta, load_checkpoint, safe_torch_load
from chestxray.data import load_index, make_splits, targets
from chestxray.imaging import read_xray
from chestxray.metrics import mean_auroc
from chestxray.onnx_backend import (
    KEY_FORMAT,
    KEY_META,
    OnnxModel,
    OnnxModelError,
    read_onnx_metadata,
)
from chestxray.transforms import preprocess

FP32_PROB_TOL = 1e-4
FP32_MAP_CORR = 0.999
INT8_AUROC_TOL = 0.01
INT8_MAP_CORR = 0.98


def _export(argv: list[str]) -> int:
    return export.main(export.get_args_parser().parse_args(argv))


def _batch(meta: Meta, paths) -> torch.Tensor:
    return torch.cat([preprocess(meta, read_xray(p)) for p in paths])


def _map_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per label: Pearson correlation of two (N, L, h, w) map stacks over all images and pixels."""
    a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    b = b.transpose(1, 0, 2, 3).reshape(b.shape[1], -1)
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.fixture(scope="module")
def scoped_checkpoint(tmp_path_factory):
    """The tiny random checkpoint plus an extra entry (as the in-scope check stores its statistics)."""
    path = make_checkpoint(tmp_path_factory.mktemp("onnx") / "tiny.pth")
    obj = safe_torch_load(path)
    obj["scope"] = {"mean": torch.linspace(0, 1, 4), "threshold": 2.5}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def fp32_onnx(scoped_checkpoint):
    out = scoped_checkpoint.with_suffix(".onnx")
    assert _export(["--checkpoint", str(scoped_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def real_batch():
    """Real NIH images from the bundled sample at 64, 128 and 1024 px, preprocessed for the 64 px checkpoint."""
    paths = (sorted((NIH_DIR / "images_64").glob("*.png"))[:12] + sorted((NIH_DIR / "images_128").glob("*.png"))[:3]
             + sorted((NIH_DIR / "images").glob("*.png"))[:1])
    return _batch(Meta.new(image_size=64), paths)


@pytest.mark.slow(5)
def test_onnx_matches_pytorch_on_real_images(scoped_checkpoint, fp32_onnx, real_batch):
    model, meta, _ = load_checkpoint(scoped_checkpoint)
    with torch.inference_mode():
        logits, maps = predict_with_maps(model, real_batch)
        pooled = model.features(real_batch).mean(dim=(2, 3))
    onnx_model = OnnxModel(fp32_onnx, device="cpu")
    o_logits, o_maps, o_pooled = onnx_model.run(real_batch.numpy())
    assert o_logits.shape == (16, 14) and o_maps.shape == (16, 14, 2, 2) and o_pooled.shape == (16, 1024)
    assert np.abs(_sigmoid(o_logits) - _sigmoid(logits.numpy())).max() <= FP32_PROB_TOL
    assert _map_correlations(o_maps, maps.numpy()).min() >= FP32_MAP_CORR
    np.testing.assert_allclose(o_pooled, pooled.numpy(), rtol=1e-4, atol=1e-5)
    # The maps are not a copy of one label's map (the BatchNorm-weight "CAM" bug gives the same map for all).
    assert not np.allclose(o_maps[:, 0], o_maps[:, 1])
    # A batch of one gives the same numbers as the image inside a batch (dynamic batch axis).
    single = onnx_model.run(real_batch[3:4].numpy())[0]
    np.testing.assert_allclose(single, o_logits[3:4], rtol=1e-5, atol=1e-5)


def test_metadata_round_trip_and_extra_data(scoped_checkpoint, fp32_onnx):
    _, meta, train_record = load_checkpoint(scoped_checkpoint)
    info = read_onnx_metadata(fp32_onnx)
    assert info.meta == meta and info.precision == "fp32"
    assert info.train == train_record
    assert info.extra["scope"]["threshold"] == 2.5
    np.testing.assert_allclose(info.extra["scope"]["mean"], np.linspace(0, 1, 4), rtol=1e-6)
    assert OnnxModel(fp32_onnx, device="cpu", expected_meta=meta).meta == meta


def _rewrite(src, dst, props=None, drop=()):
    proto = onnx.load(str(src))
    current = {p.key: p.value for p in proto.metadata_props}
    current.update(props or {})
    del proto.metadata_props[:]
    for key, value in current.items():
        if key not in drop:
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(dst))
    return dst


def _meta_with(fp32_onnx, **changes) -> str:
    d = json.loads({p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}[KEY_META])
    d.update(changes)
    return json.dumps(d)


@pytest.mark.parametrize("case, message", [
    ("no-metadata", "not exported by this tool"),
    ("format", "export format '99'"),
    ("not-json", "not valid JSON"),
    ("missing-key", "missing key(s) ['thresholds']"),
    ("size", "image_size 128"),
    ("labels", "13 labels"),
    ("truncated", "truncated or corrupt"),
    ("absent", "ONNX model not found"),
])
def test_bad_onnx_files_are_refused_with_a_clear_error(fp32_onnx, tmp_path, case, message):
    target = tmp_path / f"{case}.onnx"
    if case == "no-metadata":
        _rewrite(fp32_onnx, target, drop=(KEY_FORMAT, KEY_META))
    elif case == "format":
        _rewrite(fp32_onnx, target, {KEY_FORMAT: "99"})
    elif case == "not-json":
        _rewrite(fp32_onnx, target, {KEY_META: "{arch: resnet18"})
    elif case == "missing-key":
        d = json.loads(_meta_with(fp32_onnx))
        del d["thresholds"]
        _rewrite(fp32_onnx, target, {KEY_META: json.dumps(d)})
    elif case == "size":
        _rewrite(fp32_onnx, target, {KEY_META: _meta_with(fp32_onnx, image_size=128)})
    elif case == "labels":
        d = json.loads(_meta_with(fp32_onnx))
        _rewrite(fp32_onnx, target, {KEY_META: _meta_with(fp32_onnx, labels=d["labels"][:13],
                                                          thresholds=d["thresholds"][:13])})
    elif case == "truncated":
        target.write_bytes(fp32_onnx.read_bytes()[:5000])
    with pytest.raises(OnnxModelError, match=None) as info:
        OnnxModel(target, device="cpu")
    assert message in str(info.value)
    assert isinstance(info.value, CheckpointError)  # callers that handle a bad checkpoint handle this too


def test_model_from_another_checkpoint_is_refused(fp32_onnx, tmp_path):
    _, other_meta, _ = load_checkpoint(make_checkpoint(tmp_path / "other.pth", thresholds=[0.3] * 14))
    with pytest.raises(OnnxModelError, match=r"another checkpoint.*\['thresholds'\]"):
        OnnxModel(fp32_onnx, device="cpu", expected_meta=other_meta)


def test_wrong_input_shape_is_a_clear_error(fp32_onnx):
    model = OnnxModel(fp32_onnx, device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model.run(np.zeros((1, 3, 32, 32), np.float32))


def test_export_checks_its_arguments(scoped_checkpoint, tmp_path, capsys):
    assert _export(["--checkpoint", str(scoped_checkpoint), "--int8"]) == 2
    assert "--int8 needs --calibration-dir" in capsys.readouterr().err
    assert _export(["--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert _export(["--checkpoint", str(scoped_checkpoint), "--int8", "--calibration-dir", str(tmp_path)]) == 2
    assert "no PNG, JPEG or DICOM files" in capsys.readouterr().err


# The gate needs the 937-image development sample of ../shared/data: its validation split is large enough for a
# stable mean AUROC; the bundled sample's few validation images make |delta AUROC| swing past the tolerance.
GATE_DIR = shared_path("nih")


@pytest.fixture(scope="module")
def trained_on_sample(tmp_path_factory):
    """ResNet-18 at 64 px trained for one epoch on 256 training images of the shared sample, validated on all of its
    validation split."""
    folder = tmp_path_factory.mktemp("int8")
    args = train.get_args_parser().parse_args([
        "--data-dir", str(GATE_DIR), "--image-size", "64", "--epochs", "2", "--no-pretrained", "--device", "cpu",
        "--arch", "resnet18", "--limit", "256", "--workers", "0", "--no-progress",
        "--output", str(folder / "sample.pth"), "--run-dir", str(folder / "run")])
    assert train.main(args) == 0
    return folder / "sample.pth"


@shared
@pytest.mark.slow(28)
def test_int8_quality_gate_on_the_validation_split(trained_on_sample, capsys):
    fp32_path = trained_on_sample.with_suffix(".onnx")
    int8_path = export.int8_path(fp32_path)
    assert _export(["--checkpoint", str(trained_on_sample), "--int8", "--calibration-dir", str(GATE_DIR),
                    "--calibration-images", "64", "--out", str(fp32_path)]) == 0
    assert "training-split images" in capsys.readouterr().out
    fp32, int8 = OnnxModel(fp32_path, device="cpu"), OnnxModel(int8_path, device="cpu")
    assert int8.precision == "int8" and int8.info.quantization["calibration_images"] == 64
    meta = fp32.meta
    split = meta.training["split"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = make_splits(load_index(GATE_DIR), GATE_DIR, split["val_fraction"], split["seed"])["val"]
    x = _batch(meta, val["path"]).numpy()
    (l32, m32, _), (l8, m8, _) = fp32.run(x), int8.run(x)
    y = targets(val, meta.labels)
    auroc32, auroc8 = mean_auroc(y, _sigmoid(l32)), mean_auroc(y, _sigmoid(l8))
    assert abs(auroc8 - auroc32) <= INT8_AUROC_TOL, (auroc32, auroc8)
    assert _map_correlations(m8, m32).min() >= INT8_MAP_CORR
    # It is really quantized: the probabilities move a little, and the graph holds int8 weights.
    assert 0 < np.abs(_sigmoid(l8) - _sigmoid(l32)).max() < 0.1
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(int8_path)).graph.initializer)


def _first_conv_reads_dequantized(path) -> bool:
    """Whether the graph's first Conv takes an input (image or weight) from a DequantizeLinear: a QDQ pair."""
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    first = next(node for node in graph.node if node.op_type == "Conv")
    return any(name in dequantized for name in first.input)


@pytest.mark.slow(8)
def test_int8_options_keep_the_first_conv_float(scoped_checkpoint, tmp_path):
    common = ["--checkpoint", str(scoped_checkpoint), "--int8", "--calibration-dir", str(NIH_DIR / "images_64"),
              "--calibration-images", "8"]
    assert _export([*common, "--out", str(tmp_path / "default.onnx")]) == 0
    assert _export([*common, "--out", str(tmp_path / "stem.onnx"), "--float-first-conv", "--calibration-method",
                    "percentile", "--int8-activations"]) == 0
    default, stem = export.int8_path(tmp_path / "default.onnx"), export.int8_path(tmp_path / "stem.onnx")
    assert _first_conv_reads_dequantized(default)
    assert not _first_conv_reads_dequantized(stem)
    quantization = OnnxModel(stem, device="cpu").info.quantization
    assert quantization["method"].endswith("percentile") and quantization["activations"] == "int8"
    graph = onnx.load(str(stem)).graph
    assert next(n.name for n in graph.node if n.op_type == "Conv") in quantization["float_nodes"]
    # Only the stem stays float: the other convolutions still read int8 weights through DequantizeLinear.
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 10
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)


def test_a_file_that_passed_its_checks_loads_without_them_and_any_other_bytes_get_them(fp32_onnx, tmp_path,
                                                                                     monkeypatch):
    """OnnxModel remembers files that passed every check by their SHA-256, in the tool's cache folder (not beside
    the model): the same bytes load again without onnx's parse and the blank pass, with the same metadata; a file
    changed in one metadata value is checked in full, and a file that failed is never remembered."""
    import chestxray.onnx_backend as backend

    monkeypatch.setattr(backend, "CHECKED_RECORD", tmp_path / "cache" / "onnx-checked.json")
    checks = []
    parse = backend._load_proto
    monkeypatch.setattr(backend, "_load_proto", lambda path: checks.append(path.name) or parse(path))
    first = OnnxModel(fp32_onnx, device="cpu")
    assert checks == [fp32_onnx.name] and len(backend.checked_digests()) == 1
    again = OnnxModel(fp32_onnx, device="cpu")
    assert checks == [fp32_onnx.name]  # not parsed again
    assert (again.meta, again.info.extra, again.precision) == (first.meta, first.info.extra, first.precision)
    batch = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for a, b in zip(first.run(batch), again.run(batch)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(OnnxModelError, match="another checkpoint"):  # the metadata is still compared
        OnnxModel(fp32_onnx, device="cpu", expected_meta=Meta.from_dict({**first.meta.to_dict(),
                                                                         "thresholds": [0.3] * 14}))

    changed = tmp_path / "changed.onnx"
    _rewrite(fp32_onnx, changed, {KEY_META: _meta_with(fp32_onnx, thresholds=[0.25] * 14)})
    assert list(OnnxModel(changed, device="cpu").meta.thresholds) == [0.25] * 14
    assert checks == [fp32_onnx.name, changed.name]  # other bytes: checked in full
    bad = tmp_path / "bad.onnx"
    _rewrite(fp32_onnx, bad, {KEY_FORMAT: "99"})
    for _ in range(2):
        with pytest.raises(OnnxModelError, match="export format"):
            OnnxModel(bad, device="cpu")
    assert len(backend.checked_digests()) == 2 and not list(tmp_path.glob("*.json"))
