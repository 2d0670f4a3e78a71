"""LSE pooling with lower-bounded adaptation (LSE-LBA) from pixel logits to image-level scores.

Used by DeepInversion for segmentation (the paper's adaptation): the teacher's pixel logits are
pooled to one score per class so that an image-level CE can steer the synthesised image
towards a class.
``s_c = (logsumexp_{ij}(r_c z_{c,ij}) - log(HW)) / r_c`` interpolates between mean pooling
(``r -> 0``) and max pooling (``r -> inf``); ``r_c = r0 + exp(beta_c)`` keeps ``r_c > r0``
(the lower-bounded adaptation of Sun et al., ProNet, CVPR 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LSELBAPool", "lse_lba_pool"]


def lse_lba_pool(logits: Tensor, r: Tensor | float) -> Tensor:
    """Log-sum-exp pooling with a per-class sharpness.

    Args:
        logits: ``B x C x H x W`` pixel scores.
        r: positive sharpness, a float or a ``C`` tensor (one per class).

    Returns:
        ``B x C`` pooled scores (float32 for half-precision inputs),
        ``s_c = (logsumexp_{ij}(r_c z_{c,ij}) - log(H W)) / r_c``.

    Implementation: with ``m = max_{ij} z`` (a constant shift, so it is detached; the identity is
    exact for any shift), ``s = m + log(mean exp(r (z - m))) / r``. When that mean is close to 1
    (small ``r``: the mean-pooling limit) ``log`` is evaluated as ``log1p(mean(expm1(.)))`` so
    that dividing by a tiny ``r`` does not amplify rounding error; otherwise plain ``log`` is used
    (``mean >= 1/HW > 0``, so both branches and their gradients stay finite).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be B x C x H x W, got shape {tuple(logits.shape)}")
    z = logits.flatten(2)  # B x C x HW
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    r_t = torch.as_tensor(r, dtype=z.dtype, device=z.device)
    if r_t.dim() == 0:
        r_t = r_t.expand(z.shape[1])
    if r_t.shape != (z.shape[1],):
        raise ValueError(f"r must be a float or have shape [{z.shape[1]}], got {tuple(r_t.shape)}")
    if not bool((r_t > 0).all()):
        raise ValueError("r must be positive")
    r_t = r_t.view(1, -1, 1)
    shift = z.detach().amax(dim=2, keepdim=True)  # B x C x 1
    a = r_t * (z - shift)  # <= 0
    mean_exp = a.exp().mean(dim=2)  # B x C, in [1/HW, 1]
    near_one = torch.log1p(torch.expm1(a).mean(dim=2))
    log_mean = torch.where(mean_exp > 0.5, near_one, mean_exp.log())
    return shift.squeeze(2) + log_mean / r_t.squeeze(2)


class LSELBAPool(nn.Module):
    """``nn.Module`` wrapper of :func:`lse_lba_pool` with ``r_c = r0 + exp(beta_c)``.

    Args:
        num_classes: ``C``, channels of the pooled logits.
        r0: lower bound of the sharpness (config ``inversion.lse_r0`` in practice).
        beta_init: initial value of every ``beta_c``.
        learn_beta: if true ``beta`` is an ``nn.Parameter`` (learned with the images); otherwise
            a buffer (the default: ``r`` fixed by configuration).

    Shapes: ``B x C x H x W`` in, ``B x C`` out.
    """

    def __init__(
        self,
        num_classes: int,
        r0: float = 5.0,
        beta_init: float = 0.0,
        learn_beta: bool = False,
    ) -> None:
        super().__init__()
        if r0 < 0:
            raise ValueError(f"r0 must be >= 0, got {r0}")
        self.num_classes = int(num_classes)
        self.r0 = float(r0)
        beta = torch.full((self.num_classes,), float(beta_init))
        if learn_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    @property
    def r(self) -> Tensor:
        """``C`` sharpness ``r0 + exp(beta)`` (strictly above ``r0``)."""
        return self.r0 + self.beta.exp()

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected {self.num_classes} channels, got logits of shape {tuple(logits.shape)}"
            )
        return lse_lba_pool(logits, self.r)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, r0={self.r0}"
