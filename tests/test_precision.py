"""The ``auto`` precision / memory-format rules (incseg.precision), case by case."""

from __future__ import annotations

import pytest

from incseg.config import compose
from incseg.errors import ConfigError
from incseg.precision import (
    device_type,
    resolve_channels_last,
    resolve_precision,
    training_format,
)

# (requested, device, crop, cpu_bf16, cuda_bf16) -> precision
PRECISION_CASES = [
    # CPU: bf16-mixed only from 128 px and only with native bf16
    ("auto", "cpu", 64, True, False, "32-true"),
    ("auto", "cpu", 127, True, False, "32-true"),
    ("auto", "cpu", 128, True, False, "bf16-mixed"),
    ("auto", "cpu", 512, True, False, "bf16-mixed"),
    ("auto", "cpu", 512, False, False, "32-true"),
    ("auto", "cpu", 512, False, True, "32-true"),  # a GPU's bf16 says nothing about the CPU
    (None, "cpu", 256, True, False, "bf16-mixed"),
    ("AUTO", "cpu", 64, False, False, "32-true"),
    # CUDA: mixed precision at any crop; bf16 where supported
    ("auto", "cuda", 64, False, True, "bf16-mixed"),
    ("auto", "cuda", 512, False, False, "16-mixed"),
    ("auto", "cuda", 32, True, False, "16-mixed"),
    # other accelerators stay in fp32
    ("auto", "other", 512, True, True, "32-true"),
    # explicit values win, normalised to one spelling
    ("32-true", "cpu", 512, True, False, "32-true"),
    ("bf16-mixed", "cpu", 64, False, False, "bf16-mixed"),
    ("16-mixed", "cuda", 64, False, True, "16-mixed"),
    ("32", "cuda", 512, False, True, "32-true"),
    (16, "cuda", 512, False, True, "16-mixed"),
    ("bf16", "cpu", 32, False, False, "bf16-mixed"),
]


@pytest.mark.parametrize("requested,device,crop,cpu_bf16,cuda_bf16,expected", PRECISION_CASES)
def test_resolve_precision(requested, device, crop, cpu_bf16, cuda_bf16, expected):
    assert resolve_precision(requested, device=device, crop=crop, cpu_bf16=cpu_bf16,
                             cuda_bf16=cuda_bf16) == expected


@pytest.mark.parametrize("requested,precision,expected", [
    ("auto", "32-true", False),
    ("auto", "bf16-mixed", True),
    ("auto", "16-mixed", True),
    ("auto", "bf16", True),        # legacy spelling of bf16-mixed
    ("auto", "64-true", False),
    (None, "16-mixed", True),
    (True, "32-true", True),       # explicit values win
    (False, "bf16-mixed", False),
    ("true", "32-true", True),
    ("False", "16-mixed", False),
])
def test_resolve_channels_last(requested, precision, expected):
    assert resolve_channels_last(requested, precision) is expected


@pytest.mark.parametrize("requested,precision,device,crop,expected", [
    ("auto", "32-true", "cpu", 64, False),     # NHWC was 2 % slower at 64 px
    ("auto", "32-true", "cpu", 128, True),     # and 4-11 % faster from 128 px
    ("auto", "32-true", "cpu", 512, True),
    ("auto", "32-true", "cuda", 512, False),   # fp32 on a GPU: not measured, left contiguous
    ("auto", "32-true", "other", 512, False),
    ("auto", "bf16-mixed", "cpu", 64, True),   # low precision: NHWC whatever the crop
    (False, "32-true", "cpu", 512, False),     # explicit values win
])
def test_channels_last_by_device_and_crop(requested, precision, device, crop, expected):
    assert resolve_channels_last(requested, precision, device=device, crop=crop) is expected


def test_channels_last_rejects_nonsense():
    with pytest.raises(ConfigError, match="train.channels_last"):
        resolve_channels_last("sometimes", "32-true")


@pytest.mark.parametrize("accelerator,cuda,expected", [
    ("cpu", True, "cpu"), ("cpu", False, "cpu"), ("gpu", True, "cuda"), ("cuda", True, "cuda"),
    ("gpu", False, "other"), ("auto", True, "cuda"), ("auto", False, "cpu"),
    ("mps", False, "other"),
])
def test_device_type(accelerator, cuda, expected):
    assert device_type(accelerator, cuda) == expected


def test_shipped_configs_default_to_auto_and_resolve_on_this_machine(monkeypatch):
    cfg = compose([])
    assert cfg.trainer.precision == "auto" and cfg.train.channels_last == "auto"
    # the shapes crop (64 px) is below the bf16 threshold whatever the CPU
    assert training_format(cfg).as_dict() == {"precision": "32-true", "channels_last": False}
    # explicit values pass through untouched (no hardware probe decides them)
    cfg = compose(["trainer.precision=bf16-mixed", "train.channels_last=false"])
    assert training_format(cfg).as_dict() == {"precision": "bf16-mixed", "channels_last": False}
    # a large crop on a CPU with AMX: bf16-mixed and NHWC together
    import incseg.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    big = compose(["data.crop=256"])
    assert training_format(big).as_dict() == {"precision": "bf16-mixed", "channels_last": True}
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert training_format(big).as_dict() == {"precision": "32-true", "channels_last": True}


def test_recipe_carries_the_resolved_memory_format(monkeypatch):
    import incseg.precision as precision
    from incseg.protocol import recipe

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert recipe(compose(["data.crop=128"]), 1).channels_last is True
    assert recipe(compose([]), 1).channels_last is False
    assert recipe(compose(["train.channels_last=true"]), 0).channels_last is True
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert recipe(compose(["data.crop=128"]), 1).channels_last is True  # fp32 NHWC from 128 px
    assert recipe(compose(["data.crop=128", "train.channels_last=false"]), 1).channels_last \
        is False


def test_auto_and_the_value_it_resolves_to_share_run_and_cache_keys():
    """Resume checks and cache keys hash the resolved format: `auto` that resolves to fp32
    contiguous is the same run as an explicit 32-true / channels_last=false."""
    from incseg.config import compose
    from incseg.io import stable_hash
    from incseg.protocol import fingerprint

    explicit = compose(["trainer.precision=32-true", "train.channels_last=false"])
    auto = compose(["trainer.precision=auto", "train.channels_last=auto", "data.crop=64"])
    explicit_64 = compose(["trainer.precision=32-true", "train.channels_last=false",
                           "data.crop=64"])
    assert stable_hash(fingerprint(auto)) == stable_hash(fingerprint(explicit_64))
    assert fingerprint(explicit)["trainer"]["precision"] == "32-true"
    bf16 = compose(["trainer.precision=bf16-mixed", "train.channels_last=true"])
    assert stable_hash(fingerprint(bf16)) != stable_hash(fingerprint(explicit))
