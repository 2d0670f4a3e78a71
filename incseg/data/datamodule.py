"""The LightningDataModule of one incremental step: (dataset, task, step) -> loaders."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from incseg.data.base import Sample, Source
from incseg.data.dataset import SeededSampler, SegmentationDataset
from incseg.data.index import scan_labels, select_test, select_train
from incseg.data.memory import memory_lut, mixed_sampler
from incseg.data.transforms import eval_transform, train_transform
from incseg.errors import DataError
from incseg.tasks import IGNORE, Task

log = logging.getLogger(__name__)

#: ``data.ade_class0``: class 0 at evaluation (ADE20K's 0 is "other objects", not a class)
CLASS0_MODES = ("ignore", "score")
# data.val=none: the val loader is an empty list, which is how Lightning is told that there is
# nothing to validate; it warns about that list's length
warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")


def _single_threaded(worker_id: int) -> None:
    """Loader workers decode and augment; letting each also spawn a thread pool for torch and
    OpenCV oversubscribes the cores that the training step needs."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def step_selection(source: Source, task: Task, step: int, overlap: bool, cache: Path | None,
                   progress: bool = True) -> dict[str, list[int]]:
    """Indices into ``source.samples(split)`` for the training images of ``step`` and the
    evaluation images after it (val and test). Raises DataError for a step with no images."""
    train = select_train(scan_labels(source, "train", cache, progress), task, step, overlap)
    if not train:
        raise DataError(
            f"step {step} of task {task.name} (classes {task.classes_added(step)}) has no "
            f"training images in {source.name} (overlap={str(overlap).lower()}); use overlap=true "
            "or a split whose classes occur in the training set"
        )
    val = select_test(scan_labels(source, "val", cache, progress), task, step)
    test = select_test(scan_labels(source, "test", cache, progress), task, step)
    return {"train": train, "val": val, "test": test}


def check_steps(source: Source, task: Task, overlap: bool, cache: Path | None,
                batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Scan the dataset once and check every step of ``task`` before step 0 trains: a step
    with no training images (or fewer than one ``batch_size``) is a DataError now, not after
    the earlier steps have trained for hours. Returns per-step counts (what
    ``python -m incseg.data stats`` prints)."""
    train = scan_labels(source, "train", cache, progress)
    test = scan_labels(source, "test", cache, progress)
    scan_labels(source, "val", cache, progress)  # a broken val mask fails now, too
    steps = []
    for t in range(task.num_steps):
        n_train = len(select_train(train, task, t, overlap))
        if n_train == 0:
            raise DataError(
                f"step {t} of task {task.name} (classes {task.classes_added(t)}) has no "
                f"training images in {source.name} (overlap={str(overlap).lower()}); use "
                "overlap=true or a split whose classes occur in the training set"
            )
        if batch_size is not None and n_train < batch_size:
            # training batches are full (drop_last): fewer images than one batch train nothing
            raise DataError(
                f"step {t} of task {task.name} has {n_train} training image(s) in "
                f"{source.name}, fewer than one batch of {batch_size} (overlap="
                f"{str(overlap).lower()}); lower data.batch_size (at least 2), or use "
                "overlap=true or a split with more images per step"
            )
        steps.append({"step": t, "classes": task.classes_added(t), "train_images": n_train,
                      "test_images": len(select_test(test, task, t))})
    return steps


class IncrementalDataModule(L.LightningDataModule):
    """Loaders for one step of a task, following MiB's protocol (Cermelli et al., CVPR 2020;
    fcdl94/MiB).

    train: images selected for ``step`` (overlap/disjoint), labels remapped by
    ``task.train_lut``, shuffled by a :class:`SeededSampler`, last incomplete batch dropped
    (a BatchNorm after global pooling fails on a batch of one). val/test: images holding a seen
    foreground class, labels by ``task.test_lut``. ``replay_dataset`` (synthetic, noise or
    exemplar images, or None) is batched beside every real batch. ``memory`` (a labelled
    exemplar memory's samples, :mod:`incseg.data.memory`) trains with ``memory_labels`` and is
    mixed into the batches as ``memory_mix`` says; with ``seen`` labels the training batches
    are ``(images, labels, known)``, ``known`` (B bools) marking the memory images, whose
    labels hold every seen class.

    Which images are val is the source's validation policy (``source.val``, ``data.val``);
    ``val``, when given, must agree with it. With no val images there is no val loader, and
    Lightning validates nothing. ``ade_class0='ignore'`` makes class 0 unscored at val/test
    (255), MiB's ADE20K convention (fcdl94/MiB ``dataset/ade.py`` maps 0 to 255 when not
    training); ``'score'`` scores it as background, like every other dataset's 0.

    Under DDP the rank and world size are read from ``self.trainer`` when the loaders are
    built (Lightning attaches it; the Trainer runs with ``use_distributed_sampler=False`` so
    that it keeps our samplers); without a Trainer, or with one process, there is one replica.
    """

    def __init__(self, source: Source, task: Task, step: int, *, overlap: bool = True,
                 void_as_background: bool = True, unseen_as: str = "ignore", crop: int = 64,
                 test_mode: str = "full", batch_size: int = 16, eval_batch_size: int | None = None,
                 num_workers: int = 0, hflip: bool = True, rotation: float = 0.0,
                 color_jitter: float = 0.0, seed: int = 0, cache_dir: Path | None = None,
                 progress: bool = True, replay_dataset: Dataset | None = None,
                 val: str | None = None, ade_class0: str = "score",
                 memory: Sequence[Sample] | None = None, memory_labels: str = "seen",
                 memory_mix: str = "half"):
        super().__init__()
        if val is not None and str(val) != source.val:
            raise ValueError(f"val={val!r} differs from the source's validation policy "
                             f"{source.val!r}; build the source with it (make_source(..., val))")
        if ade_class0 not in CLASS0_MODES:
            raise ValueError(f"ade_class0={ade_class0!r} is not one of {', '.join(CLASS0_MODES)}")
        self.source, self.task, self.step = source, task, step
        self.overlap, self.seed, self.cache_dir, self.progress = overlap, seed, cache_dir, progress
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        if test_mode == "full" and source.name != "shapes":
            self.eval_batch_size = 1  # full images of different sizes cannot be stacked
        self.num_workers = num_workers
        self.train_lut = task.train_lut(step, void_as_background)
        self.test_lut = task.test_lut(step, unseen_as)
        if ade_class0 == "ignore":
            self.test_lut[0] = IGNORE
        self.train_tf = train_transform(crop, hflip, rotation, color_jitter)
        self.eval_tf = eval_transform(crop, test_mode)
        self.selection: dict[str, list[int]] | None = None
        #: images replayed beside every real batch (synthetic, noise or exemplars), or None
        self.replay_dataset = replay_dataset
        self.memory = list(memory or [])
        self.memory_lut = memory_lut(task, step, memory_labels, void_as_background)
        self.memory_labels = memory_labels
        self.memory_mix = memory_mix
        self.start_epoch = 0  # the epoch a resumed fit starts at (load_state_dict)

    def setup(self, stage: str | None = None) -> None:
        if self.selection is not None:
            return
        self.selection = step_selection(self.source, self.task, self.step, self.overlap,
                                        self.cache_dir, self.progress)
        log.info("step %d: %d training, %d val, %d test images", self.step,
                 len(self.selection["train"]), len(self.selection["val"]),
                 len(self.selection["test"]))

    def dataset(self, split: str) -> SegmentationDataset:
        self.setup()
        samples = self.source.samples(split)
        chosen = [samples[i] for i in self.selection[split]]
        if split == "train":
            return SegmentationDataset(chosen, self.train_lut, self.train_tf)
        return SegmentationDataset(chosen, self.test_lut, self.eval_tf)

    def _loader(self, dataset, batch_size=1, sampler=None, drop_last=False,
                batch_sampler=None) -> DataLoader:
        if batch_sampler is not None:  # the memory's half-and-half batches
            how = {"batch_sampler": batch_sampler}
        else:
            how = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
        return DataLoader(dataset, shuffle=False, **how, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          worker_init_fn=_single_threaded, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if len(ds) < self.batch_size * self._replicas()[0]:
            raise DataError(
                f"step {self.step} has {len(ds)} training images, fewer than one batch of "
                f"{self.batch_size}; lower data.batch_size"
            )
        replicas, rank = self._replicas()
        if self.memory:
            mem = SegmentationDataset(self.memory, self.memory_lut, self.train_tf)
            # with `seen` labels a memory image's labels are its ground truth: the batches
            # say which images those are (``(images, labels, known)``)
            joined, how = mixed_sampler(ds, mem, self.memory_mix, self.batch_size, self.seed,
                                        self.step, self.start_epoch, replicas, rank,
                                        flag_known=self.memory_labels == "seen")
            real = self._loader(joined, **how)
        else:
            sampler = SeededSampler(len(ds), self.seed, self.step, True, replicas, rank)
            sampler.set_epoch(self.start_epoch)
            real = self._loader(ds, self.batch_size, sampler, drop_last=True)
        if self.replay_dataset is None:
            return real
        from lightning.pytorch.utilities import CombinedLoader

        # One synthetic batch per real batch (1:1, the paper); the replay set cycles.
        rs = SeededSampler(len(self.replay_dataset), self.seed + 1, self.step, True,
                           replicas, rank)
        rs.set_epoch(self.start_epoch)
        replay = self._loader(self.replay_dataset, min(self.batch_size, len(self.replay_dataset)),
                              rs, drop_last=True)
        return CombinedLoader({"real": real, "replay": replay}, mode="max_size_cycle")

    # ---- exact resume with loader workers ---------------------------------------------------
    # Lightning creates the train loader's iterator when it sets its data up, before it calls
    # set_epoch, and reuses it for the first epoch it runs; with loader workers that iterator
    # prefetches its order at once. A run resumed at epoch e would thus train epoch e on epoch
    # 0's order and augmentations. The epoch checkpoint carries the epoch to resume at, and
    # the samplers start there.
    def state_dict(self) -> dict:
        # saved by EpochCheckpoint at the end of an epoch: the next one is where a resume starts
        trainer = getattr(self, "trainer", None)
        return {"start_epoch": int(trainer.current_epoch) + 1 if trainer is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch = int(state.get("start_epoch", 0))

    def _replicas(self) -> tuple[int, int]:
        """(number of ranks, this rank): the Trainer's under DDP, else (1, 0)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        n, rank = self._replicas()
        # Under DDP each rank scores every n-th image (no padding: a duplicate would be counted
        # twice) and the confusion matrices are summed across ranks: the exact single-process
        # numbers.
        sampler = list(range(rank, len(ds), n)) if n > 1 else None
        return self._loader(ds, self.eval_batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if not self.selection["val"]:  # data.val=none (or no val image holds a seen class)
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
