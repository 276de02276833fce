"""chestxray.results without Flask: saving whole folders, retention, unknown ids, heatmaps rendered on first view."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from support.data import DICOM_MONO2, NIH_PNG

import chestxray.fileio
from chestxray import results
from chestxray.cam import heatmap_image
from chestxray.results import RESULT_ID, ResultNotFound, ResultStore, default_label, label_names


@pytest.fixture(scope="module")
def prediction(tiny_predictor):
    return tiny_predictor.predict(NIH_PNG)


def test_save_writes_one_whole_folder_with_to_dict(tmp_path, prediction):
    store = ResultStore(tmp_path, retention=5)
    record = store.save(prediction)
    assert RESULT_ID.fullmatch(record["id"]) and os.listdir(tmp_path) == [record["id"]]
    folder = tmp_path / record["id"]
    assert sorted(os.listdir(folder)) == ["heatmap", "heatmaps.npy", "image.png", "result.json"]
    on_disk = json.loads((folder / "result.json").read_text())
    assert on_disk == record == store.load(record["id"])
    assert {k: record[k] for k in prediction.to_dict()} == prediction.to_dict()
    with Image.open(folder / "image.png") as im:
        assert list(im.size) == record["display_size"] == [results.DISPLAY_MAX_SIDE] * 2
    assert record["original_size"] == [1024, 1024] and record["model"]["image_size"] == 64  # three sizes, three names
    assert os.listdir(folder / "heatmap") == []  # each heat layer is drawn when first asked for


def test_heatmap_is_rendered_once_on_first_view(tmp_path, prediction):
    store = ResultStore(tmp_path, retention=5)
    record = store.save(prediction)
    label = next(name for name in label_names(record) if name != default_label(record))
    path = store.heatmap_path(record["id"], label)
    width, height = results.heatmap_size(record["display_size"])
    expected = heatmap_image(prediction.heatmaps[list(prediction.labels).index(label)], height, width)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), np.asarray(expected))
    mtime = path.stat().st_mtime_ns
    assert store.heatmap_path(record["id"], label) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_heatmap_png_goes_through_atomic_write(tmp_path, prediction, monkeypatch):
    store = ResultStore(tmp_path, retention=5)
    record = store.save(prediction)
    written = []
    real = chestxray.fileio.atomic_write
    monkeypatch.setattr(results, "atomic_write", lambda path, *a, **k: written.append(path) or real(path, *a, **k))
    label = next(name for name in label_names(record) if name != default_label(record))
    assert store.heatmap_path(record["id"], label) == written[0]


@pytest.mark.parametrize("rid", ["0" * 32, "../etc", "A" * 32, "", "0" * 31])
def test_unknown_or_malformed_ids_raise_result_not_found(tmp_path, rid):
    store = ResultStore(tmp_path, retention=3)
    for call in (store.load, store.image_path, lambda r: store.heatmap_path(r, "Mass")):
        with pytest.raises(ResultNotFound, match="newest 3 results"):
            call(rid)


def test_unknown_label_raises_result_not_found(tmp_path, prediction):
    store = ResultStore(tmp_path, retention=3)
    rid = store.save(prediction)["id"]
    with pytest.raises(ResultNotFound, match="no label 'Bogus'"):
        store.heatmap_path(rid, "Bogus")


def test_retention_keeps_the_newest_and_clears_stale_temporaries(tmp_path, tiny_predictor, prediction):
    store = ResultStore(tmp_path, retention=2)
    stale, fresh = tmp_path / ".tmp-crashed", tmp_path / ".tmp-in-progress"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    ids = [store.save(p)["id"] for p in (prediction, tiny_predictor.predict(DICOM_MONO2), prediction)]
    assert set(os.listdir(tmp_path)) == {*ids[1:], fresh.name}
    with pytest.raises(ResultNotFound, match="expired"):
        store.load(ids[0])
    assert not stale.exists()


def test_a_failed_save_leaves_nothing(tmp_path, prediction, monkeypatch):
    store = ResultStore(tmp_path, retention=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save(prediction)
    assert os.listdir(tmp_path) == []


def test_a_result_pruned_while_rendering_leaves_no_orphan(tmp_path, prediction, monkeypatch):
    store = ResultStore(tmp_path, retention=2)
    record = store.save(prediction)
    label = next(name for name in label_names(record) if name != default_label(record))
    real_load = np.load

    def load_then_prune(path, *args, **kwargs):
        maps = real_load(path, *args, **kwargs)
        store.retention = 0  # another request pruned this result meanwhile
        store.prune()
        return maps

    monkeypatch.setattr(results.np, "load", load_then_prune)
    with pytest.raises(ResultNotFound, match="expired"):
        store.heatmap_path(record["id"], label)
    assert os.listdir(tmp_path) == []


def test_retention_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="retention"):
        ResultStore(tmp_path, retention=0)


def test_saving_needs_heatmaps(tmp_path, tiny_predictor):
    with pytest.raises(ValueError, match="heatmaps"):
        ResultStore(tmp_path, retention=2).save(tiny_predictor.predict(NIH_PNG, heatmaps=False))


def test_a_result_saved_by_an_older_version_is_not_found(tmp_path, prediction):
    store = ResultStore(tmp_path, retention=3)
    record = store.save(prediction)
    old = {k: v for k, v in record.items() if k != "display_size"} | {"image_size": record["display_size"]}
    (tmp_path / record["id"] / "result.json").write_text(json.dumps(old))
    with pytest.raises(ResultNotFound, match="older version"):
        store.load(record["id"])


def test_json_data_makes_non_finite_numbers_null_in_rows_mixed_lists_and_arrays():
    nan, inf = float("nan"), float("inf")
    data = {"row": [1.0, nan, inf, -inf], "mixed": [1, 2.0, np.float32(nan), "x", None, True],
            "nested": [[0.5, nan], (np.float64(inf), 3.0)], "array": np.array([[1.0, nan]]), 7: ()}
    expected = {"row": [1.0, None, None, None], "mixed": [1, 2.0, None, "x", None, True],
                "nested": [[0.5, None], [None, 3.0]], "array": [[1.0, None]], "7": []}
    assert chestxray.fileio.to_json_data(data) == expected
    assert json.loads(chestxray.fileio.dumps_json(data)) == expected
