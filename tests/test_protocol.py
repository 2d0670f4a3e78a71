"""The protocol end to end on a tiny `shapes` (experiment=smoke): outputs, resume, cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from incseg.checkpoints import load_model, save_model
from incseg.config import compose
from incseg.errors import CheckpointError
from incseg.methods.ilt import ILT
from incseg.methods.mib import MiB
from incseg.models import build_model
from incseg.models.norm import teacher_statistics
from incseg.protocol import run_protocol
from incseg.replay.term import ReplaySpec, ReplayTerm
from incseg.results import load_results
from incseg.systems import StudentModule, TrainingError
from incseg.systems.base import Recipe
from incseg.tasks import get_task


def smoke_cfg(cache, *overrides):
    return compose(["experiment=smoke", f"paths.cache_dir={cache}", "logger=none",
                    *overrides])


def test_smoke_joint_writes_results_per_spec(tmp_path):
    run = tmp_path / "run"
    res = run_protocol(smoke_cfg(tmp_path / "cache", "method=joint"), run)
    on_disk = load_results(run / "results.json")
    assert on_disk["final"] == res["final"]
    for key in ("dataset", "task", "method", "overlap", "seed", "steps", "final", "provenance"):
        assert key in on_disk
    assert on_disk["method"] == "joint" and len(on_disk["steps"]) == 1
    step = on_disk["steps"][0]
    assert step["classes"] == list(range(21))
    assert set(step["iou"]) == {str(c) for c in range(21)}  # keyed by dataset class id
    assert all(v is None or 0.0 <= v <= 1.0 for v in step["iou"].values())
    assert step["miou_new"] is not None  # Joint is scored with the task's split (16-20 new)
    assert on_disk["provenance"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert on_disk["provenance"]["config"]["method"]["name"] == "joint"
    # CPU figures agree only on one CPU kind: the file names it (None only off Linux)
    from incseg.precision import cpu_model
    assert on_disk["provenance"]["cpu"] == cpu_model()
    assert os.path.isfile("/proc/cpuinfo") <= bool(on_disk["provenance"]["cpu"])
    from incseg.precision import cpu_kernels
    assert on_disk["provenance"]["cpu_kernels"] == cpu_kernels() != ""
    assert (run / "results.csv").read_text().startswith("step,class,iou")
    ious = [v for v in step["iou"].values() if v is not None]
    assert step["miou_all"] == pytest.approx(sum(ious) / len(ious), abs=1e-5)
    assert "old" in (run / "results.md").read_text()
    conf = step["confusion"]  # rows ground truth, columns prediction, seen classes in order
    assert conf["classes"] == list(range(21)) and len(conf["counts"]) == 21
    for c, row in zip(conf["classes"], conf["counts"]):  # the IoU is the confusion's
        tp, gt = row[c], sum(row)
        pred = sum(r[c] for r in conf["counts"])
        if step["iou"][str(c)] is not None:
            assert step["iou"][str(c)] == pytest.approx(tp / (gt + pred - tp), abs=1e-5)


def test_two_step_protocol_resume_and_step0_cache(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    run = tmp_path / "mib"
    res = run_protocol(smoke_cfg(cache), run)
    assert [s["classes"] for s in res["steps"]] == [list(range(16)), [16, 17, 18, 19, 20]]
    assert res["steps"][0]["miou_new"] is None and res["steps"][1]["miou_new"] is not None
    assert (run / "checkpoints" / "step1.pt").exists()
    assert not (run / "checkpoints" / "step1-last.ckpt").exists()

    # rerunning a finished run trains nothing and gives the same numbers
    import incseg.protocol.loop as loop
    import incseg.protocol.teachers as teachers

    def no_training(*a, **k):
        raise AssertionError("a finished step was retrained")

    monkeypatch.setattr(loop, "fit", no_training)
    monkeypatch.setattr(teachers, "fit", no_training)
    again = run_protocol(smoke_cfg(cache), run)
    assert again["steps"] == res["steps"]
    monkeypatch.undo()

    # a truncated model of a finished step is reported and that step is trained again (same
    # numbers: the step's seeds derive from (seed, step)); it is never loaded
    ckpt = run / "checkpoints" / "step1.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level("INFO", logger="incseg.protocol"):
        rebuilt = run_protocol(smoke_cfg(cache), run)
    assert "unreadable or truncated" in caplog.text
    assert "steps [1] will be trained again" in caplog.text
    assert "step 0 already finished: skipped" in caplog.text
    strip = lambda steps: [{k: v for k, v in s.items() if k != "wall_time_s"} for s in steps]  # noqa: E731
    assert strip(rebuilt["steps"]) == strip(res["steps"])

    # another method on another task with the same step 0: the step-0 model comes from the cache
    with caplog.at_level("INFO", logger="incseg.protocol"):
        ft = run_protocol(smoke_cfg(cache, "method=ft", "task=15-5s"), tmp_path / "ft")
    assert "step-0 cache hit" in caplog.text
    assert ft["steps"][0]["iou"] == res["steps"][0]["iou"]  # step 0 identical across methods
    assert len(ft["steps"]) == 6


def test_different_config_in_run_dir_is_refused(tmp_path):
    from incseg.errors import ConfigError

    run = tmp_path / "run"
    run_protocol(smoke_cfg(tmp_path / "c", "method=joint"), run)
    with pytest.raises(ConfigError, match="different config.*resume=never"):
        run_protocol(smoke_cfg(tmp_path / "c", "method=joint", "seed=5"), run)


def _student(task_name="15-5", method=None):
    task = get_task("voc", task_name)
    old = build_model("bisenet_r18", [16])
    new = build_model("bisenet_r18", [16])
    new.load_state_dict(old.state_dict())
    new.add_step(5)
    return StudentModule(new, old, task, 1, Recipe(), method or MiB(kd_weight=10)), old


def _warm_bn(model, steps=3):
    """Running statistics that differ from any one batch's (as after step-0 training)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, 32, 32) * 2 + 1)


@pytest.mark.parametrize("feat_bn", ["batch", "running"])
def test_ilt_feature_term_compares_like_with_like(feat_bn):
    torch.manual_seed(0)
    ilt = ILT(kd_weight=100, feat_weight=100, feat_layer="encoder", feat_bn=feat_bn)
    module, old = _student(method=ilt)
    _warm_bn(old)
    module.model.load_state_dict(old.state_dict(), strict=False)  # student == teacher so far
    module.train()
    before = {k: v.clone() for k, v in old.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    terms = module.training_loss(x, torch.randint(0, 21, (4, 32, 32)))
    if feat_bn == "batch":  # same weights, same normalisation: no drift, no penalty
        assert terms["feat"].item() == pytest.approx(0.0, abs=1e-10)
    else:  # eval-mode teacher: the BN mode alone is penalised
        assert terms["feat"].item() > 1e-3
    after = old.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. num_batches_tracked
    assert not old.training and all(
        m.track_running_stats for m in old.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_teacher_unchanged_by_student_step():
    torch.manual_seed(0)
    module, old = _student()
    before = {k: v.clone() for k, v in old.state_dict().items()}
    module.train()
    assert not old.training  # BN statistics of the frozen model never update
    opt = torch.optim.SGD(module.model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 21, (2, 32, 32))
    loss = module.training_loss(x, y)["loss"]
    loss.backward()
    opt.step()
    after = old.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert all(p.grad is None for p in old.parameters())


def test_non_finite_loss_names_step_and_batch(monkeypatch):
    module, _ = _student()
    monkeypatch.setattr(module, "training_loss",
                        lambda x, y, replay=None, known=None: {"loss": torch.tensor(float("nan"))})
    with pytest.raises(TrainingError, match="non-finite loss .* step 1, epoch 0, batch 7"):
        module.training_step((torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8).long()), 7)


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    model = build_model("bisenet_r18", [16])
    path = tmp_path / "step0.pt"
    save_model(path, model, "bisenet_r18", get_task("voc", "15-5").steps, 0)
    assert load_model(path, "bisenet_r18", get_task("voc", "15-5s").steps, 0).num_classes == 16
    with pytest.raises(CheckpointError, match="trained on classes .* needs"):
        load_model(path, "bisenet_r18", get_task("voc", "19-1").steps, 0)
    with pytest.raises(CheckpointError, match="asks for bisenet_r50"):
        load_model(path, "bisenet_r50", get_task("voc", "15-5").steps, 0)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path, "bisenet_r18", get_task("voc", "15-5").steps, 0)


def _cli(*args, tmp_path):
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin",
           "INCSEG_CACHE": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch"),
           "HOME": str(tmp_path), "INCSEG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "incseg.run", *args,
                           f"paths.runs_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_inputs_one_line_exit_2(tmp_path):
    r = _cli("experiment=smoke", "logger=none", "model.pretrained=imagenet", tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "resnet18-f37072fd.pth" in last
    assert "Traceback" not in r.stderr
    r = _cli("model=bisenet_r34", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        r.stderr.strip().splitlines()[-1]]
    assert "unknown model 'bisenet_r34'" in r.stderr and "bisenet_r18" in r.stderr
    assert not list((tmp_path / "runs").rglob("results.json"))


def test_wandb_logger_groups_runs_offline(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")  # the tests' own "disabled" leaves W&B out

    from incseg.protocol.trainer import Stage, make_loggers

    cfg = compose(["logger=wandb", "task=15-5s", "method=lwf", "seed=3"])
    loggers = make_loggers(Stage(tmp_path / "run", "step2", 2, "student", cfg))
    assert any(isinstance(lg, CSVLogger) for lg in loggers)  # a CSV logger always
    wb = next(lg for lg in loggers if isinstance(lg, WandbLogger))
    init = wb._wandb_init
    assert init["group"] == str(tmp_path / "run") and init["job_type"] == "student"
    assert init["name"] == "step2" and wb._offline
    assert {k: init["config"][k] for k in ("task", "method", "step", "seed")} == {
        "task": "15-5s", "method": "lwf", "step": 2, "seed": 3}


@pytest.mark.slow  # a whole run; W&B offline is also run by test_reliability
def test_smoke_protocol_with_the_default_wandb_logger_offline(tmp_path, monkeypatch):
    """The default logger (W&B, offline) through a whole 2-step run with replay: every stage's
    W&B run is finished and written offline (the default job once crashed in wandb.finish),
    and each stage has its own: step 0, the verifier's Joint training, the inversion of step 1's
    set, step 1 (the inversion once logged into the verifier's run, which was still open)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    res = run_protocol(compose(["experiment=smoke", f"paths.cache_dir={tmp_path / 'c'}",
                                "logger=wandb", "logger.name=wandb",  # smoke sets csv
                                "replay=deepinversion"]), run)
    assert len(res["steps"]) == 2
    offline = sorted(p for p in (run / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(offline) == 4  # step0, joint (the verifier), inversion1, step1

    def logged(d, key: str) -> bool:
        return any(key.encode() in f.read_bytes() for f in d.glob("*.wandb"))

    inversion = [d for d in offline if logged(d, "inversion/loss")]
    assert len(inversion) == 1 and not logged(inversion[0], "train/loss")


@pytest.mark.parametrize("bn", ["running", "batch"])
def test_replay_forward_compares_like_with_like_and_keeps_bn_statistics(bn):
    torch.manual_seed(0)
    module, old = _student()
    _warm_bn(old)
    module.model.load_state_dict(old.state_dict(), strict=False)  # student == teacher so far
    module.replay = ReplayTerm(ReplaySpec(loss="mse", weight=1.0, bn=bn, background="plain"))
    module.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 21, (4, 32, 32))
    replay = torch.randn(4, 3, 32, 32) * 0.5 + 0.3  # "synthetic": other statistics
    bns = [m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    start = {k: v.clone() for k, v in module.model.state_dict().items()}

    for m in bns:  # the real batch must not move the statistics for this check
        m.momentum = 0.0
    terms = module.training_loss(x, y, replay)
    if bn == "running":
        assert terms["replay"].item() == pytest.approx(0.0, abs=1e-10)  # no drift, no penalty
    else:
        assert terms["replay"].item() > 1e-3  # the BN mode alone is penalised

    def buffers_after(with_replay: bool) -> dict:
        module.model.load_state_dict(start)
        for m in bns:
            m.momentum = 0.1
        module.training_loss(x, y, replay if with_replay else None)
        return {k: v.clone() for k, v in module.model.state_dict().items() if "running" in k}

    real_only, with_replay = buffers_after(False), buffers_after(True)
    same = all(torch.equal(real_only[k], with_replay[k]) for k in real_only)
    assert same == (bn == "running")  # synthetic images never reach the test-time statistics


def test_replay_bn_teacher_ignores_the_students_drifted_statistics():
    """replay.bn=teacher: the student normalises the synthetic batch with the teacher's running
    statistics, so a student whose own statistics drifted (to the current step's data) but whose
    weights equal the teacher's has replay distance 0, where bn=running penalises the drift; the
    student's buffers and BN modes come back unchanged, and a missing twin is an error."""
    torch.manual_seed(0)
    module, old = _student()
    _warm_bn(old)
    module.model.load_state_dict(old.state_dict(), strict=False)  # student == teacher
    bns = [m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # the student's statistics drift; its weights do not
        m.running_mean.add_(0.5)
        m.running_var.mul_(3.0)
        m.momentum = 0.0  # and the real batch of this check must not move them
    drifted = {k: v.clone() for k, v in module.model.state_dict().items() if "running" in k}
    module.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 21, (4, 32, 32))
    replay = torch.randn(4, 3, 32, 32) * 0.5 + 0.3
    module.replay = ReplayTerm(ReplaySpec(loss="mse", weight=1.0, bn="teacher",
                                          background="plain"))
    assert module.training_loss(x, y, replay)["replay"].item() == pytest.approx(0.0, abs=1e-10)
    module.replay = ReplayTerm(ReplaySpec(loss="mse", weight=1.0, bn="running",
                                          background="plain"))
    assert module.training_loss(x, y, replay)["replay"].item() > 1e-3
    after = {k: v for k, v in module.model.state_dict().items() if "running" in k}
    assert all(torch.equal(drifted[k], after[k]) for k in drifted)
    assert all(m.training for m in bns)
    with pytest.raises(ValueError, match="replay.bn=teacher"):
        with teacher_statistics(module.model, torch.nn.Sequential()):
            pass


def test_same_seed_same_results_on_cpu(tmp_path):
    """Determinism (CPU): two runs with the same seed, each with its own cache (step 0 trained
    twice), give identical results.json numbers; another seed does not."""
    def numbers(res):
        return [{k: v for k, v in s.items() if k != "wall_time_s"} for s in res["steps"]]

    a = run_protocol(smoke_cfg(tmp_path / "c1", "task=10-5-5"), tmp_path / "a")
    b = run_protocol(smoke_cfg(tmp_path / "c2", "task=10-5-5"), tmp_path / "b")
    c = run_protocol(smoke_cfg(tmp_path / "c3", "task=10-5-5", "seed=1"), tmp_path / "c")
    assert numbers(a) == numbers(b) and a["final"] == b["final"]
    assert numbers(a) != numbers(c)


def test_replay_leaves_out_images_the_teacher_cannot_score():
    torch.manual_seed(0)
    module, old = _student()
    module.replay = ReplayTerm(ReplaySpec(loss="mse", weight=1.0))
    module.train()
    for m in module.model.modules():  # the real forwards must not move the statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    replay = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = module.training_loss(x, y, replay[:2])["replay"]
    real_forward = old.forward

    def teacher_with_inf(images):  # images 2 and 3 overflow for the teacher
        out = real_forward(images)
        if images.shape[0] == 4:
            out.logits[2:] = float("inf")
        return out

    old.forward = teacher_with_inf
    with torch.no_grad():
        masked = module.training_loss(x, y, replay)["replay"]
    assert torch.isfinite(masked) and masked.item() == pytest.approx(ref.item(), rel=1e-5)


def test_teacher_cache_key_includes_the_number_of_processes():
    """A DDP-trained teacher differs from a one-process one (per-rank BatchNorm statistics,
    which rank sees which sample): a 2-process run never reuses a 1-process cache entry."""
    from incseg.config import compose
    from incseg.protocol.teachers import teacher_key

    def key(*overrides):
        return teacher_key(compose(["experiment=smoke", *overrides]), "/data", [0, 1, 2])

    ddp = ["trainer=ddp", "trainer.accelerator=cpu"]
    one = key(*ddp, "trainer.devices=1")
    assert one == key()  # one process is one process, whatever the strategy says
    assert key(*ddp, "trainer.devices=2") not in (one, key(*ddp, "trainer.devices=4"))
    assert key(*ddp, "trainer.devices=2", "trainer.num_nodes=2") == key(*ddp,
                                                                      "trainer.devices=4")


def test_replay_decay_reads_the_trainers_progress(monkeypatch):
    """``replay.decay``: the student hands the term the fraction of the step's optimiser steps
    done (global step / the Trainer's estimated total); 0 without a Trainer."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    module, old = _student()
    module.replay = ReplayTerm(ReplaySpec(loss="kl", weight=1.0, decay="linear"))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    replay = torch.randn(2, 3, 32, 32)
    module.training_loss(x, y, replay)
    assert module.replay.progress == 0.0
    fake = SimpleNamespace(estimated_stepping_batches=40, global_step=30)
    monkeypatch.setattr(type(module), "trainer", property(lambda self: fake))
    monkeypatch.setattr(type(module), "global_step", property(lambda self: fake.global_step))
    module._trainer = fake
    module.training_loss(x, y, replay)
    assert module.replay.progress == pytest.approx(0.75)


def test_the_cpu_kind_names_family_and_model_beside_the_name():
    """A virtual machine's model name alone ("AMD EPYC") can hide two generations whose kernels
    sum differently: the family and model numbers of the first processor are added."""
    from incseg.precision import cpu_model

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\n"
            "model name\t: other\n")
    assert cpu_model(info) == "AMD EPYC (family 25, model 17)"
    assert cpu_model("model name\t: Intel(R) Xeon(R) Processor\n") == "Intel(R) Xeon(R) Processor"
