"""The ``shapes`` benchmark's class designs: ``twins`` (the default, unchanged byte for byte)
and ``shapes`` (``dataset.generator.classes=shapes``: only the shape names a class)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image, ImageDraw

import incseg
from incseg.config import compose
from incseg.data import shapes_draw
from incseg.data.corpus import CORPUS_SHAPES, CorpusParams, render_corpus_image
from incseg.data.shapes import (
    CLASS_NAMES,
    DESIGN_SHAPES,
    SHAPES,
    ShapesParams,
    class_hue_group,
    class_names,
    class_sheet,
    ensure_shapes,
    generate,
    render,
    render_sample,
    shapes_key,
)
from incseg.errors import ConfigError
from incseg.io import content_key, stable_hash
from incseg.protocol.state import fingerprint
from incseg.protocol.teachers import teacher_key
from tests.shapes_checks import hues_sit_in_their_bands

# Computed at the commit before the class designs existed (incseg 0.2.0). The cache key also
# hashes the package version, so the literal key holds for that version only; the content it
# hashes (the default parameters, no ``classes`` key) is checked for any version.
BASE_VERSION = "0.2.0"
BASE_DEFAULT_KEY = "fb78cd1e954d4aab"
BASE_SMALL_KEY = "11e8e945260e98c6"  # size 32, 60/20/20 images, seed 3
BASE_DEFAULT_FIELDS = {
    "size": 64, "n_train": 3000, "n_val": 300, "n_test": 600, "min_objects": 1,
    "max_objects": 3, "scale": (0.3, 0.6), "hue_cue": 0.95, "hue_bands": 10, "clutter": 0.4,
    "stripe_contrast": 0.7, "void_width": 1, "jpeg_quality": 95, "seed": 0,
}
# sha256(image, mask, instance map bytes)[:16] of render_sample at the base commit
BASE_RENDERS = {
    "default/train/0": "3c989c13d522802c", "default/train/1": "928391308f74726b",
    "default/train/7": "cbefa5267d5f8e3f", "default/val/0": "ab1466a37ada6af3",
    "default/test/3": "d02a4a4470de2be2", "s32b5/train/0": "c7d4348050c48fb0",
    "s32b5/train/1": "6453dfe599217c23", "s32b5/train/7": "6edec20ac6dd57a7",
    "s32b5/val/0": "0c6c465e2a31e120", "s32b5/test/3": "96807a3d5352104e",
}
# sha256(image bytes)[:16] and label of corpus images at the base commit (default
# CorpusParams): images 0, 1, 2 and one of each extra shape (ellipse 20, pentagon 19,
# octagon 33, semicircle 13, tee 3, bar 4)
BASE_CORPUS = {
    0: ("461bcdfb7071f05e", 27), 1: ("3f0cb09c93de7ece", 28), 2: ("14459edd7ac1ea2f", 35),
    20: ("0c389bfd922feeee", 40), 19: ("56e1e0cd30381904", 47), 33: ("65ea38c6c75b848c", 48),
    13: ("9eab55a519318939", 54), 3: ("ec41abf1bbccab08", 56), 4: ("731297044e85bb29", 61),
}
SHAPES_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond",
                "crescent", "arrow", "tee", "heart", "ellipse", "frame", "semicircle", "bar",
                "chevron", "ell", "pentagon", "bowtie")


def _h(*arrays: np.ndarray) -> str:
    m = hashlib.sha256()
    for a in arrays:
        m.update(a.tobytes())
    return m.hexdigest()[:16]


@pytest.mark.parametrize("value", ["shape", "Twins", "", 3, None, ["shapes"]])
def test_an_unknown_design_is_a_one_line_error(value):
    with pytest.raises(ConfigError, match=r"classes=.* must be one of \('twins', 'shapes'\)") \
            as err:
        ShapesParams.from_dict({"classes": value})
    assert "\n" not in str(err.value)


def test_the_default_design_keeps_its_key_and_manifest(tmp_path):
    default = ShapesParams()
    assert default.classes == "twins" and ShapesParams(classes="twins") == default
    # what the key hashes is what it hashed before the choice existed ...
    assert default.key_dict() == BASE_DEFAULT_FIELDS
    assert shapes_key(default) == content_key("shapes", BASE_DEFAULT_FIELDS)
    if incseg.__version__ == BASE_VERSION:  # ... and so is the key itself
        assert shapes_key(default) == BASE_DEFAULT_KEY
        assert shapes_key(ShapesParams(size=32, n_train=60, n_val=20, n_test=20, seed=3)) \
            == BASE_SMALL_KEY
    assert "classes" not in default.to_dict()
    other = ShapesParams(classes="shapes")
    assert shapes_key(other) != shapes_key(default)
    assert other.to_dict()["classes"] == "shapes"
    for p in (default, other):  # what the writer processes and the manifest check read back
        assert ShapesParams.from_dict(p.to_dict()) == p

    tiny = {"size": 32, "n_train": 4, "n_val": 2, "n_test": 2, "seed": 1}
    twins_root = ensure_shapes(ShapesParams.from_dict(tiny), tmp_path, progress=False)
    man = json.loads((twins_root / "manifest.json").read_text())
    assert "classes" not in man["params"] and man["classes"] == list(CLASS_NAMES)
    shapes_root = ensure_shapes(ShapesParams.from_dict({**tiny, "classes": "shapes"}), tmp_path,
                                progress=False)
    man = json.loads((shapes_root / "manifest.json").read_text())
    assert shapes_root != twins_root
    assert man["params"]["classes"] == "shapes"
    assert man["classes"] == ["background", *SHAPES_NAMES]


def test_the_default_design_keeps_the_run_fingerprint_and_step0_key():
    cfg = compose(["logger=none"])
    assert cfg.dataset.generator.classes == "twins"
    old = cfg.copy()
    with open_dict(old):
        del old.dataset.generator["classes"]
    assert stable_hash(fingerprint(cfg)) == stable_hash(fingerprint(old))
    assert teacher_key(cfg, "root", [0, 1]) == teacher_key(old, "root", [0, 1])
    other = compose(["logger=none", "dataset.generator.classes=shapes"])
    assert fingerprint(other)["dataset"]["generator"]["classes"] == "shapes"
    assert teacher_key(other, "root", [0, 1]) != teacher_key(cfg, "root", [0, 1])


def test_twins_images_are_byte_identical_to_before():
    designs = {"default": {}, "s32b5": {"size": 32, "hue_bands": 5, "seed": 3}}
    for name, kw in designs.items():
        for explicit in ({}, {"classes": "twins"}):
            p = ShapesParams(**kw, **explicit)
            for split, i in (("train", 0), ("train", 1), ("train", 7), ("val", 0), ("test", 3)):
                got = _h(*render_sample(p, split, i))
                assert got == BASE_RENDERS[f"{name}/{split}/{i}"], (name, explicit, split, i)


def test_the_corpus_images_are_byte_identical_to_before():
    assert CORPUS_SHAPES == SHAPES + ("ellipse", "pentagon", "octagon", "semicircle", "tee",
                                      "bar")
    p = CorpusParams()
    for i, (digest, label) in BASE_CORPUS.items():
        image, got = render_corpus_image(p, i)
        assert (_h(image), got) == (digest, label), i


def test_class_names_of_both_designs():
    assert class_names(ShapesParams()) == class_names("twins") == class_names() == CLASS_NAMES
    assert CLASS_NAMES[1] == "circle-solid" and CLASS_NAMES[20] == "arrow-striped"
    assert len(CLASS_NAMES) == 21
    names = class_names(ShapesParams(classes="shapes"))
    assert names == class_names("shapes") == ("background", *SHAPES_NAMES)
    assert DESIGN_SHAPES["shapes"][:10] == SHAPES and "octagon" not in names
    for name in SHAPES_NAMES:  # every shape of the design can be drawn
        u, v = np.meshgrid(np.linspace(-1, 1, 41), np.linspace(-1, 1, 41))
        inside = shapes_draw.shape_fn(name)(u, v)
        assert 0.1 < inside.mean() < 0.9, name


def _sheet_labels(params, tmp_path, monkeypatch) -> list[str]:
    drawn = []
    real = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *a, **k):
        drawn.append(text)
        return real(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    out = class_sheet(params, tmp_path / f"{params.classes}.png", per_class=1)
    assert Image.open(out).size[0] > 0
    return drawn


def test_the_class_sheet_names_the_design_classes(tmp_path, monkeypatch):
    twins = _sheet_labels(ShapesParams(size=32), tmp_path, monkeypatch)
    assert twins == [f"{c}: {CLASS_NAMES[c]}" for c in range(1, 21)]
    drawn = _sheet_labels(ShapesParams(size=32, classes="shapes"), tmp_path, monkeypatch)
    assert drawn == [f"{c}: {SHAPES_NAMES[c - 1]}" for c in range(1, 21)]


def test_in_the_shapes_design_an_objects_class_is_its_shape(monkeypatch):
    p = ShapesParams(size=48, classes="shapes", seed=5)
    calls: list[list] = []
    real_object, real_fn = shapes_draw._object, shapes_draw.shape_fn

    def spy_object(p_, rng, cid, centred=False):
        calls.append([cid])
        return real_object(p_, rng, cid, centred)

    def spy_fn(name):
        calls[-1].append(name)
        return real_fn(name)

    monkeypatch.setattr(shapes_draw, "_object", spy_object)
    monkeypatch.setattr(shapes_draw, "shape_fn", spy_fn)
    rng = np.random.default_rng(0)
    for c in range(1, 21):
        classes = [c, (c + 6) % 20 + 1, (c + 12) % 20 + 1]
        calls.clear()
        _, mask, owner = render(p, rng, classes)
        # every object drawn (placements included) is the shape its class names ...
        assert calls and all(name == SHAPES_NAMES[cid - 1] for cid, name in calls)
        assert {cid for cid, _ in calls} == set(classes)
        # ... and every painted object's visible, non-void pixels carry that class
        for k, cid in enumerate(classes, 1):
            labels = set(np.unique(mask[(owner == k) & (mask != 255)]).tolist())
            assert labels <= {cid}, (classes, k, labels)


def test_generated_shapes_design_files_are_its_renders(tmp_path):
    p = ShapesParams(size=32, n_train=3, n_val=1, n_test=1, classes="shapes", seed=2)
    generate(p, tmp_path, progress=False, workers=1)
    base = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    for i in range(3):
        written = np.asarray(Image.open(base / f"train_{i + 1:06d}.png"))
        assert np.array_equal(written, render_sample(p, "train", i)[1])
    twins = ShapesParams(size=32, n_train=3, n_val=1, n_test=1, seed=2)
    assert not all(np.array_equal(render_sample(p, "train", i)[0],
                                  render_sample(twins, "train", i)[0]) for i in range(3))


def test_in_the_shapes_design_texture_is_a_coin_flip_per_object():
    lum = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    rng = np.random.default_rng(0)
    for cid in (2, 17):
        p = ShapesParams(size=32, classes="shapes", clutter=0.0)
        flags, spread = [], {False: [], True: []}
        for _ in range(200):
            inside, tex, striped = shapes_draw._object(p, rng, cid)
            flags.append(striped)
            if inside.sum() >= 10:
                spread[striped].append(float((tex[inside] @ lum).std()))
        assert 0.4 <= np.mean(flags) <= 0.6, (cid, np.mean(flags))
        # the flag is what is painted: stripes spread an object's luminance, solid does not
        assert min(spread[True]) > 0.09 > max(spread[False])
    # in twins the class says the texture
    twins = ShapesParams(size=32)
    assert {shapes_draw._object(twins, rng, 3)[2] for _ in range(20)} == {False}
    assert {shapes_draw._object(twins, rng, 4)[2] for _ in range(20)} == {True}


def test_in_the_shapes_design_the_hue_band_follows_the_shape():
    for bands in (5, 10):
        groups: dict[int, list[int]] = {}
        for c in range(1, 21):
            g = class_hue_group(c, bands, "shapes")
            assert g == (c - 1) % bands
            groups.setdefault(g, []).append(c)
        # every band is shared by 20 / bands shapes: colour never names a class
        assert sorted(len(v) for v in groups.values()) == [20 // bands] * bands
    p = ShapesParams(size=48, hue_cue=1.0, clutter=0.0, hue_bands=10, classes="shapes", seed=11)
    assert hues_sit_in_their_bands(p, lambda c: ((c - 1) % 10) / 10, 0.025 + 0.02) >= 30


def _diagnosis():
    from tests.experiment_scripts import load

    return load("diagnosis")


def test_the_diagnosis_has_no_twins_in_the_shapes_design():
    diag = _diagnosis()
    # ground truth 16 (rows) predicted as: itself 5, 15 (its twin in the twins design) 3,
    # 18 (the same texture there) 2
    step0 = {"step": 0, "classes": [0, 15], "miou_all": 0.5, "iou": {}}
    final = {"step": 1, "classes": [16, 18], "miou_old": 0.4, "miou_new": 0.3,
             "miou_all": 0.35, "iou": {"16": 0.3, "18": 0.2},
             "confusion": {"classes": [0, 15, 16, 18],
                           "counts": [[9, 0, 0, 0], [0, 4, 0, 0], [0, 3, 5, 2], [0, 0, 0, 1]]}}

    def run(classes):
        generator = {} if classes is None else {"classes": classes}
        return {"steps": [step0, final],
                "provenance": {"config": {"dataset": {"generator": generator}}}}

    twins, shapes_run = run(None), run("shapes")
    assert diag.design(twins) == "twins" and diag.design(shapes_run) == "shapes"
    got = diag.summarise(twins)["new_go"]
    assert got["twin"] == pytest.approx(3 / 11) and got["texture"] == pytest.approx(2 / 11)
    assert got["hue"] == got["other"] == 0
    # 16 (diamond, striped) has band (7 + 2) mod 10 = 9, 18 (crescent, striped) band 0: the
    # same-texture pixels all went to a hue neighbour
    assert diag.summarise(twins)["texture_hue"] == 1.0
    assert diag.summarise(shapes_run)["texture_hue"] is None
    got = diag.summarise(shapes_run)["new_go"]
    # no twins or textures there: 15 shares 16's hue neighbourhood (bands 4 and 5 of 10), 18
    # (band 7) does not
    assert got["twin"] == got["texture"] == 0
    assert got["hue"] == pytest.approx(3 / 11) and got["other"] == pytest.approx(2 / 11)
    text = diag.report({"c": {"mib": shapes_run}})
    assert "shapes classes" in text and "| - |" in text
    assert "shapes classes" not in diag.report({"c": {"mib": twins}})


def test_the_diagnosis_names_where_each_runs_backbone_started():
    diag = _diagnosis()

    def run(pretrained, **dataset):
        return {"provenance": {"config": {
            "model": {"pretrained": pretrained},
            "dataset": {"generator": {"classes": "shapes"}, **dataset},
            "train": {"epochs": 7, "epochs_incremental": 4}}}}

    tail = ", step 0 7 ep, steps 4 ep, shapes classes"
    assert diag.condition(run(None)) == "random init" + tail
    corpus = {"corpus": {"params": {"size": 32, "n_images": 20000}, "train": {"epochs": 4}}}
    assert diag.condition(run("corpus", **corpus)) == "corpus (32 px, 20000 images, 4 ep)" + tail
    seg = {"segmentation": {"generator_seed": 1, "epochs": 21}}
    assert diag.condition(run("segmentation", **seg)) == (
        "segmentation pretraining (generator seed 1, 21 ep)" + tail)
    # a model file (another run's model) is named by its file, not its folder
    assert diag.condition(run("/x/y/joint_e.pt")) == "backbone of joint_e.pt" + tail
    # seed 0 is every condition's; another seed is named
    assert diag.condition({**run(None), "seed": 1}) == "random init" + tail + ", seed 1"
