"""`Meta`: what rebuilds a model and its preprocessing, as plain data; and `SplitSpec`, how its data were split.

No torch import here, so preprocessing, the dataset and anything that only reads a checkpoint's description stay
light. Every field is validated on construction (type and range): a checkpoint that passes the safe loader but
holds, say, an even transition kernel or a NaN threshold is refused with a `CheckpointError` naming the field,
instead of crashing the web app later.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .labels import LABELS, LabelError, check_labels

# The trunks model.py can build (model.ARCHS maps each to its torchvision builder; a test keeps the two equal).
ARCH_NAMES: tuple[str, ...] = ("densenet121", "efficientnet_b1", "resnet18", "resnet50")
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)  # == model.OUTPUT_STRIDES (tested); below 32 for the ResNets only
TRANSITION_CHANNELS = 1024  # the transition layer's width: the maps' and the in-scope check's features (model.py)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
SPLIT_ROLES_KEY = "roles"  # meta.training["split"]["roles"]: which split served which role (data.split_roles)
DEFAULT_TEST_FRACTION = 0.2  # seeded patient-wise split when the official lists are absent (official: ~23%)
# Fraction of the non-test patients held out for calibration, thresholds, evidence and the scope limit (training's
# default; SplitSpec's own default 0 describes checkpoints that predate the calibration split).
DEFAULT_CALIBRATION_FRACTION = 0.15
# Summary fields that must be numbers (or None) when present: the web app formats them as numbers.
NUMERIC_TRAINING_FIELDS = ("val_mean_auroc", "val_loss", "epochs", "epochs_planned", "n_train", "n_val",
                           "n_calibration", "lr", "image_size", "batch_size", "world_size")


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint of this project; the message names the problem (and the field)."""


def _fail(name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint metadata field {name!r}: {problem}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any, name: str) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise _fail(name, f"must be a finite number, got {type(value).__name__} {str(value)[:40]}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(name, f"must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise _fail(name, f"must lie in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def _sequence(value: Any, name: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _fail(name, f"must be a list, got {type(value).__name__}")
    return tuple(value)


def _check_plain(value: Any, name: str) -> None:
    """JSON-able plain data only (no tensors, no objects), finite floats: it is shown on pages and in JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        _finite(value, name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{name}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(name, f"keys must be strings, got {type(key).__name__}")
            _check_plain(item, f"{name}.{key}")
    else:
        raise _fail(name, f"must hold plain data (numbers, strings, lists, dicts), found {type(value).__name__}")


def _check_training(training: Any) -> dict:
    if not isinstance(training, dict):
        raise _fail("training", f"must be a dict, got {type(training).__name__}")
    _check_plain(training, "training")
    for key in NUMERIC_TRAINING_FIELDS:
        value = training.get(key)
        if value is not None and not _is_real(value):
            raise _fail(f"training.{key}", f"must be a number, got {type(value).__name__}")
    val_auroc = training.get("val_auroc")
    if val_auroc is not None and not (isinstance(val_auroc, dict)
                                      and all(v is None or _is_real(v) for v in val_auroc.values())):
        raise _fail("training.val_auroc", "must map labels to numbers")
    if training.get("split") is not None:
        SplitSpec.from_dict(training["split"])
    return training


@dataclass(frozen=True)
class SplitSpec:
    """How training split its data folder by patient; stored as plain data in meta.training["split"].

    official: the folder had train_val_list.txt / test_list.txt (test = test_list, val and calibration carved from
    train_val by patient); otherwise a seeded patient-wise split of test_fraction / val_fraction /
    calibration_fraction of patients. calibration_fraction 0 marks a checkpoint trained before the calibration split
    existed: its validation split served both epoch selection and calibration. limit: at most that many images per
    split, a seeded sample (smoke runs). data_entry_sha256: the label file's SHA-256, which tells whether an
    evaluated folder is the very data the model was trained on. stratify: patients were assigned by scikit-learn's
    StratifiedGroupKFold on view position x any finding (train.py --stratify-split; data.make_splits), not by
    each patient's own draw, so the split depends on the whole index it was made from. The recorded dict may also hold
    "roles" (which split served which role, with image and patient counts), a description that from_dict does not
    need.
    """

    official: bool
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    data_entry_sha256: str | None = None
    calibration_fraction: float = 0.0
    stratify: bool = False

    def __post_init__(self) -> None:
        name = "training.split"
        for key in ("official", "stratify"):
            if not isinstance(getattr(self, key), bool):
                raise _fail(f"{name}.{key}", f"must be true or false, got {type(getattr(self, key)).__name__}")
        for key in ("val_fraction", "test_fraction"):
            value = _finite(getattr(self, key), f"{name}.{key}")
            if not 0.0 < value < 1.0:
                raise _fail(f"{name}.{key}", f"must lie strictly between 0 and 1, got {value}")
            object.__setattr__(self, key, value)
        calibration = _finite(self.calibration_fraction, f"{name}.calibration_fraction")
        if not 0.0 <= calibration < 1.0 - self.val_fraction:
            raise _fail(f"{name}.calibration_fraction", f"must lie in [0, 1 - val_fraction), got {calibration}")
        object.__setattr__(self, "calibration_fraction", calibration)
        _integer(self.seed, f"{name}.seed", -(2**63))
        if self.limit is not None:
            _integer(self.limit, f"{name}.limit", 1)
        if self.data_entry_sha256 is not None and not isinstance(self.data_entry_sha256, str):
            raise _fail(f"{name}.data_entry_sha256", "must be a string")

    @classmethod
    def from_dict(cls, d: Any) -> SplitSpec:
        """Rebuild from to_dict() output (older checkpoints lack the later keys); CheckpointError names a bad one."""
        if not isinstance(d, dict):
            raise _fail("training.split", f"must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != SPLIT_ROLES_KEY}  # descriptive only: nothing to rebuild from it
        unknown = sorted(set(d) - names)
        if unknown or "official" not in d:
            raise _fail("training.split", f"unknown key(s) {unknown}" if unknown else "lacks 'official'")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Meta:
    """What rebuilds the model and its preprocessing, plus a training summary (plain data only).

    thresholds are on the scale of the probabilities the Predictor shows: calibrated when the checkpoint holds
    a "trust" entry (its calibration), sigmoid(logit) otherwise. The trust entry itself (in-scope statistics as
    tensors, Platt parameters, per-label evidence, the orientation check) lives beside "meta" in the checkpoint,
    not here, because it holds tensors; see chestxray/trust/. training["n_train"] / ["n_val"] /
    ["n_calibration"] count the images.
    """

    arch: str
    labels: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lse_r: float
    transition_kernel: int
    thresholds: tuple[float, ...]
    # data, epochs, val_auroc {label: float}, val_mean_auroc, date, commit, split (SplitSpec.to_dict()) ...
    training: dict = field(hash=False)
    # Fields added later have defaults: an older checkpoint lacks them and meant the default. Input pixels per
    # heatmap cell (model.OUTPUT_STRIDES); before it was a field, every trunk had its own, 32.
    output_stride: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCH_NAMES:
            raise CheckpointError(f"unknown arch {str(self.arch)[:40]!r} in checkpoint metadata field 'arch'; "
                                  f"known: {list(ARCH_NAMES)}")
        labels = _sequence(self.labels, "labels")
        if not all(isinstance(name, str) for name in labels):
            raise _fail("labels", "must be a list of label names (strings)")
        try:
            object.__setattr__(self, "labels", check_labels(labels))
        except LabelError as exc:
            raise _fail("labels", str(exc)) from None
        _integer(self.image_size, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if _finite(self.lse_r, "lse_r") <= 0:
            raise _fail("lse_r", f"must be positive, got {self.lse_r}")
        object.__setattr__(self, "lse_r", float(self.lse_r))
        if _integer(self.transition_kernel, "transition_kernel", 1) % 2 == 0:
            raise _fail("transition_kernel", f"must be odd, got {self.transition_kernel}")
        if _integer(self.output_stride, "output_stride", 1) not in OUTPUT_STRIDES:
            raise _fail("output_stride", f"must be one of {OUTPUT_STRIDES}, got {self.output_stride}")
        if self.output_stride != 32 and not self.arch.startswith("resnet"):
            raise _fail("output_stride", f"{self.output_stride} is available for the ResNet trunks only; "
                        f"{self.arch} has 32")
        self._check_numbers()
        _check_training(self.training)

    def _check_numbers(self) -> None:
        thresholds = tuple(_finite(t, "thresholds") for t in _sequence(self.thresholds, "thresholds"))
        if len(thresholds) != len(self.labels):
            raise _fail("thresholds", f"has {len(thresholds)} thresholds for {len(self.labels)} labels")
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise _fail("thresholds", "must lie in [0, 1]")
        object.__setattr__(self, "thresholds", thresholds)
        for key in ("mean", "std"):
            values = tuple(_finite(v, key) for v in _sequence(getattr(self, key), key))
            if len(values) != 3:
                raise _fail(key, f"must be three numbers (one per channel), got {len(values)}")
            object.__setattr__(self, key, values)
        if min(self.std) <= 0:
            raise _fail("std", "must be positive")

    @classmethod
    def new(
        cls,
        arch: str = "resnet50",
        labels: tuple[str, ...] = LABELS,
        image_size: int = 512,
        lse_r: float = 10.0,
        transition_kernel: int = 3,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        thresholds: tuple[float, ...] | None = None,
        training: dict | None = None,
        output_stride: int = 32,
    ) -> Meta:
        """A fresh Meta with the seed defaults; thresholds 0.5 until training chooses them."""
        labels = tuple(labels)
        return cls(
            arch=arch,
            labels=labels,
            image_size=int(image_size),
            mean=tuple(mean),
            std=tuple(std),
            lse_r=float(lse_r),
            transition_kernel=int(transition_kernel),
            thresholds=tuple(thresholds) if thresholds is not None else (0.5,) * len(labels),
            training=dict(training or {}),
            output_stride=int(output_stride),
        )

    @classmethod
    def from_dict(cls, d: Any) -> Meta:
        """Rebuild from asdict() output; a missing or unknown key, or a bad value, raises CheckpointError naming it.

        Only the fields added later (those with a default) may be missing: older checkpoints meant the default."""
        if not isinstance(d, dict):
            raise CheckpointError(f"checkpoint 'meta' must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - d.keys())
        unknown = sorted(str(k) for k in set(d) - names)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unknown:
                parts.append(f"unknown key(s) {unknown}")
            raise CheckpointError("checkpoint metadata: " + "; ".join(parts))
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain-data dict (lists, not tuples) for torch.save and JSON."""
        d = asdict(self)
        for key in ("labels", "mean", "std", "thresholds"):
            d[key] = list(d[key])
        return d

    @property
    def split(self) -> SplitSpec | None:
        """The split training recorded (None for checkpoints that predate it)."""
        saved = self.training.get("split")
        return SplitSpec.from_dict(saved) if saved is not None else None

    def replace(self, **changes: Any) -> Meta:
        return dataclasses.replace(self, **changes)
