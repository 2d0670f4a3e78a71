"""Incremental classifier heads: one 1x1 conv per learning step, concatenated in step order."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["IncrementalHead", "check_classes_per_step"]


def check_classes_per_step(classes_per_step: Sequence[int]) -> list[int]:
    """Return ``classes_per_step`` as a list of positive ints (accepts OmegaConf ListConfig)."""
    try:
        out = [int(c) for c in classes_per_step]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"classes_per_step must be a list of positive ints, got {classes_per_step!r}"
        ) from e
    if not out or any(c < 1 for c in out):
        raise ValueError(f"classes_per_step must be a non-empty list of positive ints, got {out}")
    return out


class IncrementalHead(nn.Module):
    """A growing pixel classifier: ``convs[t]`` scores the classes introduced at step t.

    Input B x in_ch x h x w -> logits B x sum(classes_per_step) x h x w. Channel k is the k-th
    class in task order (step 0 holds background at channel 0), as in MiB's ``cls`` ModuleList,
    so old logits keep their channel indices when a step is added.
    """

    def __init__(self, in_ch: int, classes_per_step: Sequence[int]):
        super().__init__()
        self.in_ch = int(in_ch)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.in_ch, n, 1, bias=True) for n in check_classes_per_step(classes_per_step)
        )

    @property
    def classes_per_step(self) -> list[int]:
        return [c.out_channels for c in self.convs]

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def forward(self, x: Tensor) -> Tensor:
        """B x in_ch x h x w -> B x num_classes x h x w."""
        return torch.cat([conv(x) for conv in self.convs], dim=1)

    def add_step(self, n_new: int) -> nn.Conv2d:
        """Append a conv for `n_new` new classes (on the head's device/dtype) and return it."""
        if int(n_new) < 1:
            raise ValueError(f"a step must add at least one class, got {n_new}")
        ref = self.convs[0].weight
        conv = nn.Conv2d(self.in_ch, int(n_new), 1, bias=True).to(ref.device, ref.dtype)
        self.convs.append(conv)
        return conv

    @torch.no_grad()
    def init_balanced(self, n_new: int | None = None) -> None:
        """MiB's classifier initialisation of the last step (Cermelli et al., CVPR 2020, Sec. 3.4).

        At step t the old model's background absorbs the new classes, so each new class and
        the background start from the old background score split evenly:
        w_new = w_bg, b_new = b_bg - log(N_new + 1), and b_bg <- b_bg - log(N_new + 1).
        Then softmax gives background and every new class p_bg_old / (N_new + 1), and every old
        foreground class exactly its old probability.
        """
        if len(self.convs) < 2:
            raise ValueError("init_balanced needs a step after step 0 (call add_step first)")
        last, first = self.convs[-1], self.convs[0]
        if n_new is not None and int(n_new) != last.out_channels:
            raise ValueError(
                f"init_balanced(n_new={n_new}) but the last step has {last.out_channels} classes"
            )
        n = last.out_channels
        b_bg = first.bias[0].clone()  # the background bias before it is lowered below
        new_bias = b_bg - math.log(n + 1)
        last.weight.copy_(first.weight[0:1].expand_as(last.weight))
        last.bias.copy_(new_bias.expand_as(last.bias))
        first.bias[0] = new_bias
