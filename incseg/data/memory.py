"""A labelled exemplar memory (the "-M" setting of SSUL, PLOP-M and DKD-M): a few real
training images of the old classes kept *with their ground truth* and trained on again.

The pieces that need no run directory live here: the class-balanced selection, the labels a
memory image trains with, and the loaders that mix the memory into the step's batches. Which
images a run keeps at each step, and where it stores them, is :mod:`incseg.protocol.memory`.

Not to be confused with ``replay=exemplars`` (:mod:`incseg.replay.controls`): that control
replays real images *without* labels, scored by the frozen previous model.

- Selection (clovaai/SSUL ``utils/memory.py``, kept by cvlab-yonsei/DKD): the candidates are
  shuffled, so are the old foreground classes; in rounds over the classes each class takes the
  first remaining candidate that holds it, until the memory is full.
- Labels: ``seen`` (SSUL's memory dataset) keeps every class seen up to the step, in the
  step's channel order, and turns classes not seen yet into background; ``current`` (DKD's
  ``*IncrementalMemory`` datasets mask every label but the current classes, 0 and 255) is the
  step's own training labels, old classes background.
- Mixing: ``half`` (SSUL ``main.py``) puts ``batch_size // 2`` memory images in every batch in
  place of real ones, with as many batches as without memory; ``concat`` (DKD
  ``data_loaders.get_memory``) appends the memory to the step's dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import count

import numpy as np
from torch.utils.data import Dataset, Sampler

from incseg.data.dataset import SeededSampler
from incseg.tasks import IGNORE, Task

#: what a memory image's mask keeps (``memory.labels``)
MEMORY_LABELS = ("seen", "current")
#: how memory images enter the step's batches (``memory.mix``)
MEMORY_MIX = ("half", "concat")


def memory_lut(task: Task, step: int, labels: str = "seen",
               void_as_background: bool = True) -> np.ndarray:
    """Lookup table dataset id -> training label of a memory image at ``step``.

    ``seen``: every class seen up to ``step`` keeps its channel (old classes included),
    background and classes not seen yet -> 0. ``current``: the step's own ``train_lut``.
    Void (255) as the step's data has it (``void_as_background``).
    """
    if labels not in MEMORY_LABELS:
        raise ValueError(f"labels={labels!r} is not one of {', '.join(MEMORY_LABELS)}")
    if labels == "current":
        return task.train_lut(step, void_as_background)
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[: task.num_dataset_classes] = 0
    for i, c in enumerate(task.classes_seen(step)):
        lut[c] = i
    lut[IGNORE] = 0 if void_as_background else IGNORE
    return lut


def balanced_selection(candidates: Sequence[int], classes_of: Mapping[int, set[int]],
                       class_order: Sequence[int], size: int
                       ) -> tuple[list[int], dict[int, int]]:
    """Class-balanced round robin (SSUL's ``memory_sampling_balanced``).

    ``candidates`` in the order they are tried (the caller shuffles them), ``classes_of[i]``
    the old foreground classes of candidate ``i``, ``class_order`` the order of the rounds.
    Returns the chosen candidates in the order they were picked and the number picked for
    each class (by class id). Stops early (fewer than ``size``) only when no candidate is left
    that holds an old class; SSUL's loop would spin forever there.
    """
    pool = list(candidates)
    chosen: list[int] = []
    per_class = {int(c): 0 for c in sorted(class_order)}
    while len(chosen) < size:
        picked = False
        for c in class_order:
            j = next((j for j, i in enumerate(pool) if c in classes_of[i]), None)
            if j is None:
                continue
            chosen.append(pool.pop(j))
            per_class[int(c)] += 1
            picked = True
            if len(chosen) >= size:
                break
        if not picked:
            break
    return chosen, per_class


class JoinedDataset(Dataset):
    """The step's training images followed by the memory images: index ``i < len(real)`` is
    ``real[i]``, the rest ``memory[i - len(real)]``. Unlike ``ConcatDataset`` it takes the
    ``(index, seed)`` pairs of :class:`SeededSampler`, on which exact resume rests.

    ``flag_known``: each item gains a third element, True for a memory image: its labels are
    the ground truth of every class seen so far (``memory.labels=seen``), where a step image's
    background hides the old classes. A method that guesses the old classes in the background
    (PLOP's pseudo-labels) leaves such an image's labels as they are; the others ignore it.
    """

    def __init__(self, real: Dataset, memory: Dataset, flag_known: bool = False):
        self.real, self.memory = real, memory
        self.offset = len(real)
        self.flag_known = bool(flag_known)

    def __len__(self) -> int:
        return self.offset + len(self.memory)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        ds, index = (self.real, index) if index < self.offset else \
            (self.memory, index - self.offset)
        out = ds[index] if seed is None else ds[(index, seed)]
        if not self.flag_known:
            return out
        return (*out, ds is self.memory)


class HalfBatchSampler(Sampler):
    """SSUL's mixing as batches of :class:`JoinedDataset` indices: ``batch_size -
    batch_size // 2`` real images (in the order of ``real``, a :class:`SeededSampler`) then
    ``batch_size // 2`` memory images, cycling through the memory in reshuffled rounds.

    As many batches per epoch as the step has without memory (``len(real) // batch_size``):
    SSUL replaces half of each real batch, so an epoch sees about half of the step's images,
    another half each epoch. Every draw derives from (seed, step, epoch[, round]); Lightning
    sets the epoch on ``self.sampler``, the real images' sampler, and the memory follows it.
    Under DDP each rank takes its strided share of every memory round, like the real images.
    """

    def __init__(self, real: SeededSampler, memory_size: int, batch_size: int, seed: int,
                 step: int):
        if memory_size < 1:
            raise ValueError("the memory holds no image")
        self.sampler = real
        self.n_memory = batch_size // 2
        self.n_real = batch_size - self.n_memory
        self.batches = len(real) // batch_size
        self.memory_size, self.seed, self.step = memory_size, int(seed), int(step)
        self.offset = real.n  # memory indices follow the real ones in the JoinedDataset

    def __len__(self) -> int:
        return self.batches

    def _memory(self, epoch: int) -> Iterator[tuple[int, int]]:
        m, n, rank = self.memory_size, self.sampler.num_replicas, self.sampler.rank
        for rnd in count():
            rng = np.random.default_rng([self.seed, self.step, epoch, rnd])
            order = rng.permutation(m)
            seeds = rng.integers(0, 2**31 - 1, size=m)
            for i in np.resize(order, -(-m // n) * n)[rank::n]:
                yield self.offset + int(i), int(seeds[i])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        real = iter(self.sampler)
        memory = self._memory(self.sampler.epoch)
        for _ in range(self.batches):
            yield ([next(real) for _ in range(self.n_real)]
                   + [next(memory) for _ in range(self.n_memory)])


def mixed_sampler(real: Dataset, memory: Dataset, mix: str, batch_size: int, seed: int,
                  step: int, epoch: int, replicas: int = 1, rank: int = 0,
                  flag_known: bool = False) -> tuple[JoinedDataset, dict]:
    """The joined dataset (``flag_known``: see :class:`JoinedDataset`) and the DataLoader
    arguments (``sampler`` + ``batch_size`` + ``drop_last``, or ``batch_sampler``) of a step
    trained with its memory, starting at ``epoch`` (the memory stream's seed is the step's
    seed + 2; replay uses + 1)."""
    if mix not in MEMORY_MIX:
        raise ValueError(f"mix={mix!r} is not one of {', '.join(MEMORY_MIX)}")
    joined = JoinedDataset(real, memory, flag_known)
    if mix == "concat":
        sampler = SeededSampler(len(joined), seed, step, True, replicas, rank)
        sampler.set_epoch(epoch)
        return joined, {"sampler": sampler, "batch_size": batch_size, "drop_last": True}
    sampler = SeededSampler(len(real), seed, step, True, replicas, rank)
    sampler.set_epoch(epoch)
    batches = HalfBatchSampler(sampler, len(memory), batch_size, seed + 2, step)
    return joined, {"batch_sampler": batches}
