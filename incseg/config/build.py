"""The one place where config nodes become objects: Hydra's ``instantiate`` on ``_target_``.

A model or a method is named by its ``_target_`` in its YAML (``conf/model``, ``conf/method``);
there is no registry to extend. ``name`` and ``label`` are what runs and reports call the
choice, not constructor arguments, so they are left out of the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: keys of a group's YAML that describe the choice rather than configure the object
META_KEYS = ("name", "label")


def plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (resolved); anything else unchanged."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def has_target(node: Mapping | DictConfig | None) -> bool:
    return node is not None and node.get("_target_") not in (None, "")


def target_class(node: Mapping | DictConfig) -> type:
    """The class a node's ``_target_`` names (ImportError/AttributeError if there is none)."""
    from hydra.utils import get_class

    return get_class(str(node["_target_"]))


def constructor_kwargs(node: Mapping | DictConfig) -> dict[str, Any]:
    """A node's constructor arguments: everything but ``_target_`` and the meta keys."""
    return {k: v for k, v in plain(node).items() if k != "_target_" and k not in META_KEYS}


def instantiate(node: Mapping | DictConfig, **kwargs: Any) -> Any:
    """``node``'s ``_target_`` called with the node's arguments (as plain containers) and
    ``kwargs`` (which win). A constructor's own exception (a ValueError for a value out of
    range, a TypeError for an unknown key, a user-facing IncsegError, an ImportError for a
    ``_target_`` that is not there) is raised as itself, not wrapped in Hydra's."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from incseg.errors import IncsegError

    args = {"_target_": str(node["_target_"]), **constructor_kwargs(node)}
    try:
        return hydra_instantiate(args, **kwargs, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (TypeError, ValueError, ImportError, AttributeError,
                                      IncsegError)):
            raise err.__cause__ from None
        raise
