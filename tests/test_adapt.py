"""Adapting a checkpoint to local data: label formats and the CheXpert mapping, the patient-wise local split, both
modes of Model_Training/adapt.py on a tiny model (checkpoints that load everywhere with their provenance, the base
untouched, the before/after report and its promotion rule), and recalibration repairing a model whose logits were
scaled by 3."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import NIH_DIR, make_checkpoint

from chestxray.calibration import expected_calibration_error
from chestxray.checkpoint import load_checkpoint, safe_torch_load, write_checkpoint
from chestxray.data import DataError, XrayDataset, collate_batch, load_index, targets
from chestxray.labels import LABELS
from chestxray.local_labels import (
    CHEXPERT_TO_NIH,
    hash_patient,
    local_splits,
    loss_mask,
    read_local_labels,
    write_chexpert,
)
from chestxray.scope import collect_outputs
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import Trust
from Model_Training import adapt
from webmodel import load_model

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


def adapt_args(base: Path, labels: Path, out: Path, mode: str, *extra: str):
    argv = ["--checkpoint", str(base), "--data-dir", str(NIH_DIR), "--labels", str(labels), "--mode", mode,
            "--output", str(out / f"{mode}.pth"), "--report-dir", str(out / f"{mode}-report"), "--bootstrap", "20",
            "--batch-size", "32", "--device", "cpu", "--no-progress", *extra]
    return adapt.get_args_parser().parse_args(argv)


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
    from webmodel import choose_checkpoint, list_models

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
