"""The trunk's output stride: finer heatmaps (8 or 16 input pixels per cell) that the checkpoint carries, that the
ONNX export reproduces, that older checkpoints (no such field) load at their stride 32, and the demo model's 16x16."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from support.data import NIH_DIR, NIH_PNG
from torch import nn

from chestxray.cam import predict_with_maps
from chestxray.checkpoint import (
    CheckpointError,
    Meta,
    load_checkpoint,
    model_from_meta,
    safe_torch_load,
    save_checkpoint,
)
from chestxray.imaging import read_xray
from chestxray.meta import OUTPUT_STRIDES
from chestxray.model import ARCHS, build_model
from chestxray.model import OUTPUT_STRIDES as MODEL_OUTPUT_STRIDES
from chestxray.onnx_backend import OnnxModel, export_onnx
from chestxray.predictor import Predictor
from chestxray.transforms import preprocess
from Model_Training import demo, train


def _conv_layout(trunk: nn.Module) -> list[tuple]:
    """(stride, dilation, padding) of every convolution, in order."""
    return [(m.stride, m.dilation, m.padding) for m in trunk.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_the_maps_have_size_over_stride_cells(arch, stride):
    model = build_model(arch, 14, output_stride=stride).eval()
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 128, 128)).shape == (1, 1024, 128 // stride, 128 // stride)
    # The same tensors at every stride: ImageNet (or stride-32) weights load into a finer-stride model.
    model.load_state_dict(build_model(arch, 14).state_dict(), strict=True)


@pytest.mark.parametrize("stride, dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_resnet50_is_dilated_exactly_as_torchvision_does_it(stride, dilate):
    ours = build_model("resnet50", 14, output_stride=stride).trunk
    theirs = torchvision.models.resnet50(replace_stride_with_dilation=dilate)
    assert _conv_layout(ours) == _conv_layout(theirs)
    assert _conv_layout(ours) != _conv_layout(build_model("resnet50", 14).trunk)


def test_strides_other_trunks_cannot_give_are_refused():
    assert OUTPUT_STRIDES == MODEL_OUTPUT_STRIDES
    for arch in sorted(set(ARCHS) - {"resnet18", "resnet50"}):
        with pytest.raises(ValueError, match="ResNet trunks only"):
            build_model(arch, 14, output_stride=8)
        with pytest.raises(CheckpointError, match="output_stride"):
            Meta.new(arch=arch, output_stride=16)
    with pytest.raises(ValueError, match="one of"):
        build_model("resnet18", 14, output_stride=4)
    for bad in (4, 8.0, "8", True):
        with pytest.raises(CheckpointError, match="output_stride"):
            Meta.new(arch="resnet18").replace(output_stride=bad)


@pytest.fixture(scope="module")
def stride8_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    meta = Meta.new(arch="resnet18", image_size=128, output_stride=8, transition_kernel=1)
    model = model_from_meta(meta)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.linspace(-3, 3, len(meta.labels)))
    path = tmp_path_factory.mktemp("stride") / "stride8.pth"
    save_checkpoint(path, model, meta)
    return path, model.eval()


def test_the_stride_round_trips_through_the_checkpoint(stride8_checkpoint):
    path, saved = stride8_checkpoint
    model, meta, _ = load_checkpoint(path)
    assert meta.output_stride == 8 and model.output_stride == 8
    x = preprocess(meta, read_xray(NIH_PNG))
    with torch.no_grad():
        logits, maps = predict_with_maps(model, x)
        expected_logits, expected_maps = predict_with_maps(saved, x)
    assert maps.shape == (1, 14, 16, 16)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(maps, expected_maps)


def test_a_checkpoint_from_before_the_field_loads_at_stride_32(stride8_checkpoint, tmp_path):
    torch.manual_seed(0)
    meta = Meta.new(arch="resnet18", image_size=128)
    path = tmp_path / "old.pth"
    save_checkpoint(path, model_from_meta(meta), meta)
    obj = safe_torch_load(path)
    del obj["meta"]["output_stride"]  # as written before the field existed
    torch.save(obj, path)
    model, loaded, _ = load_checkpoint(path)
    assert loaded.output_stride == 32 and loaded == meta
    with torch.no_grad():
        assert model.features(preprocess(loaded, read_xray(NIH_PNG))).shape[2:] == (4, 4)
    # The weights alone do not tell the stride: a stride-8 file claiming 32 still loads, so the field must travel.
    obj = safe_torch_load(stride8_checkpoint[0])
    del obj["meta"]["output_stride"]
    torch.save(obj, tmp_path / "lost.pth")
    assert load_checkpoint(tmp_path / "lost.pth")[1].output_stride == 32


@pytest.mark.slow(5)
def test_the_onnx_export_gives_the_eager_maps(stride8_checkpoint, tmp_path):
    path, _ = stride8_checkpoint
    model, meta, _ = load_checkpoint(path)
    out = export_onnx(model, meta, tmp_path / "stride8.onnx")
    paths = [NIH_PNG, *sorted((NIH_DIR / "images_128").glob("*.png"))[:3]]
    x = torch.cat([preprocess(meta, read_xray(p)) for p in paths])
    with torch.no_grad():
        logits, maps = predict_with_maps(model, x)
    o_logits, o_maps, _ = OnnxModel(out, device="cpu").run(x.numpy())
    assert o_maps.shape == (4, 14, 16, 16)
    np.testing.assert_allclose(o_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    scale = np.ptp(maps.numpy(), axis=(2, 3), keepdims=True)
    assert (np.abs(o_maps - maps.numpy()) / scale).max() < 1e-3


@pytest.mark.slow(20)
def test_the_demo_model_has_maps_of_16_by_16_cells(tmp_path):
    # The demo's own recipe (its size, stride and trunk), on a handful of images for one epoch.
    quick = ("--epochs", "1", "--limit", "8", "--device", "cpu", "--orientation-images", "8")
    built = demo.build_demo_model(tmp_path / "demo.pth", extra_args=quick, progress=False)
    args = train.get_args_parser().parse_args(["--data-dir", ".", *demo.DEMO_TRAIN_ARGS])
    _, meta, _ = load_checkpoint(built)
    assert (meta.arch, meta.image_size, meta.output_stride) == (args.arch, args.image_size, args.output_stride)
    for backend in ("torch", "auto"):  # auto on a CPU: the ONNX export `make run` serves
        predictor = Predictor.from_checkpoint(built, device="cpu", backend=backend, allow_untrusted=True)
        heatmaps = predictor.predict(NIH_PNG).heatmaps
        assert heatmaps.shape[0] == len(meta.labels) and min(heatmaps.shape[1:]) >= 16, backend
    assert predictor.backend == "onnx"
