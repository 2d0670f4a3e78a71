"""The procedural pretraining corpus and ``model.pretrained=corpus``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from incseg.config import compose
from incseg.data.corpus import (
    CORPUS_SHAPES,
    CORPUS_TEXTURES,
    CorpusParams,
    _render_range,
    label_name,
    render_corpus_image,
)
from incseg.errors import ConfigError
from incseg.io import stable_hash
from incseg.protocol.pretrain import (
    corpus_entry,
    corpus_manifest,
    corpus_spec,
    holdout_scores,
    render_corpus,
)
from incseg.protocol.state import fingerprint
from incseg.protocol.teachers import model_weights, resolved_model, teacher_key

TINY = {"params": {"size": 32, "n_images": 16, "seed": 3},
        "train": {"epochs": 1, "batch_size": 8, "holdout": 8, "warmup_iters": 1}}


def test_holdout_scores_against_hand_values():
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3, 0.4, 0.6],
                           [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([1, 1, 0])
    got = holdout_scores(scores, target)
    # image 0: right at top 1; image 1: class 1 ranks 6th (0.1 lowest): outside the top 5;
    # image 2: class 0 ties the four zeros below 1.0: in the top 5 (topk keeps the first index)
    assert got["top1"] == pytest.approx(round(1 / 3, 4))
    assert got["top5"] == pytest.approx(round(2 / 3, 4)) and got["images"] == 3


def test_corpus_images_are_deterministic_and_labelled():
    p = CorpusParams(size=48, n_images=10)
    a, la = render_corpus_image(p, 4)
    b, lb = render_corpus_image(p, 4)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb
    assert p.num_labels == len(CORPUS_SHAPES) * len(CORPUS_TEXTURES) == 64
    assert 0 <= la < 64
    assert not np.array_equal(a, render_corpus_image(p, 5)[0])
    assert label_name(0) == "circle-solid" and label_name(63) == "bar-checkered"
    assert render_corpus_image(CorpusParams(size=48, seed=1), 4)[0].tobytes() != a.tobytes()
    # every class occurs: 64 labels over 2000 draws
    labels = {render_corpus_image(CorpusParams(size=16), i)[1] for i in range(1000)}
    assert labels == set(range(64))


def test_corpus_rendering_does_not_depend_on_processes():
    p = CorpusParams(size=16, n_images=300)
    images, labels = render_corpus(p, 0, 300, progress=False)  # two chunks: forked workers
    one_images, one_labels = _render_range((p.to_dict(), 0, 300))
    assert np.array_equal(images, one_images) and np.array_equal(labels, one_labels)


def test_corpus_spec_refuses_unknown_keys_in_one_line():
    with pytest.raises(ConfigError, match="unknown dataset.corpus key.*epoch") as err:
        corpus_spec({"train": {"epoch": 3}})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown corpus parameter"):
        corpus_spec({"params": {"n_image": 3}})
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        corpus_spec({"train": {"batch_size": 1}})


def _shapes_cfg(tmp_path, *overrides):
    cfg = compose(["logger=none", f"paths.cache_dir={tmp_path}", "dataset.pretrained=corpus",
                   *overrides])
    with open_dict(cfg):
        cfg.dataset.corpus = OmegaConf.create(TINY)
    return cfg


def test_corpus_backbone_is_trained_once_cached_and_loads(tmp_path):
    from incseg.models.backbones import ResNetBackbone

    cfg = _shapes_cfg(tmp_path)
    assert cfg.model.pretrained == "corpus"
    path = model_weights(cfg, tmp_path)
    assert path.endswith(".pt") and "pretrain" in path
    assert cfg.model.pretrained == "corpus"  # the config keeps the word, not a path
    params, recipe = corpus_spec(TINY)
    assert str(corpus_entry(tmp_path, "resnet18", params, recipe)) == path
    manifest = corpus_manifest(path)
    assert manifest["iterations"] == 2 and 0 <= manifest["holdout"]["top1"] <= 1
    mtime = os.stat(path).st_mtime_ns
    again = resolved_model(_shapes_cfg(tmp_path), tmp_path, progress=False)
    assert again.pretrained == path and os.stat(path).st_mtime_ns == mtime  # a cache hit
    net = ResNetBackbone("resnet18", path)
    state = torch.load(path, weights_only=True)
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    other = dict(TINY, params={**TINY["params"], "seed": 4})
    assert corpus_entry(tmp_path, "resnet18", *corpus_spec(other)) != corpus_entry(
        tmp_path, "resnet18", params, recipe)


def test_model_pretrained_override_wins_over_the_dataset(tmp_path):
    cfg = _shapes_cfg(tmp_path, "model.pretrained=null")
    assert model_weights(cfg, tmp_path) is None
    assert not (tmp_path / "pretrain").exists()


def test_corpus_needs_a_resnet_backbone(tmp_path):
    cfg = _shapes_cfg(tmp_path, "model=deeplabv3_convnext_t", "model.pretrained=corpus")
    with pytest.raises(ConfigError, match="pretrains a ResNet backbone"):
        model_weights(cfg, tmp_path)


def test_scratch_runs_keep_their_fingerprint_and_step0_key():
    cfg = compose(["logger=none", "dataset.pretrained=null"])
    old = cfg.copy()
    with open_dict(old):
        del old.dataset["pretrained"]
        del old.dataset["corpus"]
    assert stable_hash(fingerprint(cfg)) == stable_hash(fingerprint(old))
    assert teacher_key(cfg, "root", [0, 1]) == teacher_key(old, "root", [0, 1])
    on = compose(["logger=none", "dataset.pretrained=corpus"])
    assert teacher_key(on, "root", [0, 1]) != teacher_key(cfg, "root", [0, 1])


def test_results_say_where_the_backbone_started_and_the_report_splits_tables():
    from incseg.report.discovery import pretrained_label
    from incseg.results import conventions

    assert conventions(compose(["logger=none", "dataset.pretrained=corpus"]))["pretrained"] \
        == "corpus"
    assert "pretrained" not in conventions(compose(["logger=none"]))
    assert pretrained_label("corpus") == "corpus" and pretrained_label(None) is None
    assert pretrained_label("segmentation") == "segmentation"
    assert pretrained_label("/x/y/r18.pth") == "r18.pth" and pretrained_label("null") is None


def test_building_a_model_by_hand_with_corpus_names_the_file():
    from incseg.models import build_model

    with pytest.raises(ConfigError, match=r"pass that file \(<cache>/pretrain/") as err:
        build_model("bisenet_r18", [16], "corpus")
    assert "\n" not in str(err.value)


def test_the_config_check_passes_corpus_and_the_cli_pretrains_before_the_run(tmp_path):
    """The models' config check accepts ``corpus``; the entry point makes the file before
    the run folder (a tiny corpus on the smoke protocol, as a user's machine runs it)."""
    import subprocess
    import sys

    from incseg.protocol.preflight import check_run

    check_run(compose(["logger=none", "dataset.pretrained=corpus"]))
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "incseg.run", "experiment=smoke", "dataset.pretrained=corpus",
         "dataset.corpus.params.n_images=16", "dataset.corpus.params.size=32",
         "dataset.corpus.train.epochs=1", "dataset.corpus.train.batch_size=8",
         "dataset.corpus.train.holdout=8", f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.runs_dir={runs}", "logger=none"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "pretrain").glob("resnet18-*.pt"))) == 1
    results = json.loads(next(runs.rglob("results.json")).read_text())
    assert results["conventions"]["pretrained"] == "corpus"
    assert results["provenance"]["config"]["model"]["pretrained"] == "corpus"
