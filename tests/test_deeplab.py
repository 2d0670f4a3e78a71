"""DeepLabV3 as MiB / PLOP build it (incseg.models.deeplab), its errors (docs/errors.md rows
67-71) and the literature's presets (conf/experiment/literature/)."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
import torch
from torch import nn

from incseg.config import compose
from incseg.errors import ConfigError
from incseg.models import DeepLabV3, IncrementalHead, ResNetBackbone, build_model
from incseg.models.backbones import imagenet_weights_path
from incseg.models.deeplab import ASPP, aspp_rates_for
from incseg.protocol.preflight import check_run
from tests.test_errors import dirs, run_main

PRESETS = ("voc_15-5", "voc_15-1", "voc_19-1", "voc_10-1", "ade_100-50")


def small(output_stride: int = 16, classes=(16,), **kw) -> DeepLabV3:
    """A DeepLabV3 with a ResNet-18 body: the same wiring as R50/R101, fast on a CPU."""
    torch.manual_seed(0)
    return DeepLabV3("resnet18", list(classes), output_stride=output_stride, **kw)


# ---- architecture --------------------------------------------------------------------------

@pytest.mark.parametrize("os_, sizes", [(16, [16, 8, 4, 4]), (8, [16, 8, 8, 8])])
def test_output_and_feature_shapes_at_output_stride(os_, sizes):
    model = small(os_).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 16, 64, 64) and out.aux == []
    assert set(out.features) == {"encoder", "stages", "decoder"}
    stages = out.features["stages"]
    assert [s.shape[-1] for s in stages] == sizes
    assert [s.shape[1] for s in stages] == [64, 128, 256, 512]
    assert out.features["encoder"] is stages[-1]  # ILT's body = layer4's output
    assert out.features["decoder"].shape == (2, 256, 64 // os_, 64 // os_)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).logits.shape == (1, 16, 48, 80)


def test_dilation_pattern_is_mibs():
    """MiB dilates every block of a dilated stage, the first one included (torchvision's
    replace_stride_with_dilation keeps dilation 1 there): same shapes, another network."""
    for os_, (d3, d4) in ((16, (1, 2)), (8, (2, 4))):
        model = small(os_)
        for layer, d in ((model.backbone.layer3, d3), (model.backbone.layer4, d4)):
            convs3 = [m for m in layer.modules()
                      if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
            assert {m.dilation for m in convs3} == {(d, d)}
            assert {m.padding for m in convs3} == {(d, d)}
            if d > 1:
                assert {m.stride for m in layer.modules() if isinstance(m, nn.Conv2d)} == {(1, 1)}
        assert model.backbone.layer2[0].conv1.stride == (2, 2)  # earlier stages untouched


def test_aspp_is_the_references_not_torchvisions():
    """Bias-free convs at rates 6/12/18, four maps (1024 channels) into the 1x1 projection
    (torchvision concatenates the pooled branch as a fifth map: 1280), no dropout, and the
    pooled branch *added*: a spatially constant offset before the last norm."""
    aspp = ASPP(64, 16, 16, (6, 12, 18))
    convs = [m for m in aspp.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert [c.dilation[0] for c in aspp.map_convs] == [1, 6, 12, 18]
    assert aspp.red_conv.in_channels == 4 * 16
    assert not any(isinstance(m, nn.Dropout) for m in aspp.modules())
    aspp.eval()
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        pre = aspp.red_conv(aspp.map_norm(torch.cat([c(x) for c in aspp.map_convs], 1)))
        pool = aspp.pool_red_conv(aspp.pool_norm(aspp.pool_conv(x.mean((2, 3), keepdim=True))))
        assert torch.allclose(aspp(x), aspp.red_norm(pre + pool.expand_as(pre)), atol=1e-6)
    assert aspp_rates_for(16) == (6, 12, 18) and aspp_rates_for(8) == (12, 24, 36)
    assert aspp_rates_for(8, [12, 24, 32]) == (12, 24, 32)  # MiB's code, literally


def test_init_balanced_on_every_head():
    model = small(classes=(3,)).eval()
    with torch.no_grad():
        model.head.convs[0].bias.copy_(torch.tensor([0.5, -0.2, 0.3]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits.softmax(1)
    model.add_step(2, init_balanced=True)
    assert model.classes_per_step == [3, 2] and model.num_classes == 5
    assert all(isinstance(h, IncrementalHead) for h in model.heads())
    for head in model.heads():
        w, b = head.convs[1].weight, head.convs[1].bias
        assert torch.equal(w, head.convs[0].weight[0:1].expand_as(w))
        assert torch.allclose(b, torch.full((2,), 0.5 - math.log(3)))
        assert head.convs[0].bias[0].item() == pytest.approx(0.5 - math.log(3))
    with torch.no_grad():
        after = model(x).logits.softmax(1)
    # old foreground classes keep their probability; background and the 2 new share p_bg / 3
    assert torch.allclose(after[:, 1:3], before[:, 1:3], atol=1e-5)
    for c in (0, 3, 4):
        assert torch.allclose(after[:, c], before[:, 0] / 3, atol=1e-5)


def test_every_batchnorm_runs_in_forward_for_deepinversion():
    from incseg.losses.inversion import BNStatisticsHook

    model = small().eval()
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with BNStatisticsHook(model) as hook:
        model(torch.rand(2, 3, 32, 32))
    assert set(hook.names) == bns and len(hook.names) == len(bns)
    assert "aspp.pool_norm.0" in bns  # the norm after global pooling (needs batch >= 2)


RESNET101_PARAMS = 44_549_160  # torchvision resnet101, fc included (its model card)
FC = 2048 * 1000 + 1000
ASPP_PARAMS = (2048 * 256 + 3 * 2048 * 256 * 9  # 1x1 + three 3x3 maps, bias-free
               + 2 * 1024                       # norm of the concatenated maps
               + 1024 * 256                     # 1x1 projection
               + 2048 * 256 + 2 * 256 + 256 * 256  # pooling branch: 1x1, norm, 1x1
               + 2 * 256)                       # last norm
HEAD_21 = 256 * 21 + 21


def test_parameter_count_of_deeplabv3_r101_at_21_classes():
    """By hand: torchvision's ResNet-101 without fc + the ASPP + a 21-class 1x1 head =
    58,040,661. MiB's own model (fcdl94/MiB ``make_model``, backbone resnet101, output stride
    16, classes [21]), built with a BatchNorm + leaky-ReLU stand-in for inplace_abn, counts
    58,040,661 too (body 42,500,160, head 15,535,104, cls 5,397): InPlace-ABN has the same
    affine parameters as BatchNorm."""
    assert ASPP_PARAMS == 15_535_104
    expected = RESNET101_PARAMS - FC + ASPP_PARAMS + HEAD_21
    assert expected == 58_040_661
    model = build_model("deeplabv3_r101", [21])
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in model.aspp.parameters()) == ASPP_PARAMS
    r50 = build_model("deeplabv3_r50", [21])
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 - FC + ASPP_PARAMS + HEAD_21


def test_macs_at_512_px():
    """Counted on the meta device (no arithmetic runs). The ASPP + head part by hand, at the
    32 x 32 map of output stride 16: the pooled branch's convs run on 1 x 1."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = DeepLabV3("resnet101", [21]).eval()
        x = torch.empty(1, 3, 512, 512)
    with FlopCounterMode(display=False) as total:
        model(x)
    with FlopCounterMode(display=False) as head:
        model.head(model.aspp(torch.empty(1, 2048, 32, 32, device="meta")))
    hw = 32 * 32
    aspp_head = ((2048 * 256 + 3 * 2048 * 256 * 9 + 1024 * 256 + 256 * 21) * hw
                 + 2048 * 256 + 256 * 256)
    assert head.get_total_flops() // 2 == aspp_head == 15_306_915_840
    assert total.get_total_flops() // 2 == 67_127_541_760


def test_imagenet_or_file_weights_load_into_the_dilated_body(tmp_path):
    """A ResNet state dict loads strictly (dilation changes no weight); the same file for
    ``pretrained=imagenet`` is read from the hub cache."""
    torch.manual_seed(1)
    src = ResNetBackbone("resnet18").state_dict()
    path = tmp_path / "r18.pth"
    torch.save(src, path)
    model = small(pretrained=str(path))
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.items())
    assert model.backbone.layer4[0].conv2.dilation == (2, 2)


# ---- errors (docs/errors.md rows 67-71) -----------------------------------------------------

MODEL_CASES = [
    pytest.param(["model=deeplabv3_r101", "model.output_stride=32"],
                 "error: model=deeplabv3_r101: output_stride=32 is not supported; use "
                 "model.output_stride=16 (MiB, PLOP) or model.output_stride=8",
                 id="output-stride"),
    pytest.param(["model=deeplabv3_r50", "model.aspp_rates=[6,12]"],
                 "error: model=deeplabv3_r50: aspp_rates=[6, 12] must be three whole numbers "
                 ">= 1, e.g. model.aspp_rates=[6,12,18], or null for DeepLabV3's rates",
                 id="aspp-rates"),
    pytest.param(["model=deeplabv3_r50", "model.backbone=resnet34"],
                 "error: model=deeplabv3_r50: unknown backbone 'resnet34'; valid backbones: "
                 "resnet101, resnet18, resnet50", id="backbone"),
]


@pytest.mark.parametrize("args, line", MODEL_CASES)
def test_model_config_errors_one_line(tmp_path, monkeypatch, capsys, args, line):
    assert run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path), *args) == line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_missing_imagenet_weights_of_deeplab_name_the_torchvision_file(tmp_path, monkeypatch,
                                                                         capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setenv("INCSEG_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    line = run_main(monkeypatch, capsys, "experiment=literature/voc_15-5", "method=mib",
                    "data.root=/nowhere", *dirs(tmp_path))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert line == (
        "error: model.pretrained=imagenet: the ImageNet weights of resnet101 are not in the "
        f"torch hub cache ({hub}/resnet101-63fe2227.pth is missing) and cannot be downloaded "
        "(INCSEG_OFFLINE=1); "
        "place resnet101-63fe2227.pth (from https://download.pytorch.org/models/"
        f"resnet101-63fe2227.pth) in {hub}/, or set model.pretrained=null (or none) to train "
        "from scratch")
    assert not (tmp_path / "torch").exists() and not (tmp_path / "runs").exists()


def test_a_weights_file_of_another_network_is_one_line(tmp_path, capsys):
    from incseg.cli import report_errors

    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "encoder.foo": torch.zeros(1)}, path)
    with pytest.raises(SystemExit) as exc:
        report_errors(lambda: DeepLabV3("resnet101", [21], pretrained=str(path)))()
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip()
    # ResNet-101: 104 convs (stem, 33 x 3 in the blocks, 4 downsamples), each followed by a BN
    # of 4 entries (num_batches_tracked is not required): 104 * 5 = 520 keys, conv1.weight given
    assert line.startswith(f"error: model.pretrained file {path} does not fit a resnet101 "
                           "backbone (weights of another network?): 519 missing keys")
    assert "1 unexpected keys ['encoder.foo']" in line and "\n" not in line


# ---- the literature's presets --------------------------------------------------------------

@pytest.fixture
def hub_weights(tmp_path, monkeypatch):
    """A torch hub cache holding (a stand-in for) torchvision's resnet101 file: the config check
    only asks that it be there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_weights_path("resnet101")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in")
    return path


def _jobs(name: str, *extra: str) -> list[list[str]]:
    """Every job of the preset's sweep, as Hydra's basic sweeper expands it (command-line
    overrides replace a swept key's list)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = compose([f"experiment=literature/{name}", *extra], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *extra])
    batches = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for batch in batches for job in batch]


@pytest.mark.parametrize("name", PRESETS)
def test_literature_presets_compose_and_validate(name, hub_weights):
    from hydra.core.hydra_config import HydraConfig

    jobs = _jobs(name)
    assert sorted(j[0] for j in jobs) == [f"method={m}" for m in
                                          ("ft", "ilt", "joint", "lwf", "mib")]
    dirs_ = set()
    for job in jobs:
        cfg = compose([f"experiment=literature/{name}", *job], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        dirs_.add(f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}")
        check_run(cfg)
        assert cfg.model.name == "deeplabv3_r101" and cfg.model.output_stride == 16
        assert cfg.model.pretrained == "imagenet" and cfg.overlap is True
        assert (cfg.data.crop, cfg.data.batch_size) == (512, 24)
        assert (cfg.train.lr, cfg.train.lr_incremental) == (0.01, 0.001)
        assert (cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay,
                cfg.train.poly_power) == (0.9, True, 1e-4, 0.9)
        epochs = {"voc_10-1": (30, 10), "ade_100-50": (60, 60)}.get(name, (30, 30))
        assert (cfg.train.epochs, cfg.train.epochs_incremental) == epochs
        # MiB's label conventions, PLOP's for 10-1 (the split PLOP introduced)
        plop = name == "voc_10-1"
        assert cfg.data.void_as_background is (not plop)
        assert cfg.data.unseen_as == ("background" if plop else "ignore")
        assert cfg.dataset.name == name.split("_")[0] and cfg.trainer.accelerator == "gpu"
    assert len(dirs_) == len(jobs)
    assert _jobs(name, "method=mib") == [["method=mib"]]  # one method: a plain override


def test_the_presets_need_the_imagenet_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="resnet101-63fe2227.pth"):
        check_run(compose(["experiment=literature/voc_19-1", "method=ft"]))
    check_run(compose(["experiment=literature/voc_19-1", "method=ft", "model.pretrained=null"]))


# ---- the protocol on DeepLabV3 ----------------------------------------------------------------

SMOKE = ["experiment=smoke", "logger=none", "model=deeplabv3_r50", "model.backbone=resnet18",
         "dataset.generator.n_train=80", "dataset.generator.n_val=8",
         "dataset.generator.n_test=16"]


@pytest.mark.slow  # DeepLabV3 + replay; DeepLabV3 runs fast in test_plops_pod_runs_on_deeplab
def test_ilt_and_deepinversion_replay_run_on_deeplab(tmp_path):
    """The smoke protocol on a DeepLabV3 (ResNet-18 body for speed): ILT distilling the encoder
    (MiB's choice for DeepLab), then MiB with DeepInversion replay, whose generator hooks the
    DeepLab's BatchNorms and whose set is scored by the teacher."""
    from incseg.protocol import run_protocol

    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    ilt = run_protocol(compose([*SMOKE, cache, "method=ilt", "method.feat_layer=encoder"]),
                       tmp_path / "ilt")
    assert ilt["method"] == "ilt" and len(ilt["steps"]) == 2
    assert all(0.0 <= ilt["final"][k] <= 1.0 for k in ("old", "new", "all"))
    rep = run_protocol(compose([*SMOKE, cache, "method=mib", "replay=deepinversion",
                                "replay.verifier=none", "inversion.n_per_class=1",
                                "inversion.iterations_low=2", "inversion.iterations_full=2",
                                "inversion.batch_size=8"]), tmp_path / "replay")
    replay = rep["steps"][1]["replay"]
    assert replay["images"] == 15 and 0.0 <= replay["teacher_accuracy"] <= 1.0
    assert replay["sharpness"] > 0


def test_plops_pod_runs_on_deeplab(tmp_path):
    """PLOP's local POD reads the contract's ``stages_preact``, ``decoder`` and
    ``logits_small``: on DeepLabV3 (ResNet-18 body) the smoke protocol runs through step 1 (a
    missing feature would stop it at the first batch, docs/errors.md row 52)."""
    from incseg.protocol import run_protocol

    out = run_protocol(compose([*SMOKE, f"paths.cache_dir={tmp_path / 'cache'}",
                                "method=plop", "logger=csv"]), tmp_path / "plop")
    assert out["method"] == "plop" and len(out["steps"]) == 2
    assert all(0.0 <= out["final"][k] <= 1.0 for k in ("old", "new", "all"))
    from incseg.methods import build_method

    assert {"stages_preact", "decoder", "logits_small"} <= set(
        build_method(compose(["method=plop"]).method).needs_features)


@pytest.mark.slow
def test_a_literature_preset_runs_at_tiny_scale_on_the_cpu(tmp_path):
    """experiment=literature/voc_15-5 with its sizes overridden to a CPU: shapes, 32 px,
    batch 4, one epoch, DeepLabV3-R50 from scratch, 32-bit on the CPU."""
    from incseg.protocol import run_protocol

    cfg = compose(["experiment=literature/voc_15-5", "method=mib", "dataset=shapes",
                   "dataset.generator.size=32", "dataset.generator.n_train=120",
                   "dataset.generator.n_val=8", "dataset.generator.n_test=16",
                   "model=deeplabv3_r50", "model.pretrained=null", "trainer=cpu",
                   "logger=none", "data.crop=32", "data.batch_size=4", "data.num_workers=0",
                   "data.test_mode=full", "train.epochs=1", "train.epochs_incremental=1",
                   "trainer.progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}"])
    check_run(cfg)
    res = run_protocol(cfg, tmp_path / "run")
    assert [s["step"] for s in res["steps"]] == [0, 1]
    assert res["method"] == "mib" and res["final"]["all"] is not None
