"""A training run's folder: the run configuration (args.json), the resumable state (last.pth), RNG states.

The run configuration is stored once, in `<run>/args.json` (plain JSON, written when the run starts and again,
merged, when it is resumed); the state file and the best checkpoint refer to it by path. The state
file holds what changes every epoch: weights, optimiser, scaler, scheduler, RNG states, history and the best score.
Core module: no argparse and no printing; problems are exceptions, notices are returned.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, atomic_torch_save, remove_stale_temporaries, safe_torch_load
from .fileio import write_json

CONFIG_FILE = "args.json"
STATE_FILE = "last.pth"
PREVIOUS_STATE_FILE = "last.prev.pth"  # the state before last.pth: a resume falls back to it if last.pth is damaged
STATE_FORMAT = 1
# Settings that define the run: a resume takes them from the saved configuration; another value is an error.
LOCKED = ("arch", "labels", "image_size", "output_stride", "transition_kernel", "batch_size", "lr", "weight_decay",
          "scheduler", "loss", "seed", "val_fraction", "calibration_fraction", "limit", "hflip", "no_pretrained",
          "clip_grad", "intensity_augment", "stratify_split")


class NoTrainingState(CheckpointError):
    """The run folder holds no training state to resume."""


class LockedSettingChanged(ValueError):
    """A resume asked for another value of a setting that defines the run; `key` and `saved` name it."""

    def __init__(self, key: str, saved: Any) -> None:
        super().__init__(f"{key} cannot change when a run is resumed (the run in progress uses {saved!r})")
        self.key, self.saved = key, saved


# ----------------------------------------------------------------------------------------------------------------
# Run configuration


def write_config(run_dir: str | os.PathLike, config: dict) -> Path:
    """Write the run configuration (plain data) to <run_dir>/args.json atomically."""
    return write_json(Path(run_dir) / CONFIG_FILE, config)


def read_config(run_dir: str | os.PathLike, state: dict | None = None) -> dict:
    """The run configuration of run_dir; states written before args.json was the one copy carry their own."""
    path = Path(run_dir) / CONFIG_FILE
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the run configuration {path}: {exc}") from None
        if isinstance(config, dict):
            return config
        raise CheckpointError(f"{path} is not a run configuration (expected a JSON object)")
    if state is not None and isinstance(state.get("args"), dict):
        return dict(state["args"])
    raise CheckpointError(f"the run folder {run_dir} has no {CONFIG_FILE}: its run configuration is lost")


def merge_config(given: dict, saved: dict, defaults: dict, locked: tuple[str, ...] = LOCKED) -> tuple[dict, list]:
    """Merge a resume's settings into the saved run's -> (merged, [(key, given, saved) changed free settings]).

    Locked settings come from `saved`; giving another non-default value raises LockedSettingChanged. Free settings
    keep a non-default `given` value (a change, reported) and otherwise the saved one. Keys not in `defaults`
    (no longer a setting) are ignored.
    """
    merged, changed = dict(given), []
    for key, value in saved.items():
        if key not in defaults:
            continue
        new = given.get(key)
        if key in locked:
            if new != defaults[key] and new != value:
                raise LockedSettingChanged(key, value)
            merged[key] = value
        elif new == defaults[key] or new is None:
            merged[key] = value
        elif new != value:
            changed.append((key, new, value))
    return merged, changed


# ----------------------------------------------------------------------------------------------------------------
# Random number generators


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors/lists, loadable with weights_only=True."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved (CUDA states only when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# State file


def save_state(run_dir: str | os.PathLike, state: dict) -> Path:
    """Write <run_dir>/last.pth atomically, keeping the previous one as last.prev.pth. `state` is plain data."""
    run_dir = Path(run_dir)
    atomic_torch_save({"format": STATE_FORMAT, "kind": "train-state", "config": CONFIG_FILE, **state},
                      run_dir / STATE_FILE, backup=run_dir / PREVIOUS_STATE_FILE)
    return run_dir / STATE_FILE


def read_state(path: str | os.PathLike) -> dict:
    """One state file; CheckpointError when it is not a resumable training state."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("kind") != "train-state" or "epoch" not in state:
        raise CheckpointError(f"{path} is not a resumable training state of this tool")
    return state


def load_resume_state(run_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """The newest complete state in run_dir -> (state, notices): last.pth, else (damaged or missing) last.prev.pth.

    Raises NoTrainingState when the folder holds neither, CheckpointError when neither loads.
    """
    run_dir = Path(run_dir)
    current, previous = run_dir / STATE_FILE, run_dir / PREVIOUS_STATE_FILE
    if not current.is_file() and not previous.is_file():
        raise NoTrainingState(f"no {STATE_FILE} in {run_dir}")
    notes = []
    stale = remove_stale_temporaries(current)
    if stale:
        notes.append(f"removed {len(stale)} partial state file(s) left by an interrupted write")
    try:
        if not current.is_file():
            raise CheckpointError(f"{current} is missing (the run stopped while replacing it)")
        return read_state(current), notes
    except CheckpointError as exc:
        if not previous.is_file():
            raise
        notes.append(f"warning: {exc}; falling back to the previous state {previous}")
        try:
            state = read_state(previous)
        except CheckpointError as prev_exc:
            raise CheckpointError(f"neither training state can be used: {exc}; {prev_exc}") from None
        notes.append(f"resuming from {previous} (epoch {state['epoch']}); the epochs after it are trained again")
        return state, notes
