"""Run outputs: ``results.json``, ``results.csv`` and ``results.md``.

``results.json``::

    {<header: dataset, task, method, overlap, seed, ...; class_names and class_colors (RGB
      per class id) for a dataset that defines them; with a labelled memory, "memory": {"size",
      "labels", "mix"} and "method_label" (the method's label + "-M")>,
     "conventions": {"val", "loss_reduction", "void_as_background", "unseen_as"[, "ade_class0"]},
     "steps": [{"step", "classes", "iou": {"<dataset class id>": float|null}, "miou_old",
                "miou_new", "miou_all", "miou_old_nobg", "miou_all_nobg", "hiou", ...}, ...],
     "final": {"old", "new", "all", "avg", "hiou"},
     "provenance": {...}}

``hiou`` is the harmonic mean of old and new, 2 old new / (old + new), as DKD reports it (Baek
et al., NeurIPS 2022): high only when both are; null while there is no new class (step 0).
Results written before it existed lack it; readers compute it from old and new
(:func:`final_metric`). ``conventions.hiou`` says which old and new it takes (``eval.hiou``):
``suite`` (the default; absent when a file predates the choice) the ``miou_old`` / ``miou_new``
beside it, classes absent from the ground truth left out; ``dkd`` DKD's, in which such a class
scores IoU 0 (:func:`incseg.metrics.dkd_old_new`), and 0/0 (old = new = 0) is NaN, written
null.

``results.csv`` is long and tidy: columns ``step,class,iou``; one row per (step, seen class id)
and, per step, rows whose class is ``miou_old``, ``miou_new``, ``miou_all``, ``miou_old_nobg``,
``miou_all_nobg``, ``hiou`` and ``avg`` (the mean of ``miou_all`` over steps 0..step, so the
last step's ``avg`` is the run's final avg). A null IoU is an empty cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from incseg.errors import DataError
from incseg.io import atomic_write_json, atomic_write_text
from incseg.metrics import mean_over_steps

DECIMALS = 6
HEADER_KEYS = ("dataset", "task", "method", "overlap", "seed")
TOP_KEYS = (*HEADER_KEYS, "steps", "final", "provenance")
STEP_KEYS = ("step", "classes", "iou", "miou_old", "miou_new", "miou_all")
MIOU_KEYS = ("miou_old", "miou_new", "miou_all", "miou_old_nobg", "miou_all_nobg")
FINAL_KEYS = ("old", "new", "all", "avg")  # required in a results file
FINAL_METRICS = (*FINAL_KEYS, "hiou")      # what the tables print
#: ``conventions`` of a run: config keys its numbers depend on beyond the method (README)
CONVENTION_KEYS = ("data.val", "train.loss_reduction", "data.void_as_background",
                   "data.unseen_as", "data.ade_class0", "eval.hiou", "model.pretrained")
#: ``eval.hiou``: which old / new the harmonic mean takes (module docstring)
HIOU_CONVENTIONS = ("suite", "dkd")
CONVENTION = (
    "old = background + step-0 classes, new = classes added after step 0; mIoU averages "
    "classes present in the ground truth (MiB); IoU in [0,1]"
)


def conventions(cfg: Any) -> dict[str, Any]:
    """The data and loss conventions of a run's config (``results.json`` ``conventions``):
    where its validation images came from (``data.val``: split, holdout or none; never the test
    split), how CE was averaged, void and unseen classes, ADE20K's class 0 at test, and which
    hIoU the figures are (``hiou``), where the backbone started (``pretrained``: corpus,
    imagenet or a file; absent from random weights). Keys a config lacks (``ade_class0``
    outside ADE20K) are left out."""
    out: dict[str, Any] = {}
    for key in CONVENTION_KEYS:
        group, name = key.split(".")
        node = cfg.get(group) if hasattr(cfg, "get") else None
        value = node.get(name) if node is not None else None
        if value is not None:
            out[name] = value if isinstance(value, (bool, int, float)) else str(value)
    return out


def hiou_convention(cfg: Any) -> str:
    """``eval.hiou`` of a run's config; ``suite`` for a config from before the choice."""
    node = cfg.get("eval") if hasattr(cfg, "get") else None
    value = node.get("hiou") if node is not None else None
    return "suite" if value is None else str(value)


def _num(x: Any) -> float | None:
    """A metric value as a float rounded to 6 decimals; None (and NaN/inf) -> None."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    x = float(x)
    return round(x, DECIMALS) if math.isfinite(x) else None


def harmonic_iou(old: float | None, new: float | None) -> float | None:
    """hIoU = 2 old new / (old + new) (DKD's summary of the stability-plasticity trade-off);
    0 when both are 0, None when either is None."""
    if old is None or new is None:
        return None
    old, new = float(old), float(new)
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def dkd_harmonic_iou(old: float | None, new: float | None) -> float | None:
    """DKD's 2 old new / (old + new) with numpy's arithmetic: NaN (None here: JSON has no NaN)
    when old + new = 0, where :func:`harmonic_iou` says 0; None when either is None."""
    if old is None or new is None:
        return None
    old, new = float(old), float(new)
    return None if old + new == 0 else 2 * old * new / (old + new)


def final_metric(final: Mapping[str, Any], key: str) -> float | None:
    """``final[key]``; ``hiou`` computed from old and new for a file written before it."""
    if key == "hiou" and "hiou" not in final:
        return _num(harmonic_iou(final.get("old"), final.get("new")))
    return final.get(key)


def step_record(step: int, classes_added: Sequence[int], summary: Mapping[str, Any],
                hiou: str = "suite", **extra: Any) -> dict[str, Any]:
    """The record of one step: classes added, per-class IoU and mIoUs, hIoU by the ``hiou``
    convention (+ ``extra`` keys)."""
    if hiou not in HIOU_CONVENTIONS:
        raise ValueError(f"hiou={hiou!r} is not one of {', '.join(HIOU_CONVENTIONS)}")
    rec: dict[str, Any] = {
        "step": int(step),
        "classes": [int(c) for c in classes_added],
        "iou": {str(k): _num(v) for k, v in summary["iou"].items()},
    }
    for key in MIOU_KEYS:
        rec[key] = _num(summary.get(key))
    if hiou == "dkd":
        rec["hiou"] = _num(dkd_harmonic_iou(summary.get("dkd_miou_old"),
                                            summary.get("dkd_miou_new")))
    else:
        rec["hiou"] = _num(harmonic_iou(rec["miou_old"], rec["miou_new"]))
    rec.update(extra)
    return rec


def final_block(steps: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """old/new/all of the last step, avg = mean over steps of ``miou_all``, and the last
    step's hiou (by its convention; from its old and new for a record without one)."""
    if not steps:
        raise ValueError("final_block needs at least one step record")
    last = steps[-1]
    return {
        "old": _num(last["miou_old"]),
        "new": _num(last["miou_new"]),
        "all": _num(last["miou_all"]),
        "avg": _num(mean_over_steps(s["miou_all"] for s in steps)),
        "hiou": _num(last["hiou"] if "hiou" in last
                     else harmonic_iou(last["miou_old"], last["miou_new"])),
    }


def _round_step(rec: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out["iou"] = {str(k): _num(v) for k, v in rec["iou"].items()}
    for key in (*MIOU_KEYS, "hiou"):
        if key in out:
            out[key] = _num(out[key])
    return out


def _missing_key(results: Any) -> str | None:
    """The first required key absent from ``results`` (dotted path), or None if complete."""
    if not isinstance(results, Mapping):
        return "<top-level object>"
    for key in TOP_KEYS:
        if key not in results:
            return key
    steps = results["steps"]
    if not isinstance(steps, list) or not steps:
        return "steps (a non-empty list)"
    for i, rec in enumerate(steps):
        if not isinstance(rec, Mapping):
            return f"steps[{i}]"
        for key in STEP_KEYS:
            if key not in rec:
                return f"steps[{i}].{key}"
        if not isinstance(rec["iou"], Mapping):
            return f"steps[{i}].iou (an object)"
    final = results["final"]
    if not isinstance(final, Mapping):
        return "final (an object)"
    for key in FINAL_KEYS:
        if key not in final:
            return f"final.{key}"
    return None


def class_label(cls: int | str, names: Sequence[str] | None) -> str:
    """``3 car`` where the dataset names its classes (``class_names`` in results), else ``3``."""
    c = int(cls)
    return f"{c} {names[c]}" if names and 0 <= c < len(names) else str(c)


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _run_label(results: Mapping[str, Any]) -> str:
    method = str(results.get("method", "?"))
    if results.get("memory"):  # a labelled exemplar memory: "-M", as SSUL / DKD name it
        method += "-M"
    replay = results.get("replay")
    if replay and str(replay) != "none":
        method += f"+{replay}"
    dataset, task = results.get("dataset", "?"), results.get("task", "?")
    return f"{dataset} {task} {method} seed{results.get('seed', '?')}"


def _csv_text(steps: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "class", "iou"])
    alls: list[float | None] = []
    for rec in steps:
        step = rec["step"]
        for cls, iou in rec["iou"].items():
            writer.writerow([step, cls, "" if iou is None else repr(iou)])
        for key in (*MIOU_KEYS, "hiou"):
            if key in rec:
                val = rec[key]
                writer.writerow([step, key, "" if val is None else repr(val)])
        alls.append(rec["miou_all"])
        avg = _num(mean_over_steps(alls))
        writer.writerow([step, "avg", "" if avg is None else repr(avg)])
    return buf.getvalue()


def _md_text(results: Mapping[str, Any]) -> str:
    steps = results["steps"]
    final = results["final"]
    lines = [f"# {_run_label(results)}", ""]
    lines.append(f"overlap: {results.get('overlap')}")
    conv = results.get("conventions")
    if conv:
        lines.append("")
        lines.append("conventions: " + ", ".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in conv.items()))
    lines.append("")
    lines.append("| step | classes added | old | new | all | old w/o bg | all w/o bg | hIoU |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rec in steps:
        classes = " ".join(str(c) for c in rec["classes"])
        cells = [_fmt(rec.get(k), 4) for k in MIOU_KEYS[:3]]
        cells += [_fmt(rec.get(k), 4) for k in MIOU_KEYS[3:]]
        cells.append(_fmt(harmonic_iou(rec.get("miou_old"), rec.get("miou_new")), 4))
        lines.append(f"| {rec['step']} | {classes} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| final | old | new | all | avg | hIoU |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    lines.append("| | " + " | ".join(_fmt(final_metric(final, k), 4) for k in FINAL_METRICS)
                 + " |")
    lines.append("")
    lines.append(CONVENTION + "; avg = mean over steps of all (PLOP); hIoU = 2 old new / "
                 "(old + new) (DKD).")
    lines.append("")
    # Per-class IoU: classes (task order of first appearance) as rows, steps as columns.
    classes: list[str] = []
    for rec in steps:
        for cls in rec["iou"]:
            if cls not in classes:
                classes.append(cls)
    lines.append("| class | " + " | ".join(f"step {rec['step']}" for rec in steps) + " |")
    lines.append("|---:|" + "---:|" * len(steps))
    for cls in classes:
        cells = [_fmt(rec["iou"].get(cls), 4) for rec in steps]
        lines.append(f"| {class_label(cls, results.get('class_names'))} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per-class IoU; '-' = class not seen yet or absent from the ground truth. "
                 + CONVENTION + ".")
    return "\n".join(lines) + "\n"


def write_results(run_dir: str | os.PathLike, header: Mapping[str, Any],
                  steps: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``run_dir`` (atomically).

    ``header`` holds at least dataset, task, method, overlap and seed. Returns the results dict.
    """
    rounded = [_round_step(rec) for rec in steps]
    results: dict[str, Any] = {
        **header,
        "steps": rounded,
        "final": final_block(list(steps)),
        "provenance": dict(provenance),
    }
    missing = _missing_key(results)
    if missing is not None:
        raise ValueError(f"results are missing the required key {missing!r}")
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.csv", _csv_text(rounded))
    atomic_write_text(run_dir / "results.md", _md_text(results))
    return results


def format_table(results: Mapping[str, Any]) -> str:
    """A compact terminal table: per-step old/new/all and the final old/new/all/avg/hiou."""
    label = " " + _run_label(results)
    rows = [f" step {rec['step']}" for rec in results["steps"]] + [" final"]
    width = max(len(label), *(len(r) for r in rows))

    def cells(values: Sequence[float | None]) -> str:
        return " ".join(_fmt(v, 3).center(5) for v in values).rstrip()

    out = [f"{label:<{width}} | " + " ".join(f"{h:<5}" for h in FINAL_METRICS).rstrip()]
    for row, rec in zip(rows, results["steps"]):
        vals = [rec.get("miou_old"), rec.get("miou_new"), rec.get("miou_all")]
        out.append(f"{row:<{width}} | " + cells(vals))
    final = results["final"]
    out.append(f"{rows[-1]:<{width}} | "
               + cells([final_metric(final, k) for k in FINAL_METRICS]))
    return "\n".join(out)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` and check its schema; raise DataError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such results file; run the protocol first") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read results file ({exc.strerror})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); re-run the protocol"
        ) from None
    missing = _missing_key(results)
    if missing is not None:
        raise DataError(
            f"{path}: missing key {missing!r} in results; re-run the protocol to rewrite it"
        )
    return results
