"""Why a method ranks where it does on ``shapes`` 15-5s: the diagnosis tables, from run files.

    python experiments/diagnosis.py RESULTS_DIR [--out FILE]

RESULTS_DIR holds one folder per condition (``<condition>/<method>/results.json``, a 15-5s run
each). For every condition and method it writes the final old / new / all mIoU and, from the
per-step IoUs and the test confusion matrices the runs record, the evidence behind them:

- each new class's IoU at the step that taught it and at the last step (learned, then kept?);
- where a new class's pixels go at the last step: itself, background, its texture twin (the
  same shape with the other texture, ``shapes``' nearest class), a class of another shape with
  the same texture, a class whose typical hue band is the same as or next to its own, or
  another class; with ``dataset.generator.classes=shapes`` (a class is a shape, texture is per
  object) there are no twins and no texture classes: those columns read ``-``;
- where the old classes' pixels go: kept, background, taken over by a new class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from incseg.data.shapes_draw import class_hue_group
from incseg.data.shapes_params import ShapesParams
from incseg.report.discovery import pretrained_label

METHOD_ORDER = ("mib", "plop", "dkd", "joint")
_DEFAULTS = ShapesParams()  # what a config without a generator key generated


def twin(c: int) -> int:
    """The class with the same shape and the other texture (ids 2s+1 solid, 2s+2 striped)."""
    return c + 1 if c % 2 else c - 1


def same_texture(a: int, b: int) -> bool:
    """Two foreground classes of different shapes with the same texture (both striped or both
    solid): what a model that tells textures apart but not shapes confuses."""
    return a != b and a > 0 and b > 0 and a % 2 == b % 2


def _generator(run: dict) -> dict:
    """The ``dataset.generator`` block of the run's recorded config ({} when it has none)."""
    cfg = (run.get("provenance") or {}).get("config") or {}
    return (cfg.get("dataset") or {}).get("generator") or {}


def design(run: dict) -> str:
    """The run's ``shapes`` class design (absent from the recorded config: the default)."""
    return _generator(run).get("classes") or _DEFAULTS.classes


def hue_bands(run: dict) -> int:
    """The run's ``shapes`` hue bands (the generator's default when the config has none)."""
    return int(_generator(run).get("hue_bands") or _DEFAULTS.hue_bands)


def hue_neighbours(a: int, b: int, bands: int, design_: str) -> bool:
    """Two foreground classes whose typical hue bands are the same or next to each other on the
    hue circle: what a model that reads colour rather than shape confuses."""
    if bands < 3:
        return False  # one or two bands: every class is a neighbour, the column says nothing
    d = abs(class_hue_group(a, bands, design_) - class_hue_group(b, bands, design_))
    return min(d, bands - d) <= 1


def pretraining(folder: Path) -> str:
    """What each condition's corpus backbone cost and how well it classifies held-out corpus
    images (the ``pretrain_manifest.json`` a condition folder keeps beside its runs)."""
    rows = []
    for f in sorted(folder.glob("*/pretrain_manifest.json")):
        m = json.loads(f.read_text())
        ho = m.get("holdout") or {}
        score = (f"top-1 {ho['top1']:.3f}, top-5 {ho['top5']:.3f}" if "top1" in ho
                 else f"multi-label mAP {ho.get('mAP', float('nan')):.3f}")
        c, t = m["corpus"], m["train"]
        rows.append(f"| {c['size']} px, {c['n_images']} images, {t['epochs']} ep | "
                    f"{m['iterations']} | {m['total_s']:.0f} | {score} |")
    if not rows:
        return ""
    return ("| corpus backbone | SGD iterations | seconds (2 threads) | held-out accuracy |\n"
            "|---|---:|---:|---|\n" + "\n".join(rows) + "\n")


def load(folder: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for f in sorted(folder.glob("*/*/results.json")):
        out.setdefault(f.parent.parent.name, {})[f.parent.name] = json.loads(f.read_text())
    return out


def _confusion(step: dict) -> tuple[list[int], list[list[int]]]:
    conf = step["confusion"]
    return conf["classes"], conf["counts"]


KINDS = ("self", "background", "texture", "twin", "hue", "other")


def where(step: dict, cls: list[int], twins: bool = True, bands: int = 10) -> dict[str, float]:
    """Fractions of the ground-truth pixels of ``cls`` predicted as: the class itself,
    background, a class of another shape with the same texture, the same shape with the other
    texture (the twin), a class of the same or the next hue band, anything else (texture and
    twin: none, when not ``twins``)."""
    classes, counts = _confusion(step)
    idx = {c: i for i, c in enumerate(classes)}
    tot = dict.fromkeys(KINDS, 0)
    for c in cls:
        if c not in idx:
            continue
        for p, k in zip(classes, counts[idx[c]]):
            tot[_kind(c, p, twins, bands)] += k
    n = sum(tot.values())
    return {k: v / n if n else float("nan") for k, v in tot.items()}


def _kind(truth: int, pred: int, twins: bool = True, bands: int = 10) -> str:
    if truth == pred:
        return "self"
    if pred == 0 or truth == 0:
        return "background"
    if twins and same_texture(truth, pred):
        return "texture"
    if twins and pred == twin(truth):
        return "twin"
    if hue_neighbours(truth, pred, bands, "twins" if twins else "shapes"):
        return "hue"
    return "other"


def came_from(step: dict, cls: list[int], twins: bool = True,
              bands: int = 10) -> dict[str, float]:
    """Fractions of the pixels predicted as one of ``cls`` whose ground truth is: that class,
    background, a same-texture class, the twin, a hue neighbour, another class (void is not
    counted)."""
    classes, counts = _confusion(step)
    tot = dict.fromkeys(KINDS, 0)
    for g, row in zip(classes, counts):
        for p, k in zip(classes, row):
            if p in cls:
                tot[_kind(g, p, twins, bands)] += k
    n = sum(tot.values())
    return {k: v / n if n else float("nan") for k, v in tot.items()}


def texture_by_hue(step: dict, cls: list[int], bands: int) -> float | None:
    """Of the pixels of ``cls`` predicted as a same-texture class of another shape, the
    fraction whose predicted class is also a hue neighbour of the true one (``twins`` only)."""
    classes, counts = _confusion(step)
    idx = {c: i for i, c in enumerate(classes)}
    tex = near = 0
    for c in cls:
        for p, k in zip(classes, counts[idx[c]] if c in idx else []):
            if p != 255 and same_texture(c, p):
                tex += k
                near += k if hue_neighbours(c, p, bands, "twins") else 0
    return near / tex if tex else None


def summarise(run: dict) -> dict:
    steps = run["steps"]
    final = steps[-1]
    first = [int(c) for c in steps[0]["classes"]] if isinstance(steps[0]["classes"], list) \
        else json.loads(steps[0]["classes"])
    old = {c for c in first if c}
    new_by_step = {}
    for s in steps[1:]:
        cl = s["classes"] if isinstance(s["classes"], list) else json.loads(s["classes"])
        for c in cl:
            new_by_step[int(c)] = s["step"]
    new = set(new_by_step)
    if not new:  # Joint: one step; its "new" classes are the incremental tasks' ones
        new = {c for c in range(16, 21)}
        old = {c for c in range(1, 16)}
    twins = design(run) == "twins"
    bands = hue_bands(run)
    per_new = {}
    for c in sorted(new):
        learned = next((s for s in steps if s["step"] == new_by_step.get(c)), final)
        per_new[c] = {"learned": learned["iou"].get(str(c)), "final": final["iou"].get(str(c))}
    return {
        "old": final["miou_old"], "new": final["miou_new"], "all": final["miou_all"],
        "step0_old": steps[0]["miou_all"],
        # how much of step 0's mIoU the old classes keep at the end (Joint has no step 1)
        "kept": final["miou_old"] / steps[0]["miou_all"] if len(steps) > 1 else None,
        "per_new": per_new,
        "new_go": where(final, sorted(new), twins, bands),
        "old_go": where(final, sorted(old), twins, bands),
        "new_from": came_from(final, sorted(new), twins, bands),
        "twins": twins,
        "texture_hue": texture_by_hue(final, sorted(new), bands) if twins else None,
    }


def condition(run: dict) -> str:
    """What a run's benchmark was, from its own config: backbone start and epochs."""
    cfg = (run.get("provenance") or {}).get("config") or {}
    start = pretrained_label((cfg.get("model") or {}).get("pretrained")) or "random init"
    if start == "corpus":
        corpus = (cfg.get("dataset") or {}).get("corpus") or {}
        params, recipe = corpus.get("params") or {}, corpus.get("train") or {}
        start = (f"corpus ({params.get('size')} px, {params.get('n_images')} images, "
                 f"{recipe.get('epochs')} ep)")
    elif start == "segmentation":
        seg = (cfg.get("dataset") or {}).get("segmentation") or {}
        start = (f"segmentation pretraining (generator seed {seg.get('generator_seed')}, "
                 f"{seg.get('epochs')} ep)")
    elif start not in ("random init", "imagenet"):
        start = f"backbone of {start}"      # a model file given as model.pretrained
    train = cfg.get("train") or {}
    classes = "" if design(run) == "twins" else f", {design(run)} classes"
    seed = f", seed {run['seed']}" if run.get("seed") not in (None, 0) else ""
    return (f"{start}, step 0 {train.get('epochs')} ep, steps "
            f"{train.get('epochs_incremental')} ep{classes}{seed}")


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(data: dict[str, dict[str, dict]]) -> str:
    lines = ["| condition | method | step 0 all | old | old / step 0 | new | all | new classes' "
             "IoU when learned -> at the end (16..20) | new pixels taken by a same-texture class: "
             "share in the same or next hue band |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    cols = "right | bg | same texture | twin | hue band | other"
    go = [f"| condition | method | new classes' pixels: {cols} | old classes' pixels: {cols} | "
          f"predicted new: {cols} |",
          "|---|---|" + "---:|" * (3 * len(KINDS))]
    for runs in data.values():
        for m in sorted(runs, key=lambda k: METHOD_ORDER.index(k) if k in METHOD_ORDER else 99):
            s = summarise(runs[m])
            trail = " ".join(f"{fmt(v['learned'])}->{fmt(v['final'])}" for v in
                             s["per_new"].values())
            label = condition(runs[m])
            hue = "-" if s["texture_hue"] is None else f"{s['texture_hue']:.2f}"
            kept = "-" if s["kept"] is None else f"{s['kept']:.2f}"
            lines.append(f"| {label} | {m} | {fmt(s['step0_old'])} | {fmt(s['old'])} | {kept} | "
                         f"{fmt(s['new'])} | {fmt(s['all'])} | {trail} | "
                         f"{hue} |")
            cells = [f"{part[k]:.2f}" if s["twins"] or k not in ("texture", "twin") else "-"
                     for part in (s["new_go"], s["old_go"], s["new_from"])
                     for k in KINDS]
            go.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(go) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    data = load(args.results)
    if not data:
        print(f"error: no <condition>/<method>/results.json under {args.results}",
              file=sys.stderr)
        return 2
    text = report(data)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
