"""Adapting a checkpoint to local data: label formats and the CheXpert mapping, the patient-wise local split, both
modes of Model_Training/adapt.py on a tiny model (checkpoints that load everywhere with their provenance, the base
untouched, the before/after report and its promotion rule), recalibration repairing a model whose logits were
scaled by 3, a fine-tune killed after an epoch and resumed, and the web app's feedback export as a label source."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import forked
from support.checkpoints import make_checkpoint
from support.data import NIH_DIR
from support.training import kill_once_written

from chestxray.checkpoint import load_checkpoint, safe_torch_load, write_checkpoint
from chestxray.data import DataError, XrayDataset, collate_batch, load_index, targets
from chestxray.labels import LABELS
from chestxray.local_labels import (
    CHEXPERT_TO_NIH,
    NOT_ASSESSED,
    hash_patient,
    local_splits,
    loss_mask,
    read_local_labels,
    write_chexpert,
)
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import Trust
from chestxray.trust.calibration import expected_calibration_error
from chestxray.trust.scope import collect_outputs
from chestxray.web.checkpoints import load_model
from Model_Training import adapt

MAPPED = [name for name in LABELS if name in CHEXPERT_TO_NIH.values()]


@pytest.fixture(scope="module")
def nih_index() -> pd.DataFrame:
    return load_index(NIH_DIR, allow_missing=True)


def small_images(index: pd.DataFrame) -> pd.DataFrame:
    """The sample's 64 and 128 px images (the full-size ones would only slow the tests)."""
    return index[index["path"].astype(str).str.contains(r"[/\\]images_(?:64|128)[/\\]")].reset_index(drop=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Label formats


def test_nih_sample_round_trips_through_chexpert_format(nih_index, tmp_path):
    csv = tmp_path / "chexpert.csv"
    write_chexpert(nih_index, csv)
    back = read_local_labels(csv, NIH_DIR)
    assert back.attrs["format"] == "chexpert" and back.attrs["informed"] == MAPPED
    assert list(back["image"]) == list(nih_index["image"])
    nih, ours = targets(nih_index, LABELS), targets(back, LABELS)
    for j, name in enumerate(LABELS):
        if name in MAPPED:
            np.testing.assert_array_equal(ours[:, j], nih[:, j], err_msg=name)
        else:  # not informed by CheXpert findings: never set
            assert ours[:, j].sum() == 0, name
    assert nih[:, [LABELS.index(n) for n in MAPPED]].sum() > 50  # the check compares real positives
    # Patient IDs are hashed, yet group the same images together.
    assert not set(back["patient"]) & set(nih_index["patient"])
    assert (back.groupby(nih_index["patient"])["patient"].nunique() == 1).all()
    assert back["patient"].nunique() == nih_index["patient"].nunique()
    assert list(back["path"].map(str)) == list(nih_index["path"].map(str))


def _chexpert_csv(tmp_path: Path, index: pd.DataFrame) -> Path:
    """Four images with uncertain (-1), blank and Lung Lesion entries, MIMIC-style subject_id column."""
    names = list(index["image"][:4])
    csv = tmp_path / "mimic.csv"
    pd.DataFrame({"dicom_id": names, "subject_id": ["s1", "s1", "s2", "s3"],
                  "Pleural Effusion": ["1", "-1", "", "0"], "Edema": ["-1", "0", "1", ""],
                  "Lung Lesion": ["1", "", "", "-1"], "Support Devices": ["1", "1", "1", "1"]}).to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize("policy, effusion, edema", [("zeros", [1, 0, 0, 0], [0, 0, 1, 0]),
                                                     ("ones", [1, 1, 0, 0], [1, 0, 1, 0]),
                                                     ("ignore", [1, 0, 0, 0], [0, 0, 1, 0])])
def test_uncertain_policy(nih_index, tmp_path, policy, effusion, edema):
    df = read_local_labels(_chexpert_csv(tmp_path, nih_index), NIH_DIR, uncertain=policy)
    y = targets(df, LABELS)
    assert y[:, LABELS.index("Effusion")].tolist() == effusion
    assert y[:, LABELS.index("Edema")].tolist() == edema
    assert df.attrs["informed"] == ["Effusion", "Edema"]  # only the mapped columns present
    assert df.attrs["uncertain_counts"] == {"Effusion": 1, "Edema": 1}
    mask = loss_mask(df, LABELS, df.attrs["informed"])
    e, d = LABELS.index("Effusion"), LABELS.index("Edema")
    expect_e = [1, 0, 1, 1] if policy == "ignore" else [1, 1, 1, 1]
    expect_d = [0, 1, 1, 1] if policy == "ignore" else [1, 1, 1, 1]
    assert mask[:, e].tolist() == expect_e and mask[:, d].tolist() == expect_d
    assert mask[:, LABELS.index("Mass")].sum() == 0  # not informed: never trains
    assert df["patient"].iloc[0] == df["patient"].iloc[1] == hash_patient("s1") != df["patient"].iloc[2]


def test_lung_lesion_mapped_only_when_asked(nih_index, tmp_path):
    csv = _chexpert_csv(tmp_path, nih_index)
    assert "Mass" not in read_local_labels(csv, NIH_DIR).attrs["informed"]
    df = read_local_labels(csv, NIH_DIR, lesion="Mass")
    assert "Mass" in df.attrs["informed"] and "Nodule" not in df.attrs["informed"]
    assert targets(df, LABELS)[:, LABELS.index("Mass")].tolist() == [1, 0, 0, 0]


def test_plain_list_and_nih_formats(nih_index, tmp_path):
    rows = nih_index.iloc[:30]
    plain = tmp_path / "list.csv"
    plain.write_text("".join(f"{im},{'' if f == 'No Finding' else f}\n" for im, f in zip(rows["image"],
                                                                                     rows["findings"])))
    df = read_local_labels(plain, NIH_DIR)
    assert df.attrs["format"] == "list" and df.attrs["informed"] == list(LABELS)
    np.testing.assert_array_equal(targets(df, LABELS), targets(rows, LABELS))
    nih = read_local_labels(NIH_DIR / "labels.csv", NIH_DIR)
    assert nih.attrs["format"] == "nih" and len(nih) == len(nih_index)
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Edema\n" + f"{rows['image'].iloc[0]},2\n")
    with pytest.raises(DataError, match="expected 1, 0, -1 or blank"):
        read_local_labels(bad, NIH_DIR)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"{rows['image'].iloc[0]},Pneumonitis\n")
    with pytest.raises(DataError, match="Pneumonitis"):
        read_local_labels(unknown, NIH_DIR)


def test_local_split_is_patient_wise_and_stable(nih_index):
    df = read_local_labels(NIH_DIR / "labels.csv", NIH_DIR)
    parts = local_splits(df, seed=3)
    assert sum(len(p) for p in parts.values()) == len(df)
    seen = [set(p["patient"]) for p in parts.values()]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    # A patient's part does not depend on the other patients present.
    half = local_splits(df[df["patient"].isin(list(df["patient"].unique()[::2]))], seed=3)
    for name, part in half.items():
        assert set(part["patient"]) <= set(parts[name]["patient"])
    assert set(local_splits(df, seed=4)["test"]["patient"]) != set(parts["test"]["patient"])
    with pytest.raises(DataError):
        local_splits(df, test=0.5, val=0.3, calibration=0.3)


# ----------------------------------------------------------------------------------------------------------------
# Model_Training/adapt.py


ADAPT_PY = Path(adapt.__file__)


def adapt_argv(base: Path, labels: Path, out: Path, mode: str, *extra: str, data_dir: Path = NIH_DIR) -> list[str]:
    return ["--checkpoint", str(base), "--data-dir", str(data_dir), "--labels", str(labels), "--mode", mode,
            "--output", str(out / f"{mode}.pth"), "--report-dir", str(out / f"{mode}-report"), "--bootstrap", "20",
            "--batch-size", "32", "--device", "cpu", "--no-progress", *extra]


def adapt_args(base: Path, labels: Path, out: Path, mode: str, *extra: str, data_dir: Path = NIH_DIR):
    return adapt.get_args_parser().parse_args(adapt_argv(base, labels, out, mode, *extra, data_dir=data_dir))


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, nih_index) -> dict:
    """A tiny base checkpoint adapted to the sample's small images (CheXpert labels) in both modes."""
    root = tmp_path_factory.mktemp("adapt")
    base = make_checkpoint(root / "base.pth")
    labels = root / "local.csv"
    write_chexpert(small_images(nih_index).iloc[:160], labels)
    digest = sha256(base)
    codes = {mode: adapt.main(adapt_args(base, labels, root, mode, *extra))
             for mode, extra in (("recalibrate", ()), ("finetune", ("--epochs", "1", "--trainable", "head")))}
    return {"root": root, "base": base, "labels": labels, "digest": digest, "codes": codes}


@pytest.mark.parametrize("mode", ["recalibrate", "finetune"])
def test_adapted_checkpoint_loads_everywhere_with_provenance(adapted, mode):
    assert adapted["codes"][mode] == 0
    root, base = adapted["root"], adapted["base"]
    path = root / f"{mode}.pth"
    assert sha256(base) == adapted["digest"]  # the base is never written
    model, meta, _ = load_checkpoint(path)
    obj = safe_torch_load(path)
    assert set(obj) == {"format", "model", "meta", "train", "trust"}
    trust = Trust.from_checkpoint(obj, meta.labels)
    assert trust.calibration is not None and trust.scope is not None and set(trust.evidence) == set(LABELS)
    state = load_model(str(path), device="cpu")
    assert state.error is None
    card = state.predictor.model_card()
    prov = card["training"]["adapted"]
    assert prov["mode"] == mode and prov["base_sha256"] == adapted["digest"]
    assert prov["informed"] == MAPPED and "Mass" in prov["not_informed"]
    local = pd.read_csv(adapted["labels"])
    assert prov["local"]["all"]["images"] == len(local)
    assert prov["local"]["all"]["positives"]["Effusion"] == int(local["Pleural Effusion"].sum())
    assert sum(prov["local"][p]["images"] for p in ("train", "val", "calibration", "test")) == len(local)
    assert prov["date"][:4].isdigit()
    base_model, _, _ = load_checkpoint(base)
    b, a = base_model.state_dict(), model.state_dict()
    trunk_same = all(torch.equal(b[k], a[k]) for k in b if not k.startswith("classifier"))
    assert trunk_same  # recalibrate and fine-tuning the head leave the trunk as it was
    w_b, w_a = b["classifier.weight"], a["classifier.weight"]
    informed = [LABELS.index(n) for n in MAPPED]
    others = [j for j in range(len(LABELS)) if j not in informed]
    if mode == "recalibrate":
        assert torch.equal(w_b, w_a)
    else:
        assert not torch.equal(w_b[informed], w_a[informed])
        assert torch.equal(w_b[others], w_a[others])  # uninformed labels' logits are unchanged
        assert prov["finetune"]["history"][0]["epoch"] == 0
    # Uninformed labels keep the base's threshold and calibration (the base has none: identity).
    for j in others:
        assert meta.thresholds[j] == pytest.approx(load_checkpoint(base)[1].thresholds[j])
        assert (trust.calibration.slope[j], trust.calibration.intercept[j]) == (1.0, 0.0)
    assert trust.calibration.fitted[LABELS.index("Effusion")]


@pytest.mark.parametrize("mode", ["recalibrate", "finetune"])
def test_report_holds_before_and_after_in_test_format(adapted, mode):
    report = adapted["root"] / f"{mode}-report"
    summary = json.loads((report / "metrics.json").read_text())
    for side in ("before", "after"):
        m = summary[side]
        assert {"per_label", "decision", "scope", "calibration", "baselines", "mean_auroc"} <= set(m)
        assert set(m["calibration"]["per_label"]) == set(LABELS)
        assert (report / side / "report.md").is_file() and (report / side / "predictions.csv").is_file()
    before = pd.read_csv(report / "before" / "predictions.csv")
    after = pd.read_csv(report / "after" / "predictions.csv")
    assert list(before["image"]) == list(after["image"])  # paired
    from sklearn.metrics import roc_auc_score
    for name in MAPPED:
        c = summary["comparison"][name]
        if c["difference"] is None:
            continue
        y = before[f"{name}_true"]
        expect = roc_auc_score(y, after[f"{name}_prob"]) - roc_auc_score(y, before[f"{name}_prob"])
        assert c["difference"] == pytest.approx(expect, abs=1e-9)
        if mode == "recalibrate":  # Platt scaling is monotone: the ranking, hence the AUROC, cannot move
            assert c["difference"] == pytest.approx(0.0, abs=1e-12)
    verdict = summary["promotion"]
    assert verdict["recommended"] == (not verdict["reasons"])
    text = (report / "report.md").read_text()
    assert ("Verdict: recommended" in text) == verdict["recommended"]
    for reason in verdict["reasons"]:
        assert reason in text


def test_promotion_rule():
    comparison = {"Effusion": {"before": 0.8, "after": 0.7, "difference": -0.1, "ci": [-0.2, -0.05]},
                  "Edema": {"before": 0.7, "after": 0.72, "difference": 0.02, "ci": [-0.03, 0.06]}}

    def calib(values):
        return {"calibration": {"per_label": {n: {"ece": v} for n, v in values.items()}}}

    before, after = calib({"Effusion": 0.2, "Edema": 0.2}), calib({"Effusion": 0.05, "Edema": 0.05})
    many = {"Effusion": 20, "Edema": 20}
    verdict = adapt.promotion(comparison, before, after, ["Effusion", "Edema"], many)
    assert not verdict["recommended"] and "Effusion" in verdict["reasons"][0]
    comparison["Effusion"]["ci"] = [-0.2, 0.01]
    assert adapt.promotion(comparison, before, after, ["Effusion", "Edema"], many)["recommended"]
    worse = adapt.promotion(comparison, after, before, ["Effusion", "Edema"], many)
    assert not worse["recommended"] and "calibration not better" in worse["reasons"][0]
    few = adapt.promotion(comparison, before, after, ["Effusion", "Edema"], {"Effusion": 2, "Edema": 20})
    assert few["labels_not_checked"] == ["Effusion"] and few["recommended"]


def test_refuses_to_overwrite_the_base(adapted, capsys):
    base = adapted["base"]
    args = adapt_args(base, adapted["labels"], adapted["root"], "recalibrate")
    args.output = str(base)
    assert adapt.main(args) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert sha256(base) == adapted["digest"]
    args.output = str(adapted["root"] / "recalibrate.pth")  # an earlier adaptation is not replaced either
    assert adapt.main(args) == 2


def test_recalibration_repairs_logits_scaled_by_three(tmp_path, nih_index):
    """A model calibrated on other images, whose logits are then scaled by 3 (its calibration now wrong), is
    recalibrated on local data: the held-out ECE falls."""
    small = small_images(nih_index)
    origin, local = small.iloc[160:], small.iloc[:160]
    base = make_checkpoint(tmp_path / "tiny.pth", bias_spread=1.0)
    model, meta, _ = load_checkpoint(base)
    loader = torch.utils.data.DataLoader(XrayDataset(origin, meta.labels, build_transform(meta)), batch_size=64,
                                         collate_fn=collate_batch)
    logits, _, y, _, _ = collect_outputs(model, loader, "cpu", build_normalize(meta))
    # Calibrated-in-the-large on the origin images: sigmoid(logit) averages to each label's prevalence there.
    prevalence = np.clip(y.mean(axis=0), 0.02, 0.98)
    shift = np.log(prevalence / (1 - prevalence)) - np.median(logits, axis=0)
    obj = safe_torch_load(base)
    bias = obj["model"]["classifier.bias"] + torch.as_tensor(shift, dtype=torch.float32)
    obj["model"]["classifier.weight"] = obj["model"]["classifier.weight"] * 3
    obj["model"]["classifier.bias"] = bias * 3
    scaled = tmp_path / "scaled.pth"
    write_checkpoint(scaled, obj)
    labels = tmp_path / "local.csv"
    write_chexpert(local, labels)
    assert adapt.main(adapt_args(scaled, labels, tmp_path, "recalibrate")) == 0
    report = tmp_path / "recalibrate-report"
    summary = json.loads((report / "metrics.json").read_text())
    frames = {side: pd.read_csv(report / side / "predictions.csv") for side in ("before", "after")}
    ece = {side: np.mean([expected_calibration_error(f[f"{n}_true"].to_numpy(), f[f"{n}_prob"].to_numpy())
                          for n in MAPPED]) for side, f in frames.items()}
    assert ece["after"] < 0.8 * ece["before"], ece
    assert summary["promotion"]["mean_ece"]["after"] < summary["promotion"]["mean_ece"]["before"]


# ----------------------------------------------------------------------------------------------------------------
# A models folder in the web app


def test_models_folder_lists_and_chooses_adapted_models(adapted, make_app, tmp_path):
    import argparse
    import shutil

    from chestxray.checkpoint import CheckpointError
    from chestxray.web.checkpoints import choose_checkpoint, list_models

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(adapted["base"], folder / "base.pth")
    shutil.copy(adapted["root"] / "recalibrate.pth", folder / "clinic.pth")
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    models = {m["name"]: m for m in list_models(folder, str(folder / "clinic.pth"))}
    assert set(models) == {"base.pth", "clinic.pth", "broken.pth"}
    assert models["clinic.pth"]["served"] and not models["base.pth"]["served"]
    assert models["clinic.pth"]["adapted"]["base_sha256"] == adapted["digest"]
    assert models["base.pth"]["adapted"] is None and models["broken.pth"]["error"]
    args = argparse.Namespace(model="clinic", models_dir=str(folder), checkpoint=None, no_demo=True)
    assert choose_checkpoint(args) == str(folder / "clinic.pth")
    args.model = "../base"
    with pytest.raises(CheckpointError, match="available: base.pth, broken.pth, clinic.pth"):
        choose_checkpoint(args)
    app = make_app(CHECKPOINT=str(folder / "clinic.pth"), MODELS_DIR=str(folder))
    listing = app.test_client().get("/api/models").get_json()
    assert [m["name"] for m in listing["models"] if m["served"]] == ["clinic.pth"]
    card = app.test_client().get("/api/model").get_json()
    assert card["training"]["adapted"]["mode"] == "recalibrate"


# ----------------------------------------------------------------------------------------------------------------
# A fine-tune killed mid-run, resumed


@pytest.mark.slow(15)
def test_finetune_killed_after_an_epoch_resumes_where_the_uninterrupted_run_goes(tmp_path, nih_index, capsys):
    """A fine-tune in a process of its own is SIGKILLed once its first epoch's state is on disk (it was fitting the
    calibration, its checkpoint not yet written); the same command with --resume --epochs 2 continues after epoch 1
    and ends with the checkpoint and history of an uninterrupted 2-epoch run."""
    base = make_checkpoint(tmp_path / "base.pth")
    labels = tmp_path / "local.csv"
    write_chexpert(small_images(nih_index).iloc[:80], labels)
    extra = ("--trainable", "transition", "--patience", "5")
    reference = tmp_path / "reference"
    assert adapt.main(adapt_args(base, labels, reference, "finetune", "--epochs", "2", *extra)) == 0

    out = tmp_path / "killed"
    argv = adapt_argv(base, labels, out, "finetune", "--epochs", "1", *extra)
    run_dir, output = out / "finetune-report" / adapt.RUN_DIR_NAME, out / "finetune.pth"
    state = run_dir / "last.pth"
    log = tmp_path / "killed.log"
    # As many threads as this process uses, so the killed run computes the numbers a run in-process would.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = forked.popen([sys.executable, str(ADAPT_PY), *argv], cwd=tmp_path, stdout=log, env=env)
    kill_once_written(proc, state, log)  # last.pth is written atomically when epoch 1 is complete
    assert not output.exists()  # killed mid-run: no adapted checkpoint yet
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and [row["epoch"] for row in saved["history"]] == [0, 1]
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == 1
    capsys.readouterr()

    assert adapt.main(adapt_args(base, labels, out, "finetune", "--epochs", "2", *extra, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"resuming {run_dir} after epoch 1" in printed and "--epochs 2 (was 1)" in printed
    assert "finetune epoch 1:" not in printed and "finetune epoch 2:" in printed  # epoch 1 is not trained again
    assert torch.load(state, weights_only=True)["epoch"] == 2

    # The adapted checkpoint loads with its provenance, as an uninterrupted run's does.
    model, meta, _ = load_checkpoint(output)
    loaded = load_model(str(output), device="cpu")
    assert loaded.error is None
    prov = loaded.predictor.model_card()["training"]["adapted"]
    assert prov["mode"] == "finetune" and prov["base_sha256"] == sha256(base)
    assert prov["finetune"]["resumed_after_epoch"] == 1 and prov["finetune"]["run_dir"] == str(run_dir)
    ref_model, ref_meta, _ = load_checkpoint(reference / "finetune.pth")
    ref_prov = ref_meta.training["adapted"]["finetune"]
    assert ref_prov["resumed_after_epoch"] is None
    # Continued exactly where the uninterrupted run went: optimiser, sampler order and RNG restored.
    history, ref_history = prov["finetune"]["history"], ref_prov["history"]
    assert [row["epoch"] for row in history] == [row["epoch"] for row in ref_history] == [0, 1, 2]
    np.testing.assert_allclose([row["val_mean_auroc"] for row in history],
                               [row["val_mean_auroc"] for row in ref_history], rtol=1e-6)
    np.testing.assert_allclose([row["loss"] for row in history[1:]], [row["loss"] for row in ref_history[1:]],
                               rtol=1e-5)
    assert prov["finetune"]["best_epoch"] == ref_prov["best_epoch"]
    ref_weights = ref_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_weights[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(meta.thresholds, ref_meta.thresholds, rtol=1e-4, atol=1e-6)

    # The run folder guards itself: a new fine-tune there needs --resume; a resume may not change the run.
    again = adapt_args(base, labels, out, "finetune", *extra)
    again.output = str(tmp_path / "other.pth")
    assert adapt.main(again) == 2 and "pass --resume" in capsys.readouterr().err
    changed = adapt_args(base, labels, out, "finetune", "--lr", "0.01", "--resume")
    changed.output = str(tmp_path / "other.pth")
    assert adapt.main(changed) == 2 and "--lr cannot change on --resume" in capsys.readouterr().err
    fresh = adapt_args(base, labels, tmp_path / "fresh", "finetune", "--resume")
    assert adapt.main(fresh) == 2 and "drop --resume" in capsys.readouterr().err
    assert adapt.main(adapt_args(base, labels, tmp_path / "r", "recalibrate", "--resume")) == 2


# ----------------------------------------------------------------------------------------------------------------
# The monitoring feedback export as a label source

FEEDBACK_LABELS = ("Effusion", "Infiltration", "Atelectasis")  # what the readers assess in the test below


@pytest.mark.slow(10)
def test_feedback_export_is_a_label_source(make_app, tiny_checkpoint, tmp_path, nih_index, capsys):
    """Results reviewed through the web app's form, exported as CSV, read back as local labels (true labels; 'not
    assessed' unknown: out of the loss, absent in calibration) and adapted with recalibrate."""
    results = tmp_path / "results"
    app = make_app(RESULTS_DIR=str(results))
    client = app.test_client()
    images = small_images(nih_index).iloc[:40]
    truth, unassessed, unreviewed = {}, {}, set()
    for i, row in enumerate(images.itertuples()):
        answer = client.post("/api/predict", data={"file": (io.BytesIO(Path(row.path).read_bytes()), "x.png")})
        rid = answer.get_json()["id"]
        findings = set(row.findings.split("|"))
        if i % 8 == 7:  # opened, agreed with one call, but no true label: not a label source
            form = {"agree_Mass": "agree"}
            unreviewed.add(rid)
        else:
            skip = {"Effusion"} if i % 5 == 0 else set()  # the reader did not assess it: unknown, not absent
            form = {f"truth_{name}": "present" if name in findings else "absent"
                    for name in FEEDBACK_LABELS if name not in skip}
            truth[rid], unassessed[rid] = {n: n in findings for n in FEEDBACK_LABELS if n not in skip}, skip
        assert client.post(f"/results/{rid}/feedback", data=form).status_code == 303
    assert client.post("/api/predict", data={"file": (io.BytesIO(b"%PDF-1.4"), "x.pdf")}).status_code == 415
    pruned = next(iter(truth))
    shutil.rmtree(results / pruned)  # retention removed its image; its database row and feedback remain
    export = tmp_path / "chestxray-analyses.csv"
    export.write_bytes(client.get("/api/results.csv").data)
    table = list(csv.DictReader(io.StringIO(export.read_text())))
    assert len(table) == 41 and table[0]["Effusion truth"] == NOT_ASSESSED  # every analysis, the refusal too

    df = read_local_labels(export, results)
    assert df.attrs["format"] == "feedback"
    assert df.attrs["informed"] == [name for name in LABELS if name in FEEDBACK_LABELS]
    assert df.attrs["missing"] == [f"{pruned}/image.png"]
    rids = [image.split("/")[0] for image in df["image"]]
    assert set(rids) == set(truth) - {pruned}  # no refusal, no result without a true label
    assert all(Path(p) == results / rid / "image.png" and Path(p).is_file() for p, rid in zip(df["path"], rids))
    assert df["patient"].nunique() == len(df)  # no patient identity in the export: each analysis its own
    y = targets(df, LABELS)
    mask = loss_mask(df, LABELS, df.attrs["informed"])
    for i, rid in enumerate(rids):
        for name in FEEDBACK_LABELS:
            j = LABELS.index(name)
            known = name not in unassessed[rid]
            assert mask[i, j] == float(known)  # 'not assessed' never trains the model
            assert y[i, j] == (float(truth[rid][name]) if known else 0.0)  # ... and reads as absent elsewhere
        assert mask[i, LABELS.index("Mass")] == 0.0  # never assessed: not informed
    assert df.attrs["uncertain_counts"] == {
        name: sum(name in unassessed[rid] for rid in rids) for name in df.attrs["informed"]}
    assert df.attrs["uncertain_counts"]["Effusion"] > 0
    crafted = tmp_path / "crafted.csv"  # a result id becomes a path: only the app's own ids are read
    crafted.write_text(export.read_text().replace(rids[0], "../" + rids[0][3:], 1))
    with pytest.raises(DataError, match="not a result id"):
        read_local_labels(crafted, results)
    # The images the app stored read as the training data does.
    dataset = XrayDataset(df, LABELS, build_transform(load_checkpoint(tiny_checkpoint)[1]))
    image, target, _ = dataset[0]
    assert image.shape[-2:] == (64, 64) and torch.equal(target, torch.from_numpy(y[0]))

    args = adapt_args(tiny_checkpoint, export, tmp_path, "recalibrate", data_dir=results)
    assert adapt.main(args) == 0, capsys.readouterr().err
    prov = load_checkpoint(tmp_path / "recalibrate.pth")[1].training["adapted"]
    assert prov["label_format"] == "feedback" and prov["informed"] == df.attrs["informed"]
    assert prov["local"]["all"]["images"] == len(df)
    assert prov["local"]["all"]["positives"] == {n: int(y[:, LABELS.index(n)].sum()) for n in prov["informed"]}
    assert prov["uncertain_counts"] == df.attrs["uncertain_counts"]
    assert "not assessed" in prov["uncertain_policy"]
