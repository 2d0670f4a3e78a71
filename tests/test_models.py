"""BiSeNet model zoo: shapes, size, incremental heads, BN coverage, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from incseg.errors import ConfigError
from incseg.models import BiSeNet, IncrementalHead, SegOutput, build_model
from incseg.models.backbones import imagenet_weights_path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def r18() -> BiSeNet:
    torch.manual_seed(0)
    return build_model("bisenet_r18", [16])


def _check_shapes(out: SegOutput, b: int, c: int, hw: int, c3: int, c4: int, train: bool):
    assert out.logits.shape == (b, c, hw, hw)
    f = out.features
    assert set(f) == {"spatial", "cx1", "cx2", "decoder", "encoder", "stages"}
    assert f["spatial"].shape == (b, 256, hw // 8, hw // 8)
    assert f["cx1"].shape == (b, c3, hw // 8, hw // 8)
    assert f["cx2"].shape == (b, c4, hw // 8, hw // 8)
    assert f["decoder"].shape == (b, 256, hw // 8, hw // 8)
    assert f["encoder"].shape == (b, c4, hw // 32, hw // 32)
    # the ResNet's four stages, shallow to deep (1/4 .. 1/32); the last one is the encoder's
    assert [tuple(s.shape) for s in f["stages"]] == [
        (b, c4 // 8, hw // 4, hw // 4), (b, c4 // 4, hw // 8, hw // 8),
        (b, c3, hw // 16, hw // 16), (b, c4, hw // 32, hw // 32)]
    assert f["stages"][-1] is f["encoder"]
    if train:
        assert len(out.aux) == 2
        assert all(a.shape == (b, c, hw, hw) for a in out.aux)
    else:
        assert out.aux == []


def test_r18_shapes_train_and_eval(r18):
    x = torch.randn(2, 3, 64, 64)
    r18.train()
    _check_shapes(r18(x), 2, 16, 64, 256, 512, train=True)
    r18.eval()
    with torch.no_grad():
        _check_shapes(r18(x), 2, 16, 64, 256, 512, train=False)


@pytest.mark.parametrize("name", ["bisenet_r50", "bisenet_r101"])
def test_deep_backbone_shapes(name):
    model = build_model(name, [11, 5])
    assert model.num_classes == 16 and model.classes_per_step == [11, 5]
    model.train()
    _check_shapes(model(torch.randn(2, 3, 32, 32)), 2, 16, 32, 1024, 2048, train=True)


def test_no_imagenet_fc_registered(r18):
    names = [n for n, _ in r18.named_modules()]
    assert not any(n.split(".")[-1] in {"fc", "avgpool"} for n in names)
    assert not any(k.startswith("backbone.fc") for k in r18.state_dict())


def test_r18_parameter_count():
    n = sum(p.numel() for p in build_model("bisenet_r18", [21]).parameters())
    print(f"bisenet_r18 [21] parameters: {n:,}")
    assert abs(n - 12.6e6) / 12.6e6 < 0.10


def test_paper_variant_parameter_counts():
    """The paper's code (3x3 fusion conv, ARM conv biases) has 14,390,719 parameters at 21
    classes without torchvision's unused fc; this suite's default 12,292,799. The difference is
    exactly the fusion conv's 1024*256*(9-1) weights plus the 256 + 512 ARM biases."""
    ours = sum(p.numel() for p in build_model("bisenet_r18", [21]).parameters())
    paper = sum(p.numel() for p in build_model("bisenet_r18_paper", [21]).parameters())
    assert ours == 12_292_799
    assert paper == 14_390_719
    assert paper - ours == 1024 * 256 * 8 + 256 + 512


def test_paper_variant_multiplies_the_global_context():
    """Same weights, two forwards: cx2 = ARM(body) + GAP(body) (default) against
    ARM(body) * GAP(body) (the paper's code)."""
    torch.manual_seed(0)
    add = BiSeNet("resnet18", [3]).eval()
    mul = BiSeNet("resnet18", [3], global_context="multiply").eval()
    mul.load_state_dict(add.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = add.backbone(x)[3]
        arm = add.arm32(body)
        gap = body.mean(dim=(2, 3), keepdim=True)
        fa, fm = add.forward_features(x), mul.forward_features(x)
    size = fa["spatial"].shape[-2:]

    def up(t):
        return torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear",
                                               align_corners=False)

    torch.testing.assert_close(fa["cx2"], up(arm + gap))
    torch.testing.assert_close(fm["cx2"], up(arm * gap))
    assert not torch.allclose(fa["cx2"], fm["cx2"])


def test_paper_variant_settings_are_checked():
    with pytest.raises(ConfigError, match="fusion_kernel=2 is not valid"):
        BiSeNet("resnet18", [3], fusion_kernel=2)
    with pytest.raises(ConfigError, match="global_context='sum' is not valid"):
        BiSeNet("resnet18", [3], global_context="sum")


def test_channels_last_matches_contiguous(r18):
    r18.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = r18(x).logits
        out = r18(x.to(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_aux_heads_not_computed_in_eval():
    model = build_model("bisenet_r18", [5]).eval()
    fired = []
    for head in (model.aux1, model.aux2):
        head.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).aux == []
    assert fired == []
    model.train()
    assert len(model(torch.randn(2, 3, 64, 64)).aux) == 2
    assert len(fired) == 2


def test_every_batchnorm_runs_in_forward():
    model = build_model("bisenet_r18", [5]).train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    fired: set[str] = set()
    for name, bn in bns.items():
        bn.register_forward_hook(lambda m, i, o, name=name: fired.add(name))
    model(torch.randn(2, 3, 64, 64))
    assert len(bns) > 20  # resnet18's 20 BNs + spatial path + ARMs + FFM
    assert fired == set(bns), sorted(set(bns) - fired)


def test_add_step_keeps_old_logits_without_init_balanced():
    model = build_model("bisenet_r18", [6]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits
        model.add_step(3, init_balanced=False)
        after = model(x).logits
    assert model.num_classes == 9 and model.classes_per_step == [6, 3]
    assert after.shape[1] == 9
    torch.testing.assert_close(after[:, :6], before)


def _head_outputs(model: BiSeNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Main, aux1, aux2 logits at 1/8 (heads called directly on eval-mode features)."""
    with torch.no_grad():
        f = model.forward_features(x)
        return [model.head(f["decoder"]), model.aux1(f["cx1"]), model.aux2(f["cx2"])]


def test_init_balanced_splits_background_on_every_head():
    model = build_model("bisenet_r18", [6]).eval()
    # Heads start with random, distinct biases so the test sees the background bias move.
    with torch.no_grad():
        for head in model.heads():
            head.convs[0].bias.normal_()
    x = torch.randn(2, 3, 64, 64)
    before = _head_outputs(model, x)
    b_bg = [h.convs[0].bias[0].item() for h in model.heads()]
    n_new = 3
    model.add_step(n_new, init_balanced=True)
    after = _head_outputs(model, x)
    for name, old, new, bg, head in zip(
        ["main", "aux1", "aux2"], before, after, b_bg, model.heads()
    ):
        assert new.shape[1] == 9, name
        # Old foreground logits are untouched; the background logit moves by design.
        torch.testing.assert_close(new[:, 1:6], old[:, 1:6])
        assert not torch.allclose(new[:, 0], old[:, 0])
        assert head.convs[0].bias[0].item() == pytest.approx(bg - math.log(n_new + 1), abs=1e-6)
        p_old, p_new = old.softmax(1), new.softmax(1)
        share = p_old[:, :1] / (n_new + 1)
        torch.testing.assert_close(p_new[:, :1], share, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            p_new[:, 6:], share.expand(-1, n_new, -1, -1), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(p_new[:, 1:6], p_old[:, 1:6], atol=1e-5, rtol=1e-4)


def test_init_balanced_through_train_forward_aux():
    """The same split seen through SegOutput.aux in training mode (batch 2, BN in eval stats)."""
    model = build_model("bisenet_r18", [4])
    x = torch.randn(2, 3, 64, 64)
    model.train()
    for m in model.modules():  # freeze BN statistics so both forwards see the same features
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        old = model(x)
        model.add_step(2, init_balanced=True)
        new = model(x)
    for o, n in zip((old.logits, *old.aux), (new.logits, *new.aux)):
        torch.testing.assert_close(
            n.softmax(1)[:, 4:],
            (o.softmax(1)[:, :1] / 3).expand(-1, 2, -1, -1),
            atol=1e-5,
            rtol=1e-4,
        )


def test_incremental_head_unit():
    head = IncrementalHead(8, [3])
    conv = head.add_step(2)
    assert head.classes_per_step == [3, 2] and head.num_classes == 5
    assert head(torch.randn(1, 8, 4, 4)).shape == (1, 5, 4, 4)
    b_bg = head.convs[0].bias[0].item()
    head.init_balanced(2)
    assert torch.equal(conv.weight, head.convs[0].weight[:1].expand(2, -1, -1, -1))
    assert conv.bias.tolist() == pytest.approx([b_bg - math.log(3)] * 2, abs=1e-6)
    with pytest.raises(ValueError):
        head.init_balanced(5)  # the last step has 2 classes
    with pytest.raises(ValueError):
        IncrementalHead(8, [])


def test_unknown_model_name():
    with pytest.raises(ValueError, match="bisenet_r18") as e:  # the config check: ConfigError
        build_model("bisenet_r34", [21])
    assert "\n" not in str(e.value) and "bisenet_r34" in str(e.value)


def test_imagenet_missing_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(ConfigError) as e:
        build_model("bisenet_r18", [21], pretrained="imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "resnet18-f37072fd.pth" in msg and str(expected.parent) in msg
    assert "model.pretrained=null" in msg


def test_imagenet_loads_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    ref = torchvision.models.resnet18(weights=None)
    # Old torchvision files have no num_batches_tracked buffers: mimic that.
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    model = build_model("bisenet_r18", [21], pretrained="imagenet")
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight)


def test_pretrained_path_round_trip(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.layer4[1].bn2.running_mean.uniform_()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)  # full torchvision dict, fc.* included
    model = build_model("bisenet_r18", [21], pretrained=str(path))
    own = model.backbone.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    # A backbone-only state dict loads as well.
    path2 = tmp_path / "backbone.pth"
    torch.save(model.backbone.state_dict(), path2)
    again = build_model("bisenet_r18", [21], pretrained=path2)
    assert torch.equal(again.backbone.layer4[1].bn2.running_mean, ref.layer4[1].bn2.running_mean)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_model("bisenet_r18", [21], pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="holds resnet50 weights, not resnet18 ones") as e:
        build_model("bisenet_r18", [21], pretrained=wrong)
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a torch file at all"):
        build_model("bisenet_r18", [21], pretrained=junk)
