"""Model_Training/test.py end to end: a small checkpoint trained on the real sample (64 px, CPU), evaluated on its
own validation split, and heatmap localization on real NIH images listed as boxed images in a temporary data folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import BBOX_CSV, NIH_DIR, NIH_PNG
from PIL import Image
from sklearn.metrics import roc_auc_score

from chestxray.checkpoint import load_checkpoint
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
                   "--out", str(out), "--bootstrap", "50", "--workers", "0", "--no-progress", "--device", "cpu",
                   "--bbox-csv", str(BBOX_CSV)])
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
    frame, y_true, y_prob = evaluation.read_predictions(out / "predictions.csv", LABELS)
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
    recomputed = evaluation.evaluate_frame(frame, LABELS, [metrics["per_label"][n]["threshold"] for n in LABELS],
                                           n_boot=50, seed=0)
    assert recomputed["mean_auroc_ci"] == pytest.approx(metrics["mean_auroc_ci"], abs=1e-5)
    table = pd.read_csv(out / "per_label.csv")
    assert table["label"].tolist() == list(LABELS)
    loc = metrics["localization"]
    assert (loc["boxes_in_file"], loc["images_in_file"], loc["boxes_evaluated"]) == (984, 880, 0)


def test_aurocs_recomputed_from_predictions_csv_equal_metrics_json_exactly(val_run):
    out, _ = val_run
    metrics = _strict_json(out / "metrics.json")
    _, y_true, y_prob = evaluation.read_predictions(out / "predictions.csv", LABELS)
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
    base = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(NIH_DIR), "--split", "val",
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
    loc = _strict_json(out / "metrics.json")["localization"]
    assert (loc["boxes_in_file"], loc["boxes_evaluated"], loc["images_evaluated"]) == (984, 2, 2)
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
