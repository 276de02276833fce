"""ONNX Runtime backend: export the model as one graph with its checkpoint's metadata, load it back checked, run it.

The graph takes the normalised batch (B, 3, S, S) float32 (transforms.py's two stages, unchanged) and returns, from
one pass:
  logits (B, L)        the model's output, before the sigmoid
  maps   (B, L, h, w)  the raw all-label class activation maps, exactly cam.class_activation_maps
  pooled (B, C)        the transition features averaged over (h, w): the vector the in-scope check compares
The checkpoint's `meta` (and its training record and any other plain data it carries) travels in the model's
metadata_props as JSON, so the .onnx file is self-describing: nothing downstream re-declares a size, a label list
or a threshold. Loading refuses a file without that metadata, or whose graph does not match it, with the same kind
of error as the checkpoint contract (OnnxModelError is a CheckpointError).

int8 (quantize_int8) is ONNX Runtime's static quantization in QDQ form, calibrated on images the caller chooses
(training-split images: calibrating on the validation split would flatter the quality gate); the head (LSE pool,
classifier, CAM einsum, pooling) stays float so the maps and the in-scope vector are computed in float.

Loading and running need ONNX Runtime and NumPy only: torch is imported by the export (and by a CUDA request), so a
server on an exported file never loads it.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fileio import atomic_write, file_sha256, is_tensor, number_row, to_json_data
from .meta import TRANSITION_CHANNELS, CheckpointError, Meta

if TYPE_CHECKING:
    import torch

    from .model import ChestXrayNet

ONNX_FORMAT = 1  # bump when the graph's inputs/outputs or the metadata keys change
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "maps", "pooled")
OPSET = 18
# metadata_props keys (all values are strings; the JSON ones are strict JSON)
KEY_FORMAT = "chestxray.format"
KEY_META = "chestxray.meta"
KEY_TRAIN = "chestxray.train"
KEY_EXTRA = "chestxray.extra"
KEY_PRECISION = "chestxray.precision"
KEY_QUANTIZATION = "chestxray.quantization"
PRECISIONS = ("fp32", "int8")
EXPORT_COMMAND = "python Model_Training/export.py --checkpoint CKPT --out model.onnx"
# SHA-256 of the files that passed every load check (OnnxModel), in this tool's own cache folder
CHECKED_RECORD = Path(__file__).resolve().parents[1] / ".cache" / "onnx-checked.json"
CHECKED_KEEP = 64  # digests kept (newest)


class OnnxModelError(CheckpointError):
    """An .onnx file that is not a loadable model of this tool; the message names the problem and the fix."""


def _export_graph(model: ChestXrayNet) -> torch.nn.Module:
    """The exported computation: x (B, 3, S, S) -> (logits (B, L), maps (B, L, h, w), pooled (B, C))."""
    from torch import nn

    from .cam import class_activation_maps
    from .trust.scope import pooled_features

    class ExportGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            features = self.model.features(x)
            return self.model.head(features), class_activation_maps(self.model, features), pooled_features(features)

    return ExportGraph()


def _plain(obj: Any) -> Any:
    """Plain JSON data, tensors included (a checkpoint's extra entries may hold small tensors)."""
    if is_tensor(obj):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not number_row(obj):  # a row of numbers holds no tensor
        return [_plain(v) for v in obj]
    return to_json_data(obj)


def metadata_props(meta: Meta, train: dict | None = None, extra: dict | None = None, precision: str = "fp32",
                   quantization: dict | None = None) -> dict[str, str]:
    """The metadata_props that make an .onnx file self-describing: {key: JSON or plain string}."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    props = {
        KEY_FORMAT: str(ONNX_FORMAT),
        KEY_META: json.dumps(_plain(meta.to_dict()), allow_nan=False, sort_keys=True),
        KEY_TRAIN: json.dumps(_plain(train or {}), allow_nan=False, sort_keys=True),
        KEY_EXTRA: json.dumps(_plain(extra or {}), allow_nan=False, sort_keys=True),
        KEY_PRECISION: precision,
    }
    if quantization is not None:
        props[KEY_QUANTIZATION] = json.dumps(_plain(quantization), allow_nan=False, sort_keys=True)
    return props


def _set_props(proto, props: dict[str, str]) -> None:
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _save_proto(proto, path: Path) -> Path:
    # One file, written atomically; a ResNet-50 is ~100 MB, far below protobuf's 2 GB single-file limit.
    return atomic_write(path, proto.SerializeToString())


def export_onnx(model: ChestXrayNet, meta: Meta, path: str | os.PathLike, train: dict | None = None,
                extra: dict | None = None, opset: int = OPSET) -> Path:
    """Export `model` (CPU, float32) as one ONNX graph with dynamic batch and meta.image_size inputs; returns path.

    Written atomically. Raises ValueError if the model does not match `meta` (label count, transition width).
    """
    import onnx
    import torch

    if model.classifier.out_features != len(meta.labels):
        raise ValueError(f"the model has {model.classifier.out_features} outputs but meta lists "
                         f"{len(meta.labels)} labels")
    graph = _export_graph(model.float().cpu()).eval()
    size = int(meta.image_size)
    example = torch.zeros(2, 3, size, size)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent if path.parent.exists() else None) as tmp:
        raw = Path(tmp) / "graph.onnx"
        # The dynamo-based exporter (torch's supported path; the TorchScript one is deprecated). Batch is dynamic;
        # the spatial size is fixed by meta.image_size, which lets ONNX Runtime plan every convolution ahead.
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            verbose=False,
        )
        program.save(str(raw), external_data=False)
        proto = onnx.load(str(raw))
    model.eval()  # export may toggle training mode on the wrapped modules; leave the caller's model in eval
    proto.producer_name = "chestxray"
    _set_props(proto, metadata_props(meta, train, extra))
    onnx.checker.check_model(proto)
    return _save_proto(proto, path)


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported file says about itself (parsed from metadata_props)."""

    meta: Meta
    train: dict = field(hash=False)
    extra: dict = field(hash=False)
    precision: str = "fp32"
    quantization: dict | None = field(default=None, hash=False)


def parse_metadata(props: dict[str, str], source: str = "the ONNX model") -> OnnxMetadata:
    """metadata_props {key: value} -> OnnxMetadata; raises OnnxModelError for missing, malformed or foreign data."""
    if KEY_FORMAT not in props or KEY_META not in props:
        raise OnnxModelError(
            f"{source} carries no chestxray metadata (keys {KEY_FORMAT!r}, {KEY_META!r}): it was not exported by "
            f"this tool, so its labels, image size and normalisation are unknown. Export it with: {EXPORT_COMMAND}")
    if props[KEY_FORMAT] != str(ONNX_FORMAT):
        raise OnnxModelError(f"{source} has ONNX export format {props[KEY_FORMAT]!r}; this version reads format "
                             f"{ONNX_FORMAT}. Export it again with: {EXPORT_COMMAND}")

    def _json(key: str, default: Any) -> Any:
        if key not in props:
            return default
        try:
            return json.loads(props[key])
        except json.JSONDecodeError as exc:
            raise OnnxModelError(f"{source}: metadata {key!r} is not valid JSON ({exc.msg} at {exc.pos})") from None

    meta_dict = _json(KEY_META, None)
    try:
        meta = Meta.from_dict(meta_dict)
    except CheckpointError as exc:
        raise OnnxModelError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise OnnxModelError(f"{source}: metadata {KEY_META!r} is invalid ({exc})") from None
    precision = props.get(KEY_PRECISION, "fp32")
    if precision not in PRECISIONS:
        raise OnnxModelError(f"{source}: unknown precision {precision!r} in metadata; expected one of {PRECISIONS}")
    train, extra = _json(KEY_TRAIN, {}), _json(KEY_EXTRA, {})
    if not isinstance(train, dict) or not isinstance(extra, dict):
        raise OnnxModelError(f"{source}: metadata {KEY_TRAIN!r} and {KEY_EXTRA!r} must be JSON objects")
    return OnnxMetadata(meta, train, extra, precision, _json(KEY_QUANTIZATION, None))


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def check_graph(proto, meta: Meta, source: str = "the ONNX model") -> None:
    """Raise OnnxModelError unless the graph's input/outputs are (image (B,3,S,S)) -> logits/maps/pooled for meta."""
    size, n_labels = int(meta.image_size), len(meta.labels)
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    problems = []
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs {[i.name for i in inputs]} (expected [{INPUT_NAME!r}])")
    elif _dims(inputs[0])[1:] != [3, size, size]:
        problems.append(f"input shape {_dims(inputs[0])} (expected [batch, 3, {size}, {size}] for the metadata's "
                        f"image_size {size})")
    outputs = {o.name: _dims(o) for o in proto.graph.output}
    if tuple(outputs) != OUTPUT_NAMES:
        problems.append(f"outputs {list(outputs)} (expected {list(OUTPUT_NAMES)})")
    else:
        if outputs["logits"][1:] != [n_labels]:
            problems.append(f"logits shape {outputs['logits']} (expected [batch, {n_labels}] for the metadata's "
                            f"{n_labels} labels)")
        if len(outputs["maps"]) != 4 or outputs["maps"][1] != n_labels:
            problems.append(f"maps shape {outputs['maps']} (expected [batch, {n_labels}, h, w])")
        if outputs["pooled"][1:] != [TRANSITION_CHANNELS]:
            problems.append(f"pooled shape {outputs['pooled']} (expected [batch, {TRANSITION_CHANNELS}])")
    if problems:
        raise OnnxModelError(f"{source}: the graph does not match its metadata: " + "; ".join(problems)
                             + f". Export it again with: {EXPORT_COMMAND}")


def external_data_refs(graph) -> list[str]:
    """Where a graph's tensors point outside the file: '<tensor name> -> <location>' for every initializer, sparse
    initializer and tensor attribute (Constant nodes, subgraphs of If/Loop/Scan included) stored as external data."""
    from onnx import TensorProto

    refs: list[str] = []
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        tensors = [*g.initializer, *(x for st in g.sparse_initializer for x in (st.values, st.indices))]
        for attr in (attr for node in g.node for attr in node.attribute):
            # Every tensor and graph field, whatever the attribute's declared type (a crafted file may lie).
            sparse = [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors]
            tensors += [*([attr.t] if attr.HasField("t") else []), *attr.tensors,
                        *(x for st in sparse for x in (st.values, st.indices))]
            graphs += [*([attr.g] if attr.HasField("g") else []), *attr.graphs]
        for t in tensors:
            if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
                location = next((e.value for e in t.external_data if e.key == "location"), "?")
                refs.append(f"{t.name or '(unnamed)'} -> {location!r}")
    return refs


def _load_proto(path: Path):
    """The file's ModelProto, refusing external data before anything (ONNX Runtime included) could read it.

    Our exports are one self-contained file. An external-data reference names a file to read (relative to the model
    or the working directory): README.md, the secret key... whose bytes would flow into the weights and out through
    the logits. Raises OnnxModelError.
    """
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise OnnxModelError(f"ONNX model not found: {path}. Export one with: {EXPORT_COMMAND}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise OnnxModelError(f"{path} is truncated or corrupt, or not an ONNX model ({type(exc).__name__})") from None
    refs = external_data_refs(proto.graph)
    if refs:
        shown = "; ".join(refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
        raise OnnxModelError(f"{path} refers to external data files ({shown}); this tool only loads self-contained "
                             f"models, as it exports them, so it is not loaded. Export it again with: "
                             f"{EXPORT_COMMAND}")
    return proto


def read_onnx_metadata(path: str | os.PathLike) -> OnnxMetadata:
    """The metadata of an exported file, checked against its graph; raises OnnxModelError naming the problem."""
    path = Path(path)
    proto = _load_proto(path)
    info = parse_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
    check_graph(proto, info.meta, str(path))
    return info


def onnx_providers(device: str = "auto") -> list:
    """ONNX Runtime execution providers for 'auto' | 'cpu' | 'cuda[:N]'; raises RuntimeError for cuda without its
    EP."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available and _torch_sees_cuda()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise RuntimeError(
                "--device cuda with the onnx backend needs onnxruntime's CUDA execution provider and a GPU; this "
                f"onnxruntime offers {available} (install onnxruntime-gpu instead of onnxruntime), "
                f"torch.cuda.is_available() is {_torch_sees_cuda()}. Use --device cpu, or --backend torch")
        index = int(device.split(":", 1)[1]) if ":" in device else 0  # one GPU per rank under torchrun
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return ["CPUExecutionProvider"]


def _torch_sees_cuda() -> bool:
    import torch  # only where onnxruntime offers CUDA, or CUDA is asked for

    return torch.cuda.is_available()


def checked_digests() -> list[str]:
    """SHA-256 digests of the .onnx files that passed every load check (newest last); [] when none or unreadable."""
    try:
        digests = json.loads(CHECKED_RECORD.read_text())
    except (OSError, ValueError):
        return []
    return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []


def _remember_checked(digest: str) -> None:
    """Add a digest to CHECKED_RECORD (bounded, written atomically); a folder that cannot be written is no error:
    the next load then checks the file again."""
    digests = [d for d in checked_digests() if d != digest][-(CHECKED_KEEP - 1):] + [digest]
    try:
        CHECKED_RECORD.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(CHECKED_RECORD, json.dumps(digests))
    except OSError:
        pass


class OnnxModel:
    """An exported model in an ONNX Runtime session. run() is thread-safe (ORT sessions are), no per-call state.

    Loading checks the file before ONNX Runtime reads it (no external data: onnx's parser), its metadata and its
    graph's declared inputs and outputs, and after loading, what one pass on a blank batch really returns. A file
    that passed all of it is remembered by its SHA-256 (CHECKED_RECORD, in this tool's own cache folder, not beside
    the model, so whoever can write the models folder cannot vouch for a file); the same bytes later skip the parse
    and the blank pass, which are most of a server's cold start on ONNX Runtime. Any other bytes get every check.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 expected_meta: Meta | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX model not found: {self.path}. Export one with: {EXPORT_COMMAND}")
        digest = file_sha256(self.path)
        checked = digest in checked_digests()
        if not checked:
            proto = _load_proto(self.path)
            info = parse_metadata({p.key: p.value for p in proto.metadata_props}, str(self.path))
            check_graph(proto, info.meta, str(self.path))
            # ONNX Runtime reads the file itself (checked above: no external data): a serialized copy handed over
            # as bytes would add the file's size to the server's memory, and the parsed proto is not needed.
            del proto
            self._set_meta(info, expected_meta)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's pool threads spin while waiting for work by default. Beside anything else on the CPU (the
        # server's other analyses, decoding, PNG writing, another program) the spinning takes the cores the others
        # need: with it off, 2 concurrent ResNet-18 runs gave 1.26x the runs per second on 2 loaded cores
        # (BENCHMARKS.md, "Eight readers at once").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=onnx_providers(device))
        except (RuntimeError, ValueError) as exc:  # onnxruntime's own errors are RuntimeError subclasses
            raise OnnxModelError(f"{self.path}: ONNX Runtime cannot load the graph ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}). Export it again with: {EXPORT_COMMAND}") from None
        self.providers = self.session.get_providers()
        if checked:  # the same metadata, read by ONNX Runtime instead of onnx's parser
            self._set_meta(parse_metadata(dict(self.session.get_modelmeta().custom_metadata_map), str(self.path)),
                           expected_meta)
        else:
            # The declared output shapes (check_graph) are not enforced by ONNX Runtime: a graph may declare 14
            # logits and compute 3. One pass on a blank batch checks what it really returns, so a bad file fails
            # here with a clear error instead of in the middle of a prediction.
            size = int(self.meta.image_size)
            self.run(np.zeros((1, 3, size, size), dtype=np.float32))
            _remember_checked(digest)

    def _set_meta(self, info: OnnxMetadata, expected_meta: Meta | None) -> None:
        if expected_meta is not None and expected_meta.to_dict() != info.meta.to_dict():
            differ = sorted(k for k, v in expected_meta.to_dict().items() if info.meta.to_dict().get(k) != v)
            raise OnnxModelError(f"{self.path} was exported from another checkpoint: its metadata differs in "
                                 f"{differ}. Export it again from this checkpoint with: {EXPORT_COMMAND}")
        self.info = info
        self.meta = info.meta
        self.precision = info.precision

    @property
    def device(self) -> str:
        """'cuda' when the session runs on the CUDA execution provider, else 'cpu'."""
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised (B, 3, S, S) float32 -> (logits (B, L), maps (B, L, h, w), pooled (B, C)) float32 numpy.

        Raises ValueError for another shape (S is meta.image_size).
        """
        if is_tensor(batch):
            batch = batch.detach().cpu().numpy()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = int(self.meta.image_size)
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or batch.shape[0] < 1:
            raise ValueError(f"expected a normalised (B, 3, {size}, {size}) batch, got shape {batch.shape}")
        logits, maps, pooled = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        n, labels = batch.shape[0], len(self.meta.labels)
        if (logits.shape != (n, labels) or maps.ndim != 4 or maps.shape[:2] != (n, labels)
                or pooled.shape != (n, TRANSITION_CHANNELS)):
            raise OnnxModelError(
                f"{self.path}: the graph returned logits {logits.shape}, maps {maps.shape}, pooled {pooled.shape} for "
                f"a batch of {n}; its metadata needs ({n}, {labels}), ({n}, {labels}, h, w), ({n}, "
                f"{TRANSITION_CHANNELS}). Export it again with: {EXPORT_COMMAND}")
        return logits, maps, pooled


# ----------------------------------------------------------------------------------------------------------------
# int8


def head_node_names(proto, include_transition: bool = False) -> list[str]:
    """Names of the nodes downstream of the last Conv (the transition layer): LSE pool, classifier, CAM, pooling;
    with include_transition, that Conv too."""
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    if not convs:
        raise ValueError("the graph has no Conv node; is it a model exported by this tool?")
    produced = set(convs[-1].output)
    head = [convs[-1].name] if include_transition else []
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        if any(i in produced for i in node.input):
            head.append(node.name)
            produced.update(node.output)
    return head


def first_conv_name(proto) -> str:
    """Name of the first Conv node (the stem, fed by the image)."""
    for node in proto.graph.node:  # topologically sorted: the first Conv met is the stem
        if node.op_type == "Conv":
            return node.name
    raise ValueError("the graph has no Conv node; is it a model exported by this tool?")


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over an iterable of normalised (B, 3, S, S) batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.count += len(batch)
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # onnxruntime's calibrators read the batches once and never rewind
        raise NotImplementedError


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Iterable[np.ndarray],
                  per_channel: bool = True, exclude_head: bool = True, float_transition: bool = False,
                  symmetric_activations: bool = False, calibration: str = "minmax", note: dict | None = None,
                  float_first_conv: bool = False) -> Path:
    """Static int8 (QDQ; MinMax, percentile or entropy calibration) of an exported fp32 model, calibrated on
    `batches`; metadata carried over.

    batches: normalised (B, 3, S, S) float32 arrays, e.g. training-split images (never the evaluation data).
    float_first_conv keeps the stem convolution in float (it reads the image itself; keeping the first layer float
    is the usual first step when int8 loses accuracy, and it is one Conv of many). calibration "entropy" gives
    MinMax's ranges with onnxruntime's quantize_static: its entropy search has 128 histogram bins for 128 quantized
    bins, so the only candidate is the full range, and quantize_static passes no option to change the bins.
    Raises OnnxModelError for a bad input file, ValueError for no calibration data.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibration not in methods:
        raise ValueError(f"calibration must be one of {sorted(methods)}, got {calibration!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    info = read_onnx_metadata(fp32_path)
    if info.precision != "fp32":
        raise OnnxModelError(f"{fp32_path} is already {info.precision}; quantize the fp32 export")
    reader = _Calibration(batches)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_path.parent if out_path.parent.exists() else None
                                     ) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference + graph optimisation (folds BatchNorm into Conv) so that each Conv gets one scale set.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        exclude = head_node_names(graph, float_transition) if exclude_head else []
        if float_first_conv:
            exclude = [first_conv_name(graph), *exclude]
        activations = QuantType.QInt8 if symmetric_activations else QuantType.QUInt8
        quantize_static(
            str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=activations, weight_type=QuantType.QInt8,
            calibrate_method=methods[calibration], nodes_to_exclude=exclude,
        )
        if reader.count == 0:
            raise ValueError("no calibration images: give training-split images to calibrate the int8 model on")
        proto = onnx.load(str(quantized))
    quant = {"method": f"onnxruntime quantize_static, QDQ, {calibration}", "per_channel": per_channel,
             "activations": "int8" if symmetric_activations else "uint8", "weights": "int8",
             "float_nodes": exclude, "calibration_images": reader.count,
             **(note or {})}
    _set_props(proto, metadata_props(info.meta, info.train, info.extra, "int8", quant))
    check_graph(proto, info.meta, str(out_path))
    return _save_proto(proto, out_path)
