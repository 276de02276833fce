"""Localization: NIH's bbox file, Wang et al.'s heatmap boxes, IoBB and the pointing game on hand-worked boxes,
and the whole path on a real NIH image with a box (copied into tmp_path, never into the repo)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from support.data import BBOX_CSV, NIH_DIR, NIH_PNG

from chestxray.cam import predict_with_maps, upsample_map
from chestxray.checkpoint import load_checkpoint
from chestxray.imaging import read_xray
from chestxray.localization import (
    BBoxError,
    Box,
    evaluate_localization,
    heatmap_boxes,
    iobb,
    localization_summary,
    localize,
    normalize_heatmap_255,
    peak_point,
    read_bbox_csv,
)
from chestxray.transforms import preprocess

NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def test_real_bbox_list_parses_all_984_boxes():
    boxes = read_bbox_csv(BBOX_CSV)
    assert len(boxes) == 984 and boxes["image"].nunique() == 880
    counts = boxes["label"].value_counts().to_dict()
    assert counts["Infiltration"] == 123 and "Infiltrate" not in counts
    assert set(counts) == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                           "Pneumonia", "Pneumothorax"}
    first = boxes.iloc[0]
    assert (first["image"], first["label"]) == ("00013118_008.png", "Atelectasis")
    assert (first["x"], first["y"], first["w"], first["h"]) == pytest.approx(
        (225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661))
    assert ((boxes[["x", "y"]] >= 0).all().all() and (boxes["x"] + boxes["w"] <= 1024 + 1e-6).all())


def test_bbox_csv_infiltrate_and_errors(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(NIH_HEADER + "a.png,Infiltrate,10,20,30,40\nb.png,Mass,1.5,2.5,3,4,,\n")
    boxes = read_bbox_csv(good)
    assert boxes["label"].tolist() == ["Infiltration", "Mass"]
    assert boxes.iloc[1][["x", "y", "w", "h"]].tolist() == [1.5, 2.5, 3.0, 4.0]
    cases = {
        "unknown label 'Tumour'": "a.png,Tumour,1,2,3,4\n",
        "not numbers": "a.png,Mass,1,2,three,4\n",
        "positive width": "a.png,Mass,1,2,0,4\n",
        "expected image, label": "a.png,Mass,1,2\n",
    }
    for message, row in cases.items():
        bad = tmp_path / "bad.csv"
        bad.write_text(NIH_HEADER + row)
        with pytest.raises(BBoxError, match=message):
            read_bbox_csv(bad)
    with pytest.raises(BBoxError, match="not found"):
        read_bbox_csv(tmp_path / "missing.csv")


def test_box_geometry_hand_worked():
    truth = Box(5, 5, 10, 10)
    assert iobb(Box(0, 0, 10, 10), truth) == pytest.approx(25 / 100)  # 5x5 overlap over the 10x10 candidate
    assert iobb(Box(6, 6, 2, 2), truth) == pytest.approx(1.0)  # inside the truth: IoBB rewards small boxes
    assert iobb(Box(0, 0, 40, 40), truth) == pytest.approx(100 / 1600)
    assert iobb(Box(20, 20, 5, 5), truth) == 0.0
    assert truth.contains(5, 15) and not truth.contains(4.9, 10)
    assert Box(100, 200, 300, 400).scaled(0.25, 0.5) == Box(25, 100, 75, 200)


def test_normalize_and_threshold_boxes():
    heat = np.zeros((20, 30), dtype=np.float32) - 5.0
    heat[2:5, 3:9] = 10.0  # strong blob: rows 2-4, cols 3-8
    heat[10:16, 20:22] = 0.0  # weak blob: (0 - -5) / 15 * 255 = 85 after min-max
    heat[15, 22] = 0.0  # diagonal neighbour: 8-connected to the weak blob
    scaled = normalize_heatmap_255(heat)
    assert scaled.min() == 0.0 and scaled.max() == pytest.approx(255.0)
    assert scaled[10, 20] == pytest.approx(85.0)
    assert heatmap_boxes(scaled, 180) == [Box(3, 2, 6, 3)]
    assert heatmap_boxes(scaled, 60) == [Box(3, 2, 6, 3), Box(20, 10, 3, 6)]
    assert normalize_heatmap_255(np.full((4, 4), 3.0)).max() == 0.0
    assert peak_point(heat) == (3.5, 2.5)


def test_localize_hand_worked():
    heat = np.zeros((100, 100), dtype=np.float32)
    heat[10:40, 30:70] = 100.0  # 100/255 -> above 60 only: box (30, 10, 40, 30)
    heat[20:30, 40:60] = 255.0  # above 180: box (40, 20, 20, 10), the truth exactly
    truth = Box(40, 20, 20, 10)
    result = localize(heat, truth)
    assert result["iobb_180"] == pytest.approx(1.0)
    assert result["iobb_60"] == pytest.approx(200 / 1200)
    assert result["iobb"] == pytest.approx(1.0) and result["candidates"] == 2
    assert result["pointing"] and not result["centre"]  # peak (40.5, 20.5) in the box; centre (50, 50) is not
    elsewhere = localize(heat, Box(0, 60, 20, 20))
    assert elsewhere["iobb"] == 0.0 and not elsewhere["pointing"] and not elsewhere["centre"]
    centred = localize(heat, Box(45, 35, 10, 20))
    assert centred["centre"] and not centred["pointing"]
    assert centred["iobb"] == pytest.approx(50 / 1200)  # only the 60-box overlaps it: rows 35-40 x cols 45-55


def test_summary_counts_and_accuracy():
    import pandas as pd

    boxes = pd.DataFrame({"image": ["a", "b", "c", "d"], "label": ["Mass", "Mass", "Nodule", "Hernia"],
                          "x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0})
    results = pd.DataFrame({"image": ["a", "b", "c"], "label": ["Mass", "Mass", "Nodule"],
                            "iobb": [0.3, 0.8, 0.1], "pointing": [True, False, True],
                            "centre": [False, False, True]})
    s = localization_summary(results, boxes, ["Mass", "Nodule", "Effusion"])
    assert s["boxes_in_file"] == 4 and s["boxes_evaluated"] == 3 and s["boxes_not_evaluated"] == 1
    assert s["labels_not_in_model"] == ["Hernia"]
    assert set(s["per_label"]) == {"Mass", "Nodule"}
    mass = s["per_label"]["Mass"]
    assert mass["accuracy"] == {"0.1": 1.0, "0.25": 1.0, "0.5": 0.5, "0.75": 0.5, "0.9": 0.0}
    assert mass["pointing_game"] == 0.5 and mass["centre_baseline"] == 0.0
    assert s["overall"]["accuracy"]["0.1"] == pytest.approx(2 / 3)  # IoBB must exceed T: 0.1 is not > 0.1
    assert s["overall"]["pointing_game"] == pytest.approx(2 / 3)


@pytest.fixture()
def boxed_data(tmp_path):
    """Two real NIH images renamed as two boxed test images: the 1024 px original and a 128 px copy."""
    small = sorted((NIH_DIR / "images_128").glob("*.png"))[0]
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    shutil.copy(NIH_PNG, folder / "00013118_008.png")
    shutil.copy(small, folder / "00014716_007.png")
    csv = tmp_path / "bbox.csv"
    csv.write_text(NIH_HEADER
                   + "00013118_008.png,Infiltrate,0,0,1024,1024\n"  # the whole image: every test is a hit
                   + "00014716_007.png,Atelectasis,0,0,512,1024\n"  # the left half of the 1024 space
                   + "00014716_007.png,Hernia,0,0,10,10\n"  # a label the model lacks
                   + "00099999_000.png,Mass,0,0,10,10\n")  # an image not under the data folder
    paths = {p.name: p for p in folder.glob("*.png")}
    return read_bbox_csv(csv), paths


def test_evaluate_localization_on_real_images(boxed_data, tmp_path, monkeypatch):
    from support.checkpoints import make_checkpoint

    from chestxray.predictor import Predictor

    boxes, paths = boxed_data
    labels = ("Atelectasis", "Infiltration", "Mass")
    model, meta, _ = load_checkpoint(make_checkpoint(tmp_path / "ckpt.pth", labels=labels))
    preprocessed = []
    real_predict_batch = Predictor.predict_batch  # predict is a batch of one; it preprocesses there (transform)

    def spy(self, images, *args, **kwargs):
        preprocessed.extend(image.shape for image in images)
        return real_predict_batch(self, images, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_batch", spy)
    results = evaluate_localization(model, meta, boxes, paths, progress=False)
    assert sorted(preprocessed) == [(128, 128), (1024, 1024)]  # each boxed image once, through the Predictor
    assert results[["image", "label"]].values.tolist() == [["00013118_008.png", "Infiltration"],
                                                           ["00014716_007.png", "Atelectasis"]]
    whole, half = results.iloc[0], results.iloc[1]
    assert (whole["width"], whole["height"]) == (1024, 1024) and (half["width"], half["height"]) == (128, 128)
    assert whole["pointing"] and whole["centre"] and whole["iobb"] == pytest.approx(1.0)
    # Independent check of the 128 px case: the 1024-space left half is x < 64 in the loaded image.
    image = read_xray(paths["00014716_007.png"])
    with torch.inference_mode():
        _, maps = predict_with_maps(model, preprocess(meta, image))
    heat = upsample_map(maps[0, labels.index("Atelectasis")].numpy(), 128, 128)
    assert half["pointing"] == (peak_point(heat)[0] <= 64)
    assert half["centre"]  # (64, 64) lies on the half's edge
    summary = localization_summary(results, boxes, labels)
    assert summary["boxes_evaluated"] == 2 and summary["images_evaluated"] == 2
    assert summary["labels_not_in_model"] == ["Hernia"] and summary["boxes_not_evaluated"] == 2
    assert summary["per_label"]["Infiltration"]["accuracy"]["0.9"] == 1.0
