"""int8 by PyTorch 2 export quantization (X86InductorQuantizer), judged with int8_gate.py's gate, sets and criteria.

    PYTHONPATH=<torchao dir> python benchmarks/int8_pt2e.py --checkpoint CKPT --data-dir DIR [--no-speed]

The field's PyTorch-native int8 path for x86 CPUs: torch.export of the trunk + transition layer (model.features),
torchao's prepare_pt2e with X86InductorQuantizer's default static config (uint8 activations with HistogramObserver,
int8 per-channel symmetric weights, BatchNorm folded into the convolutions), calibration on training-split images
(export.py's seeded sample, as int8_gate.py and export.py --int8 use), convert_pt2e. The LSE pool, the classifier and
the CAM einsum stay float, as the ONNX int8 settings keep the head float. Quality is judged on the converted model run
eagerly (its quantize/dequantize ops give the int8 numerics) against the fp32 model run eagerly, with int8_gate.judge
on the same validation and held-out sets. Speed: batch-1 latency of torch.compile (inductor, freezing on: the
quantized convolutions become oneDNN int8 kernels) of the converted model against int8_gate.py's engines (PyTorch
eager, ONNX Runtime fp32 and int8 with today's default setting, OpenVINO when it imports), in one interleaved run, at
the checkpoint's size and at --speed-size with random weights of the same architecture.

torchao is not a project dependency: install it outside the project (pip install --target DIR torchao) and put DIR on
PYTHONPATH. Writes benchmarks/results/int8_pt2e.md (the quality rows first, rewritten once the speed rows are in, so a
compile stopped for taking too long still leaves the quality figures).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import Model_Training.export as export  # noqa: E402
from benchmarks import int8_gate as gate  # noqa: E402
from benchmarks.common import write_report  # noqa: E402
from chestxray.cam import predict_with_maps  # noqa: E402
from chestxray.checkpoint import load_checkpoint, model_from_meta  # noqa: E402
from chestxray.data import targets  # noqa: E402
from chestxray.imaging import read_xray  # noqa: E402
from chestxray.metrics import binarize  # noqa: E402
from chestxray.onnx_backend import export_onnx, quantize_int8  # noqa: E402
from chestxray.predictor import Predictor  # noqa: E402
from chestxray.transforms import build_transform  # noqa: E402

NAME = "pt2e-x86-inductor"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint")
    parser.add_argument("--data-dir", required=True, help="the data folder it was trained on (calibration images "
                        "come from its training split)")
    parser.add_argument("--calibration-images", type=int, default=128, help="training-split images to calibrate "
                        "on (default: %(default)s, as int8_gate.py's default setting)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates for the "
                        "intervals (default: %(default)s)")
    parser.add_argument("--speed-size", type=int, default=512, help="second input size for the speed rows, same "
                        "architecture, random weights (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed batch-1 runs per engine and size "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s, as "
                        "BENCHMARKS.md's int8 table)")
    parser.add_argument("--no-speed", action="store_true", help="judge quality only (no torch.compile)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_pt2e.md"),
                        help="(default: %(default)s)")
    return parser


class _Block(nn.Module):
    """A torchvision residual block (BasicBlock or Bottleneck) computing the same, with one ReLU module per use and
    `+` for the skip. torchvision calls one `relu` module two or three times per block; torch 2.14's source-partition
    matcher merges those calls into one partition with several outputs, and X86InductorQuantizer then stops with
    "Input partition has more than one output node". Its conv + add + relu pattern also needs `+`, not `+=`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(3 if hasattr(block, "conv3") else 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, out = self.block, x
        for i, relu in enumerate(self.relus[:-1], start=1):
            out = relu(getattr(b, f"bn{i}")(getattr(b, f"conv{i}")(out)))
        last = len(self.relus)
        out = getattr(b, f"bn{last}")(getattr(b, f"conv{last}")(out))
        identity = b.downsample(x) if b.downsample is not None else x
        return self.relus[-1](out + identity)


class _Features(nn.Module):
    """model.features as the module to export: x (B, 3, S, S) -> A (B, 1024, h, w), on a copy of the model whose
    residual blocks are _Block-wrapped (same weights, same results)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        blocks = [(parent, name, child) for parent in self.model.modules() for name, child in parent.named_children()
                  if type(child).__name__ in ("BasicBlock", "Bottleneck")]
        for parent, name, child in blocks:
            setattr(parent, name, _Block(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class QuantizedNet(nn.Module):
    """Stands in for ChestXrayNet: features() from the converted int8 graph; head() and the classifier weights the
    CAM reads stay the float model's. forward: x (B, 3, S, S) -> (logits (B, L), maps (B, L, h, w))."""

    def __init__(self, model: nn.Module, quantized: torch.fx.GraphModule) -> None:
        super().__init__()
        self.model, self.quantized, self.classifier = model, quantized, model.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.model.head(a)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_with_maps(self, x)


def quantize_pt2e(model: nn.Module, size: int, batches: Iterable[np.ndarray]) -> QuantizedNet:
    """The float model (eval) and normalised (B, 3, S, S) float32 calibration batches -> its PT2E int8 stand-in.

    Raises ImportError naming the fix when torchao is missing (the PT2E flow left torch.ao for torchao)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise ImportError("PyTorch 2 export quantization needs torchao: pip install --target DIR torchao, then "
                          "PYTHONPATH=DIR (it is not a project dependency)") from exc
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.zeros(2, 3, size, size),)
    graph = torch.export.export(_Features(model), example, dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for b in batches:
            prepared(torch.from_numpy(b))
    return QuantizedNet(model, convert_pt2e(prepared))  # no .eval(): an exported graph refuses it (no need either)


class TorchScored:
    """int8_gate.Scored for a torch model: logits, maps, raw calls and the product's calls on the held-out images,
    from a Predictor of the checkpoint whose model is `model` (None: the checkpoint's own fp32 model), run in chunks
    of batch_size images (1 for a compiled model: one input shape, one compilation)."""

    def __init__(self, checkpoint: str, model: nn.Module | None, inputs: torch.Tensor, images: list[np.ndarray],
                 batch_size: int = 32) -> None:
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
        if model is not None:
            predictor.model = model
        logits, maps, predictions = [], [], []
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i:i + batch_size]
            with torch.inference_mode():
                z, m = predict_with_maps(predictor.model, predictor.normalize(chunk))
            logits.append(z.float().numpy())
            maps.append(m.float().numpy())
            predictions += predictor.predict_batch(images[i:i + batch_size], heatmaps=False, inputs=chunk)
        self.logits, self.maps = np.concatenate(logits), np.concatenate(maps)
        calibration = predictor.trust.calibration
        probs = np.stack([calibration.apply(z) for z in self.logits.astype(np.float64)]) if calibration else \
            gate._sigmoid(self.logits)
        self.raw_calls = binarize(probs, predictor.thresholds)
        self.calls = np.array([[p.calls[name] for name in predictor.labels] for p in predictions])


def _criteria_row(name: str, r: dict, description: str) -> str:
    v = r["validated"]
    passed, fails = gate.verdict(r)
    over, overlap = int((r["delta"][v] > gate.AUROC_TOL).sum()), int(r["overlap"][v].sum())
    judged = "**passes**" if passed else "fails: " + "; ".join(fails).replace("|", "\\|")
    return (f"| {name}: {description} | {r['delta'][v].max():.3f} ({over} / {int(v.sum())}) | {overlap} / "
            f"{int(v.sum())} | {100 * r['raw_agree'].mean():.1f} % ({100 * r['raw_agree'].min():.1f} %) | "
            f"{100 * r['agree'].mean():.1f} % ({100 * r['called']:.0f} % called) | {r['corr'].min():.3f} | {judged} |")


def compiled(quantized: QuantizedNet, size: int) -> tuple[QuantizedNet, float]:
    """(the int8 features graph under torch.compile (inductor, freezing on), seconds its first batch-1 call took:
    the compilation). Head and CAM stay eager float."""
    torch._inductor.config.freezing = True  # weights as constants: what lets inductor pick oneDNN's int8 kernels
    net = QuantizedNet(quantized.model, torch.compile(quantized.quantized))
    start = time.perf_counter()
    with torch.inference_mode():  # the mode every later call runs in: no recompilation for another grad mode
        net.features(torch.zeros(1, 3, size, size))
    return net, time.perf_counter() - start


def speed(model: nn.Module, meta, int8: QuantizedNet, args, calibration: list[Path], tmp: Path) -> dict[str, float]:
    """{engine: median batch-1 seconds} at meta.image_size, interleaved: int8_gate's engines (PyTorch eager, ONNX
    Runtime fp32 and int8 with today's default setting, calibrated on `calibration`; OpenVINO when it imports) as
    anchors, and the compiled PT2E int8 model."""
    fp32, qdq = tmp / f"speed{meta.image_size}.onnx", tmp / f"speed{meta.image_size}.int8.onnx"
    export_onnx(model, meta, fp32)
    quantize_int8(fp32, qdq, export.calibration_batches(calibration, meta, 4, []))
    engines = gate._engines(model, fp32, qdq, args.threads)

    def pt2e(x: np.ndarray) -> None:
        with torch.inference_mode():
            predict_with_maps(int8, torch.from_numpy(x))

    engines[COMPILED] = pt2e
    x = np.random.default_rng(0).standard_normal((1, 3, meta.image_size, meta.image_size)).astype(np.float32)
    return gate._timed(engines, x, args.repeats)


COMPILED = "PT2E int8, torch.compile (inductor, freezing)"


def cache_dir() -> str:
    """The folder of inductor's compilation cache (TORCHINDUCTOR_CACHE_DIR, or torch's default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


def report(args, meta, sets: dict, results: dict, description: str, timings: dict, seconds: float) -> list[str]:
    command = " ".join(["python benchmarks/int8_pt2e.py", *sys.argv[1:]]) if sys.argv[1:] else "(called from code)"
    import torchao

    t = meta.training
    lines = ["# int8 by PyTorch 2 export quantization (x86 inductor)", "", f"Command: `{command}`", "",
             f"torch {torch.__version__}, torchao {torchao.__version__} (outside the project). Checkpoint: "
             f"{meta.arch} at {meta.image_size} px, {t.get('data', '')}; validation mean AUROC at training "
             f"{t.get('val_mean_auroc'):.4f}. Sets: "
             + ", ".join(f"{name} {int(mask.sum())} images" for name, mask in sets.items())
             + f" (int8_gate.evaluation_sets). Calibration: {description}. Bootstrap: {args.bootstrap} patient "
             f"replicates. Quantization and eager scoring {seconds:.0f} s. Reference: the fp32 model run eagerly.", "",
             f"Gate on the held-out set: every label with both classes |ΔAUROC| <= {gate.AUROC_TOL}, calls agree on "
             f">= {100 * gate.AGREEMENT:.0f} % of label-images (raw and product), every label's map correlation >= "
             f"{gate.MAP_CORR}."]
    setting = ("X86InductorQuantizer default static config (per-channel int8 weights, uint8 activations, "
               f"HistogramObserver), trunk + transition int8, head float, {args.calibration_images} images")
    runs = {"eager": "converted model run eagerly (reference quantize/dequantize ops)",
            "compiled": "the same model under torch.compile (oneDNN int8 kernels), batch 1"}
    for set_name in sets:
        header = gate._criteria_rows({}, set_name)  # no ONNX results: the table's header only
        lines += ["", f"## {set_name}", "", *header]
        lines += [_criteria_row(f"{NAME} ({run})", by_set[set_name], f"{setting}; {runs[run]}")
                  for run, by_set in results.items()]
    for run, by_set in results.items():
        noise = by_set["held-out"]["noise"]
        lines += ["", f"## Per label, held-out set, {NAME} ({run})", "",
                  *gate._label_rows(by_set["held-out"], meta.labels), "",
                  f"int8's logit error against the spread of the fp32 logits over the held-out images (SD of int8 − "
                  f"fp32 / SD of fp32, per label): median {np.median(noise):.2f}, range {noise.min():.2f}–"
                  f"{noise.max():.2f}."]
    if timings:
        lines += ["", f"## Speed ({args.threads} threads, {args.repeats} runs each in alternating blocks, median; "
                  f"{args.speed_size} px with random weights; ONNX int8 and the {args.speed_size} px PT2E model "
                  f"calibrated on 8 training images; the first call is the "
                  f"compilation, from the inductor cache in {cache_dir()}: an empty one gives the cold figure)", "",
                  "| size | engine | median ms per image (batch 1) | × PyTorch eager | torch.compile first call |",
                  "|---:|---|---:|---:|---:|"]
        for size, (by_engine, compile_s) in timings.items():
            eager = by_engine["PyTorch eager"]
            lines += [f"| {size} px | {name} | {1000 * s:.1f} | {s / eager:.2f} | "
                      f"{f'{compile_s:.0f} s' if name == COMPILED else '–'} |" for name, s in by_engine.items()]
    return lines


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, meta, _ = load_checkpoint(args.checkpoint)
    model.eval()
    held, sets, _ = gate.evaluation_sets(meta, args.data_dir, None)
    transform = build_transform(meta)
    inputs = torch.stack([transform(read_xray(p)) for p in held["path"]])
    images = [a[0].numpy() for a in inputs]  # as in int8_gate.main: the inputs stand in for the images
    y, patients = targets(held, meta.labels), held["patient"].to_numpy()
    start = time.perf_counter()
    paths, description = export.calibration_paths(Path(args.data_dir), meta, args.calibration_images, 0)
    quantized = quantize_pt2e(model, meta.image_size, export.calibration_batches(paths, meta, 16, []))
    ref = TorchScored(args.checkpoint, None, inputs, images)

    def judged(net: nn.Module, batch_size: int) -> dict:
        q = TorchScored(args.checkpoint, net, inputs, images, batch_size)
        by_set = {s: gate.judge(y, patients, ref, q, mask, args.bootstrap) for s, mask in sets.items()}
        # How large int8's logit error is against the differences between images that AUROC ranks, per label.
        by_set["held-out"]["noise"] = (q.logits - ref.logits).std(axis=0) / ref.logits.std(axis=0)
        print(NAME, "held-out:", gate.verdict(by_set["held-out"]), flush=True)
        return by_set

    results = {"eager": judged(quantized, 32)}
    seconds = time.perf_counter() - start
    write_report(report(args, meta, sets, results, description, {}, seconds), args.out)
    timings = {}
    if not args.no_speed:
        with tempfile.TemporaryDirectory() as tmp:
            net, compile_s = compiled(quantized, meta.image_size)
            print(f"{meta.image_size} px: torch.compile took {compile_s:.0f} s", flush=True)
            results["compiled"] = judged(net, 1)
            calibration, _ = export.calibration_paths(Path(args.data_dir), meta, 8, 0)
            timings[meta.image_size] = speed(model, meta, net, args, calibration, Path(tmp)), compile_s
            write_report(report(args, meta, sets, results, description, timings, seconds), args.out)
            if args.speed_size != meta.image_size:
                size = args.speed_size
                random_meta = dataclasses.replace(meta, image_size=size)
                random_model = model_from_meta(random_meta).eval()
                int8 = quantize_pt2e(random_model, size, export.calibration_batches(calibration, random_meta, 4, []))
                net, compile_s = compiled(int8, size)
                print(f"{size} px: torch.compile took {compile_s:.0f} s", flush=True)
                timings[size] = speed(random_model, random_meta, net, args, calibration, Path(tmp)), compile_s
                write_report(report(args, meta, sets, results, description, timings, seconds), args.out)
    return {"results": results, "timings": timings}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
