"""Numeric precision and memory format of training: what ``auto`` means.

``trainer.precision: auto`` and ``train.channels_last: auto`` (the defaults) are resolved once
per Trainer from the accelerator, the training crop and what the hardware does fast:

    CUDA   bf16-mixed where the GPU supports bf16 (Ampere and newer), else 16-mixed.
    CPU    bf16-mixed when the crop is >= 128 px and the CPU has native bf16 matrix units
           (AMX-BF16); 32-true otherwise.
    other  (MPS, ...) 32-true: mixed precision there is not something we have measured.
    channels_last: on with 16/bf16 compute; with fp32 on a CPU, on from 128 px crops.

Explicit values in the config always win (``trainer.precision=bf16-mixed``,
``train.channels_last=true``).

Why "native bf16" means AMX and not merely AVX512-BF16. On the suite's reference 2-core Xeon
(AVX512-BF16, no AMX; torch 2.14, 2 threads) bf16 is slower than fp32 at the kernel level: a
1024^2 matmul runs at 50 GFLOP/s in bf16 against 93 in fp32, and a 3x3 convolution in NHWC at
42-54 GFLOP/s against 67 (one process timing both in turn while other jobs shared the machine,
so the ratio counts, not the absolute rates), although oneDNN picks its avx512_core_bf16
kernels (ONEDNN_VERBOSE). On the idle machine a BiSeNet-R18 training step at 128 px (batch 16)
therefore loses with autocast: 23.9 img/s bf16 and 25.8 bf16 + channels_last against 32.3
fp32; the profile puts the loss in the convolutions themselves (forward 102 -> 169 ms,
backward 226 -> 350 ms per step), not in casts. AMX tiles multiply bf16 an order of magnitude
faster than AVX512 FMAs, which is where the trade pays. ``experiments/bench/run.py``
measures it on the machine at hand.

Why channels_last for fp32 from 128 px: the same step at 128 px ran at 35.8 img/s in NHWC
against 32.3 contiguous (1.11x; 1.21x at 256 px, batch 8), and the MiB student step of the
benchmark at 18.9 against 18.2; at 64 px NHWC was 2 % slower (57.6 against 58.9 img/s).

The rules are pure functions of their inputs (tested in ``tests/test_precision.py``); the
hardware is probed only by :func:`training_format`, and only when a rule needs the answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from incseg.errors import ConfigError

#: smallest training crop at which the CPU rule switches to bf16-mixed
CPU_BF16_MIN_CROP = 128
#: smallest training crop at which fp32 on a CPU trains in channels_last
CPU_CHANNELS_LAST_MIN_CROP = 128

# Lightning's legacy spellings, normalised so the rules compare one form.
_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true",
            "half": "16-true", "double": "64-true"}
_LOW_PRECISION = ("16-mixed", "bf16-mixed", "16-true", "bf16-true")


def normalise_precision(precision) -> str:
    """Lightning's spellings to one form (``16`` -> ``16-mixed``, ``32`` -> ``32-true``)."""
    text = str(precision).strip()
    return _ALIASES.get(text, text)


def is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def device_type(accelerator: str, cuda_available: bool) -> str:
    """``cpu``, ``cuda`` or ``other`` for a Lightning ``accelerator`` name."""
    acc = str(accelerator).lower()
    if acc == "cpu":
        return "cpu"
    if acc in ("gpu", "cuda"):
        return "cuda" if cuda_available else "other"  # "gpu" on a Mac is MPS
    if acc == "auto":
        return "cuda" if cuda_available else "cpu"
    return "other"


def resolve_precision(requested, *, device: str, crop: int, cpu_bf16: bool,
                      cuda_bf16: bool) -> str:
    """The Lightning precision string to train with.

    ``requested``: the configured value (``auto``/None, or an explicit precision that is
    returned normalised). ``device``: from :func:`device_type`. ``crop``: the training crop in
    px. ``cpu_bf16``: the CPU has native bf16 matrix units (AMX). ``cuda_bf16``: the GPU
    supports bf16.
    """
    if not is_auto(requested):
        return normalise_precision(requested)
    if device == "cuda":
        return "bf16-mixed" if cuda_bf16 else "16-mixed"
    if device == "cpu" and cpu_bf16 and int(crop) >= CPU_BF16_MIN_CROP:
        return "bf16-mixed"
    return "32-true"


def resolve_channels_last(requested, precision: str, *, device: str = "other",
                          crop: int = 0) -> bool:
    """Whether to train in channels_last: explicit booleans win; ``auto`` is on with 16/bf16
    compute (NHWC is the layout the bf16/fp16 convolution kernels of oneDNN and cuDNN work in)
    and, with fp32 on a CPU, from ``CPU_CHANNELS_LAST_MIN_CROP`` px (see the module notes)."""
    if isinstance(requested, bool):
        return requested
    if is_auto(requested):
        if normalise_precision(precision) in _LOW_PRECISION:
            return True
        return device == "cpu" and int(crop) >= CPU_CHANNELS_LAST_MIN_CROP
    text = str(requested).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"train.channels_last={requested!r} is not valid; use auto, true or false")


@functools.lru_cache(maxsize=1)
def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's model name with its family and model numbers (Linux: /proc/cpuinfo; elsewhere
    platform's processor string): CPU results agree only between runs on the same CPU kind, and
    a virtual machine's name alone ("AMD EPYC") can hide two generations, so a result file
    names both."""
    import platform

    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or None
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels dispatch to (``DEFAULT``, ``AVX2``, ``AVX512``):
    two CPUs that pick different kernels sum in different orders, so their results differ in
    the last digits even at one thread."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # older torch
        return "unknown"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has AMX-BF16 tiles (Linux: the ``amx_bf16`` flag of /proc/cpuinfo;
    elsewhere torch's capability string is the only portable hint)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_bf16" in line.split()
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    except (AttributeError, RuntimeError):
        return False


def cuda_supports_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class TrainingFormat:
    precision: str
    channels_last: bool

    def as_dict(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last}


def training_format(cfg) -> TrainingFormat:
    """Resolve ``trainer.precision`` and ``train.channels_last`` of a composed config."""
    requested = cfg.trainer.get("precision", "auto")
    device = device_type(cfg.trainer.get("accelerator", "auto"), torch.cuda.is_available())
    crop = int(cfg.data.crop)
    # probe only what the rule reads: cuda_bf16 on CUDA, the CPU flags for a large crop on a CPU
    auto = is_auto(requested)
    cpu_bf16 = auto and device == "cpu" and crop >= CPU_BF16_MIN_CROP and cpu_has_native_bf16()
    cuda_bf16 = auto and device == "cuda" and cuda_supports_bf16()
    precision = resolve_precision(requested, device=device, crop=crop, cpu_bf16=cpu_bf16,
                                  cuda_bf16=cuda_bf16)
    channels_last = resolve_channels_last(cfg.train.get("channels_last", "auto"), precision,
                                          device=device, crop=crop)
    return TrainingFormat(precision, channels_last)
