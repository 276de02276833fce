"""Model_Training/train.py end to end on the real sample: run files, checkpoint contract, resume after SIGKILL,
two-process DDP under torchrun (gloo), unreadable images, clean stops. ResNet-18 at 64 px keeps each run short."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from support import forked
from support.training import TRAIN_PY, kill_once_written, linked_data, read_history, run_main, small_run
from torch.utils.data import DataLoader

from chestxray import data
from chestxray.checkpoint import load_checkpoint
from chestxray.data import XrayDataset, collate_batch, load_index, make_splits, rebuild_splits
from chestxray.engine import predict_probabilities
from chestxray.labels import CHESTXRAY8_LABELS, LABELS
from chestxray.meta import SplitSpec
from chestxray.metrics import choose_thresholds, per_label_auroc
from chestxray.model import PretrainedWeightsUnavailable
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import Trust
from Model_Training import train

ROOT = Path(__file__).resolve().parents[1]
TRAINING_KEYS = {"data", "epochs", "val_auroc", "val_mean_auroc", "date", "commit", "split", "loss",
                 "threshold_rule", "n_train", "n_val", "intensity_augment"}


def validation_predictions(data_dir: Path, checkpoint: Path, cache_dir: Path | None = None, split: str = "val"):
    """Re-create one of the checkpoint's splits (validation by default) from its metadata alone and predict it."""
    model, meta, _ = load_checkpoint(checkpoint)
    val = rebuild_splits(meta, load_index(data_dir), data_dir)[split]
    dataset = XrayDataset(val, meta.labels, build_transform(meta), cache_dir=cache_dir)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_batch)
    probs, y, indices = predict_probabilities(model, loader, torch.device("cpu"), build_normalize(meta),
                                              progress=False)
    assert indices.tolist() == list(range(len(val)))
    return meta, probs, y


def assert_auroc_matches(meta, probs, y, abs_tol: float) -> None:
    recomputed = per_label_auroc(y, probs)
    stored = np.array([np.nan if v is None else v for v in (meta.training["val_auroc"][n] for n in meta.labels)])
    np.testing.assert_array_equal(np.isnan(recomputed), np.isnan(stored))
    np.testing.assert_allclose(recomputed[~np.isnan(stored)], stored[~np.isnan(stored)], atol=abs_tol, rtol=0)
    assert meta.training["val_mean_auroc"] == pytest.approx(float(np.nanmean(stored)))


@pytest.mark.slow(6)
def test_training_writes_run_files_and_a_contract_checkpoint(trained_run, nih_dir):
    assert trained_run["rc"] == 0, trained_run["err"]
    out, run = trained_run["out"], trained_run["run"]
    assert "notice: the test split is empty" in out
    # the bundled lists (samples/nih has none); the 41 calibration images are 37 patients that train and val lack
    assert "official split: 48 train / 21 val / 41 calibration / 0 test" in out
    assert "using the official NIH split lists bundled in" in trained_run["err"]
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    for line in lines:
        for part in ("train loss", "val loss", "val mean AUROC", "worst", "best", "img/s"):
            assert part in line
    config = json.loads((run / "args.json").read_text())  # the one copy of the run configuration
    assert config["arch"] == "resnet18" and config["limit"] == 48 and config["lr"] == 1e-4
    history = read_history(run)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert all(float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0 for row in history)
    with Image.open(run / "training_curves.png") as im:
        assert im.format == "PNG" and im.width > 300
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and state["config"] == "args.json" and "args" not in state
    assert {"model", "optimizer", "scaler", "rng", "best_score", "best_epoch"} <= set(state)
    # every train, validation and calibration image decoded and resized once into the cache
    assert len(list((trained_run["cache"] / "64px").glob("*.npy"))) == 48 + 21 + 41

    model, meta, train_info = load_checkpoint(trained_run["best"])
    assert (meta.arch, meta.image_size, meta.labels) == ("resnet18", 64, LABELS)
    assert TRAINING_KEYS <= set(meta.training)
    assert train_info["run_config"] == str(run / "args.json") and "args" not in train_info
    digest = hashlib.sha256((nih_dir / "labels.csv").read_bytes()).hexdigest()
    assert meta.split == SplitSpec(official=True, val_fraction=0.1, seed=0, limit=48, data_entry_sha256=digest,
                                   calibration_fraction=0.15)
    roles = meta.training["split"]["roles"]
    assert {k: (v["role"], v["images"]) for k, v in roles.items() if k != "test"} == {
        "train": ("fit weights", 48), "val": ("epoch selection", 21),
        "calibration": ("calibration, thresholds, evidence, scope limit", 41)}
    assert roles["calibration"]["patients"] == 37 and roles["val"]["patients"] == 21
    assert (meta.training["n_train"], meta.training["n_val"], meta.training["loss"]) == (48, 21, "wbce")
    assert meta.training["intensity_augment"] == 0.0 and config["intensity_augment"] == 0.0  # off by default
    assert meta.training["epochs"] == state["best_epoch"]
    assert meta.training["data_dir"] == "nih"
    assert all(0.0 <= t <= 1.0 for t in meta.thresholds) and len(meta.thresholds) == 14


def test_checkpoint_metrics_and_thresholds_reproduce_from_its_metadata(trained_run, nih_dir):
    # through the same cache as training: its uint8 rounding moves probabilities by ~1e-3, enough to reorder the
    # near-tied outputs of a barely trained model
    meta, probs, y = validation_predictions(nih_dir, trained_run["best"], trained_run["cache"])
    assert len(probs) == meta.training["n_val"]
    assert_auroc_matches(meta, probs, y, abs_tol=1e-9)
    # Training ends by fitting the trust entry on the calibration split (not the validation split that chose the
    # epoch): thresholds are chosen there, on the calibrated scale.
    trust = Trust.from_checkpoint(torch.load(trained_run["best"], weights_only=True), meta.labels)
    assert trust.scope is not None and trust.calibration is not None and set(trust.evidence) == set(LABELS)
    assert trust.report["split"] == "calibration" and trust.report["n_images"] == 41
    assert all(ev["split"] == "calibration" for ev in trust.evidence.values())
    assert trust.orientation is not None and trust.orientation.n_fit == 48
    _, probs, y = validation_predictions(nih_dir, trained_run["best"], trained_run["cache"], "calibration")
    p64 = probs.astype(np.float64)
    calibrated = trust.calibration.apply(np.log(p64 / (1 - p64)))
    np.testing.assert_allclose(meta.thresholds, choose_thresholds(y, calibrated, "f1"), atol=1e-5)


def test_best_checkpoint_serves_predictions(trained_run, nih_dir):
    from predictions import Predictor

    prediction = Predictor.from_checkpoint(trained_run["best"], device="cpu").predict(
        nih_dir / "images" / "00000001_000.png")
    assert set(prediction.probabilities) == set(LABELS)
    assert all(0.0 < p < 1.0 for p in prediction.probabilities.values())


@pytest.mark.slow(3)
def test_intensity_augment_reaches_the_training_images_only_and_is_recorded(nih_dir, tmp_path, capsys, monkeypatch):
    built = []
    real = train.build_transform
    monkeypatch.setattr(train, "build_transform", lambda meta, **kw: built.append(real(meta, **kw)) or built[-1])
    argv = small_run(nih_dir, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "x.pth"),
                     "--intensity-augment", "0.4", "--no-trust", limit=16, epochs=1)
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    assert {(t.train, t.intensity) for t in built} == {(True, 0.4), (False, 0.0)}  # validation, calibration: plain
    _, meta, _ = load_checkpoint(tmp_path / "x.pth")
    assert meta.training["intensity_augment"] == 0.4
    assert json.loads((tmp_path / "run" / "args.json").read_text())["intensity_augment"] == 0.4
    rc, _, err = run_main(small_run(nih_dir, "--run-dir", str(tmp_path / "run"), "--resume", "--intensity-augment",
                                    "0.2", limit=16, epochs=1), capsys)
    assert rc == 2 and "--intensity-augment cannot change on --resume" in err


def test_run_folder_in_use_needs_resume(trained_run, nih_dir, capsys):
    rc, _, err = run_main(small_run(nih_dir, "--run-dir", str(trained_run["run"]), "--output", "/dev/null"), capsys)
    assert rc == 2 and "already holds a run" in err and "--resume" in err


def test_resume_refuses_a_changed_setting(trained_run, nih_dir, capsys):
    argv = small_run(nih_dir, "--run-dir", str(trained_run["run"]), "--resume", "--lr", "0.01")
    rc, _, err = run_main(argv, capsys)
    assert rc == 2 and "--lr cannot change on --resume" in err


def test_resume_of_a_run_from_before_the_calibration_split_is_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "old-run"
    shutil.copytree(trained_run["run"], run)
    config = json.loads((run / "args.json").read_text())
    del config["calibration_fraction"]  # as runs started before the three-way split recorded it
    (run / "args.json").write_text(json.dumps(config))
    rc, _, err = run_main(["--run-dir", str(run), "--resume"], capsys)
    assert rc == 2 and "started before training held out a calibration split" in err


def test_resume_of_a_finished_run_trains_no_more(trained_run, nih_dir, capsys):
    before = (trained_run["run"] / "history.csv").read_text()
    rc, out, _ = run_main(trained_run["argv"] + ["--resume"], capsys)
    assert rc == 0 and "already finished its 2 epoch(s)" in out
    assert (trained_run["run"] / "history.csv").read_text() == before


def _subprocess_env() -> dict:
    # As many threads as this process uses, so a run started here computes the same numbers as one run in-process.
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


@pytest.mark.slow(20)
def test_sigkill_during_second_epoch_then_resume(trained_run, nih_dir, tmp_path, capsys):
    # The run of the shared `trained_run` (2 epochs, same data and image cache), killed during epoch 2 in a process
    # of its own; the resume goes in-process and must end where the uninterrupted run ended.
    argv = small_run(nih_dir, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "best.pth"),
                     "--cache-dir", str(trained_run["cache"]))
    log = tmp_path / "killed.log"
    proc = forked.popen([sys.executable, str(TRAIN_PY), *argv], cwd=tmp_path, stdout=log, env=_subprocess_env())
    state = tmp_path / "run" / "last.pth"
    kill_once_written(proc, state, log)  # last.pth appears (atomically) when epoch 1 is complete
    assert torch.load(state, weights_only=True)["epoch"] == 1
    # Killed inside epoch 2, or in the moment after epoch 1's state and before its history row (the state is written
    # first, so a history never lists an epoch --resume cannot find): the resume writes the history from the state.
    written = read_history(tmp_path / "run") if (tmp_path / "run" / "history.csv").exists() else []
    assert [row["epoch"] for row in written] in ([], ["1"])

    rc, out, err = run_main(argv + ["--resume"], capsys)
    assert rc == 0, out + err
    assert "resuming" in out and "after epoch 1" in out
    history = read_history(tmp_path / "run")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert torch.load(state, weights_only=True)["epoch"] == 2
    model, meta, _ = load_checkpoint(tmp_path / "best.pth")
    assert meta.training["epochs"] in (1, 2) and meta.training["n_train"] == 48

    # The resumed run continues exactly where the uninterrupted one went (optimiser, sampler and RNG restored).
    assert trained_run["rc"] == 0, trained_run["err"]
    reference = read_history(trained_run["run"])
    for key in ("train_loss", "val_loss", "val_mean_auroc"):
        np.testing.assert_allclose([float(r[key]) for r in history], [float(r[key]) for r in reference], rtol=1e-6)


@pytest.mark.slow(28)
def test_torchrun_two_processes_gloo(nih_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN_PY),
           *small_run(nih_dir, "--output", "best.pth", "--labels", "chestxray8", limit=40)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # one run folder: the ranks agree on its name and only rank 0 writes
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pth")) == sorted(
        ["best.pth", f"runs/{runs[0].name}/last.prev.pth", f"runs/{runs[0].name}/last.pth"])
    assert proc.stdout.count("epoch 1/2 ") == 1 and proc.stdout.count("done:") == 1

    shards = json.loads((runs[0] / "shards.json").read_text())
    assert shards["world_size"] == 2
    a, b = map(set, shards["train_indices"])
    assert len(a) == len(b) == 20 and not a & b and a | b == set(range(40))

    # validation metrics cover the whole validation set (gathered from both ranks), not one rank's half
    meta, probs, y = validation_predictions(nih_dir, tmp_path / "best.pth")
    assert meta.labels == CHESTXRAY8_LABELS
    assert meta.training["n_val"] == 21 == len(probs) and meta.training["world_size"] == 2
    assert_auroc_matches(meta, probs, y, abs_tol=1e-5)


@pytest.mark.slow(5)
def test_unreadable_image_is_reported_by_name(nih_dir, tmp_path, capsys):
    names = sorted(p.name for p in (nih_dir / "images_64").iterdir())[:24]
    root = linked_data(nih_dir, tmp_path / "data", names)
    split = make_splits(load_index(root), root, val_fraction=0.3)
    bad = split["train"]["image"].iloc[0]
    (root / bad).unlink()
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing else

    base = ["--data-dir", str(root), "--arch", "resnet18", "--image-size", "64", "--epochs", "1", "--no-pretrained",
            "--device", "cpu", "--batch-size", "4", "--workers", "0", "--no-progress", "--val-fraction", "0.3"]
    rc, out, err = run_main(base + ["--run-dir", str(tmp_path / "a"), "--output", str(tmp_path / "a.pth")], capsys)
    assert rc == 0, err
    assert f"epoch 1: skipped 1 unreadable image(s): cannot read image {bad}" in out
    assert (tmp_path / "a" / "unreadable.txt").read_text().startswith(f"{bad}\t")
    assert int(read_history(tmp_path / "a")[0]["train_images"]) == len(split["train"]) - 1

    rc, out, err = run_main(base + ["--check-data", "--run-dir", str(tmp_path / "b"), "--output",
                                    str(tmp_path / "b.pth")], capsys)
    assert rc == 0, err
    assert f"checked {len(names)} images: 1 unreadable" in out
    assert f"unreadable (train): cannot read image {bad}" in out
    assert "skipped" not in out  # left out up front, so training meets no unreadable image


def test_missing_images_stop_unless_allowed(nih_dir, tmp_path, capsys):
    names = sorted(p.name for p in (nih_dir / "images_64").iterdir())[:24]
    root = linked_data(nih_dir, tmp_path / "data", names)
    (root / names[3]).unlink()
    base = ["--data-dir", str(root), "--arch", "resnet18", "--image-size", "64", "--epochs", "1", "--no-pretrained",
            "--device", "cpu", "--batch-size", "4", "--workers", "0", "--no-progress", "--val-fraction", "0.3",
            "--output", str(tmp_path / "x.pth")]
    rc, _, err = run_main(base + ["--run-dir", str(tmp_path / "a")], capsys)
    assert rc == 2 and "1 of the 24 images listed in labels.csv are missing" in err and names[3] in err
    rc, out, err = run_main(base + ["--run-dir", str(tmp_path / "b"), "--allow-missing"], capsys)
    assert rc == 0, err
    assert "warning: skipping 1 of the 24 labelled images" in err and names[3] in err
    assert (tmp_path / "b" / "missing.txt").read_text().split() == [names[3]]


def test_without_official_lists_a_patient_wise_split_is_used_with_a_warning(nih_dir, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_METADATA", tmp_path / "not-bundled")  # else the bundled lists apply
    names = sorted(p.name for p in (nih_dir / "images_64").iterdir())[:30]
    root = linked_data(nih_dir, tmp_path / "data", names, lists=False)
    argv = ["--data-dir", str(root), "--arch", "resnet18", "--image-size", "64", "--epochs", "1", "--no-pretrained",
            "--device", "cpu", "--batch-size", "4", "--workers", "0", "--no-progress", "--val-fraction", "0.3",
            "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "x.pth")]
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    assert "warning: no train_val_list.txt / test_list.txt" in err and "seeded patient-wise split" in err
    _, meta, _ = load_checkpoint(tmp_path / "x.pth")
    assert meta.split.official is False
    with pytest.warns(UserWarning, match="patient-wise"):
        splits = make_splits(load_index(root), root, val_fraction=0.3)
    assert meta.training["n_train"] == len(splits["train"]) and meta.training["n_val"] == len(splits["val"])
    assert len(splits["test"]) > 0  # held out, never trained or validated on


def test_missing_pretrained_weights_stop_before_training(nih_dir, tmp_path, capsys, monkeypatch):
    def offline(meta, pretrained=False):
        assert pretrained
        raise PretrainedWeightsUnavailable("ImageNet weights for resnet18 are not cached and could not be downloaded")

    monkeypatch.setattr(train, "model_from_meta", offline)
    argv = small_run(nih_dir, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "x.pth"))
    argv.remove("--no-pretrained")
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and "could not be downloaded" in err and "--no-pretrained" in err
    assert not (tmp_path / "run" / "history.csv").exists() and not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "--data-dir is required"),
    (["--data-dir", "D", "--resume"], "--resume needs --run-dir"),
    (["--data-dir", "D", "--resume", "--run-dir", "EMPTY"], "no last.pth in"),
    (["--data-dir", "D", "--labels", "Cardiomegaly,Heart"], "unknown label(s) ['Heart']"),
    (["--data-dir", "D", "--epochs", "0"], "--epochs must be at least 1"),
    (["--data-dir", "D", "--val-fraction", "1.5"], "--val-fraction must lie strictly between 0 and 1"),
    (["--data-dir", "D", "--intensity-augment", "1"], "--intensity-augment must lie in [0, 1)"),
    (["--data-dir", "D", "--device", "cpu", "--amp", "on"], "--amp on needs a CUDA device"),
    (["--data-dir", "EMPTY", "--device", "cpu", "--arch", "resnet18", "--no-pretrained"],
     "none of the 112120 images listed in Data_Entry_2017_v2020.csv.gz"),  # the bundled one: no CSV there
])
def test_bad_input_stops_with_a_clear_error(argv, message, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("D", "EMPTY") else a for a in argv]
    rc, _, err = run_main(argv + ["--run-dir", str(tmp_path / "run")] * ("--run-dir" not in argv and
                                                                         "--resume" not in argv), capsys)
    assert rc == 2
    assert message in err


def test_parse_labels():
    assert train.parse_labels("all") == LABELS
    assert train.parse_labels("chestxray8") == CHESTXRAY8_LABELS
    assert train.parse_labels("Mass, Hernia") == ("Mass", "Hernia")


def test_parser_flags_have_help_and_defaults():
    parser = train.get_args_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    args = parser.parse_args([])
    assert (args.arch, args.image_size, args.batch_size, args.lr, args.loss, args.val_fraction, args.output) == (
        "resnet50", 512, 16, 1e-4, "wbce", 0.1, "chestxray_model_resnet50.pth")
    assert args.calibration_fraction == 0.15
    assert pd.isna(args.limit) and args.threshold_rule == "f1" and not args.hflip


def test_merge_config_locks_run_settings_and_reports_free_changes():
    from chestxray.trainstate import LockedSettingChanged, merge_config

    defaults = {"lr": 1e-4, "epochs": None, "workers": 4, "seed": 0}
    saved = {"lr": 0.01, "epochs": 3, "workers": 2, "seed": 5, "gone": 1}
    merged, changed = merge_config({"lr": 1e-4, "epochs": None, "workers": 8, "seed": 0}, saved, defaults,
                                   locked=("lr", "seed"))
    assert (merged["lr"], merged["seed"], merged["epochs"], merged["workers"]) == (0.01, 5, 3, 8)
    assert changed == [("workers", 8, 2)] and "gone" not in merged
    with pytest.raises(LockedSettingChanged) as err:
        merge_config({"lr": 0.5, "epochs": None, "workers": 4, "seed": 0}, saved, defaults, locked=("lr", "seed"))
    assert (err.value.key, err.value.saved) == ("lr", 0.01) and "--" not in str(err.value)


def test_rng_state_round_trips_through_a_weights_only_state_file(tmp_path):
    import random

    from chestxray.trainstate import load_resume_state, rng_state, save_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_state(tmp_path, {"epoch": 1, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state, notes = load_resume_state(tmp_path)
    assert notes == [] and state["config"] == "args.json" and state["kind"] == "train-state"
    set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_run_configuration_is_read_from_args_json_and_older_states(tmp_path):
    from chestxray.checkpoint import CheckpointError
    from chestxray.trainstate import read_config, write_config

    with pytest.raises(CheckpointError, match="no args.json"):
        read_config(tmp_path)
    assert read_config(tmp_path, {"args": {"lr": 0.1}}) == {"lr": 0.1}  # a state written before args.json was one
    write_config(tmp_path, {"lr": 0.2, "cache_dir": None})
    assert read_config(tmp_path, {"args": {"lr": 0.1}}) == {"lr": 0.2, "cache_dir": None}
