"""Data layer: dataset sources (VOC, ADE20K, the built-in `shapes`), per-step selection and
label remapping (MiB protocol), albumentations pipelines and the LightningDataModule."""

import os

# albumentations asks PyPI for a newer version on import unless this is set: a network call
# on every start (and a hang on an offline node). Set before any submodule imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
