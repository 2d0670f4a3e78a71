"""Replay in the protocol: every incremental step gets a replay set from model t-1, recorded in
results.json; the cached sets are reused by a second run; the controls run the same path."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from incseg.config import compose
from incseg.protocol import run_protocol

TINY = ["experiment=smoke", "logger=none", "inversion.n_per_class=1",
        "inversion.iterations_low=2", "inversion.iterations_full=2", "inversion.batch_size=8",
        "dataset.generator.n_train=200"]


def cfg(cache, *extra):
    return compose([*TINY, f"paths.cache_dir={cache}", *extra])


@pytest.mark.slow  # whole-script runs of minutes on 2 cores: `make slow`
def test_replay_at_every_step_of_15_5s_and_cache_reuse(tmp_path, caplog):
    caplog.set_level("INFO")
    cache = tmp_path / "cache"
    res = run_protocol(cfg(cache, "task=15-5s", "replay=deepinversion", "replay.verifier=none"),
                       tmp_path / "a")
    assert "replay" not in res["steps"][0]
    for t, step in enumerate(res["steps"][1:], start=1):
        rep = step["replay"]
        assert rep["images"] == 15 + t - 1  # one image per old foreground class of model t-1
        assert 0.0 <= rep["teacher_accuracy"] <= 1.0 and rep["verifier_accuracy"] is None
        # the curvature test ran at the start of the step: smoke's lr_incremental 0.001,
        # Nesterov momentum 0.9 -> 2 * 1.9 / 2.8 / 0.001
        assert rep["sharpness"] > 0
        assert rep["stability_bound"] == pytest.approx(1357.1429, rel=1e-6)
    assert (tmp_path / "a" / "replay" / "step5_classes.png").exists()
    caplog.clear()
    with caplog.at_level("INFO"):
        again = run_protocol(cfg(cache, "task=15-5s", "replay=deepinversion",
                                 "replay.verifier=none"), tmp_path / "b")
    assert "generating batch" not in caplog.text  # every set came from the cache
    assert caplog.text.count("replay set cache hit") == 5  # one per incremental step
    assert "step-0 cache hit" in caplog.text
    assert [s["replay"]["path"] for s in again["steps"][1:]] == [
        s["replay"]["path"] for s in res["steps"][1:]]


@pytest.mark.parametrize("kind", ["noise", "exemplars"])
def test_replay_controls(tmp_path, kind):
    res = run_protocol(cfg(tmp_path / "cache", f"replay={kind}", "replay.verifier=none",
                           "replay.loss=kl"), tmp_path / kind)
    assert res["replay"] == kind
    assert res["steps"][1]["replay"]["images"] == 15


@pytest.mark.slow  # an experiments/ script over a whole run
def test_replay_stability_script_replays_a_step_under_variants(tmp_path):
    """experiments/replay_stability.py rebuilds step 1 of a finished run: at iteration 0 the
    student equals its teacher, so the weighted replay term and its gradient scale exactly with
    replay.weight, and the curvature figure with them."""
    import importlib
    import json
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    run_protocol(cfg(tmp_path / "cache", "replay=noise", "replay.verifier=none"), run)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    try:
        script = importlib.import_module("replay_stability")
    finally:
        sys.path.pop(0)
    out, png = tmp_path / "stab.json", tmp_path / "stab.png"
    assert script.main([str(run), "--step", "1", "--iters", "2", "--sharpness", "5",
                        "--variants", "replay.weight=1", "replay.weight=0.1", "--out", str(out),
                        "--plot", str(png)]) == 0
    full, tenth = json.loads(out.read_text())["variants"]
    assert tenth["overrides"] == ["replay.weight=0.1"]
    a, b = full["records"][0], tenth["records"][0]
    assert a["seg"] == pytest.approx(b["seg"], rel=1e-6)  # same batch, same weights
    assert b["replay"] == pytest.approx(0.1 * a["replay"], rel=1e-4)
    assert b["grad_replay"] == pytest.approx(0.1 * a["grad_replay"], rel=1e-4)
    assert tenth["replay_sharpness"] == pytest.approx(0.1 * full["replay_sharpness"], rel=1e-3)
    assert full["stability_bound"] == pytest.approx(1357.1429, rel=1e-6)
    assert len(full["records"]) == 2 and png.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Adaptive DeepInversion: the competition student


@pytest.mark.slow  # trains a student per step: minutes on 2 cores
def test_competition_student_is_trained_once_cached_and_used(tmp_path, caplog, monkeypatch):
    """inversion.competition=true: the protocol trains the student on the classes the teacher
    knows (step 0's at step 1), caches it like a step-0 model, and the generator uses it
    (w_adi = 0.2 > 0); the replay set's key differs from the one without a student."""
    import json
    from pathlib import Path

    import incseg.replay.generator as generator
    from incseg.checkpoints import load_model
    from incseg.replay import InversionSettings, replay_key
    from incseg.tasks import get_task

    calls = []
    real = generator.competition_loss
    monkeypatch.setattr(generator, "competition_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    over = ("replay=deepinversion", "replay.verifier=none", "inversion.competition=true",
            "inversion.student_model=bisenet_r18_paper")
    caplog.set_level("INFO")
    res = run_protocol(cfg(cache, *over), tmp_path / "a")
    assert "competition student cache miss" in caplog.text
    rep = res["steps"][1]["replay"]
    assert rep["competition_student"] == "bisenet_r18_paper" and rep["images"] == 15
    # 2 batches of 8 and 7 images, 4 iterations each: the term ran at every iteration
    assert len(calls) == 8
    manifest = json.loads((Path(rep["path"]).parent / "manifest.json").read_text())
    assert manifest["student"] is not None and manifest["settings"]["w_adi"] == 0.2
    assert manifest["settings"]["competition"] is True
    # the same teacher and settings without a student: another key
    c = cfg(cache, *over)
    teacher = load_model(tmp_path / "a" / "checkpoints" / "step0.pt", c.model,
                         get_task("shapes", "15-5").steps, 0)
    off = InversionSettings.from_dict({**OmegaConf.to_container(c.inversion),
                                       "competition": False, "student_model": None})
    assert manifest["key"] != replay_key(teacher, off, list(range(1, 16)),
                                         class_ids=list(range(16)))
    assert not (tmp_path / "a" / "checkpoints" / "competition1-last.ckpt").exists()
    caplog.clear()
    calls.clear()
    again = run_protocol(cfg(cache, *over), tmp_path / "b")
    assert "competition student cache hit" in caplog.text
    assert "competition student cache miss" not in caplog.text
    assert "replay set cache hit" in caplog.text and calls == []
    assert again["steps"][1]["replay"]["path"] == rep["path"]


def test_competition_student_model_defaults_to_the_teacher_with_resnet18():
    from incseg.protocol.teachers import student_model_config

    def student(*over):
        return student_model_config(compose(["inversion.competition=true", *over]))

    paper = student("model=bisenet_r50_paper")
    assert paper.name == "bisenet_r18_paper" and paper.backbone == "resnet18"
    assert paper.fusion_kernel == 3  # the teacher's variant, only the backbone changes
    assert student("model=bisenet_r101").name == "bisenet_r18"
    odd = student("model=bisenet_r50", "model.pretrained=/x.pt")  # equals no conf/model option
    assert odd.name == "bisenet_r50-resnet18" and odd.pretrained == "/x.pt"
    chosen = student("model=bisenet_r50", "inversion.student_model=bisenet_r18_paper")
    assert chosen.name == "bisenet_r18_paper"


@pytest.mark.parametrize("over, fragment", [
    pytest.param(["inversion.competition=true"],
                 "the competition student would be model=bisenet_r18 itself",
                 id="student-is-teacher"),
    pytest.param(["inversion.competition=true", "inversion.student_model=resnet"],
                 "inversion.student_model=resnet names no conf/model option",
                 id="unknown-student-model"),
    pytest.param(["inversion.student_model=bisenet_r18_paper"],
                 "student_model=bisenet_r18_paper is only used with competition=true",
                 id="student-without-competition"),
    pytest.param(["inversion.competition=yes"], "competition must be true or false",
                 id="competition-not-boolean"),
    pytest.param(["model=bisenet_r50", "inversion.competition=true", "inversion.w_adi=0"],
                 "w_adi=0 turns the competition off", id="competition-without-weight"),
])
def test_competition_config_errors(over, fragment):
    from incseg.errors import ConfigError
    from incseg.protocol.preflight import check_run

    with pytest.raises(ConfigError) as err:
        check_run(compose(["experiment=smoke", "replay=deepinversion", *over]))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_paper_generator_presets_turn_the_competition_on():
    from incseg.protocol.preflight import check_run

    for preset in ("paper", "paper_10k"):
        c = compose(["model=bisenet_r50_paper", "replay=deepinversion", f"inversion={preset}"])
        assert c.inversion.competition is True and c.inversion.student_model is None
        check_run(c)
    assert compose([]).inversion.competition is False  # the cpu presets leave it off


def test_each_replay_set_is_a_logged_inversion_stage(tmp_path, monkeypatch):
    """The protocol's Trainers for a set: one logger run per set (stage inversion<t>, W&B
    job_type inversion) shared by its batches, created only when a batch is generated."""
    import csv

    import torch
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from incseg.protocol.replay_sets import generation_device, inversion_trainers
    from incseg.replay import synthesise
    from tests.test_inversion import Toy, small

    monkeypatch.setenv("WANDB_MODE", "offline")  # the tests' own "disabled" leaves W&B out
    c = compose(["logger=wandb", "task=15-5s", "replay=deepinversion", "seed=2"])
    assert generation_device(c) == torch.device("cpu")
    make = inversion_trainers(c, tmp_path / "run", 3, torch.device("cpu"))
    first, second = make(0), make(1)
    assert first.loggers == second.loggers and len(first.loggers) == 2
    assert any(isinstance(lg, CSVLogger) for lg in first.loggers)
    wb = next(lg for lg in first.loggers if isinstance(lg, WandbLogger))
    assert wb._wandb_init["job_type"] == "inversion" and wb._wandb_init["name"] == "inversion3"
    assert wb._wandb_init["config"]["step"] == 3
    csv_run = compose(["logger=csv", "replay=deepinversion"])
    synthesise(Toy(), [1, 2], small(n_per_class=4), progress=False,
               trainer=inversion_trainers(csv_run, tmp_path / "run", 1, torch.device("cpu")))
    logged = tmp_path / "run" / "logs" / "inversion1" / "metrics.csv"
    with open(logged) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["inversion/batch"]) for r in rows if r["inversion/batch"]] == [0, 1]
    assert any(r["inversion/loss"] for r in rows)


def test_the_verifier_is_the_joint_methods_model(tmp_path):
    """The verifier shares the Joint method's cache key, so it must be the model a
    ``method=joint`` run trains, weight for weight: each made in a cache of its own here. It
    once drew its head's initial weights before seeding, and a later Joint run reported it."""
    import lightning as L
    import torch

    from incseg.config import source_from_cfg, task_from_cfg
    from incseg.protocol.state import derive_seed
    from incseg.protocol.teachers import train_teacher, verifier_model

    c = cfg(tmp_path / "a", "task=15-5s", "replay=deepinversion", "train.epochs=1",
            "dataset.generator.n_train=40")
    task, source = task_from_cfg(c), source_from_cfg(c, progress=False)
    torch.manual_seed(123)  # wherever the run's generator stands, the verifier is the same
    verifier, channel_of = verifier_model(c, tmp_path / "run_a", tmp_path / "a", source, task)
    assert channel_of == {k: k for k in range(21)}
    L.seed_everything(derive_seed(c.seed, 0, 1), workers=True, verbose=False)
    joint = train_teacher(c, tmp_path / "run_b", tmp_path / "b", source, task.joint(),
                          score_task=task).module.model
    mine, theirs = verifier.state_dict(), joint.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_plop_runs_verifier_is_the_joint_methods_cache_entry(tmp_path):
    """PLOP sets label conventions outside its node (void pixels, loss reduction, unseen
    classes) that change a Joint model's training or key; its verifier is still the Joint
    method's model: a ``method=joint`` run finds the entry the verifier made. Before, each such
    method trained a Joint model of its own under another key, and PLOP's images were judged by
    another model than MiB's."""
    from incseg.config import source_from_cfg, task_from_cfg
    from incseg.protocol.teachers import train_teacher, verifier_model

    cache, extra = tmp_path / "cache", ("task=15-5s", "train.epochs=1",
                                        "dataset.generator.n_train=40")
    plop = cfg(cache, *extra, "method=plop", "replay=deepinversion")
    assert (plop.data.void_as_background, plop.data.unseen_as) == (False, "background")
    task, source = task_from_cfg(plop), source_from_cfg(plop, progress=False)
    verifier_model(plop, tmp_path / "run_a", cache, source, task)
    joint = cfg(cache, *extra, "method=joint")
    fitted = train_teacher(joint, tmp_path / "run_b", cache, source, task.joint(),
                           score_task=task)
    assert fitted.cache == "hit"
    assert plop.data.unseen_as == "background"  # the run's own config is left as it was
