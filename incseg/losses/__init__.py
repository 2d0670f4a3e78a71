"""Loss functions: segmentation CE (plain/unbiased), distillation, replay and DeepInversion terms.

All are plain functions of tensors (plus one hook helper), shapes documented on each.
"""

from incseg.losses.distillation import (
    REPLAY_LOSSES,
    feature_distillation,
    knowledge_distillation,
    old_view,
    replay_kl,
    replay_loss,
    replay_mse,
    replay_sigmoid_kl,
    replay_sigmoid_mse,
    unbiased_knowledge_distillation,
)
from incseg.losses.inversion import (
    BNStatisticsHook,
    bn_layer_distance,
    bn_statistics_loss,
    competition_loss,
    image_priors,
    sigmoid_class_objective,
)
from incseg.losses.segmentation import (
    REDUCTIONS,
    bisenet_loss,
    cross_entropy,
    unbiased_cross_entropy,
)

__all__ = [
    "REDUCTIONS",
    "REPLAY_LOSSES",
    "BNStatisticsHook",
    "bisenet_loss",
    "bn_layer_distance",
    "bn_statistics_loss",
    "competition_loss",
    "cross_entropy",
    "feature_distillation",
    "image_priors",
    "sigmoid_class_objective",
    "knowledge_distillation",
    "old_view",
    "replay_kl",
    "replay_loss",
    "replay_mse",
    "replay_sigmoid_kl",
    "replay_sigmoid_mse",
    "unbiased_cross_entropy",
    "unbiased_knowledge_distillation",
]
