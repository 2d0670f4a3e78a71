"""The bad-input catalogue (SPEC 9; docs/errors.md lists every case and where it is tested).

Each bad input ends with one line ``error: <problem>; <fix>`` on stderr, exit status 2, no
traceback, and no file left behind that a later run could take as complete. Most cases run
in-process (``incseg.run.main`` with a patched ``sys.argv``, or the failing function under
``report_errors``); three run the real command line, since a subprocess that imports torch
costs seconds. Cases already covered elsewhere (missing root, list file or mask, bad mask
values, size mismatch, foreign checkpoints, ...) are referenced from docs/errors.md, not
repeated here.
"""

from __future__ import annotations

import ast
import errno
import os
import pathlib
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

import incseg.run
from incseg.checkpoints import EpochCheckpoint, safe_load, save_model
from incseg.cli import report_errors
from incseg.config import compose
from incseg.errors import DataError, StorageError, TrainingError, user_message
from incseg.io import atomic_write_json, ensure_writable_dir
from incseg.models import build_model

REPO = Path(__file__).resolve().parent.parent
WHERE = "(paths.cache_dir=DIR for caches, hydra.run.dir=DIR for run outputs)"


def dirs(tmp_path: Path) -> list[str]:
    """Runs and cache below tmp_path, so no case can write into the repository or ~/.cache."""
    return [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]


def run_main(monkeypatch, capsys, *args: str) -> str:
    """``python -m incseg.run ARGS`` in-process; the one stderr line of a user error."""
    monkeypatch.setattr(sys, "argv", ["incseg.run", *args])
    with pytest.raises(SystemExit) as exc:
        incseg.run.main()
    assert exc.value.code == 2
    return single_line(capsys.readouterr().err)


def visible_lines(stderr: str) -> list[str]:
    """The lines a terminal keeps: a progress bar redrawn with ``\r`` and erased on close
    (tqdm's ``leave=False``) leaves nothing."""
    lines = (ln.rsplit("\r", 1)[-1] for ln in stderr.split("\n"))
    return [ln for ln in lines if ln.strip()]


def single_line(stderr: str) -> str:
    lines = visible_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def last_line(stderr: str) -> str:
    """For failures inside a job, after its log lines: the error must be the last line."""
    assert "Traceback" not in stderr, stderr
    last = visible_lines(stderr)[-1]
    assert last.startswith("error: "), stderr
    return last


def files_below(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---- configuration: rejected before Hydra creates the run directory ------------------------

CONFIG_CASES = [
    pytest.param(["dataset=foo"],
                 ["unknown dataset 'foo'", "choose one of: ade, folder, shapes, voc"],
                 id="unknown-dataset"),
    pytest.param(["method=foo"], ["unknown method 'foo'", "choose one of: ",
                                  "ilt, joint, lwf, lwf_mc, mib, pi, plop, rw"],
                 id="unknown-method"),
    pytest.param(["replay=foo"], ["unknown replay 'foo'", "deepinversion"], id="unknown-replay"),
    pytest.param(["replay=deepinversion", "replay.loss=foo"],
                 ["unknown replay.loss 'foo'", "choose one of: mse, kl, ukd"],
                 id="unknown-replay-loss"),
    pytest.param(["replay=deepinversion", "replay.weight=abc"],
                 ["replay config: could not convert string to float: 'abc'",
                  "replay.weight and replay.temperature must be numbers"],
                 id="replay-weight-not-a-number"),
    pytest.param(["task=custom", "task.steps=[[1,0,2],[3]]"],
                 ["task custom: background 0 must come first in step 0",
                  "e.g. task.steps=[[0,1,2,3],[4,5]]"], id="custom-split-0-not-first"),
    pytest.param(["task=custom", "task.steps=[[0,1],[99]]"],
                 ["task custom: class 99 in step 1 is outside shapes's ids 0..20"],
                 id="custom-split-id-out-of-range"),
    pytest.param(["task=custom"], ["task=custom needs task.steps"], id="custom-split-missing"),
    pytest.param(["task.steps=[[0,1"], ["cannot parse an override",
                                        "check its brackets and quotes"],
                 id="override-syntax"),
    pytest.param(["train.lrr=0.1"], ["unknown config key 'train.lrr'", "check its spelling"],
                 id="misspelt-key"),
    pytest.param(["resume=maybe"], ["resume='maybe' is not valid", "auto", "never"],
                 id="bad-resume"),
    pytest.param(["data.batch_size=abc"], ["data.batch_size='abc' is not a whole number",
                                           "pass e.g. data.batch_size=16"],
                 id="batch-size-not-a-number"),
    pytest.param(["data.batch_size=1"], ["data.batch_size=1 is too small"],
                 id="batch-size-too-small"),
    pytest.param(["model.pretrained=/no/such/weights.pth"],
                 ["model.pretrained=/no/such/weights.pth: no such file",
                  "or null to train from scratch"], id="pretrained-file-missing"),
    pytest.param(["train.lr=-1"], ["error: train.lr=-1 is out of range: it must be > 0"],
                 id="negative-lr"),
    pytest.param(["train.lr_incremental=0"],
                 ["error: train.lr_incremental=0 is out of range: it must be > 0"], id="zero-lr"),
    pytest.param(["train.momentum=1.5"],
                 ["error: train.momentum=1.5 is out of range: it must be >= 0 and < 1"],
                 id="momentum-out-of-range"),
    pytest.param(["train.weight_decay=abc"],
                 ["error: train.weight_decay='abc' is not a number; pass e.g. "
                  "train.weight_decay=0.0001"], id="weight-decay-not-a-number"),
    pytest.param(["trainer=ddp", "trainer.devices=0"],
                 ["error: trainer.devices=0 is not valid; pass a count of at least 1"],
                 id="ddp-zero-devices"),
    pytest.param(["overlap=maybe"],
                 ["error: overlap='maybe' is not a boolean; use overlap=true or overlap=false"],
                 id="overlap-not-a-boolean"),
    pytest.param(["data.augment.hflip=1"], ["error: data.augment.hflip=1 is not a boolean"],
                 id="flag-not-a-boolean"),
    pytest.param(["method.kd_weight=-5"],
                 ["error: method=mib: kd_weight=-5 must be >= 0"], id="negative-kd-weight"),
    pytest.param(["method=ilt", "method.feat_weight=-1"],
                 ["error: method=ilt: feat_weight=-1 must be >= 0"], id="negative-feat-weight"),
    pytest.param(["replay=deepinversion", "replay.weight=-0.5"],
                 ["error: replay.weight=-0.5 must be >= 0"], id="negative-replay-weight"),
    pytest.param(["replay=deepinversion", "replay.label_weight=-1"],
                 ["error: replay.label_weight=-1 must be >= 0"], id="negative-replay-label-weight"),
    pytest.param(["replay=deepinversion", "replay.decay=exp"],
                 ["error: replay.decay='exp' is not valid; use one of none, linear, cosine"],
                 id="unknown-replay-decay"),
    pytest.param(["replay=deepinversion", "inversion.w_bn=-1"],
                 ["error: invalid inversion setting: w_bn must be >= 0, got -1"],
                 id="negative-inversion-weight"),
    pytest.param(["seed=abc"], ["error: seed='abc' is not a whole number; pass e.g. seed=0"],
                 id="seed-not-a-number"),
    pytest.param(["model=bisenet_r18_paper", "model.fusion_kernel=5"],
                 ["error: model.fusion_kernel=5 is not valid; use 1"], id="bisenet-fusion-kernel"),
    pytest.param(["model=bisenet_r18_paper", "model.global_context=concat"],
                 ["error: model.global_context='concat' is not valid; use add"],
                 id="bisenet-global-context"),
]


@pytest.mark.parametrize("args, fragments", CONFIG_CASES)
def test_config_error_one_line(tmp_path, monkeypatch, capsys, args, fragments):
    line = run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path), *args)
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("group", ["model", "method"])
def test_unimportable_target_one_line(tmp_path, monkeypatch, capsys, group):
    """A model or method YAML whose ``_target_`` names no importable class (docs/errors.md)."""
    line = run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path),
                    f"{group}._target_=my.Missing")
    assert f"{group}._target_='my.Missing' cannot be imported" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_imagenet_weights_missing_never_touch_the_network(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setenv("INCSEG_OFFLINE", "1")  # a node without internet, told so
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    line = run_main(monkeypatch, capsys, "experiment=smoke", "model=bisenet_r50",
                    "model.pretrained=imagenet", *dirs(tmp_path))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert line == (
        "error: model.pretrained=imagenet: the ImageNet weights of resnet50 are not in the torch "
        f"hub cache ({hub}/resnet50-0676ba61.pth is missing) and cannot be downloaded "
        "(INCSEG_OFFLINE=1); place "
        "resnet50-0676ba61.pth (from https://download.pytorch.org/models/resnet50-0676ba61.pth) "
        f"in {hub}/, or set model.pretrained=null (or none) to train from scratch")
    assert not (tmp_path / "torch").exists() and not (tmp_path / "runs").exists()


# ---- data: caught by the scan before step 0 trains --------------------------------------------

def stats_cli(voc_root: Path, tmp_path: Path, capsys, *args: str) -> str:
    from incseg.data.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["stats", "dataset=voc", f"data.root={voc_root}",
              f"paths.cache_dir={tmp_path / 'cache'}", *args])
    assert exc.value.code == 2
    return single_line(capsys.readouterr().err)


def test_missing_image(voc_root, tmp_path, capsys):
    image = voc_root / "VOCdevkit/VOC2012/JPEGImages/d.jpg"
    image.unlink()
    line = stats_cli(voc_root, tmp_path, capsys)
    assert line == (f"error: image {image} (listed for split train) is missing; restore it, "
                    "or remove d from the train list")


def test_corrupt_jpeg_caught_even_after_a_cached_scan(voc_root, tmp_path, capsys):
    from incseg.data.__main__ import main

    main(["stats", "dataset=voc", f"data.root={voc_root}", f"paths.cache_dir={tmp_path / 'cache'}"])
    capsys.readouterr()
    image = voc_root / "VOCdevkit/VOC2012/JPEGImages/b.jpg"
    image.write_bytes(image.read_bytes()[:300])  # truncated in the entropy-coded data
    line = stats_cli(voc_root, tmp_path, capsys)
    assert line.startswith(f"error: image {image} cannot be read (")
    assert line.endswith("; replace or re-create it")


def test_step_without_training_images_fails_before_step_0_trains(voc_root, tmp_path, capsys):
    cfg = compose(["dataset=voc", f"data.root={voc_root}", "task=custom",
                   "task.steps=[[0,1,5],[2]]", "data.batch_size=2", "logger=none",
                   *dirs(tmp_path)])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        incseg.run._main(cfg, run)
    assert exc.value.code == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: step 1 of task custom (classes [2]) has no training images "
                           "in voc (overlap=true); use overlap=true or a split")
    assert not (run / "checkpoints").exists()  # nothing trained: step 0 was never started


def test_step_smaller_than_one_batch(voc_root, tmp_path, capsys):
    cfg = compose(["dataset=voc", f"data.root={voc_root}", "task=15-5", "overlap=false",
                   "data.batch_size=2", "logger=none", *dirs(tmp_path)])
    with pytest.raises(SystemExit):
        incseg.run._main(cfg, tmp_path / "run")
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: step 0 of task 15-5 has 1 training image(s) in voc, fewer "
                           "than one batch of 2 (overlap=false); lower data.batch_size")


def test_error_in_a_loader_worker_is_still_one_line(capsys):
    from torch._utils import ExceptionWrapper

    msg = "image /d/x.jpg cannot be read (truncated); replace or re-create it"

    @report_errors
    def job():
        try:
            raise DataError(msg)
        except DataError:  # what torch's DataLoader does with a worker's exception
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    with pytest.raises(SystemExit) as exc:
        job()
    assert exc.value.code == 2
    assert single_line(capsys.readouterr().err) == f"error: {msg}"
    assert user_message(ValueError("a\n  b\tc")) == "a b c"


# ---- training -------------------------------------------------------------------------------

def test_non_finite_loss_keeps_the_last_good_epoch_checkpoint(tmp_path, monkeypatch, capsys):
    from incseg.systems.base import SegmentationSystem

    finite_loss = SegmentationSystem.training_loss

    def nan_in_epoch_1(self, images, labels, replay=None, known=None):
        terms = finite_loss(self, images, labels, replay, known)
        if self.current_epoch >= 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SegmentationSystem, "training_loss", nan_in_epoch_1)
    cache = tmp_path / "cache"
    cfg = compose(["experiment=smoke", "method=joint", "logger=none", "train.epochs=2",
                   f"paths.cache_dir={cache}"])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        incseg.run._main(cfg, run)
    assert exc.value.code == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: non-finite loss (nan; term loss) at step 0, epoch 1, "
                           "batch 0; lower the learning rate")
    assert "the last good epoch checkpoint is kept" in line
    good = safe_load(run / "checkpoints" / "joint-last.ckpt")
    assert good["epoch"] == 0  # written after epoch 0, never by the NaN epoch
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values()
               if v.is_floating_point())
    assert not (run / "results.json").exists() and not (run / "checkpoints/step0.pt").exists()
    assert not list((cache / "step0").glob("*.pt"))  # no NaN teacher in the shared cache


def test_non_finite_weights_never_overwrite_the_epoch_checkpoint(tmp_path):
    class Trainer:  # the two attributes EpochCheckpoint reads
        current_epoch = 3

        def save_checkpoint(self, path):
            raise AssertionError("a NaN state was saved")

    module = torch.nn.Linear(2, 2)
    module.step = 1
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    path = tmp_path / "step1-last.ckpt"
    path.write_bytes(b"epoch 2, all finite")
    with pytest.raises(TrainingError) as exc:
        EpochCheckpoint(path).on_train_epoch_end(Trainer(), module)
    assert str(exc.value).startswith("non-finite weights (weight) at the end of step 1, epoch 3;")
    assert f"the last good checkpoint {path} is kept" in str(exc.value)
    assert path.read_bytes() == b"epoch 2, all finite"
    # the class moved to incseg.errors; the old import paths still name the same class
    from incseg.systems import TrainingError as via_systems
    from incseg.systems.base import TrainingError as via_base
    assert via_systems is via_base is TrainingError


# ---- storage ------------------------------------------------------------------------------
# The tests run as root, where chmod does not stop a write: a path below a regular *file*
# (ENOTDIR) is unwritable for everyone, and EACCES itself is simulated with monkeypatch.

@pytest.mark.parametrize("what", ["run", "cache"])
def test_unwritable_output_or_cache_dir(tmp_path, monkeypatch, capsys, what):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run, cache = tmp_path / "run", tmp_path / "cache"
    if what == "run":
        run = blocker / "run"
        want = (f"error: the run directory {run} cannot be written ({blocker} is a file, not a "
                "folder); use hydra.run.dir=DIR (or paths.runs_dir=DIR) with a writable DIR")
    else:
        cache = blocker / "cache"
        want = (f"error: the cache directory {cache} cannot be written ({blocker} is a file, not "
                "a folder); use paths.cache_dir=DIR (or INCSEG_CACHE=DIR) with a writable DIR")
    line = run_main(monkeypatch, capsys, "experiment=smoke", "logger=none",
                    f"hydra.run.dir={run}", f"paths.cache_dir={cache}")
    assert line == want
    assert blocker.read_text() == "not a folder"
    assert not files_below(tmp_path / "run") and not files_below(tmp_path / "cache")


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    import incseg.io

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs.get("dir")))

    monkeypatch.setattr(incseg.io.tempfile, "mkstemp", denied)
    with pytest.raises(StorageError) as exc:
        ensure_writable_dir(tmp_path / "cache", "cache directory", "paths.cache_dir=DIR")
    assert str(exc.value) == (f"the cache directory {tmp_path / 'cache'} cannot be written "
                              f"({tmp_path / 'cache'} is not writable: Permission denied); use "
                              "paths.cache_dir=DIR")
    with pytest.raises(StorageError) as exc:
        atomic_write_json(tmp_path / "out" / "results.json", {})
    assert str(exc.value).startswith(f"cannot write {tmp_path / 'out' / 'results.json'}: ")
    assert "is not writable (Permission denied); fix its permissions" in str(exc.value)


@pytest.fixture
def full_disk(monkeypatch):
    """Every ``Path.write_bytes`` (the write inside ``atomic_path``) writes half its data, then
    fails as a full disk does."""
    def write_half(self, data):
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_half)


def test_full_disk_while_writing_a_model(tmp_path, capsys, full_disk):
    out = tmp_path / "checkpoints"
    target = out / "step0.pt"

    @report_errors
    def save():
        save_model(target, build_model("bisenet_r18", [3]), "bisenet_r18", [[0, 1, 2]], 0)

    with pytest.raises(SystemExit) as exc:
        save()
    assert exc.value.code == 2
    assert single_line(capsys.readouterr().err) == (
        f"error: no space left on device while writing {target}; free some space or write "
        f"elsewhere {WHERE}")
    assert list(out.iterdir()) == []  # neither the model nor its temporary file


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text('{"complete": true}\n')

    def no_space(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", no_space)
    with pytest.raises(StorageError, match="no space left on device while writing .*results"):
        atomic_write_json(target, {"complete": False})
    assert target.read_text() == '{"complete": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_storage_oserror_from_foreign_code_is_one_line(capsys):
    @report_errors
    def logger_write():  # e.g. Lightning's CSV logger on a full disk: no file name in the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SystemExit) as exc:
        logger_write()
    assert exc.value.code == 2
    assert single_line(capsys.readouterr().err) == (
        f"error: no space left on device while writing a file of this run; free some space or "
        f"write elsewhere {WHERE}")


@pytest.mark.parametrize("err", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
    FileExistsError(errno.EEXIST, "File exists", "/"),  # an existing *folder*: a caller's bug
])
def test_other_oserrors_keep_their_traceback(err):
    @report_errors
    def buggy():
        raise err

    with pytest.raises(type(err)):
        buggy()


# ---- the real command line ------------------------------------------------------------------

def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "TORCH_HOME": str(tmp_path / "torch"), "INCSEG_CACHE": str(tmp_path / "cache"),
            "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), "INCSEG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "incseg.run", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**base, **env}, timeout=300)


def test_cli_unwritable_run_dir_exit_2_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = cli(tmp_path, "experiment=smoke", "logger=none", f"hydra.run.dir={blocker}/run")
    assert r.returncode == 2, r.stderr
    assert single_line(r.stderr).startswith(f"error: the run directory {blocker}/run cannot be "
                                            "written")
    assert r.stdout == ""


def test_cli_corrupt_image_inside_the_job_exit_2(voc_root, tmp_path):
    image = voc_root / "VOCdevkit/VOC2012/JPEGImages/a.jpg"
    image.write_bytes(image.read_bytes()[:200])
    run = tmp_path / "run"
    r = cli(tmp_path, "dataset=voc", f"data.root={voc_root}", "logger=none",
            f"hydra.run.dir={run}")
    assert r.returncode == 2, r.stderr
    assert last_line(r.stderr).startswith(f"error: image {image} cannot be read")
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


# ---- safe by default ------------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    unsafe = []
    for folder in ("incseg", "experiments"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch"):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True
                if not ok:
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert unsafe == []
    # the scan sees real calls (a check that finds nothing to check proves nothing)
    assert "weights_only=True" in (REPO / "incseg/checkpoints.py").read_text()


def test_results_never_hold_the_wandb_api_key(tmp_path):
    marker = "incseg-secret-" + os.urandom(8).hex()
    run = tmp_path / "run"
    r = cli(tmp_path, "experiment=smoke", "method=joint", "logger=none",
            f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
            WANDB_API_KEY=marker)
    assert r.returncode == 0, r.stderr
    written = files_below(run)
    assert run / "results.json" in written and run / ".hydra" / "config.yaml" in written
    leaks = [p for p in written if marker.encode() in p.read_bytes()]
    assert leaks == []
    assert marker not in r.stdout + r.stderr


def test_wandb_is_offline_by_default():
    assert compose([]).logger.name == "wandb"  # the default logger ...
    assert compose([]).logger.offline is True  # ... needs no account and no network
    assert compose(["logger=wandb", "task=15-5s"]).logger.offline is True


def test_the_catalogue_doc_names_only_tests_that_exist():
    import re

    doc = (REPO / "docs" / "errors.md").read_text()
    rows = [ln for ln in doc.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 20
    refs = re.findall(r"(test_\w+\.py)::(test_\w+)(?:\[([\w-]+)\])?", doc)
    assert all(re.search(r"test_\w+\.py::", row) for row in rows)  # every case has its test
    for file, name, param in refs:
        source = (REPO / "tests" / file).read_text()
        assert f"def {name}(" in source, f"{file}::{name}"
        assert not param or f'"{param}"' in source, f"{file}::{name}[{param}]"
