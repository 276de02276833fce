"""Crafted model files: ONNX graphs that read external data or return other shapes than they declare, and trust
statistics that would call every image in scope (docs/RELIABILITY.md, "Round 3"). Each is refused at load time with
a clear error, on every path that loads it: OnnxModel, the metadata reader, int8 quantization, the web app, the CLI.
"""
from __future__ import annotations

import io
import math
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from support.checkpoints import make_checkpoint
from support.data import NIH_PNG, ROOT

import predictions
from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.onnx_backend import OnnxModel, OnnxModelError, export_onnx, quantize_int8, read_onnx_metadata
from chestxray.trust import TRUST_FORMAT, Trust, TrustError
from chestxray.trust.scope import IMAGE_PART, IMAGE_STATS, ScopeError, ScopeStats


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, its fp32 ONNX export) of the tiny model."""
    folder = tmp_path_factory.mktemp("crafted")
    checkpoint = make_checkpoint(folder / "tiny.pth")
    model, meta, _ = load_checkpoint(checkpoint)
    return checkpoint, export_onnx(model, meta, folder / "tiny.onnx")


def external_initializer(src, dst, location: str = "README.md"):
    """The export with its first initializer's bytes moved 'outside': read from `location` at load time."""
    proto = onnx.load(str(src))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.extend([onnx.StringStringEntryProto(key="location", value=location),
                                 onnx.StringStringEntryProto(key="offset", value="0")])
    onnx.save(proto, str(dst))
    return dst


def external_constant(src, dst, location: str = "instance/secret_key"):
    """The export with a Constant node whose value tensor is external data (added to an output's path)."""
    proto = onnx.load(str(src))
    value = helper.make_tensor("leak", TensorProto.FLOAT, [1], [0.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.append(onnx.StringStringEntryProto(key="location", value=location))
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_raw"
    proto.graph.node.extend([helper.make_node("Constant", [], ["leak"], value=value),
                             helper.make_node("Add", ["logits_raw", "leak"], ["logits"])])
    onnx.save(proto, str(dst))
    return dst


def three_logits(src, dst):
    """The export with logits sliced to 3 columns while the graph still declares 14."""
    proto = onnx.load(str(src))
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_all"
    proto.graph.initializer.extend([helper.make_tensor(n, TensorProto.INT64, [1], [v])
                                    for n, v in (("zero", 0), ("three", 3), ("one", 1))])
    proto.graph.node.append(helper.make_node("Slice", ["logits_all", "zero", "three", "one"], ["logits"]))
    onnx.save(proto, str(dst))
    return dst


CRAFTED = {"external initializer": (external_initializer, "refers to external data files"),
           "external constant": (external_constant, "refers to external data files"),
           "3 of 14 logits": (three_logits, "the graph returned logits (1, 3)")}


@pytest.mark.parametrize("kind", CRAFTED)
def test_a_crafted_onnx_file_is_refused_by_every_loader(exported, tmp_path, kind):
    craft, message = CRAFTED[kind]
    path = craft(exported[1], tmp_path / "crafted.onnx")
    with pytest.raises(OnnxModelError, match=re.escape(message)):
        OnnxModel(path, device="cpu")
    if kind != "3 of 14 logits":  # the declared graph is fine: only running it shows the lie
        with pytest.raises(OnnxModelError, match=re.escape(message)):
            read_onnx_metadata(path)
        with pytest.raises(OnnxModelError, match=re.escape(message)):
            quantize_int8(path, tmp_path / "int8.onnx", [np.zeros((1, 3, 64, 64), np.float32)])


@pytest.mark.parametrize("kind", CRAFTED)
def test_the_web_app_and_the_cli_refuse_a_crafted_onnx_file_with_its_reason(exported, make_app, tmp_path, capsys,
                                                                          kind):
    craft, message = CRAFTED[kind]
    path = craft(exported[1], tmp_path / "crafted.onnx")
    client = make_app(CHECKPOINT=str(path), BACKEND="onnx").test_client()
    response = client.post("/api/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")})
    assert response.status_code == 503 and message in response.get_json()["error"]
    code = predictions.main(predictions.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--backend", "onnx", "--device", "cpu", str(NIH_PNG)]))
    out = capsys.readouterr()
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_external_data_is_refused_before_any_file_is_opened(exported, tmp_path, monkeypatch):
    """The location is a file that exists and would be read (this repository's README) if loading went that far."""
    path = external_initializer(exported[1], tmp_path / "crafted.onnx", location=str(ROOT / "README.md"))
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(OnnxModelError, match="README.md"):
        OnnxModel(path, device="cpu")
    assert not [f for f in opened if f.endswith("README.md")]


# ---------------------------------------------------------------- trust statistics

def scope_entry(channels: int = 1024, method: str = "mahalanobis", **changes) -> dict:
    """A well-formed scope entry (identity precision: distances are plain Euclidean), then `changes`."""
    d = {"format": 1, "method": method, "mean": torch.zeros(channels), "precision": torch.eye(channels),
         "limit": 40.0, "percentile": 99.0, "n_fit": 100, "n_limit": 50}
    if method == "mahalanobis+image":
        d.update(image_mean=torch.zeros(IMAGE_PART), image_precision=torch.eye(IMAGE_PART), feature_scale=30.0,
                 image_scale=5.0, limit=1.2)
    return d | changes


def checkpoint_with(scope: dict) -> dict:
    return {"trust": {"format": TRUST_FORMAT, "scope": scope}}


def not_positive_definite(channels: int = 1024) -> torch.Tensor:
    precision = torch.eye(channels)
    precision[0, 0] = -1.0  # a direction along which the "distance" is imaginary, clamped to 0
    return precision


BAD_SCOPES = {
    "5 channels": (scope_entry(5), "5 channels"),
    "not positive definite": (scope_entry(precision=not_positive_definite()), "not positive definite"),
    "all-zero precision": (scope_entry(precision=torch.zeros(1024, 1024)), "not positive definite"),
    "not symmetric": (scope_entry(precision=torch.eye(1024) + torch.triu(torch.ones(1024, 1024), 1)),
                      "not symmetric"),
    "NaN mean": (scope_entry(mean=torch.full((1024,), math.nan)), "NaN or infinite"),
    "limit 1e300": (scope_entry(limit=1e300), "outside"),
    "limit infinite": (scope_entry(limit=math.inf), "outside"),
    "limit NaN": (scope_entry(limit=math.nan), "outside"),
    "limit 0": (scope_entry(limit=0.0), "outside"),
    "limit not a number": (scope_entry(limit="everything"), "not a number"),
    "infinite feature scale": (scope_entry(method="mahalanobis+image", feature_scale=math.inf), "positive finite"),
    "infinite image scale": (scope_entry(method="mahalanobis+image", image_scale=math.inf), "positive finite"),
    "image precision not positive definite": (
        scope_entry(method="mahalanobis+image", image_precision=not_positive_definite(IMAGE_PART)),
        "image precision is not positive definite"),
}


@pytest.mark.parametrize("kind", BAD_SCOPES)
def test_crafted_scope_statistics_are_refused_at_load_with_a_clear_error(kind):
    entry, message = BAD_SCOPES[kind]
    with pytest.raises(TrustError, match=re.escape(message)):
        Trust.from_checkpoint(checkpoint_with(entry), labels=["A"])


@pytest.mark.parametrize("method", ["mahalanobis", "mahalanobis+image"])
def test_well_formed_scope_statistics_still_load_and_judge(method):
    trust = Trust.from_checkpoint(checkpoint_with(scope_entry(method=method)), labels=["A"])
    far = trust.scope.score(np.full((1, 1024), 100.0), np.zeros((1, IMAGE_STATS)))
    near = trust.scope.score(np.zeros((1, 1024)), np.zeros((1, IMAGE_STATS)))
    assert trust.scope.in_scope(near).all() and not trust.scope.in_scope(far).any()


def test_a_crafted_scope_is_never_in_scope_on_the_web(make_app, tiny_checkpoint, tmp_path):
    """A checkpoint whose scope would accept everything: the app refuses to load it and says why (503), rather
    than answering 'in scope'."""
    obj = safe_torch_load(tiny_checkpoint)
    obj["trust"] = {"format": TRUST_FORMAT, "scope": scope_entry(limit=1e300)}
    torch.save(obj, tmp_path / "crafted.pth")
    client = make_app(CHECKPOINT=str(tmp_path / "crafted.pth")).test_client()
    response = client.post("/api/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")})
    assert response.status_code == 503 and "scope limit" in response.get_json()["error"]


def test_scope_stats_checks_hold_for_direct_construction_too():
    with pytest.raises(ScopeError, match="not positive definite"):
        ScopeStats("mahalanobis", torch.zeros(4), -torch.eye(4))
