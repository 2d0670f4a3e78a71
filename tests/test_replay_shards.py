"""A replay set made by several processes together (DDP): rank r makes the batches k with
k % world_size == r into the shared partial folder, rank 0 writes the manifest; the set is the
one a single process makes, to the byte."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp

import incseg.replay.fill as fill
from incseg.io import file_sha256
from incseg.replay import ensure_replay_set
from incseg.replay.fill import shard_batches
from tests.test_inversion import Toy, small

torch.set_num_threads(1)

TARGETS = [1, 2, 3]
SETTINGS = dict(n_per_class=3, batch_size=2)  # 9 images: batches of 2, 2, 2, 2, 1


def fingerprint(rs) -> dict:
    """Key, manifest records and the bytes of every PNG (what a reader of the set gets)."""
    files = {str(f.relative_to(rs.path)): file_sha256(f)
             for f in sorted(rs.image_files + rs.mask_files)}
    images = [dict(r) for r in rs.records]
    batches = [{k: b[k] for k in ("batch", "count", "iterations", "final_loss", "best_loss")}
               for b in rs.manifest["batches"]]
    return {"key": rs.key, "files": files, "images": images, "batches": batches,
            "teacher_accuracy": rs.teacher_accuracy}


def one_process(cache) -> dict:
    return fingerprint(ensure_replay_set(cache, Toy(), TARGETS, small(**SETTINGS),
                                         progress=False))


def ranks_in_threads(cache, world: int) -> list:
    """Every rank in a thread of this process, each with its own copy of the teacher (the BN
    hooks of one rank must not see another's passes), as separate processes would."""
    results: list = [None] * world
    errors: list = []
    # built here: Toy() seeds the global RNG, which the threads would share
    teachers = [Toy() for _ in range(world)]

    def rank(r: int) -> None:
        try:
            results[r] = ensure_replay_set(cache, teachers[r], TARGETS, small(**SETTINGS),
                                           progress=False, rank=r, world_size=world)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


@pytest.fixture
def made_by(monkeypatch):
    """Which rank (thread) generated which batch."""
    calls: dict[str, list[int]] = {}
    real = fill.synthesise
    monkeypatch.setattr(fill, "POLL_S", 0.05)

    def record(*a, **k):
        calls.setdefault(threading.current_thread().name, []).extend(k["batches"])
        return real(*a, **k)

    monkeypatch.setattr(fill, "synthesise", record)
    return calls


def test_which_rank_makes_which_batch():
    assert shard_batches(5, 0, 2) == [0, 2, 4] and shard_batches(5, 1, 2) == [1, 3]
    assert shard_batches(5, 0, 1) == [0, 1, 2, 3, 4]
    assert shard_batches(2, 2, 3) == []  # more ranks than batches: nothing to do
    for n, world in ((7, 3), (8, 4), (1, 2)):
        shares = [shard_batches(n, r, world) for r in range(world)]
        assert sorted(k for s in shares for k in s) == list(range(n))  # each batch once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            shard_batches(4, rank, world)


def test_two_ranks_make_the_one_process_set_and_rank0_merges_the_manifest(tmp_path, made_by):
    want = one_process(tmp_path / "one")
    made_by.clear()
    sets = ranks_in_threads(tmp_path / "two", 2)
    assert made_by == {"rank0": [0, 2, 4], "rank1": [1, 3]}
    assert sets[0].path == sets[1].path and fingerprint(sets[1]) == fingerprint(sets[0])
    got = fingerprint(sets[0])
    assert got == want
    # the merged manifest: every batch in order, images numbered 0..8 across the ranks' batches
    manifest = json.loads((sets[0].path / "manifest.json").read_text())
    assert [b["batch"] for b in manifest["batches"]] == [0, 1, 2, 3, 4]
    assert [r["index"] for r in manifest["images"]] == list(range(9))
    assert [r["batch"] for r in manifest["images"]] == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert not (tmp_path / "two" / "replay" / f".{got['key']}.partial").exists()


def test_a_corrupt_shard_is_regenerated_never_used(tmp_path, made_by, monkeypatch, caplog):
    """Every batch was made but the manifest never written (rank 0 died); then one batch's PNG
    is truncated and another's marker garbled: the rerun makes exactly those two again, each by
    its rank, and the set equals a fresh one."""
    want = one_process(tmp_path / "fresh")
    real_manifest = fill._write_manifest

    def die(*a, **k):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(fill, "_write_manifest", die)
    with pytest.raises(RuntimeError, match="killed"):
        one_process(tmp_path / "cache")
    monkeypatch.setattr(fill, "_write_manifest", real_manifest)
    work = tmp_path / "cache" / "replay" / f".{want['key']}.partial"
    assert sorted(p.name for p in work.glob("batch_*.json")) == [
        f"batch_{k}.json" for k in range(5)]
    made_by.clear()
    png = work / "images" / "000003.png"  # batch 1 (images 2, 3): rank 1's
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (work / "batch_2.json").write_text('{"key": "')  # rank 0's
    with caplog.at_level("WARNING", logger="incseg.replay"):
        sets = ranks_in_threads(tmp_path / "cache", 2)
    assert made_by == {"rank0": [2], "rank1": [1]}
    assert "partial replay batch 1" in caplog.text and "partial replay batch 2" in caplog.text
    assert fingerprint(sets[0]) == want


# ---------------------------------------------------------------------------------------------
# Real processes (gloo): the ranks come from the process group, as in a DDP run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    from incseg.protocol.replay_sets import generation_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fill.POLL_S = 0.1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    made: list[int] = []
    real = fill.synthesise
    fill.synthesise = lambda *a, **k: made.extend(k["batches"]) or real(*a, **k)
    r, w, do_fill = generation_ranks()
    assert (r, w, do_fill) == (rank, world, True)
    rs = ensure_replay_set(cache, Toy(), TARGETS, small(**SETTINGS), progress=False,
                           rank=r, world_size=w)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"made": made, "fingerprint": fingerprint(rs)}, fh)
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_processes_make_the_one_process_set(tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_gloo_rank, args=(2, _free_port(), str(tmp_path / "two"), out), nprocs=2,
             join=True)
    want = json.loads(json.dumps(one_process(tmp_path / "one")))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got["made"] == shard_batches(5, rank, 2) and got["fingerprint"] == want
