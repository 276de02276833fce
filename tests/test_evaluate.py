"""Model_Training/test.py end to end: a small checkpoint trained on the real sample (64 px, CPU), evaluated on its
own validation split, and heatmap localization on real NIH images listed as boxed images in a temporary data folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from support.data import BBOX_CSV, NIH_DIR, NIH_PNG

from chestxray.checkpoint import load_checkpoint
from chestxray.evaluation import evaluate_frame, read_predictions
from chestxray.labels import LABELS
from Model_Training import test as evaluation

pytestmark = pytest.mark.slow(1)
OUTPUTS = ("predictions.csv", "metrics.json", "per_label.csv", "report.md", "args.json", "roc.png", "pr.png",
           "confusion.png", "reliability.png", "localization.csv")


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _run(argv: list[str]) -> int:
    return evaluation.main(evaluation.get_args_parser().parse_args(argv))


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run):
    """The session's training run (conftest.trained_run): ResNet-18 at 64 px, 48 training + 21 validation images."""
    assert trained_run["rc"] == 0, trained_run["err"]
    return trained_run["best"]


@pytest.fixture(scope="module")
def val_run(trained_checkpoint, tmp_path_factory):
    """test.py --split val on the sample, with the real BBox_List_2017.csv; returns (out folder, console text)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("eval") / "val"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(NIH_DIR), "--split", "val",
                   "--in-sample", "--out", str(out), "--bootstrap", "50", "--workers", "0", "--no-progress",
                   "--device", "cpu", "--bbox-csv", str(BBOX_CSV)])
    assert rc == 0, console.getvalue()
    return out, console.getvalue()


def test_writes_every_file_and_valid_pngs(val_run):
    out, _ = val_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("roc.png", "pr.png", "confusion.png", "reliability.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300
            im.verify()


def test_val_split_is_the_checkpoints_own(val_run, trained_checkpoint):
    out, _ = val_run
    metrics = _strict_json(out / "metrics.json")
    _, meta, _ = load_checkpoint(trained_checkpoint)
    # Training validated on exactly these images: same count, same mean AUROC from the same predictions.
    assert metrics["n_images"] == meta.training["n_val"] == 21
    assert metrics["mean_auroc"] == pytest.approx(meta.training["val_mean_auroc"], abs=1e-6)
    for name in LABELS:
        assert metrics["per_label"][name]["threshold"] == pytest.approx(meta.thresholds[LABELS.index(name)])


def test_metrics_json_contract_and_recompute_from_predictions(val_run):
    out, _ = val_run
    metrics = _strict_json(out / "metrics.json")
    for key in ("n_images", "mean_auroc", "mean_auroc_ci", "per_label", "accuracy", "subgroups", "localization"):
        assert key in metrics
    assert set(metrics["accuracy"]) >= {"per_label_mean", "all_negative_baseline", "exact_match"}
    assert set(metrics["subgroups"]) == {"view=PA", "view=AP", "sex=F", "sex=M"}
    low, high = metrics["mean_auroc_ci"]
    assert low <= metrics["mean_auroc"] <= high
    frame, y_true, y_prob = read_predictions(out / "predictions.csv", LABELS)
    assert list(frame.columns[:3]) == ["image", "patient", "view"] and len(frame) == metrics["n_images"]
    assert ((y_prob > 0) & (y_prob < 1)).all()
    defined = []
    for j, name in enumerate(LABELS):
        m = metrics["per_label"][name]
        assert set(m) >= {"auroc", "auroc_ci", "average_precision", "precision", "recall", "f1", "specificity",
                          "accuracy", "threshold", "positives"}
        assert m["positives"] == int(y_true[:, j].sum())
        if 0 < m["positives"] < len(frame):
            assert m["auroc"] == pytest.approx(roc_auc_score(y_true[:, j], y_prob[:, j]), abs=1e-5)
            defined.append(m["auroc"])
        else:
            assert m["auroc"] is None and m["note"]
    assert metrics["mean_auroc"] == pytest.approx(np.mean(defined))
    pa = frame["view"] == "PA"
    sub = metrics["subgroups"]["view=PA"]
    assert sub["n_images"] == int(pa.sum())
    j = next(j for j, name in enumerate(LABELS) if sub["per_label"][name]["auroc"] is not None)
    assert sub["per_label"][LABELS[j]]["auroc"] == pytest.approx(roc_auc_score(y_true[pa, j], y_prob[pa, j]),
                                                                  abs=1e-5)
    recomputed = evaluate_frame(frame, LABELS, [metrics["per_label"][n]["threshold"] for n in LABELS],
                                n_boot=50, seed=0)
    assert recomputed["mean_auroc_ci"] == pytest.approx(metrics["mean_auroc_ci"], abs=1e-5)
    table = pd.read_csv(out / "per_label.csv")
    assert table["label"].tolist() == list(LABELS)
    loc = metrics["localization"]
    assert (loc["boxes_in_file"], loc["images_in_file"], loc["boxes_evaluated"]) == (984, 880, 0)


def test_aurocs_recomputed_from_predictions_csv_equal_metrics_json_exactly(val_run):
    out, _ = val_run
    metrics = _strict_json(out / "metrics.json")
    _, y_true, y_prob = read_predictions(out / "predictions.csv", LABELS)
    defined = 0
    for j, name in enumerate(LABELS):
        stored = metrics["per_label"][name]["auroc"]
        if stored is not None:
            assert roc_auc_score(y_true[:, j], y_prob[:, j]) == stored, name  # no tolerance: full precision
            defined += 1
    assert defined > 0


def test_report_and_console(val_run):
    out, console = val_run
    report = (out / "report.md").read_text()
    for text in ("0.745", "0.806", "0.841", "official split", "random 70/10/20", "split **val**",
                 "Per-label (element-wise) accuracy", "Exact-match accuracy", "all-negative baseline",
                 "view=AP", "sex=F", "![ROC curves](roc.png)", "![Reliability diagram](reliability.png)",
                 "No boxed image was found"):
        assert text in report, text
    assert "AUROC [95% CI]" in console and "mean (" in console
    for name in LABELS:
        assert f"\n{name} " in console


def test_empty_test_split_exits_with_a_clear_message(trained_checkpoint, tmp_path, capsys):
    rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(NIH_DIR), "--out", str(tmp_path / "o"),
               "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "test split is empty" in err and "--split val" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "missing.pth"], "checkpoint not found"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--bbox-csv", "nowhere.csv"], "--bbox-csv"),
])
def test_bad_input_is_a_clear_error(trained_checkpoint, tmp_path, capsys, argv, message):
    base = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(NIH_DIR), "--split", "val", "--in-sample",
            "--out", str(tmp_path / "o"), "--workers", "0", "--no-progress"]
    assert _run(base + argv) == 2
    assert message in capsys.readouterr().err


@pytest.fixture()
def boxed_data_dir(tmp_path, metadata_dir):
    """A data folder with real NIH PNGs renamed as NIH boxed images (one Atelectasis, one 'Infiltrate' box) and a
    third, unboxed image, listed in a tiny labels.csv."""
    boxes = pd.read_csv(BBOX_CSV, usecols=[0, 1])
    boxes.columns = ["image", "label"]
    counts = boxes["image"].value_counts()
    single = boxes[boxes["image"].map(counts) == 1]
    atelectasis = single[single["label"] == "Atelectasis"]["image"].iloc[0]
    infiltrate = single[single["label"] == "Infiltrate"]["image"].iloc[0]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    sources = sorted((NIH_DIR / "images").glob("*.png"))
    header = (NIH_DIR / "labels.csv").read_text().splitlines()[0]
    rows = []
    for name, source, findings in ((atelectasis, NIH_PNG, "Atelectasis"), (infiltrate, sources[1], "Infiltration"),
                                   ("00000999_000.png", sources[2], "No Finding")):
        shutil.copy(source, data / "images" / name)
        patient = int(name.split("_")[0])
        rows.append(f"{name},{findings},0,{patient},50,F,AP,2500,2048,0.168,0.168")
    (data / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return data, atelectasis, infiltrate


def test_localization_on_boxed_images(trained_checkpoint, boxed_data_dir, metadata_dir, tmp_path, capsys):
    data, atelectasis, infiltrate = boxed_data_dir
    out = tmp_path / "out"
    rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(data), "--split", "all", "--out", str(out),
               "--bootstrap", "20", "--workers", "0", "--no-progress",
               "--bbox-csv", str(BBOX_CSV)])
    console = capsys.readouterr()
    assert rc == 0, console.err
    metrics = _strict_json(out / "metrics.json")
    loc = metrics["localization"]
    assert (loc["boxes_in_file"], loc["boxes_evaluated"], loc["images_evaluated"]) == (984, 2, 2)
    # A folder that is not the training data is not worded as if it held training images.
    description = metrics["run"]["split_description"]
    assert "including" not in description and "mixes training" not in description
    assert "not the one the checkpoint was trained on" in description and metrics["run"]["in_sample"] is None
    assert loc["per_label"]["Atelectasis"]["boxes"] == 1 and loc["per_label"]["Infiltration"]["boxes"] == 1
    assert loc["per_label"]["Mass"]["boxes"] == 0 and loc["per_label"]["Mass"]["pointing_game"] is None
    # The checkpoint was trained on the sample folder (its label file's hash is in the SplitSpec): this folder's
    # images are not its training data, whatever a new split of this folder would say.
    assert loc["images_in_training_split"] == 0
    assert "training split" not in console.out
    details = pd.read_csv(out / "localization.csv")
    assert sorted(zip(details["image"], details["label"])) == sorted(
        [(atelectasis, "Atelectasis"), (infiltrate, "Infiltration")])
    assert (details[["width", "height"]] == 1024).all().all()
    for _, row in details.iterrows():
        assert 0.0 <= row["iobb"] <= 1.0 and row["candidates"] >= 1
        assert loc["per_label"][row["label"]]["pointing_game"] == float(row["pointing"])
    assert "## Localization" in (out / "report.md").read_text()
    assert "pointing game" in console.out


# --- what the user gets: the product's calls, scope, calibration, baselines -----------------------------------------


def test_metrics_json_scores_the_products_calls(val_run, trained_checkpoint):
    from sklearn.metrics import confusion_matrix

    from chestxray.calls import CALLS, POSITIVE
    from chestxray.predictor import Predictor
    from chestxray.trust.calibration import expected_calibration_error

    out, console = val_run
    metrics = _strict_json(out / "metrics.json")
    frame, y_true, y_prob = read_predictions(out / "predictions.csv", LABELS)
    predictor = Predictor.from_checkpoint(trained_checkpoint, device="cpu")
    for j, name in enumerate(LABELS):
        calls = frame[f"{name}_call"].to_numpy()
        assert set(calls) <= set(CALLS)
        d = metrics["decision"][name]
        assert d["validated"] == predictor.validated[name]
        tn, fp, fn, tp = confusion_matrix(y_true[:, j], calls == POSITIVE, labels=[0, 1]).ravel()
        a = d["all"]
        assert (a["tp"], a["fp"], a["tn"] + a["no_call_negative"], a["fn"] + a["no_call_positive"]) == (tp, fp, tn, fn)
        assert a["calls"] == {word: int((calls == word).sum()) for word in CALLS}
        accepted = frame["in_scope"].to_numpy(dtype=bool)
        assert d["accepted"]["n_images"] == accepted.sum()
        assert d["accepted"]["positives"] == y_true[accepted, j].sum()
        c = metrics["calibration"]["per_label"][name]
        assert c["ece"] == pytest.approx(expected_calibration_error(y_true[:, j], y_prob[:, j]))
        assert c["ece_ci"][0] <= c["ece_ci"][1] and c["brier"] == pytest.approx(np.mean((y_prob[:, j] - y_true[:, j])
                                                                                        ** 2))
    assert metrics["not_validated"] == [n for n in LABELS if predictor.validated[n] is False]
    scope = metrics["scope"]
    assert (scope["accepted"], scope["total"]) == (int(frame["in_scope"].sum()), len(frame))
    assert scope["accepted_metrics"]["n_images"] == scope["accepted"]
    # An out-of-scope image has every label "out of scope".
    rejected = frame[~frame["in_scope"].astype(bool)]
    assert (rejected[[f"{n}_call" for n in LABELS]] == "out of scope").all().all()
    assert "the product's calls" in console and "In-scope check:" in console


def test_metadata_baseline_is_fitted_on_the_training_split(val_run, trained_checkpoint):
    out, _ = val_run
    metrics = _strict_json(out / "metrics.json")
    _, meta, _ = load_checkpoint(trained_checkpoint)
    base = metrics["baselines"]["metadata"]
    assert base["available"] and base["n_train"] == meta.training["n_train"] == 48
    frame, y_true, _ = read_predictions(out / "predictions.csv", LABELS)
    aurocs = []
    for j, name in enumerate(LABELS):
        if base["per_label"][name]["auroc"] is not None:
            aurocs.append(roc_auc_score(y_true[:, j], frame[f"{name}_metadata_prob"]))
            assert base["per_label"][name]["auroc"] == pytest.approx(aurocs[-1])
    assert base["mean_auroc"] == pytest.approx(np.mean(aurocs))
    low, high = base["mean_auroc_ci"]
    assert low <= base["mean_auroc"] <= high
    prevalence = metrics["baselines"]["prevalence"]
    assert prevalence["prevalence_from"] == "training split" and prevalence["mean_auroc"] == 0.5
    report = (out / "report.md").read_text()
    assert report.startswith("# In-sample evaluation report (not an independent estimate)")
    verdict = ("does not beat the metadata baseline" if base["model_beats"] is False
               else "beats the metadata baseline" if base["model_beats"] else "cannot be told")
    assert verdict in report and "## Baselines" in report and "## Calibration per label" in report


@pytest.mark.parametrize("split", ["val", "calibration", "train", "all"])
def test_images_that_fitted_the_checkpoint_are_refused_without_in_sample(trained_checkpoint, tmp_path, capsys,
                                                                          split):
    rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(NIH_DIR), "--split", split,
               "--out", str(tmp_path / "o"), "--workers", "0", "--no-progress", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--in-sample" in err and "in-sample" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _unseen_names(checkpoint, count: int) -> list[str]:
    """Sample images at 64 px whose patients are in none of the checkpoint's train, val or calibration splits."""
    import warnings

    from chestxray.data import load_index, rebuild_splits

    _, meta, _ = load_checkpoint(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_index(NIH_DIR)
        splits = rebuild_splits(meta, index, NIH_DIR)
    fitted = set().union(*(set(splits[s]["patient"]) for s in ("train", "val", "calibration")))
    small = {p.name for p in (NIH_DIR / "images_64").glob("*.png")}
    names = sorted(index["image"][~index["patient"].isin(fitted) & index["image"].isin(small)])
    assert len(names) >= count
    return names[:count]


def _fitted_name(checkpoint) -> str:
    import warnings

    from chestxray.data import load_index, rebuild_splits

    _, meta, _ = load_checkpoint(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = rebuild_splits(meta, load_index(NIH_DIR), NIH_DIR)["train"]
    return next(n for n in train["image"] if (NIH_DIR / "images_64" / n).is_file())


def test_external_validation_report(trained_checkpoint, tmp_path):
    from support.training import linked_data

    data = linked_data(NIH_DIR, tmp_path / "external", _unseen_names(trained_checkpoint, 14), lists=False)
    out = tmp_path / "out"
    rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(data), "--external",
               "--train-data-dir", str(NIH_DIR), "--out", str(out), "--bootstrap", "20", "--workers", "0",
               "--no-progress"])
    assert rc == 0
    metrics = _strict_json(out / "metrics.json")
    run = metrics["run"]
    assert run["external"] is True and run["split"] == "all" and run["in_sample"] is None
    assert run["training_overlap"]["checked"] and run["training_overlap"]["images"] == 0
    assert run["training_overlap"]["patients"] == 0
    assert metrics["n_images"] == 14 and metrics["baselines"]["metadata"]["available"]
    report = (out / "report.md").read_text()
    assert report.startswith("# External validation report")
    assert report.index("## In-scope acceptance") < report.index("## What the user gets") < report.index(
        "## Per-label metrics")
    assert "none of them fitted the checkpoint" in run["split_description"] and "including" not in report
    # Without the training folder: said plainly, no baseline, no overlap check.
    rc = _run(["--checkpoint", str(trained_checkpoint), "--data-dir", str(data), "--external", "--out",
               str(tmp_path / "out2"), "--bootstrap", "0", "--workers", "0", "--no-progress"])
    assert rc == 0
    metrics = _strict_json(tmp_path / "out2" / "metrics.json")
    metadata = metrics["baselines"]["metadata"]
    assert metadata["available"] is False and "--train-data-dir" in metadata["reason"]
    assert f"Metadata baseline: not available ({metadata['reason']})" in (tmp_path / "out2" / "report.md").read_text()
    assert metrics["run"]["training_overlap"]["checked"] is False
    assert "not checked without --train-data-dir" in metrics["run"]["split_description"]
    assert "**Overlap with the training data not checked:**" in (tmp_path / "out2" / "report.md").read_text()
    assert "**Overlap" not in report


def test_external_refuses_the_training_data(trained_checkpoint, tmp_path, capsys):
    from support.training import linked_data

    base = ["--checkpoint", str(trained_checkpoint), "--external", "--out", str(tmp_path / "o"), "--workers", "0",
            "--no-progress", "--bootstrap", "0"]
    assert _run([*base, "--data-dir", str(NIH_DIR)]) == 2
    assert "is the data this checkpoint was trained on" in capsys.readouterr().err
    mixed = linked_data(NIH_DIR, tmp_path / "mixed", [*_unseen_names(trained_checkpoint, 3),
                                                      _fitted_name(trained_checkpoint)], lists=False)
    assert _run([*base, "--data-dir", str(mixed), "--train-data-dir", str(NIH_DIR)]) == 2
    assert "1 of the images under" in capsys.readouterr().err
    assert _run([*base, "--data-dir", str(mixed), "--split", "test"]) == 2
    assert "--external evaluates every labelled image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calls_are_the_apps_for_every_image(tiny_checkpoint, tmp_path):
    """A checkpoint whose evidence validates one label at threshold 0, on sample images plus one that is not a
    radiograph: every call in predictions.csv is the one Predictor.predict gives the original file."""
    from support.training import linked_data
    from support.trust import VALIDATED, make_trusted_checkpoint

    from chestxray.predictor import Predictor

    checkpoint = make_trusted_checkpoint(tmp_path / "trusted.pth", tiny_checkpoint, NIH_DIR)
    names = sorted(p.name for p in (NIH_DIR / "images_64").glob("*.png"))[:8]
    data = linked_data(NIH_DIR, tmp_path / "data", names, lists=False)
    (data / names[0]).unlink()  # the first image becomes uniform noise: not a radiograph
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(data / names[0])
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(checkpoint), "--data-dir", str(data), "--split", "all", "--out", str(out),
                 "--bootstrap", "0", "--workers", "0", "--no-progress"]) == 0
    frame, y_true, _ = read_predictions(out / "predictions.csv", LABELS)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for _, row in frame.iterrows():
        prediction = predictor.predict(data / row["image"])
        assert row["in_scope"] == prediction.in_scope, row["image"]
        assert [row[f"{n}_call"] for n in LABELS] == [prediction.call(n) for n in LABELS], row["image"]
    assert not frame.loc[frame["image"] == names[0], "in_scope"].item()  # the noise image
    metrics = _strict_json(out / "metrics.json")
    accepted = int(frame["in_scope"].sum())
    assert 0 < accepted < len(frame) and metrics["scope"]["accepted"] == accepted
    effusion = metrics["decision"][VALIDATED]["all"]
    # Threshold 0: every accepted image is called positive, the rejected one gets no call.
    assert effusion["tp"] + effusion["fp"] == accepted and effusion["calls"]["out of scope"] == len(frame) - accepted
    assert effusion["called_positive_rate"]["value"] == accepted / len(frame)
    assert metrics["decision"][VALIDATED]["validated"] is True and VALIDATED not in metrics["not_validated"]
    # The checkpoint records no split: no training split to fit the metadata baseline on, and it says so.
    assert metrics["baselines"]["metadata"]["available"] is False
    assert "does not record its training data" in metrics["run"]["split_description"]
