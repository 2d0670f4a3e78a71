"""Generate a replay set once and cache it: :func:`ensure_replay_set`.

Filling is resumable batch by batch, because a DeepInversion set takes long enough on a CPU to
be interrupted: batches are written into ``<cache>/replay/.<key>.partial/`` and each one is
committed by an atomic ``batch_<k>.json`` marker written after its PNGs; a rerun regenerates
only the batches without a valid marker (a batch's images depend only on the seed and its
index, so the result equals an uninterrupted run). When every batch is done the manifest is
written last and the folder renamed to its final name (``os.replace``). Everything happens under
:func:`incseg.io.entry_lock`.

Under DDP the ranks share the work (:func:`shard_batches`: rank r makes the batches k with
k % world_size == r) and write them into the same partial folder; rank 0 holds the lock, waits
until every batch has a valid marker and writes the manifest. The waits poll the files rather
than meet at a collective barrier: a rank with one batch more than the others can take hours at
the paper's scale, longer than a process group's timeout. So that such a wait still ends when
the rank it waits for has died, every rank refreshes a heartbeat (``.<key>.rank<r>.heartbeat``
beside the entry) while it makes its share, and a waiter gives up once the heartbeat has gone
silent (:mod:`incseg.heartbeat`). Batches are seeded by their index, never by the rank, so the
set does not depend on the number of processes.

Teacher figures are measured on the stored (uint8-quantised) images, which is what the student
replays; the verifier (an independent model that knows all old classes, evaluation only) likewise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from incseg.errors import CheckpointError
from incseg.heartbeat import Heartbeat, wait_for
from incseg.io import atomic_write_json, entry_lock
from incseg.replay.batch_files import read_marker, write_batch
from incseg.replay.controls import generator_settings
from incseg.replay.settings import InversionSettings, batch_plan, from_uint8
from incseg.replay.store import (
    FORMAT,
    ReplaySet,
    check_kind,
    discard,
    expected_settings,
    log,
    read_png,
    replay_key,
    teacher_fingerprint,
    verify_entry,
)
from incseg.replay.synthesis import synthesise
from incseg.replay.verdicts import (
    device_of,
    verifier_accuracy,
    verifier_predictions,
)

__all__ = ["ensure_replay_set", "shard_batches"]

#: seconds between two looks at files another rank is writing
POLL_S = 2.0


def shard_batches(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches of a set of ``n_batches`` that ``rank`` of ``world_size`` makes: every
    ``world_size``-th from ``rank`` (round robin, so the ranks' shares differ by one batch at
    most and each rank's first batch comes first)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} processes")
    return list(range(rank, n_batches, world_size))


def ensure_replay_set(
    cache: Path,
    teacher: nn.Module,
    targets: Sequence[int],
    settings: InversionSettings,
    *,
    kind: str = "deepinversion",
    class_ids: Sequence[int] | None = None,
    student: nn.Module | None = None,
    verifier: nn.Module | None = None,
    verifier_channel_of: Mapping[int, int] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    trainer: Callable[[int], Any] | None = None,
    fill: bool = True,
    rank: int = 0,
    world_size: int = 1,
    name: str | None = None,
) -> ReplaySet:
    """The replay set of ``teacher`` for ``targets``, generated once and cached.

    Args:
        cache: the cache directory (the entry is ``cache/replay/<key>``).
        teacher: frozen model of the previous step.
        targets: channels of the old foreground classes (``1..C_o-1``).
        settings: :class:`InversionSettings`.
        kind: "deepinversion", or "noise" for the noise control
            (:func:`~incseg.replay.controls.generator_settings`); part of the key.
        class_ids: dataset class id of every teacher channel (indexed by channel; names and the
            manifest); default: the channel itself.
        student: optional competition student (Adaptive DeepInversion; part of the key);
            "deepinversion" only.
        verifier: optional independent model that knows all old classes (evaluation only).
        verifier_channel_of: teacher channel -> verifier channel (default identity).
        progress: tqdm bars on stderr.
        device: where to optimise (default: the teacher's device).
        trainer: ``k -> lightning.Trainer`` fitting batch ``k`` (default: a plain one on
            ``device``; :func:`~incseg.replay.synthesis.synthesise`).
        fill: generate a missing entry (false: wait until another process has written it).
        rank, world_size: this process's share of the generation (:func:`shard_batches`); rank 0
            finishes the entry, the others wait for it.
        name: this process in the lines of a wait (default "rank r of N").
    """
    shard_batches(0, rank, world_size)  # a valid share
    check_kind(kind)
    if kind == "noise" and student is not None:
        raise ValueError("a noise replay set has no competition student; pass student=None")
    targets = [int(t) for t in targets]
    if class_ids is None:
        class_ids = list(range(max(targets) + 1))
    class_ids = [int(c) for c in class_ids]
    if max(targets) >= len(class_ids):
        raise ValueError(f"class_ids has {len(class_ids)} entries; it needs one per teacher "
                          f"channel up to {max(targets)}")
    class_of = {t: class_ids[t] for t in targets}
    key = replay_key(teacher, settings, targets, class_ids=class_ids, student=student, kind=kind)
    root = Path(cache) / "replay"
    final = root / key
    work = root / f".{key}.partial"
    settings_dict = expected_settings(settings, student is not None)
    plan = batch_plan(targets, settings)
    n_total = sum(len(b) for b in plan)
    if device is None:
        device = device_of(teacher)

    job = _Job(work, key, kind, teacher, targets, plan, settings, class_of, student, verifier,
               progress and rank == 0, device, trainer, world_size,
               name or (f"rank {rank} of {world_size}" if world_size > 1 else f"rank {rank}"))
    manifest = verify_entry(final, key, settings_dict, n_total, warn=False)
    if manifest is None and fill and rank > 0:
        with Heartbeat(job.heartbeat(rank)):
            _make_batches(job, shard_batches(len(plan), rank, world_size), final,
                          _on_rank(rank, world_size))
    if manifest is None and (not fill or rank > 0):
        # rank 0 finishes the entry; polled, not a collective (no barrier timeout), and given
        # up when rank 0's heartbeat goes silent
        log.info("replay set %s: waiting for rank 0 to write it%s", key,
                 _on_rank(rank, world_size))

        def written() -> dict[str, Any] | None:
            if not (final / "manifest.json").is_file():
                return None
            return verify_entry(final, key, settings_dict, n_total, warn=False)

        manifest = wait_for(written, waiter=job.name, target=final / "manifest.json",
                            writers=lambda: {"rank 0": job.heartbeat(0)}, poll=POLL_S)
    if manifest is None:
        # the heartbeat beats while this process waits for the lock too: a waiting rank then
        # sees either this process or the lock's holder (another job, also a rank 0) alive
        with Heartbeat(job.heartbeat(0)), entry_lock(final):
            manifest = verify_entry(final, key, settings_dict, n_total)
            if manifest is None:
                discard(final)
                markers = _make_batches(job, shard_batches(len(plan), 0, world_size), final,
                                        _on_rank(0, world_size))
                markers.update(_collect(job, [k for k in range(len(plan)) if k not in markers]))
                manifest = _write_manifest(job, final, settings_dict,
                                           [markers[k] for k in range(len(plan))])
                return _finish(final, manifest, settings, verifier, verifier_channel_of)
    log.info("replay set cache hit: %s (%d images, not regenerated)", final, n_total)
    return _finish(final, manifest, settings, verifier, verifier_channel_of)


class _Job(NamedTuple):
    """What every batch of one replay set is made from."""

    work: Path
    key: str
    kind: str
    teacher: nn.Module
    targets: list[int]
    plan: list[list[int]]
    settings: InversionSettings
    class_of: Mapping[int, int]
    student: nn.Module | None
    verifier: nn.Module | None
    progress: bool
    device: Any
    trainer: Callable[[int], Any] | None
    world_size: int
    name: str  # this process, in the lines of a wait

    def first(self, k: int) -> int:
        """Number of the first image of batch ``k``."""
        return sum(len(b) for b in self.plan[:k])

    def heartbeat(self, rank: int) -> Path:
        """The file ``rank`` refreshes while it makes its share of this set: beside the entry,
        not in the partial folder, which is renamed into the entry when it is complete."""
        return self.work.parent / f".{self.key}.rank{rank}.heartbeat"


def _on_rank(rank: int, world_size: int) -> str:
    """' on rank r of N' under DDP: the ranks log to one stream, and the lines must say which
    rank made which batch. Empty for one process."""
    return f" on rank {rank} of {world_size}" if world_size > 1 else ""


def _make_batches(job: _Job, batches: Sequence[int], final: Path,
                  where: str = "") -> dict[int, dict[str, Any]]:
    """Make (or find valid) the given batches in the partial folder; their markers by index.
    Stops early when the finished entry has appeared meanwhile (another job made it)."""
    (job.work / "images").mkdir(parents=True, exist_ok=True)
    (job.work / "teacher_masks").mkdir(parents=True, exist_ok=True)
    gen_settings = generator_settings(job.kind, job.settings)
    if gen_settings.adaptive and gen_settings.iterations_low + gen_settings.iterations_full:
        return _make_adaptive(job, gen_settings, batches, final, where)
    markers: dict[int, dict[str, Any]] = {}
    for k in batches:
        batch = job.plan[k]
        marker = read_marker(job.work, k, job.key, batch, job.settings.image_size)
        if marker is None:
            if (final / "manifest.json").is_file():
                break
            (job.work / f"batch_{k}.json").unlink(missing_ok=True)  # never read while rewritten
            log.info("replay set %s: generating batch %d/%d%s", job.key, k + 1, len(job.plan),
                     where)
            images, info = synthesise(job.teacher, job.targets, gen_settings,
                                      student=job.student, progress=job.progress,
                                      device=job.device, batches=[k], trainer=job.trainer)
            if images.shape[0] != len(batch):
                raise CheckpointError(f"generator returned {images.shape[0]} images for batch "
                                      f"{k} of {len(batch)}")
            rec = info["batches"][0] if info.get("batches") else None
            marker = write_batch(job.work, k, job.key, images, batch, job.first(k), job.teacher,
                                  job.settings, job.class_of, rec, job.verifier)
        markers[k] = marker
    return markers


def _make_adaptive(job: _Job, settings: InversionSettings, batches: Sequence[int], final: Path,
                   where: str = "") -> dict[int, dict[str, Any]]:
    """:func:`_make_batches` with the adaptive budget: the missing batches' images share the
    optimisation slots, and each batch is committed as soon as its last image is done."""
    from incseg.replay.batching import synthesise_stream

    markers: dict[int, dict[str, Any]] = {}
    missing = []
    for k in batches:
        marker = read_marker(job.work, k, job.key, job.plan[k], job.settings.image_size)
        if marker is None:
            (job.work / f"batch_{k}.json").unlink(missing_ok=True)
            missing.append(k)
        else:
            markers[k] = marker
    if not missing or (final / "manifest.json").is_file():
        return markers
    log.info("replay set %s: generating batches %s of %d (adaptive budget)%s", job.key,
             ", ".join(str(k + 1) for k in missing), len(job.plan), where)
    stream = synthesise_stream(job.teacher, job.targets, settings, student=job.student,
                               progress=job.progress, device=job.device, batches=missing)
    try:
        for k, images, rec in stream:
            markers[k] = write_batch(job.work, k, job.key, images, job.plan[k], job.first(k),
                                      job.teacher, job.settings, job.class_of, rec, job.verifier)
            if (final / "manifest.json").is_file():
                break
    finally:
        stream.close()
    return markers


def _collect(job: _Job, pending: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Wait for the other ranks' batches: their valid markers by index. Batch k comes from
    rank k % world_size (:func:`shard_batches`); the wait ends with :class:`PeerLost` when the
    heartbeat of a rank whose batches are still missing goes silent."""
    markers: dict[int, dict[str, Any]] = {}
    pending = list(pending)
    if not pending:
        return markers
    log.info("replay set %s: waiting for batches %s from the other ranks", job.key, pending)

    def all_there() -> dict[int, dict[str, Any]] | None:
        for k in list(pending):
            marker = read_marker(job.work, k, job.key, job.plan[k], job.settings.image_size,
                                  warn=False)
            if marker is not None:
                markers[k] = marker
                pending.remove(k)
        return None if pending else markers

    def writers() -> dict[str, Path]:
        ranks = sorted({k % job.world_size for k in pending})
        return {f"rank {r}": job.heartbeat(r) for r in ranks}

    return wait_for(all_there, waiter=job.name, writers=writers, poll=POLL_S,
                    target=f"{job.work / 'batch_<k>.json'} for k in {pending}")


def _common_verifier(markers: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The verifier of the stored predictions when every batch used the same one."""
    fps = {m.get("verifier") for m in markers}
    if len(fps) != 1 or None in fps:
        return None
    return {"fingerprint": fps.pop()}


def _write_manifest(job: _Job, final: Path, settings_dict: dict[str, Any],
                    markers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The manifest over every batch's marker, written last; the folder then takes its final
    name."""
    records = [r for m in markers for r in m["images"]]
    hits = sum(int(r["teacher_pred"] == r["target"]) for r in records)
    manifest = {
        "format": FORMAT,
        "key": job.key,
        "kind": job.kind,
        "settings": settings_dict,
        "teacher": teacher_fingerprint(job.teacher),
        "student": teacher_fingerprint(job.student) if job.student is not None else None,
        "image_size": job.settings.image_size,
        "count": len(records),
        "class_ids": {str(t): c for t, c in job.class_of.items()},
        "teacher_accuracy": hits / len(records) if records else 0.0,
        "verifier": _common_verifier(markers),
        "batches": [{k: m[k] for k in ("batch", "count", "start_loss", "final_loss",
                                       "best_loss", "iterations", "seconds")} for m in markers],
        "images": records,
    }
    atomic_write_json(job.work / "manifest.json", manifest)
    os.replace(job.work, final)
    log.info("replay set %s written (%d images, teacher accuracy %.3f)", final, len(records),
             manifest["teacher_accuracy"])
    return manifest


def _finish(final: Path, manifest: dict[str, Any], settings: InversionSettings,
            verifier: nn.Module | None, channel_of: Mapping[int, int] | None) -> ReplaySet:
    rs = ReplaySet(final, manifest)
    if verifier is None:
        return rs
    stored = manifest.get("verifier") or {}
    preds = [r.get("verifier_pred") for r in rs.records]
    if stored.get("fingerprint") != teacher_fingerprint(verifier) or None in preds:
        log.info("replay set %s: evaluating the stored images with the given verifier", final)
        # A different verifier than at generation: evaluate the stored images now (read-only).
        images = from_uint8([read_png(f) for f in rs.image_files])
        preds = verifier_predictions(verifier, images, settings.lse_r)
    rs.verifier_accuracy = verifier_accuracy(preds, rs.targets, channel_of)
    return rs
