"""``python -m incseg.predict checkpoint=PATH input=DIR output=DIR [model=NAME] [size=N]`` (or
``incseg-predict``; ``--help`` lists the keys from :data:`KEYS`).

Segments every image (jpg/jpeg/png, sorted by name) in ``input`` with a run's model checkpoint
(``checkpoints/step<t>.pt``) and writes, per image, ``<stem>_mask.png`` (palette PNG of dataset
class ids, the VOC mask format) and ``<stem>_overlay.png`` (the image blended with the colour
map, alpha 0.5), in the dataset's own colours where the checkpoint records them (``folder``'s
classes.yaml), else VOC's. Arguments are ``key=value`` like every other incseg command (one option
system). ``size`` resizes the shorter side before the model (as the eval ``resize`` mode, without
the centre crop); by default the image is segmented at its own resolution. Masks always have
the input image's size. One JSON summary line on stdout; progress and logs on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from incseg.cli import help_text, report_errors, wants_help
from incseg.config import setup_logging
from incseg.errors import ConfigError, DataError

log = logging.getLogger("incseg.predict")

USAGE = ("usage: python -m incseg.predict checkpoint=PATH input=DIR output=DIR "
         "[model=bisenet_r18] [size=N] (--help for more)")
#: the arguments, key -> what it is (``--help`` prints this table)
KEYS = {
    "checkpoint": "a run's model file, e.g. RUN_DIR/checkpoints/step1.pt (the classes of that "
                  "step)",
    "input": "a folder of .jpg/.jpeg/.png images (sorted by name)",
    "output": "the folder the masks and overlays are written to (created; not the input)",
    "model": "optional: the model the checkpoint must hold (a conf/model name); a checkpoint "
             "of another model is refused (default: whatever model it records)",
    "size": "the shorter side in pixels before the model, or full (default: full, the "
            "image's own resolution)",
}
REQUIRED = ("checkpoint", "input", "output")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str]) -> dict[str, str | None]:
    """``key=value`` arguments -> dict; unknown or missing keys are one-line errors.

    Parsed by hand rather than with OmegaConf.from_dotlist so that a path stays a string
    (``output=1`` or ``input=null`` would otherwise change type).
    """
    args: dict[str, str | None] = dict.fromkeys(KEYS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not key=value; {USAGE}")
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        args[key] = value
    missing = [k for k in REQUIRED if not args[k]]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=' for k in missing)}; {USAGE}")
    return args


def parse_size(value: str | None) -> int | None:
    if value in (None, "", "null", "none", "full"):
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 8:
        raise ConfigError(f"size={value} is not valid; give the shorter side in pixels (>= 8) "
                          "or size=full for the image's own resolution")
    return size


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist; pass input=DIR with images")
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"input folder {folder} holds no .jpg/.jpeg/.png images")
    stems = [p.stem for p in images]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise DataError(f"input folder {folder} holds several images named {clash[0]}.* whose "
                        "outputs would overwrite each other; rename one of them")
    return images


def check_images(images: list[Path]) -> None:
    """Open every image's header before any output is written, so a broken file stops the run
    before it has produced a partial set of masks."""
    from incseg.data.index import image_size

    for p in images:
        image_size(p)


def predict(args: dict[str, str | None]) -> dict:
    import torch
    from tqdm import tqdm

    from incseg.data.dataset import read_image
    from incseg.viz import (
        load_segmenter,
        overlay,
        palette_of,
        predict_ids,
        to_input,
        write_palette_png,
        write_rgb_png,
    )

    size = parse_size(args["size"])
    inp, out = Path(args["input"]), Path(args["output"])
    images = list_images(inp)
    if out.resolve() == inp.resolve():
        raise ConfigError("output= must differ from input= (masks would be read as inputs "
                          "next time); choose another folder")
    model, class_ids, meta = load_segmenter(args["checkpoint"], args["model"])
    palette = palette_of(meta.get("class_colors"))  # the dataset's colours, else VOC's
    check_images(images)
    if torch.cuda.is_available():
        model = model.cuda()
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predict", unit="img", file=sys.stderr):
        image = read_image(path)
        ids = predict_ids(model, to_input(image, size), class_ids, out_size=image.shape[:2],
                          prediction=meta["prediction"])[0]
        write_palette_png(ids, out / f"{path.stem}_mask.png", palette)
        write_rgb_png(overlay(image, ids, 0.5, palette), out / f"{path.stem}_overlay.png")
    names = meta.get("class_names")
    return {"checkpoint": str(args["checkpoint"]), "model": meta["model"],
            "step": meta["step"], "classes": class_ids,
            **({"class_names": [names[c] for c in class_ids]} if names else {}),
            "images": len(images), "output": str(out)}


def usage_help() -> str:
    return help_text(
        "python -m incseg.predict checkpoint=PATH input=DIR output=DIR [model=NAME] [size=N]"
        "   (or: incseg-predict ...)",
        "Segment every image of a folder with a trained incseg model. Writes, per image, "
        "<name>_mask.png (a palette PNG of dataset class ids, the PASCAL VOC mask format, at the "
        "image's own size) and <name>_overlay.png (the image blended with the class colours); "
        "prints one JSON summary line on stdout. Runs on the GPU when there is one.",
        [("arguments (key=value)", list(KEYS.items()))],
        ["python -m incseg.predict checkpoint=runs/shapes/15-5/mib/seed0/checkpoints/step1.pt "
         "input=photos output=masks",
         "python -m incseg.predict checkpoint=step1.pt input=photos output=masks size=512"])


@report_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage_help(), flush=True)
        return
    setup_logging()
    args = parse_args(argv)
    print(json.dumps(predict(args)), flush=True)


if __name__ == "__main__":
    main()
