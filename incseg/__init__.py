"""incseg: class-incremental semantic segmentation (BiSeNet, MiB protocol, DeepInversion replay)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("incseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
