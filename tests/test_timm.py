"""timm encoders (incseg.models.timm_*): parameter counts, the contract features, timm's
ImageNet weights from a Hugging Face hub cache the test builds or a hub it serves on 127.0.0.1
(never the network), the one-line errors (docs/errors.md rows 119-129) and the smoke protocol
with MiB, PLOP and DKD."""

from __future__ import annotations

import copy
import socket
import urllib.request

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from incseg.config import compose, validate
from incseg.errors import ConfigError
from incseg.models import FEATURE_KEYS, TimmDeepLabV3, build_model
from incseg.models.timm_encoders import TimmEncoder, encoder_info, split_norm_act
from incseg.models.timm_models import aspp_rates_at
from incseg.models.timm_weights import timm_weights_file
from incseg.protocol.preflight import check_replay_model
from tests.test_errors import dirs, run_main


def _loopback(address) -> bool:
    return isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost")


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """Every test here: huggingface_hub offline, an empty hub cache of the test's own, and no
    socket that can connect beyond 127.0.0.1 (a download attempt fails the test instead of
    reaching the hub)."""
    connect, create_connection = socket.socket.connect, socket.create_connection

    def guarded_connect(self, address):
        if not _loopback(address):
            raise AssertionError(f"tried to reach {address}")
        return connect(self, address)

    def guarded_create_connection(address, *args, **kwargs):
        if not _loopback(address):
            raise AssertionError(f"tried to reach {address}")
        return create_connection(address, *args, **kwargs)

    def no_urlopen(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INCSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    return tmp_path / "hf"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- parameter counts ------------------------------------------------------------------------

#: timm's ImageNet classifiers with 1000 classes, counted once on the meta device (timm's model
#: cards: 28.6 M and 28.3 M)
CONVNEXT_T_TIMM = 28_589_128
SWIN_T_TIMM = 28_288_354
#: what features_only leaves out: the final norm (768 x 2) and the 768 -> 1000 classifier
DROPPED = 2 * 768 + 768 * 1000 + 1000
#: MiB's ASPP on a 768-channel map (incseg.models.deeplab.ASPP), bias-free convs
ASPP_768 = (768 * 256 + 3 * 768 * 256 * 9   # 1x1 + three 3x3 maps
            + 2 * 1024 + 1024 * 256          # norm of the 4 maps, 1x1 projection
            + 768 * 256 + 2 * 256 + 256 * 256  # pooling branch: 1x1, norm, 1x1
            + 2 * 256)                       # last norm
HEAD_21 = 256 * 21 + 21
#: BiSeNet's own modules on 384 / 768-channel 1/16 and 1/32 levels, three 21-class heads
BISENET_768 = ((3 * 64 * 9 + 2 * 64) + (64 * 128 * 9 + 2 * 128) + (128 * 256 * 9 + 2 * 256)
               + (384 * 384 + 2 * 384) + (768 * 768 + 2 * 768)        # ARM16, ARM32
               + (1408 * 256 + 2 * 256) + 2 * (256 * 256 + 256)       # FFM: fuse, attention
               + HEAD_21 + (384 * 21 + 21) + (768 * 21 + 21))         # main, aux1, aux2


def test_parameter_counts_of_convnext_t_and_swin_t_models():
    assert ASPP_768 == 6_032_384 and BISENET_768 == 1_633_023
    with torch.device("meta"):
        assert n_params(timm.create_model("convnext_tiny")) == CONVNEXT_T_TIMM
        assert n_params(timm.create_model("swin_tiny_patch4_window7_224")) == SWIN_T_TIMM
    expected = {
        "deeplabv3_convnext_t": CONVNEXT_T_TIMM - DROPPED + ASPP_768 + HEAD_21,
        "deeplabv3_swin_t": SWIN_T_TIMM - DROPPED + ASPP_768 + HEAD_21,
        "bisenet_convnext_t": CONVNEXT_T_TIMM - DROPPED + BISENET_768,
        "bisenet_swin_t": SWIN_T_TIMM - DROPPED + BISENET_768,
    }
    assert expected == {"deeplabv3_convnext_t": 33_856_373, "deeplabv3_swin_t": 33_555_599,
                        "bisenet_convnext_t": 29_451_615, "bisenet_swin_t": 29_150_841}
    for name, count in expected.items():
        with torch.device("meta"):  # shapes only: counting needs no weight values
            model = build_model(name, [21])
        assert n_params(model) == count, name
        assert n_params(model.backbone) == count - (ASPP_768 + HEAD_21 if "deeplab" in name
                                                    else BISENET_768)


# ---- the contract ----------------------------------------------------------------------------

SHAPES = [  # model, channels of the four levels, their strides
    ("deeplabv3_convnext_t", (96, 192, 384, 768), (4, 8, 16, 16)),
    ("deeplabv3_swin_t", (96, 192, 384, 768), (4, 8, 16, 32)),
    ("deeplabv3_resnet50d", (256, 512, 1024, 2048), (4, 8, 16, 16)),
    ("deeplabv3_efficientnet_b0", (24, 40, 112, 320), (4, 8, 16, 16)),
    ("bisenet_convnext_t", (96, 192, 384, 768), (4, 8, 16, 32)),
    ("bisenet_swin_t", (96, 192, 384, 768), (4, 8, 16, 32)),
]


@pytest.mark.parametrize("name, channels, strides", SHAPES, ids=[s[0] for s in SHAPES])
def test_contract_features_and_their_shapes(name, channels, strides):
    torch.manual_seed(0)
    model = build_model(name, [16, 2]).train()
    h, w = 64, 96  # not timm's 224 px, not square: Swin runs at any size
    out = model(torch.randn(2, 3, h, w))
    assert out.logits.shape == (2, 18, h, w)
    f = out.features
    assert set(FEATURE_KEYS) | {"logits_small", "stages_preact"} <= set(f)
    assert [s.shape for s in f["stages"]] == [
        (2, c, h // r, w // r) for c, r in zip(channels, strides)]
    # dense NCHW or channels_last memory (Swin's NHWC outputs, permuted, are the latter)
    assert all(s.is_contiguous() or s.is_contiguous(memory_format=torch.channels_last)
               for s in f["stages"])
    assert f["stages_preact"] is f["stages"]  # timm exposes no pre-activation value
    bisenet = name.startswith("bisenet")
    assert f["encoder"] is f["stages"][3]  # the deepest level (1/32 for BiSeNet)
    dec = 8 if bisenet else strides[-1]
    assert f["decoder"].shape == (2, 256, h // dec, w // dec)
    assert f["logits_small"].shape == (2, 18, h // dec, w // dec)
    up = F.interpolate(f["logits_small"], size=(h, w), mode="bilinear", align_corners=False)
    assert torch.equal(up, out.logits)  # logits_small is the main head before upsampling
    assert len(out.aux) == (2 if bisenet else 0)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 56)).aux == []


def test_a_timm_name_is_a_config_value():
    """model.encoder=NAME: another timm model, no code edit (ConvNeXt-Atto: 320 channels)."""
    cfg = compose(["model=deeplabv3_convnext_t", "model.encoder=convnext_atto"])
    validate(cfg)
    model = build_model(cfg.model, [4])
    assert model.backbone.channels == (40, 80, 160, 320)
    assert model.aspp.map_convs[0].in_channels == 320
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 4, 32, 32)


def test_output_stride_through_timm_and_the_native_one():
    assert encoder_info("convnext_tiny", 8).reductions == (4, 8, 8, 8)
    assert encoder_info("convnext_tiny", 16).reductions == (4, 8, 16, 16)
    assert encoder_info("convnext_tiny", None).reductions == (4, 8, 16, 32)
    swin = {"dynamic_img_size": True}
    assert encoder_info("swin_tiny_patch4_window7_224", None, swin).reductions == (4, 8, 16, 32)
    with pytest.raises(ConfigError, match=r"^model.output_stride=16: timm's swin_tiny_patch4_"
                       r"window7_224 has no dilated mode; set model.output_stride=null to run "
                       r"it at its native stride \(1/32\)$"):
        encoder_info("swin_tiny_patch4_window7_224", 16, swin)


def test_aspp_rates_scale_with_the_output_stride():
    """DeepLabV3's (6, 12, 18) at 16, doubled at 8 (Chen et al. 2017), halved at 32."""
    assert aspp_rates_at(16, None) == (6, 12, 18)
    assert aspp_rates_at(8, None) == (12, 24, 36)
    assert aspp_rates_at(32, None) == (3, 6, 9)
    assert aspp_rates_at(32, [1, 2, 3]) == (1, 2, 3)
    model = build_model("deeplabv3_swin_t", [3])
    assert [c.dilation for c in model.aspp.map_convs[1:]] == [(3, 3), (6, 6), (9, 9)]


# ---- BatchNorm: DeepInversion's hooks, SyncBatchNorm ------------------------------------------

def test_timm_fused_batchnorm_is_split_so_syncbatchnorm_keeps_the_activation():
    """timm's BatchNormAct2d converted by torch's SyncBatchNorm (Lightning's sync_batchnorm)
    loses its activation; split into BN + act first, the conversion changes nothing."""
    torch.manual_seed(0)
    fused = timm.create_model("efficientnet_b0", features_only=True, out_indices=4).eval()
    x = torch.randn(2, 3, 64, 64)
    split = copy.deepcopy(fused)
    assert split_norm_act(split) == 48  # every BN of EfficientNet-B0's four-level pyramid
    with torch.no_grad():
        ref = fused(x)[-1]
        assert torch.equal(split(x)[-1], ref)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(split)).eval()
        assert torch.equal(synced(x)[-1], ref)
        broken = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused)).eval()
        assert not torch.allclose(broken(x)[-1], ref)  # the pitfall the split avoids


@pytest.mark.parametrize("name", ["deeplabv3_efficientnet_b0", "deeplabv3_resnet50d"])
def test_every_batchnorm_of_a_bn_encoder_runs_for_deepinversion(name):
    from incseg.losses.inversion import BNStatisticsHook

    model = build_model(name, [4]).eval()
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert sum(n.startswith("backbone.") for n in bns) > 40
    with BNStatisticsHook(model) as hook:
        model(torch.rand(2, 3, 32, 32))
    assert set(hook.names) == bns and len(hook.names) == len(bns)
    check_replay_model(compose([f"model={name}", "replay=deepinversion"]))  # not refused


DI_REFUSED = ("error: replay=deepinversion: model={m} has no BatchNorm in its encoder ({e}), and "
              "DeepInversion makes its images by matching the teacher's BatchNorm statistics "
              "(Yin et al., CVPR 2020); the {n} BatchNorms outside its encoder alone are too "
              "weak a prior; use a BatchNorm encoder (model=deeplabv3_resnet50d, "
              "deeplabv3_efficientnet_b0, deeplabv3_r101, bisenet_r18) or another replay "
              "(replay=exemplars, replay=noise, replay=none)")


@pytest.mark.parametrize("model, encoder, n", [
    ("deeplabv3_convnext_t", "convnext_tiny.fb_in1k", 3),
    ("bisenet_swin_t", "swin_tiny_patch4_window7_224.ms_in1k", 6)])
def test_deepinversion_on_a_layernorm_encoder_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                      capsys, model, encoder, n):
    line = run_main(monkeypatch, capsys, "experiment=smoke", f"model={model}",
                    "replay=deepinversion", *dirs(tmp_path))
    assert line == DI_REFUSED.format(m=model, e=encoder, n=n)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ---- ImageNet weights: the Hugging Face hub cache ---------------------------------------------

def hub_entry(cache, repo: str, state: dict, filename: str = "model.safetensors"):
    """The hub cache's layout for one file (what huggingface_hub writes after a download):
    ``models--org--name/refs/main`` naming a snapshot that holds the file."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / filename))
    return snap / filename


def test_imagenet_weights_are_read_from_the_hub_cache_offline(offline_hub):
    """A stand-in for timm's file of convnext_atto.d2_in1k in the hub cache: loaded through
    timm (its checkpoint filter renames stem.0 -> stem_0), nothing fetched."""
    torch.manual_seed(1)
    state = timm.create_model("convnext_atto").state_dict()
    hub_entry(offline_hub, "timm/convnext_atto.d2_in1k", state)
    TimmDeepLabV3.check_config("convnext_atto.d2_in1k", pretrained="imagenet")
    enc = TimmEncoder("convnext_atto.d2_in1k", pretrained="imagenet")
    got = enc.net.state_dict()
    assert torch.equal(got["stem_0.weight"], state["stem.0.weight"])
    assert torch.equal(got["stages_3.blocks.1.mlp.fc2.weight"],
                       state["stages.3.blocks.1.mlp.fc2.weight"])
    fresh = TimmEncoder("convnext_atto.d2_in1k").net.state_dict()
    assert not torch.equal(fresh["stem_0.weight"], state["stem.0.weight"])


def test_a_weights_file_of_another_network_is_one_line(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ConfigError) as err:
        TimmEncoder("convnext_atto", pretrained=str(path))
    assert str(err.value).startswith(f"model.pretrained file {path} does not fit timm's "
                                     "convnext_atto: ")
    # ConvNeXt's checkpoint filter takes a file with fc.* for Facebook's original layout
    assert "KeyError 'fc.weight' in timm's loader" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_partial_or_padded_weights_file_is_refused_though_timm_only_logs_it(tmp_path):
    """timm loads a features_only model's weights non-strictly and only logs the keys it could
    not place: a missing or an extra key is an error here."""
    torch.manual_seed(0)
    state = timm.create_model("convnext_atto").state_dict()
    part = {k: v for k, v in state.items() if k != "stages.2.blocks.0.conv_dw.weight"}
    torch.save(part, tmp_path / "part.pth")
    with pytest.raises(ConfigError, match=r"^model.pretrained file .*/part.pth does not fit "
                       r"timm's convnext_atto: 1 missing keys "
                       r"\(stages.2.blocks.0.conv_dw.weight\)$"):
        TimmEncoder("convnext_atto", pretrained=str(tmp_path / "part.pth"))
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match=r"1 unexpected keys \(extra.weight\)$"):
        TimmEncoder("convnext_atto", pretrained=str(tmp_path / "extra.pth"))
    torch.save(state, tmp_path / "full.pth")  # the classifier's keys: dropped, not missing
    enc = TimmEncoder("convnext_atto", pretrained=str(tmp_path / "full.pth"))
    assert torch.equal(enc.net.state_dict()["stem_0.weight"], state["stem.0.weight"])


def test_offline_and_not_cached_is_one_line_naming_model_and_cache(tmp_path, monkeypatch, capsys,
                                                                    offline_hub):
    line = run_main(monkeypatch, capsys, "experiment=smoke", "model=deeplabv3_swin_t",
                    "model.pretrained=imagenet", *dirs(tmp_path))
    assert line == (
        "error: model.pretrained=imagenet: timm's weights of swin_tiny_patch4_window7_224.ms_in1k"
        " (hub repo timm/swin_tiny_patch4_window7_224.ms_in1k) are not in the Hugging Face hub "
        f"cache {offline_hub} and HF_HUB_OFFLINE=1 forbids downloading them; run once with "
        "network access (without HF_HUB_OFFLINE), point HF_HUB_CACHE at a cache that holds them, "
        "or set model.pretrained=null to train from scratch")
    assert not (tmp_path / "runs").exists() and not offline_hub.exists()


TIMM_CASES = [
    pytest.param(["model=deeplabv3_convnext_t", "model.encoder=convnext_nope"],
                 "error: model.encoder=convnext_nope is not a timm model; list them with "
                 "timm.list_models() (e.g. convnext_tiny.fb_in1k)", id="unknown-name"),
    pytest.param(["model=deeplabv3_convnext_t", "model.encoder=convnext_tiny.nope"],
                 "error: model.encoder=convnext_tiny.nope: Invalid pretrained tag (nope) for "
                 "convnext_tiny; list the tags with timm.list_pretrained('convnext_tiny*')",
                 id="unknown-tag"),
    pytest.param(["model=deeplabv3_swin_t", "model.output_stride=16"],
                 "error: model.output_stride=16: timm's swin_tiny_patch4_window7_224.ms_in1k has "
                 "no dilated mode; set model.output_stride=null to run it at its native stride "
                 "(1/32)", id="no-dilated-mode"),
    pytest.param(["model=deeplabv3_convnext_t", "model.output_stride=12"],
                 "error: model.output_stride=12 is not valid; use 16 (MiB, PLOP), 8, or null for "
                 "the encoder's native stride", id="bad-stride"),
    pytest.param(["model=deeplabv3_swin_t", "model.encoder_kwargs.dynamic_img_size=false"],
                 "error: model.encoder=swin_tiny_patch4_window7_224.ms_in1k takes only its fixed "
                 "input size (Input height (64) doesn't match model (224)); pass "
                 "+model.encoder_kwargs.dynamic_img_size=true (timm's option for Swin / ViT "
                 "families) so it runs at any crop size", id="fixed-size"),
    pytest.param(["model=deeplabv3_convnext_t", "+model.encoder_kwargs.foo=1"],
                 "error: model.encoder_kwargs: timm's convnext_tiny.fb_in1k does not take them "
                 "(ConvNeXt.__init__() got an unexpected keyword argument 'foo'); check "
                 "model.encoder_kwargs against the timm model's arguments", id="bad-kwargs"),
    pytest.param(["model=bisenet_convnext_t", "model.encoder=vit_small_patch16_224",
                  "+model.encoder_kwargs.dynamic_img_size=true"],
                 "error: model.encoder=vit_small_patch16_224 gives features at 1/16, 1/16, 1/16, "
                 "1/16, and BiSeNet's context path reads 1/16 and 1/32; choose a hierarchical "
                 "encoder (ConvNeXt, Swin, ResNet, EfficientNet) or a DeepLabV3 model",
                 id="bisenet-needs-32"),
    pytest.param(["model=deeplabv3_convnext_t", "model.encoder=vit_base_patch16_clip_224.openai",
                  "model.output_stride=null", "+model.encoder_kwargs.dynamic_img_size=true",
                  "model.pretrained=imagenet"],
                 "error: model.pretrained=imagenet: timm's vit_base_patch16_clip_224.openai was "
                 "trained on images normalised with mean (0.48145466, 0.4578275, 0.40821073) / "
                 "std (0.26862954, 0.26130258, 0.27577711), and the suite normalises with "
                 "ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); choose a tag trained "
                 "with those (e.g. *.fb_in1k, *.ms_in1k)", id="other-normalisation"),
    pytest.param(["model=deeplabv3_convnext_t", "model.pretrained=/no/such.pth"],
                 "error: model.pretrained=/no/such.pth: no such file; give a timm state dict of "
                 "convnext_tiny.fb_in1k, 'imagenet', or null to train from scratch",
                 id="missing-file"),
]


@pytest.mark.parametrize("args, line", TIMM_CASES)
def test_timm_config_errors_one_line(tmp_path, monkeypatch, capsys, args, line):
    assert run_main(monkeypatch, capsys, "experiment=smoke", *dirs(tmp_path), *args) == line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ---- the protocol ------------------------------------------------------------------------------

SMOKE = ["experiment=smoke", "logger=none", "dataset.generator.n_train=80",
         "dataset.generator.n_val=8", "dataset.generator.n_test=16"]


@pytest.mark.parametrize("model, method", [
    ("deeplabv3_convnext_t", "mib"),
    pytest.param("deeplabv3_convnext_t", "plop", marks=pytest.mark.slow),
    pytest.param("deeplabv3_convnext_t", "dkd", marks=pytest.mark.slow),
    pytest.param("deeplabv3_swin_t", "mib", marks=pytest.mark.slow),
    pytest.param("deeplabv3_swin_t", "plop", marks=pytest.mark.slow),
    pytest.param("deeplabv3_swin_t", "dkd", marks=pytest.mark.slow),
    pytest.param("bisenet_convnext_t", "plop", marks=pytest.mark.slow),
])
def test_smoke_protocol_on_timm_encoders(tmp_path, model, method):
    """Two steps on 32 px shapes: MiB (unbiased CE / KD, init_balanced), PLOP (local POD on the
    stages and the decoder, pseudo-labels) and DKD (its heads, the encoder at lr / 10) read
    only the contract, so each runs through step 1 on the timm encoders."""
    from incseg.protocol import run_protocol

    cfg = compose([*SMOKE, f"model={model}", f"method={method}",
                   f"paths.cache_dir={tmp_path / 'cache'}"])
    validate(cfg)
    out = run_protocol(cfg, tmp_path / "run")
    assert out["method"] == method and out["model"] == model
    assert [s["step"] for s in out["steps"]] == [0, 1]
    assert all(0.0 <= out["final"][k] <= 1.0 for k in ("old", "new", "all"))


@pytest.mark.slow
def test_deepinversion_replay_runs_on_a_batchnorm_timm_encoder(tmp_path):
    """EfficientNet-B0's 48 BatchNorms + the ASPP's 3: the generator hooks them all."""
    from incseg.protocol import run_protocol

    cfg = compose([*SMOKE, "model=deeplabv3_efficientnet_b0", "method=mib",
                   "replay=deepinversion", "replay.verifier=none", "inversion.n_per_class=1",
                   "inversion.iterations_low=2", "inversion.iterations_full=2",
                   "inversion.batch_size=8", f"paths.cache_dir={tmp_path / 'cache'}"])
    validate(cfg)
    check_replay_model(cfg)
    out = run_protocol(cfg, tmp_path / "run")
    replay = out["steps"][1]["replay"]
    assert replay["images"] == 15 and 0.0 <= replay["teacher_accuracy"] <= 1.0


# ---- ImageNet weights: fetched from a hub the test serves on 127.0.0.1 ------------------------

class FakeHub:
    """The two requests of huggingface_hub's download (HEAD for the commit, etag and size; GET
    for the bytes) for ``/<repo>/resolve/main/<file>``; ``status`` answers every request
    instead when set; ``requests`` counts them."""

    def __init__(self, files: dict[str, bytes]):
        import hashlib
        import http.server
        import threading

        hub = self
        self.files, self.status, self.requests = files, None, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self) -> bytes | None:
                hub.requests.append((self.command, self.path))
                body = hub.files.get(self.path)
                if hub.status or body is None:
                    self.send_response(hub.status or 404)
                    if not hub.status:  # the hub's answer for a file its repo does not hold
                        self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("X-Repo-Commit", "c" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                body = self._head()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fake_hub(monkeypatch):
    """Online, with the hub at 127.0.0.1: HF_ENDPOINT points there and HF_HUB_OFFLINE is off
    (in the environment and in huggingface_hub's constant, frozen at its import); sockets still
    connect to the loopback address only (``offline_hub``)."""
    from huggingface_hub import constants
    from safetensors.torch import save

    torch.manual_seed(2)
    state = timm.create_model("convnext_atto").state_dict()
    body = save({k: v.contiguous() for k, v in state.items()})
    hub = FakeHub({"/timm/convnext_atto.d2_in1k/resolve/main/model.safetensors": body})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("INCSEG_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.state = state
    yield hub
    hub.server.shutdown()


def test_imagenet_weights_are_downloaded_once_then_read_from_the_cache(fake_hub, offline_hub):
    """timm's file of convnext_atto.d2_in1k, fetched into the hub cache by huggingface_hub
    (HEAD + GET), loaded through timm; a second model reads the cache: no request."""
    TimmDeepLabV3.check_config("convnext_atto.d2_in1k", pretrained="imagenet")  # no download
    assert fake_hub.requests == []
    enc = TimmEncoder("convnext_atto.d2_in1k", pretrained="imagenet")
    assert [m for m, _ in fake_hub.requests] == ["HEAD", "GET"]
    assert torch.equal(enc.net.state_dict()["stem_0.weight"], fake_hub.state["stem.0.weight"])
    assert len(list(offline_hub.rglob("model.safetensors"))) == 1
    fake_hub.requests.clear()
    again = TimmEncoder("convnext_atto.d2_in1k", pretrained="imagenet")
    assert fake_hub.requests == []
    assert torch.equal(again.net.state_dict()["stem_0.weight"], fake_hub.state["stem.0.weight"])


@pytest.mark.parametrize("status", [401, 403])  # huggingface_hub: an HTTP error; "no connection"
def test_a_refused_download_is_one_line(fake_hub, offline_hub, status):
    fake_hub.status = status
    with pytest.raises(ConfigError) as err:
        TimmEncoder("convnext_atto.d2_in1k", pretrained="imagenet")
    msg = str(err.value)
    assert msg.startswith("model.pretrained=imagenet: cannot download timm's weights of "
                          "convnext_atto.d2_in1k from the Hugging Face hub (timm/convnext_atto."
                          "d2_in1k/model.safetensors: ")
    assert msg.endswith(f") into {offline_hub}; check the network, or set model.pretrained=null "
                        "to train from scratch")
    assert "\n" not in msg and not list(offline_hub.rglob("model.safetensors"))


def test_a_hub_repo_without_the_files_is_one_line(fake_hub):
    fake_hub.files.clear()  # 404 for model.safetensors and pytorch_model.bin
    with pytest.raises(ConfigError, match=r"^model.pretrained=imagenet: the hub repo "
                       r"timm/convnext_atto.d2_in1k holds none of model.safetensors, "
                       r"pytorch_model.bin; pass a weights file as model.pretrained=PATH$"):
        TimmEncoder("convnext_atto.d2_in1k", pretrained="imagenet")
    assert sorted({p.rsplit("/", 1)[1] for _, p in fake_hub.requests}) == [
        "model.safetensors", "pytorch_model.bin"]


def test_a_name_without_hub_weights_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.pretrained=imagenet: timm has no Hugging Face "
                       r"hub weights for botnet50ts_256; name a tag that has"):
        timm_weights_file("botnet50ts_256", download=True)
