"""Model zoo: BiSeNet V1 with ResNet-18/50/101 context paths and incremental heads."""

from incseg.models.backbones import ResNetBackbone
from incseg.models.bisenet import MODELS, BiSeNet, SegOutput, build_model
from incseg.models.heads import IncrementalHead
from incseg.models.pooling import LSELBAPool, lse_lba_pool

__all__ = [
    "MODELS", "BiSeNet", "IncrementalHead", "LSELBAPool", "ResNetBackbone", "SegOutput",
    "build_model", "lse_lba_pool",
]
