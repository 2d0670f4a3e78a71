"""Load a script of ``experiments/`` as a module (they are scripts, not a package)."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name: str):
    """``experiments/<name>.py`` as the module ``name`` (registered in ``sys.modules`` so its
    dataclasses and its own ``import`` of a sibling script resolve)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
