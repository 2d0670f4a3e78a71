"""How recognisable and how varied replay sets are, side by side (issue 16: with and without
Adaptive DeepInversion's competition).

    python experiments/replay_diversity.py --verifier MODEL.pt SET_DIR [SET_DIR ...] \
        [--names plain competition] [--out FILE.json]

``SET_DIR``: replay set entries of the cache (``<cache>/replay/<key>``, the folder holding
``manifest.json``); ``MODEL.pt``: an independent model that knows every old class, e.g. the
cached Joint model the protocol verifies with (``<cache>/joint/<key>.pt``) or any step's model
file of a Joint run. Per set: the verifier's accuracy (the verifier's image-level prediction
equals the image's class, matched by dataset class id, so the verifier may order its channels
differently from the teacher) and the diversity, the mean over classes of the mean pairwise
distance between the verifier's pooled, unit-length decoder features of the class's images
(:func:`incseg.replay.verdicts.class_diversity`; 0 = identical images, 2 at most).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from incseg.io import atomic_write_json
from incseg.replay import ReplayDataset
from incseg.replay.settings import InversionSettings
from incseg.replay.verdicts import class_diversity, pooled_features, verifier_predictions
from incseg.viz import load_segmenter


def measure(set_dir: Path, verifier, channel_of_class: dict[int, int],
            lse_r: float | None) -> dict:
    ds = ReplayDataset(set_dir)
    if lse_r is None:  # the sharpness the set was verified with, as the protocol logged it
        lse_r = InversionSettings.from_dict(ds.replay_set.manifest["settings"]).lse_r
    images = torch.stack([ds[i] for i in range(len(ds))])
    classes = ds.replay_set.class_ids
    missing = sorted(set(classes) - set(channel_of_class))
    if missing:
        raise SystemExit(f"{set_dir}: the verifier knows no class {missing}; give a model "
                         "trained on every old class (a Joint model)")
    preds = verifier_predictions(verifier, images, lse_r)
    hits = [int(p) == channel_of_class[c] for p, c in zip(preds, classes, strict=True)]
    div = class_diversity(pooled_features(verifier, images), classes)
    return {"images": len(ds), "classes": len(div),
            "verifier_accuracy": sum(hits) / len(hits),
            "diversity": statistics.fmean(div.values()),
            "diversity_min": min(div.values()), "diversity_max": max(div.values()),
            "diversity_per_class": {str(c): round(v, 6) for c, v in div.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", type=Path)
    p.add_argument("--verifier", type=Path, required=True)
    p.add_argument("--names", nargs="+", default=None)
    p.add_argument("--lse-r", type=float, default=None,
                   help="LSE-LBA pooling sharpness for the image-level verdict (default: each "
                        "set's own, lse_r0 + exp(lse_beta) of its manifest)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = args.names or [s.name for s in args.sets]
    if len(names) != len(args.sets):
        raise SystemExit(f"--names gives {len(names)} names for {len(args.sets)} sets")
    for s in args.sets:
        if not (s / "manifest.json").is_file():
            raise SystemExit(f"{s} holds no manifest.json; give a replay set folder of the "
                             "cache (<cache>/replay/<key>)")
    verifier, class_ids, _ = load_segmenter(args.verifier)
    channel_of_class = {c: k for k, c in enumerate(class_ids)}
    out = {n: measure(s, verifier, channel_of_class, args.lse_r)
           for n, s in zip(names, args.sets, strict=True)}
    print("| set | images | verifier accuracy | diversity (mean over classes) | min | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, r in out.items():
        print(f"| {n} | {r['images']} | {r['verifier_accuracy']:.3f} | {r['diversity']:.4f} | "
              f"{r['diversity_min']:.4f} | {r['diversity_max']:.4f} |")
    if args.out:
        atomic_write_json(args.out, {"verifier": str(args.verifier), "sets": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
