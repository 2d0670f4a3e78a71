"""`python -m incseg.data prepare|stats`: VOC + SBD conversion, one-line errors, JSON on stdout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from incseg.data.__main__ import main
from incseg.data.prepare import prepare_voc, voc_colormap
from incseg.errors import DataError

from .conftest import draw_mask, make_voc


def _sbd(root, ids):
    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "cls").mkdir(parents=True)
    for i, cl in ids.items():
        gt = {"Segmentation": draw_mask(cl), "Boundaries": np.zeros(1),
              "CategoriesPresent": np.array(cl)}
        scipy.io.savemat(ds / "cls" / f"{i}.mat", {"GTcls": gt})
    return ds


def test_voc_colormap_matches_known_colours():
    cmap = voc_colormap()
    assert tuple(cmap[0]) == (0, 0, 0)
    assert tuple(cmap[1]) == (128, 0, 0)
    assert tuple(cmap[15]) == (192, 128, 128)  # person
    assert tuple(cmap[255]) == (224, 224, 192)  # void


def test_prepare_builds_train_aug_from_sbd(tmp_path):
    # VOC: train a,b (own masks); val t1..t5. SBD adds s1, s2 and an image that is in VOC val.
    root = make_voc(tmp_path / "voc", train={"a": [1], "b": [2], "s1": [3], "s2": [4]})
    base = root / "VOCdevkit/VOC2012"
    (base / "ImageSets/Segmentation/train_aug.txt").unlink()
    import shutil

    shutil.rmtree(base / "SegmentationClassAug")
    # a, b are VOC train with masks in SegmentationClass
    for i, cl in (("a", [1]), ("b", [2])):
        from incseg.data.prepare import save_palette_png
        save_palette_png(draw_mask(cl), base / "SegmentationClass" / f"{i}.png")
    ds = _sbd(root, {"a": [7], "s1": [3], "s2": [4], "t1": [1]})
    (ds / "train.txt").write_text("a\ns1\n")
    (ds / "val.txt").write_text("s2\nt1\n")
    out = prepare_voc(root, progress=False)
    assert out["built"] and out["train_aug"] == 4
    ids = (base / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert ids == ["a", "b", "s1", "s2"]  # t1 is VOC val: excluded
    a = np.asarray(Image.open(base / "SegmentationClassAug/a.png"))
    assert set(np.unique(a)) == {0, 1, 255}  # VOC's own mask wins over SBD's (class 7)
    s1 = Image.open(base / "SegmentationClassAug/s1.png")
    assert s1.mode == "P" and set(np.unique(np.asarray(s1))) == {0, 3, 255}
    again = prepare_voc(root, progress=False)
    assert again == {"dataset": "voc", "train_aug": 4, "val": 5, "built": False}


def test_prepare_without_sbd_says_what_to_get(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DataError, match="benchmark.tgz"):
        prepare_voc(root, progress=False)


def test_cli_missing_root_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "dataset=voc", f"data.root={tmp_path / 'nope'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: dataset root") and "data.root=DIR" in err[-1]


def test_cli_missing_list_file(voc_root, tmp_path, capsys):
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(SystemExit) as exc:
        main(["stats", "dataset=voc", f"data.root={voc_root}", f"paths.cache_dir={tmp_path}"])
    assert exc.value.code == 2
    assert "val.txt is missing" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["task=bogus"], "unknown task 'bogus'"),
    (["task=custom", "task.steps=[[0,1],[1,2]]"], "appears twice"),
    (["task=custom", "task.steps=[[1,2],[3]]"], "must contain the background"),
    (["task=custom", "task.steps=[[0,1,2],[9]]"], "has no training images"),
])
def test_cli_bad_task(voc_root, tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "dataset=voc", f"data.root={voc_root}", f"paths.cache_dir={tmp_path}",
              *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and words in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_stats_json_on_stdout(voc_root, tmp_path, capsys):
    main(["stats", "dataset=voc", f"data.root={voc_root}", "task=15-5", "overlap=false",
          f"paths.cache_dir={tmp_path}"])
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "voc" and out["task"] == "15-5" and out["overlap"] is False
    assert out["steps"] == [
        {"step": 0, "classes": list(range(16)), "train_images": 1, "test_images": 2},
        {"step": 1, "classes": [16, 17, 18, 19, 20], "train_images": 6, "test_images": 4},
    ]


def test_cli_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2 and "usage" in capsys.readouterr().err


def test_shapes_stats_background_shift(tmp_path, capsys):
    gen = ["dataset.generator.size=32", "dataset.generator.n_train=400",
           "dataset.generator.n_val=20", "dataset.generator.n_test=60"]
    counts = {}
    for overlap in ("true", "false"):
        main(["stats", "dataset=shapes", "task=15-5s", f"overlap={overlap}",
              f"paths.cache_dir={tmp_path}", *gen])
        out = json.loads(capsys.readouterr().out)
        assert len(out["steps"]) == 6 and all(s["train_images"] > 0 for s in out["steps"])
        counts[overlap] = [s["train_images"] for s in out["steps"]]
    assert all(d <= o for d, o in zip(counts["false"], counts["true"]))
    assert counts["false"][-1] == counts["true"][-1]  # nothing is "future" at the last step
    assert counts["true"][0] > counts["false"][0]  # images of future classes exist at step 0
