"""The labelled exemplar memory ("-M"): class-balanced selection, labels, mixing into the
batches, the stored choice read back on resume, a tiny protocol run, and runs without memory
unchanged (their config hash and step-0 cache key)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

import incseg.run
from incseg.config import compose, run_path, source_from_cfg, task_from_cfg
from incseg.data.dataset import SeededSampler
from incseg.data.memory import (
    HalfBatchSampler,
    JoinedDataset,
    balanced_selection,
    memory_lut,
    mixed_sampler,
)
from incseg.io import stable_hash
from incseg.protocol import memory as pmem
from incseg.protocol.state import fingerprint
from incseg.protocol.teachers import teacher_key
from incseg.report.discovery import variant_of
from incseg.results import load_results
from incseg.tasks import get_task, remap
from tests.test_errors import dirs, last_line, run_main


# ---- selection ---------------------------------------------------------------------------------
def test_round_robin_is_class_balanced_hand_computed():
    held = {10: {1}, 11: {1, 2}, 12: {2}, 13: {3}, 14: {1}, 15: {2, 3}}
    order = [10, 11, 12, 13, 14, 15]
    # round 1: class 2 takes 11 (the first holding 2), 1 takes 10, 3 takes 13;
    # round 2: 2 takes 12, 1 takes 14 -> full at 5
    chosen, per_class = balanced_selection(order, held, [2, 1, 3], 5)
    assert chosen == [11, 10, 13, 12, 14]
    assert per_class == {1: 2, 2: 2, 3: 1}
    assert list(per_class) == [1, 2, 3]  # by class id
    # one more: 3 takes 15 (2 finds none left); then the pool is empty and the loop stops
    chosen, per_class = balanced_selection(order, held, [2, 1, 3], 9)
    assert chosen == [11, 10, 13, 12, 14, 15] and per_class == {1: 2, 2: 2, 3: 2}
    # a class no candidate holds is skipped, the others go on
    chosen, per_class = balanced_selection(order, held, [4, 3, 2], 3)
    assert chosen == [13, 11, 15] and per_class == {2: 1, 3: 2, 4: 0}


TASK = get_task("shapes", "custom", [[0, 1, 2], [3], [4]])
#            0       1       2          3       4          5       6
LABELS = [[0, 1], [0, 2], [0, 1, 2], [0, 3], [0, 1, 3], [0, 4], [0, 2, 255]]


def test_reselection_draws_from_the_previous_step_and_the_previous_memory():
    # step 2's candidates: step 1's training images (3, 4: they hold class 3) and the memory of
    # step 1 (here image 0); never the step-0 images that memory did not keep (1, 2, 6)
    chosen, per_class = pmem.select_memory(LABELS, TASK, 2, True, [0], 3, seed=0)
    assert sorted(chosen) == [0, 3, 4]
    assert sum(per_class.values()) == 3 and set(per_class) == {1, 2, 3}
    for seed in range(4):  # any two of them, balanced, and the same for a seed
        a = pmem.select_memory(LABELS, TASK, 2, True, [0], 2, seed=seed)
        assert a == pmem.select_memory(LABELS, TASK, 2, True, [0], 2, seed=seed)
        assert set(a[0]) <= {0, 3, 4} and max(a[1].values()) == 1
    # step 1: from step 0's training images (those holding 1 or 2, image 4 included: overlap)
    chosen, _ = pmem.select_memory(LABELS, TASK, 1, True, [], 5, seed=0)
    assert sorted(chosen) == [0, 1, 2, 4, 6]
    with pytest.raises(Exception, match="memory.size=6 is larger than the 5 candidate"):
        pmem.select_memory(LABELS, TASK, 1, True, [], 6, seed=0)


# ---- labels --------------------------------------------------------------------------------------
def test_memory_labels_seen_and_current_on_a_hand_made_mask():
    task = get_task("shapes", "custom", [[0, 1, 2], [3, 4], [5]])
    mask = np.array([[0, 1, 2], [3, 4, 5], [255, 7, 3]], dtype=np.uint8)
    # seen at step 1: 1, 2 (old) and 3, 4 (current) keep their channels; 5, 7 (future) -> 0
    assert remap(mask, memory_lut(task, 1, "seen")).tolist() == \
        [[0, 1, 2], [3, 4, 0], [0, 0, 3]]
    assert remap(mask, memory_lut(task, 1, "seen", void_as_background=False)).tolist() == \
        [[0, 1, 2], [3, 4, 0], [255, 0, 3]]
    # current (DKD): the step's own labels, old classes background too
    assert remap(mask, memory_lut(task, 1, "current")).tolist() == \
        [[0, 0, 0], [3, 4, 0], [0, 0, 3]]
    # channel order is the task's, not the dataset ids'
    shuffled = get_task("shapes", "custom", [[0, 7, 2], [5]])
    assert remap(mask, memory_lut(shuffled, 1, "seen")).tolist() == \
        [[0, 0, 2], [0, 0, 3], [0, 1, 0]]


# ---- mixing --------------------------------------------------------------------------------------
class Tagged(Dataset):
    """Item (i, seed) -> (tag + i, seed): which dataset and image, and the augmentation seed."""

    def __init__(self, n: int, tag: int):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        i, seed = item
        return torch.tensor(self.tag + i), torch.tensor(seed)


def test_half_batches_hold_half_memory_and_as_many_batches_as_without():
    joined, how = mixed_sampler(Tagged(10, 0), Tagged(3, 100), "half", 4, seed=7, step=1,
                                epoch=0)
    loader = DataLoader(joined, **how)
    batches = [b[0].tolist() for b in loader]
    assert len(batches) == 2 == 10 // 4  # the step's batches without memory
    for b in batches:
        assert all(x < 10 for x in b[:2]) and all(100 <= x < 103 for x in b[2:])
    real = [x for b in batches for x in b[:2]]
    assert len(set(real)) == 4  # distinct real images
    memory = [x for b in batches for x in b[2:]]
    assert sorted(memory[:3]) == [100, 101, 102]  # one shuffled round of the memory, then more
    # exact resume: the batches of an epoch depend on (seed, step, epoch) only
    assert [b[0].tolist() for b in DataLoader(joined, **how)] == batches
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 3)  # what Lightning calls each epoch: the memory follows it
    assert how["batch_sampler"].sampler.epoch == 3
    later = [b[0].tolist() for b in loader]
    _, resumed = mixed_sampler(Tagged(10, 0), Tagged(3, 100), "half", 4, seed=7, step=1,
                               epoch=3)
    assert [b[0].tolist() for b in DataLoader(joined, **resumed)] == later != batches


def test_half_batches_split_the_memory_across_ranks():
    parts = []
    for rank in (0, 1):
        real = SeededSampler(8, 0, 1, True, num_replicas=2, rank=rank)
        parts.append([x for b in HalfBatchSampler(real, 4, 2, 5, 1) for x, _ in b[1:]])
    assert sorted(parts[0] + parts[1]) == [8, 9, 10, 11]  # one round, shared out


def test_concat_appends_the_memory_to_the_step():
    joined, how = mixed_sampler(Tagged(6, 0), Tagged(2, 100), "concat", 4, seed=7, step=1,
                                epoch=0)
    assert len(joined) == 8 and len(how["sampler"]) == 8
    seen = sorted(x for b in DataLoader(joined, **how) for x in b[0].tolist())
    assert seen == [0, 1, 2, 3, 4, 5, 100, 101]
    assert isinstance(JoinedDataset(Tagged(1, 0), Tagged(1, 5))[(1, 3)][0].item(), int)


# ---- the protocol --------------------------------------------------------------------------------
def smoke(tmp_path, *overrides):
    return compose(["experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}",
                    "logger=none", *overrides])


def test_memory_is_stored_in_the_run_and_read_back(tmp_path, monkeypatch):
    cfg = smoke(tmp_path, "memory.size=6", "task=15-5s")
    source, task, run = source_from_cfg(cfg, progress=False), task_from_cfg(cfg), tmp_path / "r"
    cache = tmp_path / "cache"
    # step 2 first: step 1's memory (its pool) is selected and stored on the way
    two = pmem.build_memory(cfg, run, cache, source, task, 2)
    stored = {t: json.loads((run / "memory" / f"step{t}.json").read_text()) for t in (1, 2)}
    assert [s.id for s in two.samples] == stored[2]["ids"] and len(stored[1]["ids"]) == 6
    assert two.info["images"] == 6 and sum(two.info["per_class"].values()) == 6
    assert pmem.build_memory(cfg, run, cache, source, task, 0) is None
    # a resumed run reads the choice back and never selects again
    monkeypatch.setattr(pmem, "select_memory", lambda *a, **k: pytest.fail("re-selected"))
    again = pmem.build_memory(cfg, run, cache, source, task, 2)
    assert [s.id for s in again.samples] == stored[2]["ids"]
    assert again.info["per_class"] == two.info["per_class"]
    # ... what is on disk, even if another choice would be made now
    ids = [s.id for s in source.samples("train")]
    keep = [i for i in range(len(ids)) if i not in stored[2]["indices"]][:6]
    (run / "memory" / "step2.json").write_text(json.dumps(
        {**stored[2], "indices": keep, "ids": [ids[i] for i in keep]}))
    assert [s.id for s in pmem.build_memory(cfg, run, cache, source, task, 2).samples] == \
        [ids[i] for i in keep]
    monkeypatch.undo()
    (run / "memory" / "step2.json").write_text("{truncated")  # unreadable: selected again
    assert [s.id for s in pmem.build_memory(cfg, run, cache, source, task, 2).samples] == \
        stored[2]["ids"]


def test_mib_with_memory_end_to_end(tmp_path):
    from incseg.protocol import run_protocol

    run = tmp_path / "run"
    res = run_protocol(smoke(tmp_path, "method=mib", "memory.size=8"), run)
    assert res["method"] == "mib" and res["method_label"] == "MiB-M"
    assert res["memory"] == {"size": 8, "labels": "seen", "mix": "half"}
    assert res["steps"][1]["memory"]["images"] == 8 and "memory" not in res["steps"][0]
    assert (run / "memory" / "step1.json").exists()
    assert load_results(run)["method_label"] == "MiB-M"
    assert (run / "results.md").read_text().startswith("# shapes 15-5 mib-M seed0")
    variant = variant_of(res)
    assert variant.label == "MiB-M" and variant.slug == "mib-M"
    assert variant != variant_of({**res, "memory": None})  # its own row
    # step 0 is the shared one: the memory never enters its cache key
    assert res["steps"][0]["step0_cache"] == "miss"
    plain = run_protocol(smoke(tmp_path, "method=mib"), tmp_path / "plain")
    assert plain["steps"][0]["step0_cache"] == "hit" and "method_label" not in plain
    assert plain["steps"][0]["miou_all"] == res["steps"][0]["miou_all"]


def test_run_directory_of_a_memory_run_differs():
    plain = run_path("shapes", "15-5", None, "mib", "none", 0, "none", [])
    with_memory = run_path("shapes", "15-5", None, "mib", "none", 0, "none", ["memory.size=100"])
    assert plain == "shapes/15-5/mib/seed0" and with_memory.startswith("shapes/15-5/mib-")
    assert with_memory != run_path("shapes", "15-5", None, "mib", "none", 0, "none",
                                   ["memory.size=100", "memory.mix=concat"])


# ---- runs without memory are the runs they were ------------------------------------------------
def _without_memory_block(cfg):
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["memory"]
    return cfg


@pytest.mark.parametrize("overrides", [(), ("method=lwf_mc",), ("method=plop", "task=15-5s")])
def test_memory_off_leaves_fingerprint_and_step0_key_unchanged(overrides):
    cfg = compose(["logger=none", *overrides])
    old = _without_memory_block(cfg)
    assert "memory" in cfg and "memory" not in old
    assert stable_hash(fingerprint(cfg)) == stable_hash(fingerprint(old))
    for with_method in (False, True):
        assert teacher_key(cfg, "root", [0, 1], with_method) == \
            teacher_key(old, "root", [0, 1], with_method)
    on = compose(["logger=none", *overrides, "memory.size=10"])
    assert stable_hash(fingerprint(on)) != stable_hash(fingerprint(cfg))
    for with_method in (False, True):  # memory never affects step 0
        assert teacher_key(on, "root", [0, 1], with_method) == \
            teacher_key(cfg, "root", [0, 1], with_method)
    joint = compose(["logger=none", "method=joint", "memory.size=10"])  # ignored by Joint
    assert fingerprint(joint) == fingerprint(_without_memory_block(joint))
    assert OmegaConf.select(on, "memory.size") == 10


# ---- errors (docs/errors.md 85-88) ------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    pytest.param(["memory.size=-1"], ["memory.size=-1 is not valid", "a whole number >= 0",
                                      "memory.size=100"], id="size-negative"),
    pytest.param(["memory.size=abc"], ["memory.size='abc' is not valid"], id="size-not-a-number"),
    pytest.param(["memory.labels=all"], ["memory.labels='all' is not valid; use "
                                         "memory.labels=seen or memory.labels=current"],
                 id="labels"),
    pytest.param(["memory.mix=third"], ["memory.mix='third' is not valid; use memory.mix=half "
                                        "or memory.mix=concat"], id="mix"),
])
def test_memory_config_errors_one_line(tmp_path, monkeypatch, capsys, args, fragments):
    line = run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path), *args)
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_memory_larger_than_step0_fails_before_step0_trains(tmp_path, capsys):
    cfg = compose(["experiment=smoke", "logger=none", "memory.size=141", *dirs(tmp_path)])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        incseg.run._main(cfg, run)
    assert exc.value.code == 2
    assert last_line(capsys.readouterr().err) == (
        "error: memory.size=141 is larger than the 140 training images of step 0 of task 15-5 "
        "in shapes (overlap=true) that step 1 selects its memory from; lower memory.size to "
        "at most 140")
    assert not (run / "checkpoints").exists() and not (run / "state.json").exists()
    assert not (run / "memory").exists()
