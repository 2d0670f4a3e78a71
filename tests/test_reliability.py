"""Rough edges a new user meets: a weights file that is not a state dict (said what it is,
refused before anything starts), a path with a non-ASCII letter in an override (quoted for
Hydra), W&B's deprecation warning on every run, and what a repaired cache entry's warning says.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from incseg.cli import quote_override, quote_overrides
from incseg.errors import ConfigError
from incseg.models import build_model, check_pretrained

REPO = Path(__file__).resolve().parent.parent
R18 = {"name": "bisenet_r18", "backbone": "resnet18"}


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "TORCH_HOME": str(tmp_path / "torch"), "INCSEG_CACHE": str(tmp_path / "cache"),
            "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "incseg.run", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**base, **env}, timeout=600)


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("wandb:")]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


# ---- model.pretrained: what the file is, and what to pass ------------------------------------

def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        check_pretrained({**R18, "pretrained": str(path)})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.pretrained file {path} ")
    return msg[len(f"model.pretrained file {path} "):]


def test_a_file_that_is_not_a_state_dict_is_said_what_it_is(tmp_path):
    fix = ("pass a ResNet state dict (torch.save(model.state_dict(), path)), "
           "model.pretrained=imagenet, or model.pretrained=null to train from scratch")
    text = tmp_path / "w.pth"
    text.write_text("hello\n")  # torch's own message for it: "KeyError: 101"
    assert refused(text) == f"is not a torch file at all; {fix}"
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert refused(empty) == f"is empty; {fix}"
    whole = tmp_path / "model.pth"
    torch.save(torchvision.models.resnet18(weights=None), whole)
    assert refused(whole).startswith(
        "holds a pickled Python object (torchvision.models.resnet.ResNet), e.g. a whole model "
        "saved with torch.save(model), which weights_only=True does not load")
    assert refused(whole).endswith("torch.save(model.state_dict(), 'weights.pth'), and pass that")
    cut = tmp_path / "cut.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    assert refused(cut).startswith("is a zip archive that torch.load cannot read (truncated, or "
                                   "not written by torch.save")
    npy = tmp_path / "w.npy"
    npy.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'}")
    assert refused(npy) == f"is a NumPy array (.npy), not a torch file; {fix}"
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    assert refused(listed) == ("holds a list, not a state dict (a mapping of names to tensors); "
                               + fix)


def test_weights_of_another_architecture_name_the_model_to_choose(tmp_path):
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    assert refused(r50) == ("holds resnet50 weights, not resnet18 ones; choose a model with a "
                            "resnet50 backbone (model.backbone=resnet50, e.g. model=bisenet_r50) "
                            "or pass resnet18 weights")
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, other)
    assert refused(other).startswith("does not fit a resnet18 backbone (weights of another "
                                     "network?): 100 missing keys")


def test_a_lightning_checkpoint_with_the_backbone_inside_is_used(tmp_path, caplog):
    """A Lightning checkpoint of this suite's TeacherModule holds the backbone under
    ``model.backbone.``: those weights are loaded (said in the log); one whose hyper-parameters
    hold Python objects cannot be read safely and is refused with the command that extracts its
    weights."""
    torch.manual_seed(3)
    ref = build_model("bisenet_r18", [4])
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}
    ckpt = tmp_path / "step0-last.ckpt"
    torch.save({"state_dict": state, "epoch": 2, "pytorch-lightning_version": "2.6.6"}, ckpt)
    with caplog.at_level(logging.INFO, logger="incseg.models.backbones"):
        got = build_model("bisenet_r18", [4], pretrained=ckpt)
    assert f"model.pretrained file {ckpt}: the resnet18 weights under 'model.backbone.'" \
        in caplog.text
    for k, v in ref.backbone.state_dict().items():
        assert torch.equal(got.backbone.state_dict()[k], v), k
    with_hparams = tmp_path / "hp.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": OmegaConf.create({"lr": 0.1}),
                "pytorch-lightning_version": "2.6.6"}, with_hparams)
    assert refused(with_hparams).startswith(
        "is a Lightning checkpoint holding Python objects (omegaconf.dictconfig.DictConfig) "
        "beyond its weights, which weights_only=True does not load; save its weights alone")


def test_cli_refuses_the_file_before_the_dataset_or_the_run_folder_exist(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_text("not weights\n")
    run = tmp_path / "runs" / "x"
    r = cli(tmp_path, "experiment=smoke", "logger=none", f"model.pretrained={weights}",
            f"hydra.run.dir={run}")
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr) == (
        f"error: model.pretrained file {weights} is not a torch file at all; pass a ResNet state "
        "dict (torch.save(model.state_dict(), path)), model.pretrained=imagenet, or "
        "model.pretrained=null to train from scratch")
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1  # nothing ran before
    assert not run.exists() and not (tmp_path / "cache" / "shapes").exists()


# ---- non-ASCII letters in an override ------------------------------------------------------

@pytest.mark.parametrize("arg, want", [
    ("hydra.run.dir=/data/données", 'hydra.run.dir="/data/données"'),
    ("data.root=/home/jürgen/voc", 'data.root="/home/jürgen/voc"'),
    ("+paths.extra=/srv/Ærø/data sets/v1", '+paths.extra="/srv/Ærø/data sets/v1"'),
    ("data.root=/home/jurgen/voc", "data.root=/home/jurgen/voc"),  # ASCII: as typed
    ('data.root="/home/jürgen/voc"', 'data.root="/home/jürgen/voc"'),  # quoted already
    ("data.root='/home/jürgen/voc'", "data.root='/home/jürgen/voc'"),
    ("--multirun", "--multirun"),
])
def test_a_plain_value_with_a_non_ascii_letter_is_quoted_for_hydra(arg, want):
    assert quote_override(arg) == want
    assert quote_override(want) == want  # idempotent: DDP ranks re-read the quoted argv


@pytest.mark.parametrize("arg, hint", [
    # a sweep: quoting the whole value would make it one string
    ("data.root=/a/é,/b/ü", """quote it: 'data.root="/a/é","/b/ü"'"""),
    # an interpolation inside: quoted, ${...} would still resolve, but it is left to the user
    ("data.root=${oc.env:HOME}/données", "put each value that has such a character in double "
                                         "quotes"),
    ("data.root=/x/→y", """quote it: 'data.root="/x/→y"'"""),  # not a letter
])
def test_a_value_that_cannot_be_quoted_safely_gets_the_form_to_type(arg, hint):
    with pytest.raises(ConfigError) as err:
        quote_override(arg)
    msg = str(err.value)
    assert msg.startswith(f"the override {arg} has a non-ASCII character (")
    assert "outside quotes, which Hydra's override grammar does not accept; " + hint in msg


def test_the_quoted_path_reaches_the_config_intact(tmp_path):
    """The real command line: the non-ASCII data.root is parsed and used as typed (the
    dataset check names it), and a sweep over such paths gets its one line."""
    root = tmp_path / "jürgen" / "voc"
    r = cli(tmp_path, "dataset=voc", f"data.root={root}", "logger=none")
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert str(root) in line and "LexerNoViableAlt" not in line
    r = cli(tmp_path, "dataset=voc", f"data.root={root},/b/ü", "logger=none")
    assert r.returncode == 2
    assert error_line(r.stderr) == (
        f"error: the override data.root={root},/b/ü has a non-ASCII character ('ü') outside "
        "quotes, which Hydra's override grammar does not accept; quote it: "
        f"""'data.root="{root}","/b/ü"'""")
    assert quote_overrides(["task=15-5", f"data.root={root}"])[1] == f'data.root="{root}"'


# ---- W&B: no deprecation warning ---------------------------------------------------------

def test_wandb_is_not_handed_the_removed_anonymous_setting(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from incseg.config import compose
    from incseg.protocol.trainer import Stage, make_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = make_loggers(Stage(tmp_path, "step0", 0, "teacher", compose(["logger=wandb"])))
    wb = next(lg for lg in loggers if isinstance(lg, WandbLogger))
    assert "anonymous" not in wb._wandb_init and wb._wandb_init["project"] == "incseg"


@pytest.mark.parametrize("mode", ["disabled", "Disabled "])
def test_wandb_mode_disabled_leaves_the_csv_logger_alone(tmp_path, monkeypatch, mode):
    """W&B's own "no W&B at all" switch wins over the config's ``offline: true`` (which
    would otherwise start offline runs): only the CSV logger is made."""
    from lightning.pytorch.loggers import CSVLogger

    from incseg.config import compose
    from incseg.protocol.trainer import Stage, make_loggers

    monkeypatch.setenv("WANDB_MODE", mode)
    loggers = make_loggers(Stage(tmp_path, "step0", 0, "teacher", compose(["logger=wandb"])))
    assert [type(lg) for lg in loggers] == [CSVLogger]


@pytest.mark.parametrize("mode", ["offline", pytest.param("disabled", marks=pytest.mark.slow)])
def test_a_wandb_run_prints_no_deprecation_warning_into_a_non_ascii_run_dir(tmp_path, mode):
    """A whole (one-step) run with the W&B logger, its run folder named with a non-ASCII letter
    (quoted for Hydra by the entry point): it finishes, and W&B warns of nothing."""
    run = tmp_path / "données" / "run"
    r = cli(tmp_path, "experiment=smoke", "method=joint", "logger=wandb", "logger.name=wandb",
            f"hydra.run.dir={run}", WANDB_MODE=mode, WANDB_DIR=str(tmp_path / "wandb"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "results.json").is_file()
    if mode == "offline":
        assert list((run / "wandb").glob("offline-run-*"))  # W&B did run
    else:
        assert not (run / "wandb").exists()  # W&B's "disabled" starts none, offline either
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("wandb: WARNING")]
    assert not [ln for ln in warned if "anonymous" in ln or "deprecat" in ln.lower()
                or "will be removed" in ln], warned


# ---- a repaired file: the warning says what happens now -------------------------------------

def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "incseg.protocol" and r.levelno >= logging.WARNING]


def test_an_unusable_step_model_is_said_to_be_trained_again(tmp_path, caplog):
    from incseg.protocol.state import usable_model

    path = tmp_path / "step1.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="incseg.protocol"):
        assert not usable_model(path)
    assert warnings(caplog) == [f"model checkpoint {path} is unusable (unreadable or truncated: "
                               "RuntimeError); training that step again now"]


def test_an_unusable_epoch_checkpoint_is_said_to_be_restarted(tmp_path, caplog):
    from incseg.protocol.trainer import fit

    ckpt = tmp_path / "checkpoints" / "step0-last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"garbage")
    calls = []

    class Trainer:
        def fit(self, module, datamodule, ckpt_path, weights_only):
            calls.append(ckpt_path)

    with caplog.at_level(logging.WARNING, logger="incseg.protocol"):
        fit(Trainer(), object(), None, tmp_path, "step0")
    assert calls == [None] and not ckpt.exists()
    assert warnings(caplog) == [f"epoch checkpoint {ckpt} is unusable (unreadable or truncated: "
                               "UnpicklingError); training step0 from its first epoch now"]


def test_an_unusable_step0_cache_entry_is_said_to_be_rebuilt(tmp_path, monkeypatch, caplog):
    import incseg.protocol.teachers as teachers
    from incseg.checkpoints import read_model_file
    from incseg.config import compose
    from incseg.protocol.trainer import recipe
    from incseg.systems import TeacherModule
    from incseg.tasks import get_task

    fits = []
    monkeypatch.setattr(teachers, "fit", lambda *a, **k: fits.append(a[-1]))

    class Source:
        def cache_identity(self):
            return "test-source"

    cfg = compose(["experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'c'}"])
    task = get_task("shapes", "15-5")

    def teacher():
        module = TeacherModule(build_model(cfg.model, [16]), task, 0, recipe(cfg, 0))
        return teachers.fit_teacher(cfg, tmp_path / "run", tmp_path / "c", Source(), module,
                                    None, task, "step-0")

    assert teacher().cache == "miss"
    (entry,) = (tmp_path / "c" / "step0").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:500])
    with caplog.at_level(logging.WARNING, logger="incseg.protocol"):
        assert teacher().cache == "miss"
    assert warnings(caplog) == [f"step-0 cache entry {entry} is unusable (unreadable or "
                               "truncated: RuntimeError); training it again now, the entry is "
                               "replaced when done"]
    assert fits == ["step0", "step0"]
    read_model_file(entry)  # rebuilt whole


# ---- the process group's timeout -------------------------------------------------------------

def test_trainer_timeout_s_reaches_the_ddp_strategy_and_is_checked(tmp_path):
    from datetime import timedelta

    from incseg.config import compose, validate
    from incseg.protocol.state import fingerprint
    from incseg.protocol.trainer import Stage, make_trainer

    ddp = ["experiment=smoke", "logger=none", "trainer=ddp", "trainer.accelerator=cpu"]
    cfg = compose([*ddp, "trainer.timeout_s=77"])
    validate(cfg)
    trainer = make_trainer(cfg, Stage(tmp_path, "step0", 0, "teacher", cfg), 1)
    assert trainer.strategy._timeout == timedelta(seconds=77)
    assert compose(ddp).trainer.timeout_s == 1800  # Lightning's default, written out
    # how long a dead rank is waited for changes no number: same run, same caches
    assert fingerprint(cfg) == fingerprint(compose(ddp))
    for bad, msg in (("0", "trainer.timeout_s=0 is out of range: it must be > 0"),
                     ("soon", "trainer.timeout_s='soon' is not a number; pass e.g. "
                              "trainer.timeout_s=1800")):
        with pytest.raises(ConfigError) as err:
            validate(compose([*ddp, f"trainer.timeout_s={bad}"]))
        assert str(err.value) == msg


def test_cli_refuses_bad_wait_settings_before_anything_starts(tmp_path):
    run = tmp_path / "runs" / "x"
    r = cli(tmp_path, "experiment=smoke", "logger=none", f"hydra.run.dir={run}",
            INCSEG_WAIT_GRACE_S="5min")
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr) == ("error: INCSEG_WAIT_GRACE_S='5min' is not a positive number "
                                    "of seconds; unset it (default 300) or pass e.g. "
                                    "INCSEG_WAIT_GRACE_S=300")
    assert not run.exists()
