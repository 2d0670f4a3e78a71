"""The adaptive inversion budget and the device-filling batch (incseg.replay.adaptive)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import incseg.replay.fill as fill
from incseg.config import compose
from incseg.errors import ConfigError
from incseg.io import file_sha256, stable_hash
from incseg.losses.inversion import (
    BNStatisticsHook,
    bn_image_distance,
    bn_layer_distance,
    competition_loss,
    image_priors,
    per_image_priors,
)
from incseg.replay import (
    InversionModule,
    InversionSettings,
    batch_plan,
    ensure_replay_set,
    replay_key,
    synthesise,
)
from incseg.replay.adaptive import AdaptiveInversion, ImageJob, image_seed
from incseg.replay.batching import auto_batch_size, batch_from_peaks
from incseg.replay.settings import AUTO_BATCH_CPU, StopRule, clamp_normalised
from incseg.replay.verdicts import frozen
from tests.test_inversion import Toy

torch.set_num_threads(1)

#: images stop at different iterations on the Toy teacher (its BN term levels off after ~20)
VARIED = {"min_prob": 0.0, "bn_window": 3, "bn_rel_drop": 0.03}
#: never met (a probability of exactly 1 is out of reach): every stage runs to its maximum
NEVER = {"min_prob": 1.0, "bn_window": 2, "bn_rel_drop": 0.0}


def adaptive(**kw) -> InversionSettings:
    base = dict(n_per_class=2, batch_size=2, image_size=16, iterations_low=4, iterations_full=30,
                lr=0.1, budget="adaptive", stop=VARIED)
    base.update(kw)
    return InversionSettings(**base)


def run_jobs(teacher, settings, jobs, slots, **kw):
    """Every job through ``slots`` slots; ``{index: Finished}`` and the engine."""
    with frozen(teacher):
        engine = AdaptiveInversion(teacher, settings, slots, "cpu", **kw)
        out = {f.job.index: f for f in engine.run(jobs)}
    return out, engine


# ---------------------------------------------------------------------------------------------
# The stopping rule


def test_stop_rule_on_a_hand_made_trace():
    rule = StopRule(min_prob=0.8, bn_window=2, bn_rel_drop=0.1)
    bns = [10.0, 8.0, 6.0, 5.0, 4.8, 4.7, 4.6, 4.6, 4.6]
    probs = [0.1, 0.2, 0.5, 0.7, 0.85, 0.9, 0.95, 0.95, 0.95]
    # by hand: after 5 values the probability is 0.85 >= 0.8, but mean(5, 4.8) = 4.9 is below
    # 0.9 x mean(8, 6) = 6.3; after 6: 4.75 < 0.9 x 5.5 = 4.95; after 7: 4.65 >= 0.9 x 4.9 = 4.41
    assert [rule.met(probs[:i], bns[:i]) for i in range(1, 8)] == [False] * 6 + [True]
    assert rule.iterations(probs, bns, maximum=9) == 7
    assert rule.iterations(probs, bns, maximum=5) == 5  # never beyond the maximum
    # the BN term has levelled off from the 4th value on, but the teacher is not yet sure
    flat = [5.0] * 9
    assert rule.iterations(probs, flat, maximum=9) == 5
    # fewer than 2 windows of values never stop a stage
    assert not StopRule(min_prob=0.0, bn_window=3, bn_rel_drop=0.5).met([1.0] * 5, [1.0] * 5)
    assert StopRule(min_prob=0.0, bn_window=3, bn_rel_drop=0.5).met([1.0] * 6, [1.0] * 6)


def test_the_engine_stops_each_stage_where_the_rule_says_and_never_beyond_the_maximum():
    teacher = Toy()
    st = adaptive(iterations_low=5, iterations_full=12, stop=NEVER)
    jobs = [ImageJob(n, 1 + n % 3, 0) for n in range(3)]
    out, _ = run_jobs(teacher, st, jobs, slots=2)
    assert all(f.stage_iterations == [5, 12] for f in out.values())
    # min_prob 0 and any rise of the BN term: a stage ends after exactly two windows
    st = adaptive(iterations_low=5, iterations_full=12,
                  stop={"min_prob": 0.0, "bn_window": 2, "bn_rel_drop": 0.99})
    out, _ = run_jobs(teacher, st, jobs, slots=2)
    assert all(f.stage_iterations == [4, 4] for f in out.values())
    # the varied rule: each stage is what StopRule.iterations gives on the image's own traces
    st = adaptive(iterations_low=0, iterations_full=30)
    with frozen(teacher):
        engine = AdaptiveInversion(teacher, st, 1, "cpu")
        engine.place(0, jobs[0])
        img = engine.images[0]
        trace_p, trace_b = img.probs, img.bns  # the lists the engine appends to
        n = 0
        while engine.images[0] is not None:
            engine.step()
            n += 1
        engine.close()
    assert n == st.stop_rule.iterations(trace_p, trace_b, 30) and n < 30


# ---------------------------------------------------------------------------------------------
# Per-image objective: the same image in any batch


def test_per_image_terms_are_the_batch_of_one_terms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 5, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    per = bn_image_distance(x, rm, rv)
    for i in range(3):
        assert torch.allclose(per[i], bn_layer_distance(x[i:i + 1], rm, rv), atol=1e-6)
        for a, b in zip(per_image_priors(x), image_priors(x[i:i + 1]), strict=True):
            assert torch.allclose(a[i], b, atol=1e-5)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    per = competition_loss(s, t, per_image=True)
    for i in range(3):
        assert torch.allclose(per[i], competition_loss(s[i:i + 1], t[i:i + 1]), atol=1e-6)
    teacher = Toy()
    with BNStatisticsHook(teacher, per_image=True) as hook:
        teacher(x[:, :3])
        per = hook.loss
    with BNStatisticsHook(teacher) as hook:
        teacher(x[1:2, :3])
        assert torch.allclose(per[1], hook.loss, atol=1e-5)


def test_refilled_slots_give_the_images_each_gives_alone():
    teacher = Toy()
    st = adaptive()
    jobs = [ImageJob(n, 1 + n % 3, n // 3) for n in range(5)]
    batched, engine = run_jobs(teacher, st, jobs, slots=2)
    its = [sum(f.stage_iterations) for f in batched.values()]
    # slots were refilled while the other image was mid-way: images stopped at different
    # iterations and the run took fewer steps than the images' iterations one after another
    assert len(set(its)) > 1 and engine.steps < sum(its)
    assert max(its) <= st.iterations_low + st.iterations_full
    for job in jobs:
        alone, _ = run_jobs(teacher, st, [job], slots=1)
        a, b = alone[job.index], batched[job.index]
        assert a.stage_iterations == b.stage_iterations
        # batched convolutions round differently from single-image ones (oneDNN picks its
        # kernels by shape): equal to float noise, not to the bit
        torch.testing.assert_close(a.image, b.image, atol=1e-4, rtol=0)


def test_an_image_is_deepinversion_with_a_batch_of_one_and_its_own_generator():
    """The adaptive engine at its maximum against InversionModule (torch's Adam, the fixed
    budget's loss) on one image with the same initial draws."""
    teacher = Toy()
    st = adaptive(iterations_low=3, iterations_full=5, stop=NEVER)
    job = ImageJob(4, 2, 0)
    out, _ = run_jobs(teacher, st, [job], slots=3)
    fixed = InversionSettings(**{**st.to_dict(), "budget": "fixed", "stop": None,
                                 "batch_size": 1})
    with frozen(teacher):
        module = InversionModule(teacher, [job.target], fixed)
        module.rng = torch.Generator().manual_seed(image_seed(st.seed, job.target, job.index))
        init = torch.randn(1, 3, 16, 16, generator=module.rng)
        with torch.no_grad():
            module.images.copy_(clamp_normalised(init))
        module.run()
    torch.testing.assert_close(out[job.index].image, module.result_images()[0], atol=1e-4,
                               rtol=0)
    assert out[job.index].stage_iterations == [3, 5]


def compiled_vs_eager(backend: str) -> None:
    torch._dynamo.reset()
    teacher = Toy()
    jobs = [ImageJob(n, 1 + n % 3, 0) for n in range(2)]
    eager, _ = run_jobs(teacher, adaptive(iterations_low=2, iterations_full=6, stop=NEVER),
                        jobs, slots=2)
    compiled, engine = run_jobs(teacher, adaptive(iterations_low=2, iterations_full=6,
                                                  stop=NEVER, compile=True), jobs, slots=2,
                                compile_backend=backend)
    assert engine._loss is not engine.group_loss  # really the compiled function
    for n in eager:
        assert compiled[n].stage_iterations == eager[n].stage_iterations == [2, 6]
        torch.testing.assert_close(compiled[n].image, eager[n].image, atol=1e-4, rtol=0)


def test_compiled_step_equals_eager():
    """The graphs torch.compile captures (BN hooks, per-image rolls and flips, both
    resolutions) give the eager images; ``aot_eager`` runs them without building kernels."""
    compiled_vs_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    """The same with inductor, the default backend: a C compiler builds its CPU kernels (about
    7 minutes on a shared 2-core CPU, one compilation per group size and resolution)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for inductor's CPU kernels")
    compiled_vs_eager("inductor")


# ---------------------------------------------------------------------------------------------
# Sets: manifest, resume, keys


def test_manifest_records_the_iterations_of_every_image_and_resumes(tmp_path, monkeypatch):
    teacher = Toy()
    st = adaptive(n_per_class=3)
    assert [len(b) for b in batch_plan([1, 2], st)] == [2, 2, 2]  # one image of each class
    images, info = synthesise(teacher, [1, 2], st, progress=False)
    rs = ensure_replay_set(tmp_path, teacher, [1, 2], st, progress=False)
    its = [r["iterations"] for r in rs.records]
    assert its == info["image_iterations"] and len(set(its)) > 1
    assert all(0 < i <= 34 for i in its)
    assert rs.manifest["settings"]["stop"] == VARIED and "batch_size" not in rs.manifest["settings"]
    hashes = [r["file_sha256"] for r in rs.records]
    # resume: the last batch is missing from a half-made set, only it is made again
    work = tmp_path / "replay" / f".{rs.key}.partial"
    rs.path.rename(work)
    (work / "manifest.json").unlink()
    (work / "batch_2.json").unlink()
    calls = []
    real = fill._make_adaptive

    def spy(job, settings, batches, final, where=""):
        out = real(job, settings, batches, final, where)
        calls.append(sorted(out))
        return out

    monkeypatch.setattr(fill, "_make_adaptive", spy)
    again = ensure_replay_set(tmp_path, teacher, [1, 2], st, progress=False)
    assert calls == [[0, 1, 2]]
    assert [r["file_sha256"] for r in again.records] == hashes
    assert [r["iterations"] for r in again.records] == its


def test_fixed_budget_keys_are_those_of_earlier_sets():
    """The resolved settings the replay key hashes, per preset, as before the adaptive budget
    existed (hashes taken then): earlier replay sets stay valid."""
    from omegaconf import OmegaConf

    before = {"cpu": ("cf74a7c4a05019cb", "1a2e59c896d36b3b"),
              "cpu_half": ("fbb6a6a27471b80a", "e6320cc977f59c51"),
              "cpu_small": ("ae05fb23d41096e8", "196963b148871c02"),
              "paper": ("2c22148ffd0c9cf0", "22b798a321f77873"),
              "paper_10k": ("454947ad455c0ee9", "7d1482a3b3c3107a")}
    for preset, (alone, with_student) in before.items():
        cfg = compose([f"inversion={preset}"])
        s = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
        assert s.budget == "fixed"
        assert (stable_hash(s.resolved(False)), stable_hash(s.resolved(True))) == (
            alone, with_student), preset


def test_adaptive_key_holds_the_rule_but_not_the_batch_or_compile():
    teacher = Toy()
    key = replay_key(teacher, adaptive(), [1, 2])
    assert key != replay_key(teacher, InversionSettings(
        **{**adaptive().to_dict(), "budget": "fixed"}), [1, 2])
    assert key != replay_key(teacher, adaptive(stop={**VARIED, "bn_window": 4}), [1, 2])
    assert key != replay_key(teacher, adaptive(stop={**VARIED, "min_prob": 0.5}), [1, 2])
    assert key == replay_key(teacher, adaptive(batch_size="auto"), [1, 2])
    assert key == replay_key(teacher, adaptive(batch_size=7, compile=True), [1, 2])
    # stop values act on nothing with the fixed budget
    fixed = dict(n_per_class=2, batch_size=4, image_size=16)
    assert replay_key(teacher, InversionSettings(**fixed), [1, 2]) == replay_key(
        teacher, InversionSettings(**fixed, stop={"bn_window": 50}), [1, 2])


# ---------------------------------------------------------------------------------------------
# batch_size: auto, and bad settings


def test_auto_batch_on_a_cpu_is_a_fixed_number_capped_by_the_set():
    teacher = Toy()
    st = adaptive(batch_size="auto")
    assert auto_batch_size(teacher, st, "cpu", n_images=1000) == AUTO_BATCH_CPU
    assert auto_batch_size(teacher, st, "cpu", n_images=5) == 5
    images, info = synthesise(teacher, [1, 2], adaptive(batch_size="auto", iterations_full=3,
                                                        stop=NEVER), progress=False)
    assert info["batches"][0]["slots"] == 4 and images.shape[0] == 4


def test_auto_batch_extrapolates_the_probes_peak_memory_by_hand():
    mib = 2 ** 20
    # 2 images peak at 300 MiB, 4 at 500: 100 MiB per image, 100 MiB fixed; 10 GiB free less
    # 15 % = 8704 MiB usable: (8704 - 100) // 100 = 86 images
    assert batch_from_peaks((2, 4), (300 * mib, 500 * mib), 10240 * mib) == 86
    assert batch_from_peaks((2, 4), (300 * mib, 500 * mib), 10240 * mib, margin=0.0) == 101
    assert batch_from_peaks((2, 4), (300 * mib, 500 * mib), 150 * mib) == 1  # never below 1


@pytest.mark.parametrize("settings, fragment", [
    ({"batch_size": "auto"}, "batch_size=auto needs budget=adaptive"),
    ({"compile": True}, "compile must be one of false, true, reduce-overhead, max-autotune and "
                        "needs budget=adaptive"),
    ({"budget": "fast"}, "budget must be fixed or adaptive, got 'fast'"),
    ({"budget": "adaptive", "stop": {"min_prob": 1.5}}, "stop.min_prob must be in [0, 1]"),
    ({"budget": "adaptive", "stop": {"bn_window": 0}}, "stop.bn_window must be a whole number"),
    ({"budget": "adaptive", "stop": {"bn_rel_drop": -0.1}}, "stop.bn_rel_drop must be in [0, 1)"),
    ({"budget": "adaptive", "stop": {"window": 3}}, "unknown stop setting(s) window"),
    ({"budget": "adaptive", "batch_size": "many"}, "batch_size must be a whole number or auto"),
])
def test_bad_settings_are_one_line(settings, fragment):
    with pytest.raises(ConfigError) as err:
        InversionSettings.from_dict(settings)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_budget_setting_stops_the_run_before_anything_is_written(tmp_path, monkeypatch,
                                                                    capsys):
    from tests.test_errors import dirs, run_main

    line = run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path),
                    "replay=deepinversion", "inversion.batch_size=auto")
    assert "error: invalid inversion setting: batch_size=auto needs budget=adaptive" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_manifest_of_a_fixed_set_records_the_budget_per_image(tmp_path):
    rs = ensure_replay_set(tmp_path, Toy(), [1, 2], InversionSettings(
        n_per_class=2, batch_size=4, image_size=16, iterations_low=2, iterations_full=1),
        progress=False)
    assert [r["iterations"] for r in rs.records] == [3] * 4
    assert json.loads((rs.path / "manifest.json").read_text())["batches"][0]["iterations"] == 3
    assert file_sha256(rs.image_files[0])  # written and listed


def test_ranks_share_an_adaptive_set_and_make_the_one_process_set(tmp_path, monkeypatch):
    """Two DDP ranks (threads here, each with its own teacher copy) make the plan batches
    k % 2 == r, each through its own slots; the set is the one-process set (iterations
    exactly, pixels to one uint8 level: slots hold other images than in one process)."""
    import threading

    import numpy as np

    from incseg.replay.store import read_png

    monkeypatch.setattr(fill, "POLL_S", 0.05)
    st = adaptive(n_per_class=3)
    one = ensure_replay_set(tmp_path / "one", Toy(), [1, 2], st, progress=False)
    teachers, results, errors = [Toy(), Toy()], [None, None], []

    def rank(r: int) -> None:
        try:
            results[r] = ensure_replay_set(tmp_path / "two", teachers[r], [1, 2], st,
                                           progress=False, rank=r, world_size=2)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    two = results[0]
    assert two.key == one.key and results[1].key == one.key
    assert [r["iterations"] for r in two.records] == [r["iterations"] for r in one.records]
    for a, b in zip(one.image_files, two.image_files, strict=True):
        diff = np.abs(read_png(a).astype(int) - read_png(b).astype(int))
        assert diff.max() <= 1
