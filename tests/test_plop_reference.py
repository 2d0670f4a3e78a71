"""PLOP as its reference computes it (arthurdouillard/CVPR2021_PLOP): POD on each stage's
pre-activation output and on the logits before upsampling, read through the model contract's
optional features; and PLOP-M's labelled memory, whose ground truth is never pseudo-labelled.
Formulas against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from incseg.data.memory import JoinedDataset
from incseg.losses.pod import pod_distance
from incseg.losses.pseudo_labels import adaptive_factor, pseudo_label
from incseg.methods.base import Batch, StepContext
from incseg.methods.plop import PLOP
from incseg.models import BiSeNet, DeepLabV3, SegOutput, model_output
from incseg.models.backbones import residual_sum


# ---- POD on hand-made maps ---------------------------------------------------------------------
def test_pod_on_a_4x4_map_hand_computed():
    """One pixel of value v at the top-left corner of a 4 x 4 map against zeros: its square
    shows in 2 + 2 + 2 pooled values, v²/4 (scale 1: row 0 and column 0 over 4 pixels), v²/2
    (scale 2: the top-left 2 x 2 region) and v² (scale 4: its own 1 x 1 region)."""
    zeros = torch.zeros(1, 1, 4, 4)
    one = zeros.clone()
    one[0, 0, 0, 0] = 1.0
    per_unit = math.sqrt(2 * 0.25**2 + 2 * 0.5**2 + 2 * 1.0**2)  # sqrt(2.625)
    assert pod_distance(zeros, one).item() == pytest.approx(per_unit)
    # a negative pre-activation counts by its square; its ReLU (0) would leave nothing to distil
    neg = -2.0 * one
    assert pod_distance(zeros, neg).item() == pytest.approx(4 * per_unit)
    assert pod_distance(zeros, neg.relu()).item() == 0.0


def _ctx(num_old=2, num_classes=3, old=None):
    return StepContext(step=1, num_old=num_old, num_classes=num_classes, old_model=old,
                       model=None)


def _outputs():
    """New and old outputs whose pre-activation stage and small logits differ from their old
    counterparts while the ReLU'd stage and the full-size logits do not."""
    zeros = torch.zeros(1, 1, 2, 2)
    small = torch.zeros(1, 3, 2, 2)
    small[:, 2] = 1.0  # a new class: collapsed into the background channel, [1, 0] vs [0, 0]
    new = SegOutput(torch.zeros(1, 3, 4, 4), features={
        "stages": [zeros], "stages_preact": [-torch.ones(1, 1, 2, 2)], "decoder": zeros,
        "logits_small": small})
    old = SegOutput(torch.zeros(1, 2, 4, 4), features={
        "stages": [zeros], "stages_preact": [zeros], "decoder": zeros,
        "logits_small": torch.zeros(1, 2, 2, 2)})
    return new, old


def test_plop_pods_the_preactivation_stages_and_the_small_logits():
    new, old = _outputs()
    plop = PLOP()
    plop.setup(_ctx())
    assert plop.needs_features == ("stages_preact", "decoder", "logits_small")
    # 2 x 2 maps: 12 pooled values (scale 4 has no pixel); stage (-1)² vs 0: sqrt(12); logits
    # (collapsed) 1 vs 0 in one channel: sqrt(12); / 3 maps; x sqrt(C / C_new) = sqrt(3)
    expected = math.sqrt(3) * (0.01 + 0.0005) * math.sqrt(12) / 3
    assert plop.pod(new, old).item() == pytest.approx(expected)
    # the earlier readings: the ReLU'd stages and the full-size logits, both equal here
    for size in ("decoder", "input"):
        before = PLOP(pod_stages="activated", pod_logits_size=size)
        before.setup(_ctx())
        assert before.needs_features == ("stages", "decoder")
        assert before.pod(new, old).item() == 0.0


def test_a_model_without_the_preactivation_stages_is_one_line():
    """PLOP on a model that offers only the required features: refused at the first batch
    (docs/errors.md row 52), naming the features and pointing at the settings."""
    from incseg.errors import ConfigError
    from incseg.models import IncrementalHead
    from incseg.systems.base import Recipe
    from incseg.systems.student import StudentModule
    from incseg.tasks import get_task

    class Plain(nn.Module):
        def __init__(self, per_step):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.head = IncrementalHead(4, per_step)

        num_classes = property(lambda self: self.head.num_classes)
        classes_per_step = property(lambda self: self.head.classes_per_step)

        def add_step(self, n_new, init_balanced=True):
            self.head.add_step(n_new)

        def forward(self, x):  # no `extra`: model_output calls it plainly
            f = self.conv(x)
            return SegOutput(self.head(f), [], {"encoder": f, "stages": [f], "decoder": f})

    task = get_task("shapes", "15-5")
    old, new = Plain([16]), Plain([16])
    new.add_step(5)
    module = StudentModule(new, old, task, 1, Recipe(), PLOP())
    with pytest.raises(ConfigError, match="reads the model features stages_preact, "
                                          "logits_small, which Plain does not provide"):
        module.training_loss(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))


# ---- the models' pre-activation stages and small logits --------------------------------------
def test_residual_sum_keeps_the_negatives_the_relu_drops():
    """A BasicBlock whose residual branch is the constant -0.5 (zero convs, bn2's bias -0.5,
    eval mode): its sum before the ReLU is x - 0.5, the block's output relu(x - 0.5)."""
    block = BasicBlock(1, 1).eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
        block.bn2.bias.fill_(-0.5)
    x = torch.tensor([[[[1.0, 0.0], [0.25, 2.0]]]])
    pre = residual_sum(block, x)
    assert pre.tolist() == [[[[0.5, -0.5], [-0.25, 1.5]]]]
    assert block(x).tolist() == [[[[0.5, 0.0], [0.0, 1.5]]]]
    with pytest.raises(TypeError, match="BasicBlock or Bottleneck"):
        residual_sum(nn.Conv2d(1, 1, 1), x)


@pytest.mark.parametrize("build", [
    pytest.param(lambda: BiSeNet("resnet18", [3, 2]), id="bisenet"),
    pytest.param(lambda: DeepLabV3("resnet18", [3, 2]), id="deeplab"),
])
def test_optional_features_change_no_number_and_cost_nothing_unasked(build):
    """Asking for ``stages_preact`` and ``logits_small`` leaves the logits, the stages and every
    gradient bit-identical; the stages are the ReLU of the pre-activations, which hold
    negatives; the logits are the small ones upsampled; unasked, neither is kept."""
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    assert not {"stages_preact", "logits_small"} & set(plain.features)
    plain.logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model_output(model, x, ("stages_preact", "decoder", "logits_small"))
    out.logits.square().sum().backward()
    assert torch.equal(out.logits, plain.logits)
    for a, b in zip(out.features["stages"], plain.features["stages"]):
        assert torch.equal(a, b)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters()
               if p.grad is not None) and len(grads) > 0
    for stage, pre in zip(out.features["stages"], out.features["stages_preact"], strict=True):
        assert torch.equal(stage, pre.relu()) and bool((pre < 0).any())
    small = out.features["logits_small"]
    assert small.shape[-2:] == out.features["decoder"].shape[-2:]
    assert torch.equal(out.logits, F.interpolate(small, size=(32, 32), mode="bilinear",
                                                 align_corners=False))


# ---- PLOP-M: a labelled memory keeps its ground truth -------------------------------------------
def test_known_images_keep_their_labels_and_a_factor_of_one():
    """Two images with the same labels and old outputs; the second is a memory image (known):
    the first's background is pseudo-labelled, the second's labels stay as they are."""
    labels = torch.tensor([[[0, 1, 0], [2, 255, 0]]]).repeat(2, 1, 1)  # 1: an old class (GT)
    old_logits = torch.zeros(2, 2, 2, 3)
    old_logits[:, 1, 0, 0] = 5.0  # the old model says class 1 at (0, 0)
    uncertainty = torch.tensor([[[0.1, 0.1, 0.9], [0.1, 0.1, 0.1]]]).repeat(2, 1, 1)
    thresholds = torch.tensor([0.5, 0.5])
    known = torch.tensor([False, True])
    out, kept = pseudo_label(labels, old_logits, thresholds, uncertainty, known)
    # image 0: (0,0) -> 1 (confident old class), (0,1) GT 1 guessed as 0, (0,2) too uncertain
    assert out[0].tolist() == [[1, 0, 255], [2, 255, 0]]
    assert out[1].tolist() == labels[1].tolist()
    assert kept[1].sum() == 0
    # image 0: 4 background pixels (label < 2), 3 kept; image 1: all of its labels kept
    factor = adaptive_factor(labels, kept, 2, known)
    assert factor.tolist() == pytest.approx([3 / 4, 1.0])
    assert adaptive_factor(labels, kept, 2)[1].item() == 0.0  # without the flag: nothing kept


class LogitsAsImages(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return SegOutput(x)


def test_known_images_stay_out_of_the_thresholds():
    """Histogram of 2 bins over H / log C_o, true median: the step image's 4 background pixels
    (3 certain, 1 uniform) give class 0 the median 1/3; a memory image of uniform old outputs
    in the same batch would give 1/2 if it counted."""
    step_img = torch.zeros(1, 2, 2, 2)
    step_img[0, 0, 0, :] = 10.0
    step_img[0, 0, 1, 0] = 10.0  # (1, 1) uniform
    memory_img = torch.zeros(1, 2, 2, 2)  # uniform everywhere
    images = torch.cat([step_img, memory_img])
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    plop = PLOP(bins=2, median="histogram", entropy="normalized")
    plop.setup(_ctx(old=LogitsAsImages()))
    plop.on_step_start(None, plop.ctx.old_model, [(images, labels, torch.tensor([False, True]))])
    assert plop.thresholds.tolist() == pytest.approx([1 / 3, 0.001])
    plop.on_step_start(None, plop.ctx.old_model, [(images, labels)])
    # counted: 3 in bin 0, 5 in bin 1 -> median (1 + (4 - 3) / 5) / 2
    assert plop.thresholds.tolist() == pytest.approx([0.6, 0.001])
    # in training the memory image's background stays 0, the step image's uncertain pixel 255
    batch = Batch(images, labels, torch.tensor([False, True]))
    feats = {"stages_preact": [torch.zeros(2, 1, 2, 2)], "decoder": torch.zeros(2, 1, 2, 2)}
    out = SegOutput(torch.zeros(2, 3, 2, 2), features={
        **feats, "logits_small": torch.zeros(2, 3, 2, 2)})
    old = SegOutput(images, features={**feats, "logits_small": images})
    plop.on_step_start(None, plop.ctx.old_model, [(images, labels, torch.tensor([False, True]))])
    # CE ln 3 on the 3 kept pixels (factor 3/4) and the 4 memory pixels (factor 1), / 8 pixels
    assert plop.terms(batch, out, old)["seg"].item() == pytest.approx(
        (0.75 * 3 + 4) * math.log(3) / 8, rel=1e-6)


def test_joined_dataset_flags_the_memory_images():
    class Items:
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def __getitem__(self, item):
            i, _ = item
            return torch.tensor(self.tag + i), torch.tensor(0)

    joined = JoinedDataset(Items(0, 2), Items(100, 1), flag_known=True)
    assert [joined[(i, 0)][2] for i in range(3)] == [False, False, True]
    assert len(JoinedDataset(Items(0, 2), Items(100, 1))[(2, 0)]) == 2  # no flag asked


@pytest.mark.parametrize("labels,flagged", [("seen", True), ("current", False)])
def test_memory_batches_mark_the_known_images(tmp_path, labels, flagged):
    """With ``memory.labels=seen`` a step's training batches are (images, labels, known), known
    exactly for the memory images (SSUL's half batches: the second half); with ``current`` a
    memory image's labels hide the old classes like a step image's, and batches stay pairs."""
    from incseg.config import compose, source_from_cfg, task_from_cfg
    from incseg.protocol import memory as pmem
    from incseg.protocol.trainer import make_datamodule

    cfg = compose(["experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none",
                   "memory.size=4", f"memory.labels={labels}", "data.num_workers=0"])
    source, task = source_from_cfg(cfg, progress=False), task_from_cfg(cfg)
    memory = pmem.build_memory(cfg, tmp_path / "run", tmp_path / "cache", source, task, 1)
    dm = make_datamodule(cfg, source, task, 1, tmp_path / "cache", memory=memory.samples)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if not flagged:
        assert len(batch) == 2
        return
    images, masks, known = batch
    half = images.shape[0] // 2
    assert known.tolist() == [False] * (images.shape[0] - half) + [True] * half
    # a memory image's labels hold old classes (1 .. C_o - 1), a step image's never do
    num_old = len(task.classes_before(1))
    old_fg = (masks > 0) & (masks < num_old)
    assert not old_fg[~known].any() and old_fg[known].any()
