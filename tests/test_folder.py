"""``dataset=folder``: a user's own dataset (images/, masks/, split lists, classes.yaml).

One generated dataset serves every test: 11 classes that are not VOC's (names, three with their
own colours), images of seven sizes and aspects as JPEG and PNG, masks as grey (L) and palette
(P) PNGs with a void border. The split by names, check and stats, a 2-step MiB run with
DeepInversion replay, the report and predict run on it; each bad input has its one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from incseg.config import compose, task_from_cfg
from incseg.data.__main__ import main as data_main
from incseg.data.datamodule import IncrementalDataModule
from incseg.data.folder import read_classes
from incseg.data.prepare import save_palette_png, voc_colormap
from incseg.data.sources import make_source
from incseg.errors import ConfigError, DataError
from incseg.tasks import get_task

CLASSES = ["background", {"name": "sky", "color": [70, 130, 180]}, "road",
           {"name": "car", "color": [0, 0, 142]}, "tree", "building", "person", "bike",
           {"name": "sign", "color": [220, 220, 0]}, "water", "grass"]
NAMES = ["background", "sky", "road", "car", "tree", "building", "person", "bike", "sign",
         "water", "grass"]
CAR = 3
# (width, height, classes): car (3) in b, c, e, g, l; j is background only
TRAIN = {"a": (40, 30, [1, 2]), "b": (30, 44, [3]), "c": (36, 36, [4, 3]), "d": (52, 28, [5, 6]),
         "e": (28, 40, [3, 7]), "f": (44, 33, [8, 9]), "g": (64, 24, [10, 3]),
         "h": (40, 30, [1, 4]), "i": (30, 44, [2, 6]), "j": (36, 36, []), "k": (52, 28, [7, 9]),
         "l": (28, 40, [3, 8])}
TEST = {"t1": (40, 30, [1, 3]), "t2": (30, 44, [2, 4]), "t3": (48, 36, [3]),
        "t4": (36, 36, [5, 10]), "t5": (28, 40, [6, 8]), "t6": (44, 33, [9, 7])}
STEP0 = [n for n in NAMES if n != "car"]
STEPS = f"task.steps=[[{','.join(STEP0)}],[car]]"


def draw(w: int, h: int, classes: list[int]) -> np.ndarray:
    """Background with one vertical band per class, each inside a 1-px void (255) border."""
    mask = np.zeros((h, w), np.uint8)
    bw = w // max(len(classes), 1)
    for i, c in enumerate(classes):
        x0, x1 = i * bw + 2, (i + 1) * bw - 2
        mask[3:h - 3, x0:x1] = 255
        mask[4:h - 4, x0 + 1:x1 - 1] = c
    return mask


def make_folder(root: Path, val: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """The dataset and, per split, the pixel counts of every mask value (what check reads)."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES}, sort_keys=False))
    rng = np.random.default_rng(0)
    counts = {}
    splits = {"train": TRAIN, "test": TEST, **({"val": dict(list(TEST.items())[:2])} if val
                                                else {})}
    for split, items in splits.items():
        counts[split] = np.zeros(256, np.int64)
        for k, (sid, (w, h, cl)) in enumerate(items.items()):
            mask = draw(w, h, cl)
            counts[split] += np.bincount(mask.ravel(), minlength=256)
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            for c in cl:
                img[mask == c] = (c * 23 % 256, c * 57 % 256, c * 91 % 256)
            Image.fromarray(img).save(root / "images" / f"{sid}{'.jpg' if k % 2 else '.png'}")
            if k % 2:
                save_palette_png(mask, root / "masks" / f"{sid}.png")
            else:
                Image.fromarray(mask, mode="L").save(root / "masks" / f"{sid}.png")
        (root / f"{split}.txt").write_text("# ids\n" + "".join(f"{s}\n" for s in items))
    return root, counts


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    return make_folder(tmp_path_factory.mktemp("folder") / "data")


def fresh(tmp_path: Path, folder) -> Path:
    """A private copy of the dataset to break."""
    return Path(shutil.copytree(folder[0], tmp_path / "data"))


def args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["dataset=folder", f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}",
            "task=custom", STEPS, *extra]


def one_line(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    # a progress bar redrawn with \r and erased on close leaves nothing on a terminal
    err = [ln.rsplit("\r", 1)[-1] for ln in capsys.readouterr().err.split("\n")]
    err = [ln for ln in err if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- classes and task splits ---------------------------------------------------------------

def test_classes_yaml_names_colours_and_a_split_by_names(folder):
    classes = read_classes(folder[0] / "classes.yaml")
    assert classes.names == tuple(NAMES)
    voc = voc_colormap()
    assert classes.colors[CAR] == (0, 0, 142) and classes.colors[2] == tuple(voc[2])
    pal = classes.palette()
    assert pal.shape == (256, 3) and tuple(pal[8]) == (220, 220, 0)
    assert tuple(pal[255]) == tuple(voc[255])  # void keeps VOC's colour
    task = task_from_cfg(compose(args(folder[0], folder[0])))
    assert task.steps == [[0, 1, 2, 4, 5, 6, 7, 8, 9, 10], [3]]
    assert task.num_dataset_classes == 11
    # names and ids mix; the channel order is the split's order
    assert get_task("folder", "custom", [[0, "road", 1], ["car", 10]], NAMES).steps == \
        [[0, 2, 1], [3, 10]]
    assert get_task("folder", "offline", None, NAMES).steps == [list(range(11))]
    with pytest.raises(ConfigError, match="outside folder.s ids 0..10"):
        get_task("folder", "custom", [[0, 1], [11]], NAMES)


def test_check_counts_every_class_and_stats_follow_the_split(folder, tmp_path, capsys):
    root, counts = folder
    data_main(["check", "dataset=folder", f"data.root={root}"])
    out = json.loads(capsys.readouterr().out)
    assert out["num_classes"] == 11 and out["splits"]["val"] is None  # no val.txt
    train = out["splits"]["train"]
    assert train["images"] == len(TRAIN)
    assert train["void_pixels"] == counts["train"][255] > 0
    for row in train["classes"]:
        assert row["name"] == NAMES[row["id"]]
        assert row["pixels"] == counts["train"][row["id"]]
        assert row["images"] == (len(TRAIN) if row["id"] == 0 else
                                 sum(row["id"] in cl for _, _, cl in TRAIN.values()))
    assert train["classes"][CAR]["images"] == 5
    assert out["warnings"] == []
    # disjoint step 0 drops the images that hold a car: a, d, f, h, i, k remain
    for overlap, step0 in (("true", 10), ("false", 6)):
        data_main(["stats", *args(root, tmp_path, f"overlap={overlap}")])
        steps = json.loads(capsys.readouterr().out)["steps"]
        assert [s["train_images"] for s in steps] == [step0, 5]
        assert steps[1]["names"] == ["car"] and steps[1]["test_images"] == 6


def test_without_val_txt_no_validation_with_it_a_val_loader(folder, tmp_path):
    task = get_task("folder", "custom", [STEP0, ["car"]], NAMES)
    dm = IncrementalDataModule(make_source("folder", folder[0]), task, 1, crop=24, batch_size=2,
                               cache_dir=tmp_path / "c", progress=False)
    assert dm.val_dataloader() == [] and len(dm.test_dataloader()) == 6
    root, _ = make_folder(tmp_path / "with_val", val=True)
    dm = IncrementalDataModule(make_source("folder", root), task, 1, crop=24, batch_size=2,
                               cache_dir=tmp_path / "c", progress=False)
    assert len(dm.val_dataloader().dataset) == 2


# ---- the whole suite on it -----------------------------------------------------------------

def test_mib_with_replay_then_report_and_predict(folder, tmp_path, capsys):
    from incseg.predict import main as predict_main
    from incseg.protocol import run_protocol
    from incseg.report import make_report

    cfg = compose(["experiment=smoke", "logger=none", *args(folder[0], tmp_path), "data.crop=24",
                   "replay=deepinversion", "replay.verifier=none", "replay.check=0",
                   "inversion.n_per_class=1", "inversion.iterations_low=2",
                   "inversion.iterations_full=2", "inversion.batch_size=8",
                   "inversion.image_size=24"])
    run = tmp_path / "runs" / "mib"
    res = run_protocol(cfg, run)
    assert res["dataset"] == "folder" and res["class_names"] == NAMES
    assert res["class_colors"][CAR] == [0, 0, 142]
    assert [s["classes"] for s in res["steps"]] == [[0, 1, 2, 4, 5, 6, 7, 8, 9, 10], [3]]
    assert res["steps"][1]["replay"]["images"] == 9  # one per old foreground class
    assert "val_miou_all" not in res["steps"][0]  # no val.txt: nothing validated
    assert "| 3 car |" in (run / "results.md").read_text()

    make_report(run)
    md = (run / "report" / "table.md").read_text()
    assert "## folder, bisenet_r18, overlap" in md
    assert "| 0 background |" in md and "| 3 car |" in md and "| 10 grass |" in md

    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(next((folder[0] / "images").glob("t1.*")), images / "t1.png")
    out = tmp_path / "pred"
    predict_main([f"checkpoint={run / 'checkpoints' / 'step1.pt'}", f"input={images}",
                  f"output={out}"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["class_names"] == STEP0 + ["car"]  # channel order, as names
    with Image.open(out / "t1_mask.png") as im:
        assert im.size == (40, 30)
        pal = np.asarray(im.getpalette()[:768]).reshape(256, 3)
        ids = np.asarray(im)
    assert tuple(pal[CAR]) == (0, 0, 142) and tuple(pal[8]) == (220, 220, 0)
    with Image.open(images / "t1.png") as im:
        image = np.asarray(im.convert("RGB")).astype(np.float64)
    with Image.open(out / "t1_overlay.png") as im:
        over = np.asarray(im).astype(np.float64)
    np.testing.assert_array_equal(over, np.rint(0.5 * image + 0.5 * pal[ids]))


# ---- bad input: one line each (docs/errors.md rows 53-60) ----------------------------------

@pytest.mark.parametrize("text, words", [
    pytest.param(None, "classes.yaml is missing", id="missing"),
    pytest.param("classes: background, car\n", "has no list under `classes`", id="not-a-list"),
    pytest.param("classes: [background]\n", "lists 1 classes", id="one-class"),
    pytest.param("classes: [background, car, car]\n", "class 2 repeats the name 'car'",
                 id="duplicate-name"),
    pytest.param("classes: [background, {name: car, colour: [1, 2, 3]}]\n",
                 "class 1 has unknown key 'colour'", id="unknown-key"),
    pytest.param("classes: [background, {name: car, color: [1, 2, 300]}]\n",
                 "class 1 has color [1, 2, 300]", id="bad-color"),
    pytest.param("classes: [background, 7]\n", "class 1 is 7, not a name", id="not-a-name"),
    pytest.param("classes: [background\n", "is not valid YAML", id="not-yaml"),
])
def test_bad_classes_yaml(folder, tmp_path, capsys, text, words):
    root = fresh(tmp_path, folder)
    if text is None:
        (root / "classes.yaml").unlink()
    else:
        (root / "classes.yaml").write_text(text)
    assert words in one_line(capsys, data_main, ["check", "dataset=folder", f"data.root={root}"])


def test_mask_value_without_a_class(folder, tmp_path, capsys):
    root = fresh(tmp_path, folder)
    mask = draw(40, 30, [1, 11])  # 11: one past the last class id
    Image.fromarray(mask, mode="L").save(root / "masks" / "a.png")
    line = one_line(capsys, data_main, ["check", "dataset=folder", f"data.root={root}"])
    assert "a.png holds values [11] outside the dataset's classes 0..10 and 255" in line
    assert "add the class to" in line and "classes.yaml" in line


def test_class_name_not_in_classes_yaml(folder, tmp_path, capsys, monkeypatch):
    import incseg.run

    line = one_line(capsys, data_main, ["stats", *args(folder[0], tmp_path)[:-1],
                                        "task.steps=[[background,sky],[cat]]"])
    assert "step 1 names class 'cat', which is not in the dataset's class list" in line
    assert "background, sky, road, car" in line
    # the training entry refuses it before Hydra creates a run directory
    monkeypatch.setattr(sys, "argv", ["incseg.run", *args(folder[0], tmp_path)[:-1],
                                      f"paths.runs_dir={tmp_path / 'runs'}",
                                      "task.steps=[[background],[cars]]"])
    assert "names class 'cars'" in one_line(capsys, lambda _: incseg.run.main(), None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("remove, words", [
    pytest.param("images/c.png", "train.txt:4 lists 'c' but", id="image"),
    pytest.param("masks/b.png", "train.txt:3 lists 'b' but its mask", id="mask"),
])
def test_list_naming_a_missing_file(folder, tmp_path, capsys, remove, words):
    root = fresh(tmp_path, folder)
    (root / remove).unlink()
    line = one_line(capsys, data_main, ["check", "dataset=folder", f"data.root={root}"])
    assert words in line and "add the" in line and "or remove the line" in line


def test_image_and_mask_of_different_sizes(folder, tmp_path, capsys):
    root = fresh(tmp_path, folder)
    Image.fromarray(draw(40, 31, [1, 2]), mode="L").save(root / "masks" / "a.png")
    line = one_line(capsys, data_main, ["stats", *args(root, tmp_path)])
    assert "a.png is 40x31 but its image" in line and "is 40x30" in line


@pytest.mark.parametrize("remove, words", [
    pytest.param("test.txt", "list file", id="test-list"),
    pytest.param("images", "image folder", id="images-folder"),
])
def test_missing_list_or_folder(folder, tmp_path, capsys, remove, words):
    root = fresh(tmp_path, folder)
    shutil.rmtree(root / remove) if (root / remove).is_dir() else (root / remove).unlink()
    line = one_line(capsys, data_main, ["check", "dataset=folder", f"data.root={root}"])
    assert f"{words} {root / remove} is missing" in line


def test_a_named_task_other_than_offline(folder, tmp_path, capsys):
    line = one_line(capsys, data_main, ["stats", "dataset=folder", f"data.root={folder[0]}",
                                        "task=15-5"])
    assert "unknown task '15-5' for dataset folder; choose one of: offline" in line


@pytest.mark.parametrize("case, words", [
    pytest.param("both", "lists 'a' and both a.jpg and a.png are in", id="jpg-and-png"),
    pytest.param("line", "expected one image id per line, got 'a b'", id="two-words"),
])
def test_ambiguous_image_or_line(folder, tmp_path, capsys, case, words):
    root = fresh(tmp_path, folder)
    if case == "both":
        shutil.copy(root / "images" / "a.png", root / "images" / "a.jpg")
    else:
        (root / "test.txt").write_text("a b\n")
    assert words in one_line(capsys, data_main, ["check", "dataset=folder",
                                                 f"data.root={root}"])


def test_data_errors_are_data_errors(folder):
    with pytest.raises(DataError, match="data.root is not set for dataset folder"):
        make_source("folder", None)
