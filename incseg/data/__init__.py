"""Data layer: dataset sources (VOC, ADE20K, the built-in `shapes`), per-step selection and
label remapping (MiB protocol), albumentations pipelines and the LightningDataModule."""
