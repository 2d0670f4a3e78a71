"""Replay for class-incremental segmentation: images of the old classes shown to the student.

- :mod:`~incseg.replay.settings`: :class:`InversionSettings` and the pixel space (normalise,
  denormalise, clamp, quantise to the stored uint8).
- :mod:`~incseg.replay.generator`: DeepInversion (Yin et al., CVPR 2020) for a segmentation
  teacher, one batch: :class:`InversionModule`; :mod:`~incseg.replay.schedule`: its learning
  rate and best iterate; :mod:`~incseg.replay.synthesis`: a set's batches, each fitted by a
  Lightning Trainer: :func:`synthesise`. :mod:`~incseg.replay.adaptive`: the adaptive budget
  (each image stops when done, in refilled batches); :mod:`~incseg.replay.batching`: its batch
  size (``auto``) and a set's batches through it.
- :mod:`~incseg.replay.verdicts`: what a frozen teacher or verifier predicts for an image.
- :mod:`~incseg.replay.store` / :mod:`~incseg.replay.fill`: replay sets cached under a content
  key, verified on read, filled resumably: :func:`ensure_replay_set`.
- :mod:`~incseg.replay.controls`: the noise (lower bound) and real-exemplar (upper bound) controls.
- :mod:`~incseg.replay.figures`: :func:`class_grid`.
"""

from incseg.replay.controls import exemplar_dataset
from incseg.replay.figures import class_grid
from incseg.replay.fill import ensure_replay_set
from incseg.replay.generator import InversionModule, LossParts
from incseg.replay.schedule import BestIterate, cosine_warmup_lr
from incseg.replay.settings import (
    InversionSettings,
    batch_plan,
    clamp_normalised,
    denormalise,
    normalise,
    pixel_range,
    quantise,
)
from incseg.replay.store import KINDS, ReplayDataset, ReplaySet, replay_key, teacher_fingerprint
from incseg.replay.synthesis import inversion_trainer, synthesise
from incseg.replay.verdicts import (
    frozen,
    image_level_logits,
    model_logits,
    teacher_verdicts,
    verifier_predictions,
)

__all__ = [
    "KINDS",
    "BestIterate",
    "InversionModule",
    "InversionSettings",
    "LossParts",
    "ReplayDataset",
    "ReplaySet",
    "batch_plan",
    "clamp_normalised",
    "class_grid",
    "cosine_warmup_lr",
    "denormalise",
    "ensure_replay_set",
    "exemplar_dataset",
    "frozen",
    "image_level_logits",
    "inversion_trainer",
    "model_logits",
    "normalise",
    "pixel_range",
    "quantise",
    "replay_key",
    "synthesise",
    "teacher_fingerprint",
    "teacher_verdicts",
    "verifier_predictions",
]
