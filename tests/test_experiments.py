"""The versioned experiments (conf/experiment/{cpu,paper}/table*.yaml) compose, and each job of
their sweeps composes, validates and gets a run directory of its own."""

from __future__ import annotations

import itertools
import re

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from incseg.config import CONF_DIR, compose
from incseg.config.build import plain as plain_container
from incseg.protocol.preflight import check_run
from incseg.replay import InversionSettings
from incseg.replay.term import ReplaySpec

EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                     for p in (CONF_DIR / "experiment").glob("*/table*.yaml"))


def _jobs(name: str) -> list[list[str]]:
    """The override lists of every job of the experiment's sweep (the basic sweeper's product)."""
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(combo) for combo in itertools.product(*axes)]


def replay_spec(cfg) -> ReplaySpec | None:
    """The student's replay spec of a composed config (what the protocol builds)."""
    return ReplaySpec.from_config(plain_container(cfg.get("replay")))


def test_every_table_has_a_cpu_and_a_paper_experiment():
    for table in (1, 2, 3, 4):
        assert f"cpu/table{table}" in EXPERIMENTS and f"paper/table{table}" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweep_jobs_compose_validate_and_do_not_share_run_dirs(name):
    family = name.split("/")[0]
    dirs = set()
    jobs = _jobs(name)
    assert len(jobs) >= 2  # each table is a sweep over its axes
    for overrides in jobs:
        cfg = compose([f"experiment={name}", *overrides], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert cfg.dataset.name == ("shapes" if family == "cpu" else "voc")
        assert cfg.trainer.accelerator == ("cpu" if family == "cpu" else "gpu")
        HydraConfig.instance().set_config(cfg)
        dirs.add(f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}")
        # the controls and the 15-5s half of Table 3 write beside the table they belong to
        table = re.sub(r"(_controls|_15-5s|_weight|_newclass|_plain|_competition)+$", "", name)
        assert str(cfg.hydra.sweep.dir) == f"runs/{table}"
        plain = cfg  # validate reads the job's keys, never hydra's
        check_run(plain)
        if plain.replay.name != "none":
            assert replay_spec(plain).loss in ("mse", "kl", "ukd")
            InversionSettings.from_dict(OmegaConf.to_container(plain.inversion))
    assert len(dirs) == len(jobs)  # e.g. replay.loss=mse,kl,ukd must not collide


def test_table_axes_match_the_paper():
    axes = {n: {o.split("=")[0] for o in _jobs(n)[0]} for n in EXPERIMENTS}
    assert axes["cpu/table1"] == axes["paper/table1"] == {
        "model", "data.batch_size", "train.lr", "data.augment.rotation",
        "data.augment.color_jitter"}
    assert {"task", "method", "seed"} <= axes["cpu/table2"] == axes["paper/table2"]
    assert "replay.loss" in axes["cpu/table3"] and "replay.loss" in axes["paper/table3"]
    assert axes["cpu/table4"] == axes["paper/table4"] == {"inversion"}
    methods = {o for job in _jobs("cpu/table2") for o in job if o.startswith("method=")}
    assert methods == {f"method={m}" for m in ("ft", "lwf", "ilt", "mib", "joint")}
    paper4 = [compose(["experiment=paper/table4", *j]).inversion for j in _jobs("paper/table4")]
    assert sorted(i.iterations_low + i.iterations_full for i in paper4) == [10000, 20000]


def test_run_path_names_the_replay_distance_and_a_set_weight():
    from incseg.config import overrides_hash, run_path

    assert run_path("shapes", "15-5", None, "mib", "none", 0, "none", []) == \
        "shapes/15-5/mib/seed0"
    assert run_path("shapes", "15-5", None, "mib", "deepinversion", 1, "kl", None) == \
        "shapes/15-5/mib+deepinversion-kl/seed1"
    assert run_path("shapes", "15-1", None, "mib", "exemplars", 2, "mse", None) == \
        "shapes/15-5s/mib+exemplars-mse/seed2"
    # overrides already in the readable part (or not changing the numbers) add nothing
    assert run_path("shapes", "15-5", None, "mib", "deepinversion", 0, "mse",
                    ["replay=deepinversion", "replay.loss=mse", "seed=0",
                     "paths.runs_dir=/x"]) == "shapes/15-5/mib+deepinversion-mse/seed0"
    # a set weight gets a directory of its own, one per value
    w01 = run_path("shapes", "15-5", None, "mib", "deepinversion", 0, "mse",
                   ["replay.weight=0.1"])
    w3 = run_path("shapes", "15-5", None, "mib", "noise", 0, "ukd", ["replay.weight=3.0"])
    assert w01 == f"shapes/15-5/mib+deepinversion-mse-{overrides_hash(['replay.weight=0.1'])}" \
        "/seed0"
    assert w3 == f"shapes/15-5/mib+noise-ukd-{overrides_hash(['replay.weight=3.0'])}/seed0"
    assert overrides_hash(["replay.weight=0.1"]) != overrides_hash(["replay.weight=3.0"])
    # a command-line weight gets a run directory of its own (not the default run's)
    cfg = compose(["replay=deepinversion", "replay.weight=0.1"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    default = compose(["replay=deepinversion"], return_hydra_config=True)
    HydraConfig.instance().set_config(default)
    assert str(default.hydra.run.dir).endswith("shapes/15-5/mib+deepinversion-mse/seed0")
    HydraConfig.instance().set_config(cfg)
    assert str(cfg.hydra.run.dir).endswith(
        f"shapes/15-5/mib+deepinversion-mse-{overrides_hash(['replay.weight=0.1'])}/seed0")


def test_mse_replay_weight_default_and_the_paper_tables():
    """The default MSE replay weight is 0.1 (stable at the CPU recipe); the Table-3/4
    experiments keep the paper's 1.0, the weight their recorded runs used."""
    assert replay_spec(compose(["replay=deepinversion"])).weight == 0.1
    assert replay_spec(compose(["replay=exemplars"])).weight == 0.1
    assert replay_spec(compose(["replay=deepinversion", "replay.loss=kl"])).weight == 1.0
    assert replay_spec(compose(["replay=deepinversion", "replay.loss=ukd"])).weight == 10.0
    for name in ("cpu/table3", "cpu/table3_15-5s", "paper/table3", "cpu/table4", "paper/table4"):
        assert replay_spec(compose([f"experiment={name}", "replay.loss=mse"])).weight == 1.0
    assert replay_spec(compose(["experiment=cpu/table3_controls", "replay=noise"])).weight == 1.0
    assert replay_spec(compose(["experiment=cpu/table3_15-5s_weight", "seed=0",
                                "replay.weight=0.1"])).weight == 0.1


METHOD_SWEEPS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                       for p in (CONF_DIR / "experiment").glob("cpu/methods*.yaml"))


@pytest.mark.parametrize("name", METHOD_SWEEPS)
def test_methods_sweeps_compose_and_share_one_runs_dir_without_collisions(name):
    """cpu/methods and its -M / 10-1 companions: every job composes and validates, the jobs
    write under runs/cpu/methods (one report), never into one another's directory."""
    dirs = set()
    for overrides in _jobs(name):
        cfg = compose([f"experiment={name}", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert str(cfg.hydra.sweep.dir) == "runs/cpu/methods"
        dirs.add(str(cfg.hydra.sweep.subdir))
        check_run(cfg)
    assert len(dirs) == len(_jobs(name))


def test_methods_sweeps_cover_the_table():
    """15-5s: every method at 3 seeds, -M of MiB / PLOP / DKD at 3 seeds; 10-1: MiB, PLOP, DKD
    and their -M at 3 seeds, the others at 1."""
    def runs(name):
        return {tuple(sorted(o for o in job if not o.startswith("task="))) for job in _jobs(name)}

    seeds3 = {f"seed={s}" for s in range(3)}
    main = runs("cpu/methods")
    assert {o for job in main for o in job if o.startswith("method=")} == {
        f"method={m}" for m in ("ft", "lwf", "lwf_mc", "ilt", "mib", "plop", "dkd", "joint")}
    assert {o for job in main for o in job if o.startswith("seed=")} == seeds3
    regs = runs("cpu/methods_regularizers")
    assert {o for job in regs for o in job if o.startswith("method=")} == {
        "method=ewc", "method=pi", "method=rw"}
    assert {o for job in regs for o in job if o.startswith("seed=")} == seeds3
    for name in ("cpu/methods_memory", "cpu/methods_10-1_memory"):
        assert all("memory.size=100" in job for job in runs(name))
        assert len(runs(name)) == 9
    assert len(runs("cpu/methods_10-1")) == 9
    for name in ("cpu/methods_10-1_others", "cpu/methods_10-1_regularizers"):
        assert {o for job in runs(name) for o in job if o.startswith("seed=")} == {"seed=0"}


PRETRAINED_SWEEPS = ("cpu/pretrained_methods", "cpu/pretrained_regularizers",
                     "cpu/pretrained_memory")


def test_pretrained_sweeps_cover_the_table_on_the_pretrained_benchmark():
    """The methods table on the pretrained shapes benchmark: 14 rows (11 methods, 3 -M) x 15-5s
    and 10-1 x 3 seeds, every job with the shapes class design and the segmentation
    pretraining, under one runs folder without two jobs in one directory."""
    dirs, rows = set(), set()
    for name in PRETRAINED_SWEEPS:
        for overrides in _jobs(name):
            cfg = compose([f"experiment={name}", *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            assert str(cfg.hydra.sweep.dir) == "runs/cpu/pretrained"
            assert cfg.dataset.pretrained == "segmentation" == cfg.model.pretrained
            assert cfg.dataset.generator.classes == "shapes"
            dirs.add(str(cfg.hydra.sweep.subdir))
            check_run(cfg)
            memory = "-M" if int(cfg.memory.size) > 0 else ""
            rows.add((cfg.method.name + memory, str(cfg.task.name), int(cfg.seed)))
    assert len(dirs) == len(rows) == 14 * 2 * 3


PRETRAINED_OTHER = ("cpu/pretrained_table2", "cpu/pretrained_replay", "cpu/pretrained_star",
                    "cpu/pretrained_star_replay")


def test_pretrained_table2_and_replay_sweeps_share_the_methods_tables_runs():
    """Table 2, the replay rows and STAR against DKD with and without image replay on the
    pretrained benchmark: every job valid; a run directory two sweeps share holds one config
    fingerprint (the 15-5s Table 2 rows and plain DKD are the methods table's own runs, which
    the second sweep finds finished instead of running them twice)."""
    from incseg.protocol.state import fingerprint

    where: dict[str, dict] = {}
    sweeps: dict[str, set[str]] = {}
    rows = set()
    for name in PRETRAINED_SWEEPS + PRETRAINED_OTHER:
        for overrides in _jobs(name):
            cfg = compose([f"experiment={name}", *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            assert str(cfg.hydra.sweep.dir) == "runs/cpu/pretrained"
            assert cfg.dataset.pretrained == "segmentation"
            check_run(cfg)
            what = (cfg.method.name, int(cfg.memory.size), str(cfg.task.name), int(cfg.seed),
                    cfg.replay.name, OmegaConf.select(cfg, "replay.loss"))
            # the job's own config, the Hydra node aside (what a run fingerprints)
            fp = fingerprint(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
            assert where.setdefault(str(cfg.hydra.sweep.subdir), fp) == fp, overrides
            sweeps.setdefault(str(cfg.hydra.sweep.subdir), set()).add(name)
            if name in PRETRAINED_OTHER:
                rows.add(what[:3] + what[4:])
    tasks = {r[2] for r in rows}
    assert tasks == {"15-5", "15-5s", "10-1"}
    replayed = {(m, t) for m, _, t, r, _ in rows if r == "deepinversion"}
    # one distance for every image-replay row, so they compare (the tables' "+ DI (kl)" rows)
    assert {loss for *_, r, loss in rows if r == "deepinversion"} == {"kl"}
    assert replayed >= {("mib", "15-5"), ("mib", "15-5s"), ("mib", "10-1"), ("dkd", "15-5s"),
                        ("dkd", "10-1"), ("star", "15-5s"), ("star", "10-1")}
    assert {r[0] for r in rows if r[2] == "15-5"} == {"ft", "lwf", "ilt", "mib", "joint"}
    shared = {d for d, names in sweeps.items() if len(names) > 1}
    assert {"shapes/15-5s/mib/seed0", "shapes/10-1/dkd/seed0"} <= shared


@pytest.mark.parametrize("name", [n for n in METHOD_SWEEPS if "regularizers" in n]
                         + ["cpu/pretrained_regularizers"])
def test_regularizer_sweeps_train_at_an_lr_their_weights_can_follow(name):
    """EWC / PI / RW at MiB's weights: the penalty's largest curvature (2 w, 4 w for RW's two
    normalised importances) below the bound of the sweep's SGD, so no job is refused at its
    first incremental step as they would be at the shapes recipe's lr."""
    from incseg.protocol.trainer import recipe
    from incseg.stability import sgd_stability_bound

    for overrides in _jobs(name):
        cfg = compose([f"experiment={name}", *overrides])
        r = recipe(cfg, 1)
        worst = 2 * cfg.method.reg_weight * (2 if cfg.method.name == "rw" else 1)
        assert worst <= sgd_stability_bound(r.lr, r.momentum, r.nesterov), overrides
        shapes = recipe(compose([f"method={cfg.method.name}"]), 1)
        assert worst > sgd_stability_bound(shapes.lr, shapes.momentum, shapes.nesterov)


@pytest.mark.parametrize("name", ["cpu/table3_competition", "cpu/table3_competition_15-5s"])
def test_a_sweep_whose_base_config_needs_its_swept_values_starts(name, tmp_path, monkeypatch):
    """``python -m incseg.run experiment=...`` (no -m: the experiment sets MULTIRUN) checks its
    first job, not the base config: competition=true is a swept value that the experiment's
    inversion.student_model needs, and the base config alone would be refused."""
    from incseg.run import precheck

    monkeypatch.chdir(tmp_path)
    precheck([f"experiment={name}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert (tmp_path / "runs" / "cpu" / "table3").is_dir()
    with pytest.raises(Exception, match="only used with competition=true"):
        precheck([f"experiment={name}", "hydra.mode=RUN", f"paths.cache_dir={tmp_path / 'c'}"])
