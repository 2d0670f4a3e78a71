"""Replay-set diversity (issue 16): per-class mean pairwise distance of a model's pooled,
unit-length features, by hand; and experiments/replay_diversity.py on a generated set."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from incseg.checkpoints import save_model
from incseg.config import compose
from incseg.models import build_model
from incseg.models.base import SegOutput
from incseg.replay import ensure_replay_set
from incseg.replay.verdicts import class_diversity, pooled_features
from tests.test_inversion import Toy, small

ROOT = Path(__file__).resolve().parent.parent


def test_class_diversity_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    div = class_diversity(f, [1, 1, 1, 2, 2])
    # class 1: |a-b| = sqrt2, |a-c| = 2, |b-c| = sqrt2 -> mean (2 + 2 sqrt2) / 3
    assert div[1] == pytest.approx((2 + 2 * math.sqrt(2)) / 3)
    assert div[2] == 0.0  # identical images
    assert class_diversity(f[:1], [3]) == {3: 0.0}  # one image: no pair


class Feat(torch.nn.Module):
    """Pooled decoder feature = the image's per-channel mean times (1, 2, 0)."""

    def forward(self, x):
        dec = x * torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
        return SegOutput(x[:, :1], features={"decoder": dec})


def test_pooled_features_are_unit_length_spatial_means():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 3.0
    x[1, 0], x[1, 1] = 1.0, 1.0
    f = pooled_features(Feat(), x)
    assert torch.allclose(f[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(f[1], torch.tensor([1.0, 2.0, 0.0]) / math.sqrt(5))


def test_script_reports_accuracy_and_diversity(tmp_path):
    rs = ensure_replay_set(tmp_path / "cache", Toy(), [1, 2, 3],
                           small(n_per_class=3, batch_size=3), class_ids=[0, 4, 5, 6],
                           progress=False)
    torch.manual_seed(0)
    verifier = build_model("bisenet_r18", [7], None)
    cfg = compose(["model=bisenet_r18"])
    save_model(tmp_path / "joint.pt", verifier, cfg.model, [list(range(7))], 0)
    spec = importlib.util.spec_from_file_location("rd", ROOT / "experiments" /
                                                  "replay_diversity.py")
    rd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rd)
    out = tmp_path / "div.json"
    assert rd.main([str(rs.path), "--verifier", str(tmp_path / "joint.pt"), "--names", "toy",
                    "--out", str(out)]) == 0
    r = json.loads(out.read_text())["sets"]["toy"]
    assert r["images"] == 9 and r["classes"] == 3
    assert 0.0 <= r["verifier_accuracy"] <= 1.0
    assert 0.0 < r["diversity"] <= 2.0
    assert set(r["diversity_per_class"]) == {"4", "5", "6"}
    with pytest.raises(SystemExit, match="holds no manifest.json"):
        rd.main([str(tmp_path), "--verifier", str(tmp_path / "joint.pt")])
