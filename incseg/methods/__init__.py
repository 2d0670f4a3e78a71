"""Class-incremental methods: one file each over the :class:`Method` interface.

A method is chosen with ``method=<name>``: ``conf/method/<name>.yaml`` names its class with
``_target_`` and holds its weights. Adding one is a Python file and a YAML (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from incseg.methods.base import Batch, Method, StepContext

__all__ = ["Batch", "Method", "StepContext", "build_method", "is_joint", "method_prediction"]


def is_joint(method_cfg: Mapping[str, Any]) -> bool:
    """Joint (offline) training is a protocol mode, not a method: one step over all classes."""
    return bool(method_cfg.get("joint", False))


def build_method(method_cfg: Mapping[str, Any]) -> Method:
    """The :class:`Method` that ``conf/method/<name>.yaml`` names (ValueError / TypeError for a
    value out of range or a key the class does not take)."""
    from incseg.config.build import has_target, instantiate

    if not has_target(method_cfg):
        raise ValueError(f"method {method_cfg.get('name')!r} names no _target_ class")
    method = instantiate(method_cfg)
    if not isinstance(method, Method):
        raise TypeError(f"{method_cfg['_target_']} is not an incseg.methods.Method")
    return method


def method_prediction(method_cfg: Mapping[str, Any]) -> str:
    """The prediction rule of the method ``conf/method/<name>.yaml`` names (its class's
    ``prediction``, read without building it): what the replay's generator objective and
    distance follow. ``argmax`` for Joint and a config without a class."""
    from incseg.config.build import has_target, target_class

    if is_joint(method_cfg) or not has_target(method_cfg):
        return "argmax"
    return str(getattr(target_class(method_cfg), "prediction", "argmax"))
