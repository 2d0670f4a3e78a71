"""What a classifier can read from a frozen backbone: a linear probe of a `shapes` step-0 model.

    python experiments/probe.py RESULTS_DIR [--cache DIR] [--out FILE]

RESULTS_DIR is a diagnosis folder (``<condition>/<method>/results.json``, as for
``experiments/diagnosis.py``). For each condition it takes the step-0 models its runs trained
(MiB's, PLOP's, DKD's; found in the cache by the key each ``results.json`` records), Joint's
model, and a randomly initialised model of the same architecture, freezes each, and fits one
linear softmax classifier over all 21 classes on the ``decoder`` feature (what the main head
reads), upsampled to the label size, of the training split; then scores it on the test split.

Why: PLOP distils the features and DKD freezes BatchNorm and trains the backbone at a tenth of
the lr, so both learn a new class mostly by reading it off the features step 0 left. On VOC
those features come from ImageNet and separate objects step 0 was never taught (the premise of
both papers). The probe's new-class IoU measures how far that premise holds on `shapes`: near
Joint's, and a method's failure to learn the new classes lies in its training, not in the
representation; near the random model's, and no method that keeps the backbone can learn them.

Pixels: up to ``--per-class`` pixels of each class present in an image (void excluded), so the
background does not swamp the fit; the classifier is trained by full-batch L-BFGS with a small
weight decay. The test scores every pixel of every test image (per-class IoU over the split,
classes absent from the test ground truth left out, as the suite's own mIoU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from incseg.checkpoints import model_from_checkpoint, read_model_file
from incseg.data.shapes import shapes_key
from incseg.data.shapes_params import ShapesParams
from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from incseg.io import atomic_write_json, cache_dir
from incseg.metrics import iou_per_class
from incseg.models import build_model

N_CLASSES = 21
OLD = range(0, 16)   # background + the 15 classes of step 0 (15-5s)
NEW = range(16, 21)


def _read_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    base = root / "VOCdevkit" / "VOC2012"
    ids = (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    imgs = np.stack([np.asarray(Image.open(base / "JPEGImages" / f"{i}.jpg").convert("RGB"))
                     for i in ids])
    masks = np.stack([np.asarray(Image.open(base / "SegmentationClass" / f"{i}.png"))
                      for i in ids])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(masks).long()


@torch.no_grad()
def batches(model, x: torch.Tensor, batch: int = 64):
    """The ``decoder`` feature of each batch of images, bilinearly upsampled to the input size
    (one batch at a time: the whole split at full size would not fit in memory)."""
    model.eval()
    for i in range(0, len(x), batch):
        f = model(x[i:i + batch]).features["decoder"]
        yield i, F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)


def sample_pixels(feat: torch.Tensor, mask: torch.Tensor, per_class: int,
                  g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Up to ``per_class`` random pixels of each class present in each image (void 255 out)."""
    xs, ys = [], []
    for f, m in zip(feat, mask):
        flat_m = m.flatten()
        flat_f = f.flatten(1)
        for c in flat_m.unique().tolist():
            if c == 255:
                continue
            idx = (flat_m == c).nonzero().squeeze(1)
            pick = idx[torch.randperm(len(idx), generator=g)[:per_class]]
            xs.append(flat_f[:, pick].T)
            ys.append(torch.full((len(pick),), c, dtype=torch.long))
    return xs, ys


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int = N_CLASSES,
               weight_decay: float = 1e-4, iterations: int = 200) -> torch.nn.Linear:
    """A softmax classifier on standardised features, full-batch L-BFGS."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations,
                            line_search_fn="strong_wolfe")
    xn = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xn), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.div_(sd)
        head.bias.sub_((head.weight * mu).sum(1))
    return head


@torch.no_grad()
def confusion(head: torch.nn.Linear, feat: torch.Tensor, mask: torch.Tensor,
              n_classes: int = N_CLASSES) -> torch.Tensor:
    pred = head(feat.permute(0, 2, 3, 1).flatten(0, 2)).argmax(1)
    t = mask.flatten()
    keep = t != 255
    return torch.bincount(t[keep] * n_classes + pred[keep],
                          minlength=n_classes * n_classes).view(n_classes, n_classes)


def iou(conf: torch.Tensor) -> dict[int, float]:
    """Per-class IoU of the classes present in the ground truth (the suite's own IoU)."""
    return {c: v for c, v in enumerate(iou_per_class(conf)) if v is not None}


def summary(per_class: dict[int, float]) -> dict[str, float]:
    def mean(cs):
        v = [per_class[c] for c in cs if c in per_class]
        return sum(v) / len(v) if v else float("nan")
    return {"old": mean(OLD), "new": mean(NEW), "all": mean(range(N_CLASSES))}


def probe(model, train: tuple, test: tuple, per_class: int) -> dict:
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for i, f in batches(model, train[0]):
        bx, by = sample_pixels(f, train[1][i:i + len(f)], per_class, g)
        xs += bx
        ys += by
    y = torch.cat(ys)
    head = fit_linear(torch.cat(xs), y)
    conf = sum(confusion(head, f, test[1][i:i + len(f)]) for i, f in batches(model, test[0]))
    per = iou(conf)
    return {**summary(per), "per_class": {str(c): round(v, 6) for c, v in per.items()},
            "pixels": len(y)}


def models_of(condition: Path, cache: Path):
    """(label, checkpoint path or None for the random model, the condition's generator, model
    config) for each backbone the condition's runs trained."""
    out, gen, model_cfg = [], None, None
    for res in sorted(condition.glob("*/results.json")):
        run = json.loads(res.read_text())
        prov = run["provenance"]
        keys = prov.get("cache_keys") or {}
        cfg = prov["config"]
        gen = (cfg.get("dataset") or {}).get("generator") or {}
        model_cfg = cfg["model"]
        kind = "joint" if "joint" in keys else "step-0"
        out.append((f"{res.parent.name} {kind}", cache / "step0" / f"{keys[kind]}.pt"))
    out.append(("random init", None))
    return out, gen, model_cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--cache", type=Path, default=cache_dir())
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--only", nargs="*", default=None, help="condition folders to probe")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    result = dict(old)
    for cond in sorted(p for p in args.results.iterdir() if p.is_dir()):
        if args.only is not None and cond.name not in args.only:
            continue
        entries, gen, model_cfg = models_of(cond, args.cache)
        params = ShapesParams.from_dict(gen)
        root = args.cache / "shapes" / shapes_key(params)
        if not root.is_dir():
            raise SystemExit(f"error: the dataset of {cond.name} is not in the cache ({root}); "
                             "run one of its runs first to generate it")
        train, test = _read_split(root, "train"), _read_split(root, "test")
        rows = {}
        for label, path in entries:
            if path is None:
                torch.manual_seed(0)
                model = build_model(model_cfg, [N_CLASSES])
            else:
                if not path.is_file():
                    raise SystemExit(f"error: {label} of {cond.name}: {path} is not in the "
                                     "cache; rerun that run to train it again")
                model = model_from_checkpoint(read_model_file(path), path)
            rows[label] = probe(model, train, test, args.per_class)
            r = rows[label]
            print(f"{cond.name:24s} {label:16s} old {r['old']:.3f} new {r['new']:.3f} "
                  f"all {r['all']:.3f}", flush=True)
        result[cond.name] = {"per_class_pixels": args.per_class, "probes": rows,
                             "torch_threads": torch.get_num_threads()}
        if args.out:  # after each condition, atomically: an interrupted run keeps the rest
            atomic_write_json(args.out, result)
    if not args.out:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
