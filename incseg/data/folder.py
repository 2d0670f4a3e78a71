"""``dataset=folder``: a user's own dataset in a plain layout.

::

    <root>/images/<id>.jpg (or .jpeg, .png)   any size and aspect
    <root>/masks/<id>.png                     single-channel (L or P) PNG of class ids, 255 = void
    <root>/train.txt, test.txt [, val.txt]    one <id> per line
    <root>/classes.yaml                       classes: [background, {name: car, color: [r,g,b]}]

The class list is the dataset's own: its length is the number of classes (id 0 is the
background, as in VOC and ADE20K), its names may stand for ids in a custom split, and its
colours replace the VOC palette in predictions and overlays (a class without a colour keeps
VOC's colour of its id, so masks saved as VOC palette PNGs look the same).

Without ``val.txt`` there is no validation split: the run trains on the whole training list
and skips per-epoch validation, which is the literature's setting (MiB and PLOP select nothing
on a validation set). Validation never borrows test images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from incseg.data.base import Sample, Source
from incseg.data.prepare import voc_colormap
from incseg.errors import DataError
from incseg.io import stable_hash
from incseg.tasks import IGNORE

CLASSES_FILE = "classes.yaml"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "images/, masks/, train.txt, test.txt and classes.yaml"
CLASSES_HINT = ("write it as `classes:` followed by the class names in id order, background "
                "(id 0) first; an item may be {name: car, color: [r, g, b]}")


@dataclass(frozen=True)
class ClassList:
    """The classes of a folder dataset in id order, with one RGB colour each."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def palette(self) -> np.ndarray:
        """256 x 3 uint8: the dataset's colours over the VOC palette (void 255 keeps VOC's)."""
        pal = voc_colormap(256)
        pal[: len(self.colors)] = np.asarray(self.colors, dtype=np.uint8)
        return pal


def _color(value, where: str, path: Path) -> tuple[int, int, int]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                  for v in value))
    if not ok:
        raise DataError(f"classes file {path}: {where} has color {value!r}; give it as "
                        "[r, g, b] with whole numbers 0..255")
    return tuple(int(v) for v in value)


def read_classes(path: Path) -> ClassList:
    """Parse and check ``classes.yaml`` (one-line DataError for anything malformed)."""
    import yaml

    if not path.is_file():
        raise DataError(f"classes file {path} is missing; {CLASSES_HINT}")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = " ".join(str(err).split())
        raise DataError(f"classes file {path} is not valid YAML ({first}); {CLASSES_HINT}"
                        ) from None
    items = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise DataError(f"classes file {path} has no list under `classes`; {CLASSES_HINT}")
    if not 2 <= len(items) <= IGNORE:
        raise DataError(f"classes file {path} lists {len(items)} classes; it needs the "
                        f"background (id 0) and at least one more, and at most {IGNORE} "
                        f"(ids 0..{IGNORE - 1}; {IGNORE} marks void pixels)")
    palette = voc_colormap(len(items))
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    for i, item in enumerate(items):
        color = tuple(int(v) for v in palette[i])
        if isinstance(item, dict):
            unknown = sorted(set(map(str, item)) - {"name", "color"})
            if unknown:
                raise DataError(f"classes file {path}: class {i} has unknown key "
                                f"{unknown[0]!r}; an item is a name or {{name: ..., color: "
                                "[r, g, b]}")
            if "color" in item:
                color = _color(item["color"], f"class {i}", path)
            item = item.get("name")
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"classes file {path}: class {i} is {item!r}, not a name; "
                            f"{CLASSES_HINT}")
        name = item.strip()
        if name in names:
            raise DataError(f"classes file {path}: class {i} repeats the name {name!r} of "
                            f"class {names.index(name)}; names must be unique")
        names.append(name)
        colors.append(color)
    return ClassList(tuple(names), tuple(colors))


class FolderSource(Source):
    """``images/``, ``masks/``, ``train.txt``, ``test.txt`` (optional ``val.txt``) and
    ``classes.yaml`` under ``data.root`` (see the module docstring)."""

    name = "folder"
    layout_hint = LAYOUT

    def __init__(self, root, val: str | None = None):
        # ``val.txt`` is optional: with it ``data.val=split`` (the folder default) reads it;
        # without it the default validates nothing, and holdout / none apply as for VOC.
        if root is not None and str(root) not in ("", "None", "null"):
            self.own_val = (Path(os.path.expanduser(str(root))) / "val.txt").is_file()
        if val == "split" and not self.own_val:
            val = "none"
        super().__init__(root, val)
        self.classes = read_classes(self.root / CLASSES_FILE)
        self.num_classes = len(self.classes.names)
        self.mask_value_fix = f"fix the mask, or add the class to {self.root / CLASSES_FILE}"
        self._samples: dict[str, list[Sample]] = {}
        self._identity: str | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names

    def class_info(self) -> dict:
        return {"class_names": list(self.classes.names),
                "class_colors": [list(c) for c in self.classes.colors]}

    def cache_identity(self) -> str:
        """A user's own data changes between runs (a mask fixed, images added): a cached
        step-0 model is keyed by the class list, the training list and every training file's
        size and modification time, not by the folder's name alone."""
        if self._identity is None:
            files = []
            for s in self.samples("train"):
                img, mask = os.stat(s.image), os.stat(s.mask)
                files.append([s.image.name, img.st_size, img.st_mtime_ns, mask.st_size,
                              mask.st_mtime_ns])
            self._identity = f"{self.root}#" + stable_hash(
                {"classes": self.class_info(), "train": files})
        return self._identity

    def listed(self, split: str) -> list[Sample]:
        if split not in self._samples:
            self._samples[split] = self._read(split)
        return self._samples[split]

    def _read(self, split: str) -> list[Sample]:
        lst = self._require(self.root / f"{split}.txt", "list file",
                            f"write it with one image id per line (data.root must hold {LAYOUT})")
        img_dir = self._require(self.root / "images", "image folder", f"data.root must hold "
                                f"{LAYOUT}")
        mask_dir = self._require(self.root / "masks", "mask folder", f"data.root must hold "
                                 f"{LAYOUT}")
        samples = []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            where = f"{lst}:{n}"
            if len(parts) != 1:
                raise DataError(f"{where}: expected one image id per line, got {line.strip()!r}")
            sid = parts[0]
            found = [img_dir / f"{sid}{s}" for s in IMAGE_SUFFIXES
                     if (img_dir / f"{sid}{s}").is_file()]
            if not found:
                raise DataError(f"{where} lists {sid!r} but {img_dir}/{sid}.jpg (or .png) is "
                                f"missing; add the image or remove the line")
            if len(found) > 1:
                raise DataError(f"{where} lists {sid!r} and both {found[0].name} and "
                                f"{found[1].name} are in {img_dir}; keep one of them")
            mask = mask_dir / f"{sid}.png"
            if not mask.is_file():
                raise DataError(f"{where} lists {sid!r} but its mask {mask} is missing; add the "
                                "mask or remove the line")
            samples.append(Sample(sid, found[0], mask))
        return samples
