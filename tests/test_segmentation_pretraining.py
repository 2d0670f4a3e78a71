"""``model.pretrained=segmentation``: a backbone pretrained once as a Joint segmenter of every
class on another stream of the ``shapes`` generator, cached, and the run's step 0 from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict

from incseg.config import CONF_DIR, compose, source_from_cfg, task_from_cfg
from incseg.errors import ConfigError
from incseg.io import stable_hash
from incseg.protocol.pretrain import corpus_manifest
from incseg.protocol.state import fingerprint
from incseg.protocol.teachers import (
    model_weights,
    resolved_model,
    segmentation_config,
    segmentation_spec,
    teacher_key,
)

TINY = ["experiment=smoke", "logger=none", "dataset.pretrained=segmentation",
        "dataset.segmentation.epochs=1", "dataset.segmentation.crop=32"]


def test_spec_fills_defaults_and_refuses_bad_keys_in_one_line():
    spec = segmentation_spec({"epochs": "3"})
    assert spec == {"generator_seed": 1, "epochs": 3, "crop": 64, "lr": 0.05, "seed": 0}
    with pytest.raises(ConfigError, match="unknown dataset.segmentation key.*epoch;") as err:
        segmentation_spec({"epoch": 3})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="epochs >= 1"):
        segmentation_spec({"epochs": 0})
    with pytest.raises(ConfigError, match="integers"):
        segmentation_spec({"crop": "big"})


def test_the_pretraining_is_the_joint_run_on_the_other_generator_seed():
    """The derived config trains what `method=joint dataset.generator.seed=S train.epochs=E
    data.crop=C` trains, under the same step-0 cache key (a Joint model trained by hand is a
    cache hit), whatever the task, overlap and method of the run that asks for it."""
    spec = segmentation_spec({"generator_seed": 5, "epochs": 2, "crop": 32})
    by_hand = compose(["experiment=smoke", "logger=none", "method=joint", "task=15-5s",
                       "dataset.generator.seed=5", "train.epochs=2", "data.crop=32",
                       "train.lr=0.05"])
    runs = [["task=10-1", "method=mib", "overlap=false", "train.epochs=9"]]
    runs += [["task=15-5s", f"method={m.stem}"] for m in (CONF_DIR / "method").glob("*.yaml")
             if m.stem != "joint"]
    keys = set()
    for args in runs:
        cfg = compose(TINY + args)
        p = segmentation_config(cfg, spec)
        assert p.dataset.generator.seed == 5 and p.model.pretrained is None
        assert p.method.name == "joint" and cfg.method.name != "joint"  # the run's is kept
        keys.add(teacher_key(p, "root", task_from_cfg(p).joint().steps[0]))
    assert keys == {teacher_key(by_hand, "root", task_from_cfg(by_hand).joint().steps[0])}
    # under DDP the pretraining still runs in the one process that starts the ranks
    ddp = segmentation_config(compose(TINY + ["trainer=ddp"]), spec)
    assert ddp.trainer.strategy == "auto" and ddp.trainer.devices == 1
    assert "num_nodes" not in ddp.trainer


def test_refusals_name_what_to_pass(tmp_path):
    cfg = compose(TINY + [f"paths.cache_dir={tmp_path}", "dataset.segmentation.generator_seed=0"])
    with pytest.raises(ConfigError, match="benchmark's own dataset.generator.seed"):
        model_weights(cfg, tmp_path)
    cfg = compose(TINY + [f"paths.cache_dir={tmp_path}", "model=deeplabv3_convnext_t",
                          "model.pretrained=segmentation"])
    with pytest.raises(ConfigError, match="pretrains a ResNet backbone"):
        model_weights(cfg, tmp_path)
    cfg = compose(TINY + [f"paths.cache_dir={tmp_path}", "data.root=/nowhere"])
    with pytest.raises(ConfigError, match="needs the generated shapes dataset"):
        model_weights(cfg, tmp_path)
    assert not (tmp_path / "pretrain").exists()


def test_backbone_is_trained_once_cached_and_is_the_joint_models(tmp_path):
    from incseg.checkpoints import safe_load
    from incseg.models.backbones import ResNetBackbone

    cfg = compose(TINY + [f"paths.cache_dir={tmp_path}"])
    path = model_weights(cfg, tmp_path)
    assert cfg.model.pretrained == "segmentation"  # the config keeps the word, not a path
    assert "pretrain" in path and path.endswith(".pt")
    manifest = corpus_manifest(path)
    assert manifest["kind"] == "segmentation_backbone" and manifest["joint_cache"] == "miss"
    assert 0 <= manifest["val_miou_all"] <= 1 and manifest["segmentation"]["epochs"] == 1
    assert not list((tmp_path / "pretrain").glob("work-*"))  # its epoch checkpoint is gone
    # the backbone is the cached Joint model's, trained on generator seed 1's images
    p = segmentation_config(cfg, segmentation_spec(dict(cfg.dataset.segmentation)))
    key = teacher_key(p, source_from_cfg(p, progress=False).cache_identity(),
                      task_from_cfg(p).joint().steps[0])
    assert manifest["joint_entry"] == f"{key}.pt"
    joint = safe_load(tmp_path / "step0" / f"{key}.pt", "cache entry")
    state = torch.load(path, weights_only=True)
    weights = next(v for k, v in joint["state_dict"].items()
                   if k.endswith("backbone.conv1.weight"))
    assert torch.equal(state["conv1.weight"], weights)
    net = ResNetBackbone("resnet18", path)
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    mtime = os.stat(path).st_mtime_ns
    again = resolved_model(compose(TINY + [f"paths.cache_dir={tmp_path}"]), tmp_path,
                           progress=False)
    assert again.pretrained == path and os.stat(path).st_mtime_ns == mtime  # a cache hit


def test_runs_that_do_not_use_it_keep_their_fingerprint():
    for pretrained in ("null", "corpus"):
        cfg = compose(["logger=none", f"dataset.pretrained={pretrained}"])
        old = cfg.copy()
        with open_dict(old):
            del old.dataset["segmentation"]
        assert stable_hash(fingerprint(cfg)) == stable_hash(fingerprint(old))
    on = compose(["logger=none", "dataset.pretrained=segmentation"])
    assert "corpus" not in fingerprint(on)["dataset"]
    longer = compose(["logger=none", "dataset.pretrained=segmentation",
                      "dataset.segmentation.epochs=30"])
    assert teacher_key(on, "root", [0, 1]) != teacher_key(longer, "root", [0, 1])


def test_the_cli_pretrains_before_the_run_and_records_it(tmp_path):
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "incseg.run", *TINY, f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.runs_dir={runs}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Joint segmentation of every class on generator seed 1" in out.stderr + out.stdout
    assert len(list((tmp_path / "cache" / "pretrain").glob("resnet18-segmentation-*.pt"))) == 1
    results = json.loads(next(runs.rglob("results.json")).read_text())
    assert results["conventions"]["pretrained"] == "segmentation"
    assert results["provenance"]["config"]["dataset"]["segmentation"]["epochs"] == 1
