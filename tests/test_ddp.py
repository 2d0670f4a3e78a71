"""DDP on CPU (gloo, 2 processes): the gradient of one optimisation step equals the one-process
gradient at the same global batch; SyncBatchNorm (GPU only) is tested as a conversion."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from incseg.methods.mib import MiB
from incseg.models import build_model
from incseg.systems import StudentModule
from incseg.systems.base import Recipe
from incseg.tasks import get_task

GLOBAL_BATCH = 4


def _student() -> StudentModule:
    torch.manual_seed(0)
    old = build_model("bisenet_r18", [16])
    new = build_model("bisenet_r18", [16])
    new.load_state_dict(old.state_dict())
    new.add_step(5)
    task = get_task("voc", "15-5")
    return StudentModule(new, old, task, 1, Recipe(), MiB(kd_weight=10))  # MiB: UCE + UKD


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 21, (GLOBAL_BATCH, 32, 32), generator=g)  # no void: equal pixel counts
    return x, y


def _grads(module: StudentModule, x, y, bn_train: bool) -> dict[str, torch.Tensor]:
    module.train()
    if not bn_train:
        for m in module.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    module.model.zero_grad()
    module.training_loss(x, y)["loss"].backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str, bn_train: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = _student()
    ddp = torch.nn.parallel.DistributedDataParallel(module.model)
    module.model = ddp  # the student's forward goes through DDP (gradient all-reduce hooks)
    x, y = _batch()
    per = GLOBAL_BATCH // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    module.train()
    if not bn_train:
        for m in module.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    ddp.zero_grad()
    # the method's loss on this rank's share; DDP averages the gradients over the ranks
    loss = module.training_loss(xs, ys)["loss"]
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in ddp.module.named_parameters()
                    if p.grad is not None}, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bn_train", [False, True])
def test_ddp_gradient_equals_one_process_at_same_global_batch(tmp_path, bn_train):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out, bn_train), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    x, y = _batch()
    if bn_train:
        # plain BN (CPU has no SyncBatchNorm): each rank normalises with its own half's
        # statistics, so DDP equals the mean of the two half-batch gradients of one process
        halves = [_grads(_student(), x[i * 2:(i + 1) * 2], y[i * 2:(i + 1) * 2], True)
                  for i in range(2)]
        ref = {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}
    else:  # BN with running statistics: exactly the one-process full-batch gradient
        ref = _grads(_student(), x, y, False)
    assert set(ddp_grads) == set(ref) and len(ref) > 50
    for name, g in ref.items():
        torch.testing.assert_close(ddp_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_sync_batchnorm_conversion_of_bisenet():
    model = build_model("bisenet_r18", [16, 5]).eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert n_bn > 20
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    with torch.no_grad():  # in eval mode SyncBatchNorm is BatchNorm with the same buffers
        torch.testing.assert_close(synced(x).logits, before)


@pytest.mark.slow
def test_ddp_smoke_protocol_with_replay_rank0_writes_everything(tmp_path):
    """trainer=ddp on 2 CPU processes (gloo): the protocol finishes, both ranks train every
    step, and every file (caches, replay set, checkpoints, state, results) is written by rank 0
    (INCSEG_WRITE_LOG records the rank of each atomic write) but rank 1's share of the replay
    set: its batches, which rank 0 merges. That set is the one a single process makes from the
    same teacher, to the byte."""
    import json
    import subprocess
    import sys

    from incseg.checkpoints import load_model
    from incseg.config import compose
    from incseg.io import file_sha256
    from incseg.replay import InversionSettings, ensure_replay_set

    writes = tmp_path / "writes.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_MODE="disabled", INCSEG_WRITE_LOG=str(writes))
    run = tmp_path / "run"
    overrides = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "logger=none", "replay=deepinversion", "replay.verifier=none"]
    proc = subprocess.run(
        [sys.executable, "-m", "incseg.run", *overrides, f"hydra.run.dir={run}",
         f"paths.cache_dir={tmp_path / 'c'}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("step 1: old") == 2  # rank 0 and rank 1 both ran step 1
    # smoke: 15 old classes x 2 images in batches of 16: batch 0 on rank 0, batch 1 on rank 1
    assert proc.stderr.count("generating batch 1/2") == proc.stderr.count("generating batch 2/2")
    assert proc.stderr.count("waiting for rank 0") == 1  # rank 1, for the manifest
    # the ranks share one log stream: each line says which rank made the batch
    assert proc.stderr.count("generating batch 1/2 on rank 0 of 2") == 1
    assert proc.stderr.count("generating batch 2/2 on rank 1 of 2") == 1
    assert proc.stderr.count("waiting for rank 0 to write it on rank 1 of 2") == 1
    lines = [ln.split(" ", 1) for ln in writes.read_text().splitlines()]
    assert {rank for rank, _ in lines} == {"0", "1"}
    assert [os.path.basename(p) for rank, p in lines if rank == "1"] == ["batch_1.json"]
    assert all("/replay/." in p and p.endswith(".partial/batch_1.json")
               for rank, p in lines if rank == "1")
    paths = [p for _, p in lines]
    for name in ("results.json", "state.json", "step1.pt", "manifest.json"):
        assert any(p.endswith(name) for p in paths), name
    assert any("/step0/" in p for p in paths)  # the step-0 cache entry
    assert (run / "results.json").exists()
    # one process, same teacher (the DDP run's model 0) and settings: the same set
    replay = json.loads((run / "results.json").read_text())["steps"][1]["replay"]
    two = tmp_path / "c" / "replay" / os.path.basename(os.path.dirname(replay["path"]))
    cfg = compose(overrides)
    teacher = load_model(run / "checkpoints" / "step0.pt", cfg.model,
                         [list(range(16)), [16, 17, 18, 19, 20]], 0)
    one = ensure_replay_set(tmp_path / "one", teacher, list(range(1, 16)),
                            InversionSettings.from_dict(dict(cfg.inversion)),
                            class_ids=list(range(16)), progress=False)
    assert one.path.name == two.name
    for rec in one.records:
        for field in ("file", "mask"):
            assert file_sha256(two / rec[field]) == file_sha256(one.path / rec[field])
