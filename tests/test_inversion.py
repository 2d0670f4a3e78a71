"""The replay package: DeepInversion generator, replay-set cache, controls (incseg.replay)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import incseg.replay.fill as fill
from incseg.errors import ConfigError
from incseg.io import file_sha256
from incseg.models import build_model
from incseg.replay import (
    BestIterate,
    InversionModule,
    InversionSettings,
    ReplayDataset,
    batch_plan,
    class_grid,
    cosine_warmup_lr,
    denormalise,
    ensure_replay_set,
    frozen,
    pixel_range,
    replay_key,
    synthesise,
    teacher_fingerprint,
    teacher_verdicts,
)

torch.set_num_threads(1)


class Toy(nn.Module):
    """A tiny segmentation 'teacher': conv-BN-ReLU-conv-BN-ReLU-conv1x1, plain tensor out."""

    def __init__(self, num_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, num_classes, 1),
        )
        with torch.no_grad():  # non-trivial running statistics
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        return self.body(x)


class Stub(nn.Module):
    """A 'verifier' with fixed pixel logits: background highest, then channel ``favourite``."""

    def __init__(self, channels: int = 5, favourite: int = 2) -> None:
        super().__init__()
        self.channels, self.favourite = channels, favourite

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.channels, *x.shape[2:])
        z[:, 0] = 10.0
        z[:, self.favourite] = 5.0
        return z


def small(**kw) -> InversionSettings:
    base = dict(n_per_class=2, batch_size=4, image_size=16, iterations_low=2,
                iterations_full=2, lr=0.1)
    base.update(kw)
    return InversionSettings(**base)


def bn_hooks_left(model: nn.Module) -> int:
    n = len(model._forward_pre_hooks) + len(model._forward_hooks)
    return n + sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                   for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------------
# Settings and helpers


def test_settings_from_dict():
    s = InversionSettings.from_dict({"n_per_class": 3, "betas": [0.4, 0.8], "precision": "bf16"})
    assert s.n_per_class == 3 and s.betas == (0.4, 0.8) and s.precision == "bf16"
    assert InversionSettings().effective_jitter == round(30 * 64 / 224)
    assert InversionSettings(jitter=3).effective_jitter == 3
    assert s.effective_w_adi(False) == 0.0 and s.effective_w_adi(True) == 0.2
    with pytest.raises(ConfigError) as err:
        InversionSettings.from_dict({"n_per_class": 3, "itterations": 5})
    msg = str(err.value)
    assert "itterations" in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        InversionSettings.from_dict({"precision": "8"})


def test_best_iterate_keeps_lowest():
    best = BestIterate()
    seq = [float("nan"), 5.0, 3.0, 4.0, 2.0, 2.0, 2.5, float("inf")]
    kept = [best.update(v, torch.full((1,), float(i))) for i, v in enumerate(seq)]
    assert kept == [False, True, True, False, True, False, False, False]
    assert best.loss == 2.0 and best.index == 4 and best.images.item() == 4.0
    # The stored batch is a copy: later changes to the live tensor do not leak in.
    live = torch.zeros(2)
    best2 = BestIterate()
    best2.update(1.0, live)
    live += 7
    assert best2.images.tolist() == [0.0, 0.0]


def test_cosine_warmup_lr():
    n, base = 100, 0.2
    lrs = [cosine_warmup_lr(i, n, base, 0.05) for i in range(n)]
    assert lrs[0] == pytest.approx(base / 5) and lrs[4] == pytest.approx(base)
    assert lrs[5] == pytest.approx(base) and lrs[-1] < 0.01 * base
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    assert cosine_warmup_lr(0, 10, base, 0.0) == pytest.approx(base)


def test_batch_plan_mixes_classes():
    plan = batch_plan([1, 2, 3, 4, 5], small(n_per_class=4, batch_size=8))
    assert [len(b) for b in plan] == [8, 8, 4]
    assert all(len(set(b)) > 1 for b in plan)
    flat = [t for b in plan for t in b]
    assert {t: flat.count(t) for t in set(flat)} == {t: 4 for t in range(1, 6)}


# ---------------------------------------------------------------------------------------------
# Generator


def test_teacher_frozen_hooks_removed_and_images_in_range():
    teacher = build_model("bisenet_r18", [4])
    teacher.train()  # synthesise must switch to eval itself (BN buffers would move otherwise)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    st = small(image_size=32, batch_size=6, n_per_class=2)
    images, info = synthesise(teacher, [1, 2, 3], st, progress=False)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert bn_hooks_left(teacher) == 0
    assert images.shape == (6, 3, 32, 32)
    low, high = pixel_range()
    assert bool((images >= low - 1e-6).all()) and bool((images <= high + 1e-6).all())
    # One batch mixing all three classes; per-image verdicts and per-batch losses reported.
    assert info["targets"] == [1, 2, 3, 1, 2, 3] and len(info["batches"]) == 1
    rec = info["batches"][0]
    assert rec["iterations"] == 4 and math.isfinite(rec["final_loss"])
    assert rec["best_loss"] is not None and len(info["teacher_conf"]) == 6
    assert all(1 <= p <= 3 for p in info["teacher_pred"])


def test_loss_decreases_on_toy_teacher():
    teacher = Toy()
    st = small(iterations_low=0, iterations_full=60, n_per_class=2, batch_size=6, lr=0.1)
    with frozen(teacher):
        module = InversionModule(teacher, [1, 2, 3, 1, 2, 3], st).run()
    h = module.history
    assert len(h) == 60 and np.mean(h[-5:]) < np.mean(h[:5])
    assert module.best.loss == pytest.approx(min(h))
    # Clamped after every step, and the best iterate is what is returned.
    low, high = pixel_range()
    out = module.result_images()
    assert bool((out >= low - 1e-6).all()) and bool((out <= high + 1e-6).all())
    assert bn_hooks_left(teacher) == 0


def test_best_tracked_at_full_resolution_only():
    teacher = Toy()
    with frozen(teacher):
        module = InversionModule(teacher, [1, 2], small(iterations_low=3, iterations_full=2))
        module.run()
    assert len(module.history) == 5 and module.best.index is not None
    assert module.best.loss == pytest.approx(min(module.history[3:]))


def test_competition_student_and_targets_checked():
    teacher, student = Toy(seed=0), Toy(seed=1)
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    with frozen(teacher, student):
        module = InversionModule(teacher, [1, 2], small(), student=student)
        module.attach_hooks()
        try:
            parts = module.compute_loss(module.prepare_input(1))
        finally:
            module.detach_hooks()
    assert module.w_adi == 0.2 and 0.0 <= float(parts.adi.detach()) <= 1.0
    assert all(torch.equal(s_before[k], v) for k, v in student.state_dict().items())
    with pytest.raises(ValueError):
        InversionModule(teacher, [0, 1], small())  # background without include_background
    with pytest.raises(ValueError):
        InversionModule(teacher, [4], small())


def test_teacher_verdicts_exclude_background():
    images = torch.zeros(3, 3, 8, 8)
    pred, conf, masks = teacher_verdicts(Stub(), images, torch.tensor([2, 1, 3]), small())
    assert pred.tolist() == [2, 2, 2] and masks.unique().tolist() == [0]
    assert conf[0] > conf[1]


# ---------------------------------------------------------------------------------------------
# Replay sets


def _files(rs):
    return {p.name: p.read_bytes() for p in sorted(rs.images_dir.iterdir())}


def test_replay_round_trip(tmp_path):
    teacher = Toy()
    st = small()
    rs = ensure_replay_set(tmp_path, teacher, [1, 2, 3], st, class_ids=[0, 5, 7, 9],
                           progress=False)
    assert rs.images == 6 and rs.targets == [1, 2, 3, 1, 2, 3]
    assert rs.class_ids == [5, 7, 9, 5, 7, 9] and rs.verifier_accuracy is None
    d = rs.as_dict()
    assert d["path"] == str(rs.path / "images") and d["images"] == 6
    manifest = json.loads((rs.path / "manifest.json").read_text())
    assert len(manifest["batches"]) == 2 and manifest["settings"]["jitter"] == 2
    hits = [r["teacher_pred"] == r["target"] for r in manifest["images"]]
    assert rs.teacher_accuracy == pytest.approx(sum(hits) / 6)
    assert all(f.is_file() for f in rs.mask_files)
    assert np.asarray(Image.open(rs.mask_files[0])).shape == (16, 16)
    assert not (tmp_path / "replay" / f".{rs.key}.partial").exists()
    # Same images (deterministic generator) within quantisation after the PNG round trip.
    images, _ = synthesise(teacher, [1, 2, 3], st, progress=False)
    ds = ReplayDataset(rs)
    back = torch.stack([ds[i] for i in range(len(ds))])
    assert back.shape == (6, 3, 16, 16)
    assert (denormalise(back) - denormalise(images)).abs().max() <= 1 / 255 + 1e-6
    # Seeded horizontal flip, as the real data.
    flip_ds = ReplayDataset(rs.path, hflip=True)
    seeds = range(50)
    flips = [torch.equal(flip_ds[(0, s)], torch.flip(back[0], dims=(2,))) for s in seeds]
    assert any(flips) and not all(flips)
    assert torch.equal(flip_ds[0], back[0])


def test_rerun_reuses_cache(tmp_path, monkeypatch):
    teacher = Toy()
    first = ensure_replay_set(tmp_path, teacher, [1, 2], small(), progress=False)

    def boom(*a, **k):
        raise AssertionError("regenerated a valid cache entry")

    monkeypatch.setattr(fill, "synthesise", boom)
    again = ensure_replay_set(tmp_path, teacher, [1, 2], small(), progress=False)
    assert again.path == first.path and again.targets == first.targets
    other = replay_key(teacher, small(seed=1), [1, 2])
    assert other != first.key


@pytest.mark.parametrize("damage", ["delete_png", "truncate_manifest", "alter_png", "foreign"])
def test_corrupt_entry_is_regenerated(tmp_path, monkeypatch, caplog, damage):
    teacher = Toy()
    rs = ensure_replay_set(tmp_path, teacher, [1, 2], small(), progress=False)
    good = _files(rs)
    mf = rs.path / "manifest.json"
    if damage == "delete_png":
        rs.image_files[1].unlink()
    elif damage == "truncate_manifest":
        mf.write_text(mf.read_text()[:50])
    elif damage == "alter_png":
        arr = np.asarray(Image.open(rs.image_files[0])).copy()
        arr[0, 0] = 255 - arr[0, 0]
        Image.fromarray(arr).save(rs.image_files[0])
    else:
        m = json.loads(mf.read_text())
        m["key"] = "0" * 16
        mf.write_text(json.dumps(m))
    calls = []
    real = fill.synthesise
    monkeypatch.setattr(fill, "synthesise", lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="incseg.replay"):
        again = ensure_replay_set(tmp_path, teacher, [1, 2], small(), progress=False)
    assert len(calls) == len(rs.manifest["batches"]) and "invalid" in caplog.text
    assert _files(again) == good


def test_resume_continues_from_first_missing_batch(tmp_path, monkeypatch):
    teacher = Toy()
    st = small(n_per_class=4, batch_size=3)  # 8 images -> batches of 3, 3, 2
    real = fill.synthesise
    calls: list[list[int]] = []

    def once(*a, **k):
        if calls:
            raise RuntimeError("interrupted")
        calls.append(list(k["batches"]))
        return real(*a, **k)

    monkeypatch.setattr(fill, "synthesise", once)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_replay_set(tmp_path, teacher, [1, 2], st, progress=False)
    key = replay_key(teacher, st, [1, 2], class_ids=[0, 1, 2])
    work = tmp_path / "replay" / f".{key}.partial"
    assert (work / "batch_0.json").is_file() and not (work / "batch_1.json").exists()
    assert not (tmp_path / "replay" / key).exists()

    calls.clear()

    def counting(*a, **k):
        calls.append(list(k["batches"]))
        return real(*a, **k)

    monkeypatch.setattr(fill, "synthesise", counting)
    rs = ensure_replay_set(tmp_path, teacher, [1, 2], st, progress=False)
    assert calls == [[1], [2]] and rs.key == key and rs.images == 8
    assert not work.exists()
    # Identical to an uninterrupted run.
    fresh = ensure_replay_set(tmp_path / "other", teacher, [1, 2], st, progress=False)
    assert _files(fresh) == _files(rs)


def test_teacher_fingerprint():
    a, b = Toy(seed=0), Toy(seed=0)
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    with torch.no_grad():
        b.body[0].weight[0, 0, 0, 0] += 1e-3
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    c = Toy(seed=0)
    with torch.no_grad():
        c.body[1].running_var[0] += 1e-3
    assert teacher_fingerprint(a) != teacher_fingerprint(c)


def test_verifier_accuracy_with_stub(tmp_path, monkeypatch):
    teacher = Toy()
    channel_of = {1: 2, 2: 3, 3: 4}
    rs = ensure_replay_set(tmp_path, teacher, [1, 2, 3], small(), verifier=Stub(),
                           verifier_channel_of=channel_of, progress=False)
    # The stub always predicts channel 2 (background excluded) = teacher channel 1: 1/3.
    assert rs.verifier_accuracy == pytest.approx(1 / 3)
    assert {r["verifier_pred"] for r in rs.records} == {2}
    assert rs.as_dict()["verifier_accuracy"] == pytest.approx(1 / 3)
    monkeypatch.setattr(fill, "synthesise", lambda *a, **k: 1 / 0)
    # A different verifier on the cached set is evaluated on the stored images.
    other = ensure_replay_set(tmp_path, teacher, [1, 2, 3], small(), verifier=Stub(favourite=3),
                              progress=False)
    assert other.verifier_accuracy == pytest.approx(1 / 3)  # identity map: channel 3
    assert ensure_replay_set(tmp_path, teacher, [1, 2, 3], small(),
                             progress=False).verifier_accuracy is None


def test_noise_replay_set(tmp_path):
    teacher = Toy()
    st = small()
    noise = ensure_replay_set(tmp_path, teacher, [1, 2], st, kind="noise", progress=False)
    assert noise.kind == "noise" and noise.images == 4 and noise.targets == [1, 2, 1, 2]
    assert noise.key != replay_key(teacher, st, [1, 2], class_ids=[0, 1, 2])
    init = InversionModule(Toy(), [1, 2, 1, 2], st).images.detach()
    back = torch.stack(list(ReplayDataset(noise)))
    assert (denormalise(back) - denormalise(init)).abs().max() <= 1 / 255 + 1e-6
    assert all(b["iterations"] == 0 for b in noise.manifest["batches"])


def test_replay_set_is_reproducible_and_kind_is_in_the_key(tmp_path):
    """Two fresh fills give the same key and byte-identical PNGs; ``kind="noise"`` another key."""
    teacher, st = Toy(), small()

    def fresh(sub, **kw):
        rs = ensure_replay_set(tmp_path / sub, teacher, [1, 2], st, progress=False, **kw)
        files = rs.image_files + rs.mask_files
        return rs.key, {str(f.relative_to(rs.path)): file_sha256(f) for f in files}

    first, again = fresh("a"), fresh("b")
    assert first == again
    noise = fresh("c", kind="noise")
    assert noise[0] != first[0]
    assert noise[1]["images/000000.png"] != first[1]["images/000000.png"]
    with pytest.raises(ValueError):
        ensure_replay_set(tmp_path, teacher, [1, 2], st, kind="gan", progress=False)
    with pytest.raises(ValueError):
        ensure_replay_set(tmp_path, teacher, [1, 2], st, kind="noise", student=Toy(seed=1),
                          progress=False)


def test_class_grid(tmp_path):
    rs = ensure_replay_set(tmp_path, Toy(), [1, 2, 3], small(), class_ids=[0, 5, 7, 9],
                           progress=False)
    out = class_grid(rs, tmp_path / "grid.png", per_class=2)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_autocast_precisions_run(precision):
    teacher = Toy()
    st = small(iterations_low=1, iterations_full=3, precision=precision)
    with frozen(teacher):
        module = InversionModule(teacher, [1, 2], st).run()
    assert len(module.history) == 4 and all(math.isfinite(v) for v in module.history)
    assert next(teacher.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Adaptive DeepInversion's competition term, against the reference formula by hand


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _reference_competition(student: list[float], teacher: list[float], t: float = 3.0) -> float:
    """NVlabs/DeepInversion (deepinversion.py, R_ADI): M = (P + Q) / 2 from the unclamped
    softmaxes, then P, Q and M clamped to [0.01, 0.99]; JS = KLDiv(log P, M) / 2 +
    KLDiv(log Q, M) / 2 (KLDiv(input, target) = sum target * (log target - input))."""
    p, q = _softmax(student, t), _softmax(teacher, t)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    p, q, m = ([min(max(v, 0.01), 0.99) for v in x] for x in (p, q, m))
    js = 0.5 * sum(c * (math.log(c) - math.log(a)) for c, a in zip(m, p, strict=True)) \
        + 0.5 * sum(c * (math.log(c) - math.log(b)) for c, b in zip(m, q, strict=True))
    return 1.0 - min(max(js, 0.0), 1.0)


def test_competition_loss_clamps_in_the_reference_order():
    from incseg.losses import competition_loss

    # T = 3, student [0, 0], teacher [0, 20.72]: Q = softmax([0, 6.9067]) ~ (0.001, 0.999),
    # M ~ (0.5005, 0.4995); only Q is clamped. Clamping Q before forming M gives 0.6303.
    s, t = [0.0, 0.0], [0.0, 20.72]
    want = _reference_competition(s, t)
    assert want == pytest.approx(0.6357, abs=1e-4)
    got = competition_loss(torch.tensor([s], dtype=torch.float64),
                           torch.tensor([t], dtype=torch.float64), 3.0).item()
    assert got == pytest.approx(want, rel=1e-12)
    # Three classes where M itself is clamped: P(2) ~ 0.0003 and Q(2) ~ 0.0149 -> M(2) ~ 0.0076,
    # raised to 0.01 (M from the clamped P and Q would be 0.0124); batch mean with another.
    s2, t2 = [6.0, 0.0, -18.0], [0.0, 0.0, -10.5]
    m2 = (_softmax(s2, 3.0)[2] + _softmax(t2, 3.0)[2]) / 2
    assert m2 < 0.01 < (0.01 + _softmax(t2, 3.0)[2]) / 2
    s3, t3 = [0.0, 3.0, 0.0], [9.0, 0.0, 0.0]
    want2 = (_reference_competition(s2, t2) + _reference_competition(s3, t3)) / 2
    got2 = competition_loss(torch.tensor([s2, s3], dtype=torch.float64),
                            torch.tensor([t2, t3], dtype=torch.float64), 3.0).item()
    assert got2 == pytest.approx(want2, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Generation through a Lightning Trainer


def test_trainer_fit_gives_the_plain_loop_images_to_the_bit():
    """synthesise fits each batch with a Trainer; on a CPU its images, losses and verdicts are
    those of InversionModule.run (no Trainer), with a competition student too; the global RNG
    streams are left as they were."""
    teacher, student = Toy(seed=0), Toy(seed=1)
    st = small(n_per_class=3, batch_size=4, iterations_low=3, iterations_full=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    images, info = synthesise(teacher, [1, 2, 3], st, student=student, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    plain, history = [], []
    with frozen(teacher, student):
        for k, batch in enumerate(batch_plan([1, 2, 3], st)):
            module = InversionModule(teacher, batch, st, student=student, batch_index=k).run()
            plain.append(module.result_images())
            history.append(module.history[-1])
    assert torch.equal(images, torch.cat(plain))
    assert [b["final_loss"] for b in info["batches"]] == history
    assert bn_hooks_left(teacher) == 0 and not teacher.training


def test_inversion_logs_per_iteration_losses_and_per_batch_teacher_accuracy(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from incseg.replay import inversion_trainer

    logger = CSVLogger(str(tmp_path), name="logs", version="inversion1")
    st = small(n_per_class=4, iterations_low=2, iterations_full=3)  # 2 batches of 5 iterations
    synthesise(Toy(), [1, 2], st, progress=False,
               trainer=lambda k: inversion_trainer("cpu", False, [logger], log_every_n_steps=2))
    logger.save()
    with open(tmp_path / "logs" / "inversion1" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    losses = {int(r["step"]): float(r["inversion/loss"]) for r in rows if r["inversion/loss"]}
    assert sorted(losses) == [1, 3, 4, 6, 8, 9]  # every 2nd and the last iteration of a batch
    acc = [r for r in rows if r["inversion/batch_teacher_accuracy"]]
    assert [(int(r["step"]), int(r["inversion/batch"])) for r in acc] == [(4, 0), (9, 1)]
    assert all(0.0 <= float(r["inversion/batch_teacher_accuracy"]) <= 1.0 for r in acc)


def test_ctrl_c_during_generation_is_a_keyboard_interrupt(monkeypatch):
    """Lightning turns Ctrl-C inside fit into exit status 1 with SIGINT ignored; generation
    keeps it a KeyboardInterrupt (the CLI reports it, a rerun resumes) and SIGINT's handler."""
    import signal

    real = InversionModule.optimisation_step

    def interrupted(self, optimizers):
        if self.iteration == 2:
            raise KeyboardInterrupt
        return real(self, optimizers)

    monkeypatch.setattr(InversionModule, "optimisation_step", interrupted)
    teacher = Toy()
    with pytest.raises(KeyboardInterrupt):
        synthesise(teacher, [1, 2], small(), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert bn_hooks_left(teacher) == 0
