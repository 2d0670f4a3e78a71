"""A new method or model is one Python file plus one YAML, outside the package, with no edit
elsewhere: both run the smoke protocol end to end (docs/extending.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCALED_FT = '''
from incseg.methods.base import Method


class ScaledFT(Method):
    """Fine-tuning with the CE of every head scaled by ``scale``."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale={scale} must be > 0")
        self.scale = float(scale)

    def classification_loss(self, logits, labels):
        return self.scale * super().classification_loss(logits, labels)
'''

TINY_MODEL = '''
import torch.nn.functional as F
from torch import nn

from incseg.models import IncrementalHead, SegOutput


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class TinySeg(nn.Module):
    """Two conv stages and an incremental 1x1 head: the smallest model of the contract."""

    def __init__(self, classes_per_step, width=8):
        super().__init__()
        self.stage1, self.stage2 = block(3, width), block(width, 2 * width)
        self.head = IncrementalHead(2 * width, classes_per_step)

    @property
    def classes_per_step(self):
        return self.head.classes_per_step

    @property
    def num_classes(self):
        return self.head.num_classes

    def add_step(self, n_new, init_balanced=True):
        self.head.add_step(n_new)
        if init_balanced:
            self.head.init_balanced(n_new)

    def forward(self, x):
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        logits = F.interpolate(self.head(s2), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return SegOutput(logits, [], {"encoder": s2, "stages": [s1, s2], "decoder": s2})
'''


def _write_plugin(tmp: Path) -> Path:
    """The user's own folder: two Python files and two YAMLs, nothing in the package."""
    (tmp / "code").mkdir()
    (tmp / "code" / "scaled_ft.py").write_text(SCALED_FT)
    (tmp / "code" / "tiny_model.py").write_text(TINY_MODEL)
    (tmp / "conf" / "method").mkdir(parents=True)
    (tmp / "conf" / "model").mkdir(parents=True)
    (tmp / "conf" / "method" / "scaled_ft.yaml").write_text(
        "_target_: scaled_ft.ScaledFT\nname: scaled_ft\nlabel: FT x s\nscale: 1.0\n")
    (tmp / "conf" / "model" / "tiny.yaml").write_text(
        "_target_: tiny_model.TinySeg\nname: tiny\nwidth: 8\n")
    return tmp


def _run(tmp: Path, runs: str, *overrides: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tmp / "code"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    argv = [sys.executable, "-m", "incseg.run", "experiment=smoke", "task=15-5",
            f"hydra.searchpath=[file://{tmp / 'conf'}]", f"paths.runs_dir={tmp / runs}",
            f"paths.cache_dir={tmp / 'cache'}", *overrides]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = (tmp / runs).rglob("results.json")
    return json.loads(found.read_text())


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return _write_plugin(tmp_path_factory.mktemp("plugin"))


@pytest.mark.slow  # a whole run; the model plug-in test covers the same contract
def test_a_new_method_is_one_file_and_one_yaml(plugin):
    files = sorted(str(p.relative_to(plugin)) for p in plugin.rglob("*") if p.is_file()
                   and "method" in str(p.relative_to(plugin)) or p.name == "scaled_ft.py")
    assert files == ["code/scaled_ft.py", "conf/method/scaled_ft.yaml"]
    toy = _run(plugin, "runs_toy", "method=scaled_ft")
    ft = _run(plugin, "runs_ft", "method=ft")
    assert toy["method"] == "scaled_ft"
    assert toy["provenance"]["config"]["method"]["label"] == "FT x s"
    assert [s["step"] for s in toy["steps"]] == [0, 1]
    # scale 1 is fine-tuning: the same numbers as the suite's own FT, to the last digit
    assert toy["final"] == ft["final"]
    halved = _run(plugin, "runs_half", "method=scaled_ft", "method.scale=50")
    score = ("iou", "miou_old", "miou_all")
    # step 0 is the method-free teacher (a step-0 cache hit); the scaled CE trained step 1
    assert [halved["steps"][0][k] for k in score] == [toy["steps"][0][k] for k in score]
    assert halved["final"] != toy["final"]


def test_a_new_model_is_one_file_and_one_yaml(plugin):
    out = _run(plugin, "runs_tiny", "model=tiny", "method=ilt", "method.feat_layer=encoder")
    assert out["model"] == "tiny"
    assert [s["step"] for s in out["steps"]] == [0, 1]
    assert out["final"]["all"] is not None
    (ckpt,) = (plugin / "runs_tiny").rglob("step1.pt")
    import torch

    stored = torch.load(ckpt, weights_only=True)
    assert stored["model_config"]["_target_"] == "tiny_model.TinySeg"
    assert stored["classes_per_step"] == [16, 5]


def test_a_bad_value_of_a_new_method_is_one_line(plugin):
    env = {**os.environ, "PYTHONPATH": str(plugin / "code"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "incseg.run", "experiment=smoke", "method=scaled_ft",
         "method.scale=-1", f"hydra.searchpath=[file://{plugin / 'conf'}]",
         f"paths.runs_dir={plugin / 'runs_bad'}", f"paths.cache_dir={plugin / 'cache'}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: method=scaled_ft: scale=-1 must be > 0; check method.* overrides "
                     "against conf/method"]


def test_a_method_needing_a_feature_the_model_lacks_is_one_line():
    """A method names the contract features it reads; a model without one is refused with one
    line at the first batch, not a KeyError deep in the method."""
    import torch
    from torch import nn

    from incseg.errors import ConfigError
    from incseg.methods.ilt import ILT
    from incseg.models import IncrementalHead, SegOutput
    from incseg.systems.base import Recipe
    from incseg.systems.student import StudentModule
    from incseg.tasks import get_task

    class NoDecoder(nn.Module):
        def __init__(self, per_step):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.head = IncrementalHead(4, per_step)

        num_classes = property(lambda self: self.head.num_classes)
        classes_per_step = property(lambda self: self.head.classes_per_step)

        def add_step(self, n_new, init_balanced=True):
            self.head.add_step(n_new)

        def forward(self, x):
            f = self.conv(x)
            return SegOutput(self.head(f), [], {"encoder": f, "stages": [f]})

    task = get_task("shapes", "15-5")
    old, new = NoDecoder([16]), NoDecoder([16])
    new.add_step(5)
    module = StudentModule(new, old, task, 1, Recipe(), ILT(feat_layer="decoder"))
    with pytest.raises(ConfigError, match="reads the model features decoder, which NoDecoder"):
        module.training_loss(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("form", ["hydra.searchpath", "--config-dir", "--config-dir=", "-cd"])
def test_a_users_config_folder_adds_choices_however_hydra_is_told_of_it(tmp_path, form):
    """The one-line check of ``method=NAME`` looks in every folder Hydra searches: the
    ``hydra.searchpath`` override and Hydra's ``--config-dir`` / ``-cd`` flag alike; a name in
    neither is still refused."""
    from incseg.config import check_overrides
    from incseg.errors import ConfigError

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("name: mine\n")
    flag = {"hydra.searchpath": [f"hydra.searchpath=[file://{tmp_path}]"],
            "--config-dir": ["--config-dir", str(tmp_path)],
            "--config-dir=": [f"--config-dir={tmp_path}"],
            "-cd": ["-cd", str(tmp_path)]}[form]
    check_overrides([*flag, "method=mine"])
    with pytest.raises(ConfigError, match="unknown method 'mine'"):
        check_overrides(["method=mine"])
    with pytest.raises(ConfigError, match="unknown method 'theirs'"):
        check_overrides([*flag, "method=theirs"])
