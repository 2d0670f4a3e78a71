"""The result tables of the READMEs, regenerated from the committed result files.

    python experiments/tables.py            # rewrite every table block in place
    python experiments/tables.py --check    # exit 1, naming each table that differs

A table lives in a README between ``<!-- table:NAME -->`` and ``<!-- /table -->``; everything
between the markers is this script's output, so a figure in a table is always the figure of a
file under ``experiments/results/`` (torchvision's references keep "the exact command behind
every number"; here the number itself is derived, never typed). The per-run figures come from
a folder's ``runs.csv`` (what ``python -m incseg.report`` writes) or, for a folder that only
holds run directories, from its ``results.json`` files read by the report's own discovery.
Means and sample standard deviations are the report's (``incseg.report.tables.mean_std``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
#: the files whose table blocks this script owns
READMES = (ROOT / "README.md", ROOT / "experiments" / "README.md",
           ROOT / "experiments" / "diagnosis.md", ROOT / "docs" / "inversion_speed.md")

TABLE3 = "table3_amd-epyc_2026-12-01"     # MiB (cpu/table2 runs) and the cpu/table3* sweeps
NEWCLASS = "table3_amd-epyc_2026-12-04"   # teacher-label CE, linear decay, competition
METHODS = "methods_amd-epyc_2026-12-04"   # cpu/methods* (10-1 and the 15-5s runs kept)
QUICKSTART = "quickstart_amd-epyc_2026-12-06"  # `make run` in a fresh clone, empty cache
DIAGNOSIS = "diagnosis_amd-epyc_2026-12-06"    # 15-5s seed 0: scratch vs corpus, per condition
SEGMENTATION = "segmentation_amd-epyc_2026-12-06"  # the shapes design + segmentation pretraining
SEGMENTATION_INTEL = "segmentation_intel-xeon_2026-12-07"  # the same, on an Intel Xeon
# the same again on an AMD EPYC whose pretraining differs from the 2026-12-06 one (its
# pretraining.json): not pooled with it
SEGMENTATION_AMD2 = "segmentation_amd-epyc_2026-12-07"
ADAPTIVE = "adaptive_amd-epyc_2026-12-06"      # cpu/adaptive*: fixed vs adaptive inversion budget
ADAPTIVE_BENCH = "adaptive_amd-epyc_2thread_quick.json"  # bench/run.py --quick --only adaptive

BLOCK = re.compile(r"(<!-- table:([\w.-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


@cache
def runs_of(folder: str) -> tuple[dict[str, str], ...]:
    """Every finished run of a result folder, one dict per run (the columns of ``runs.csv``)."""
    path = RESULTS / folder
    if (path / "runs.csv").is_file():
        text = (path / "runs.csv").read_text()
    else:  # run directories only: the report's discovery reads their results.json
        from incseg.report.discovery import discover
        from incseg.report.tables import runs_csv_text
        runs, _missing = discover(path / "per_run")
        text = runs_csv_text(runs, path / "per_run")
    return tuple(csv.DictReader(io.StringIO(text)))


def hiou(old: float, new: float) -> float:
    """Harmonic mean of old and new mIoU (DKD, Baek et al., NeurIPS 2022); 0 when both are."""
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def metric(run: dict[str, str], name: str) -> float:
    # the 2026-12-01 runs.csv predates the report's hiou column: derive it from old and new
    if name == "hiou" and not run.get("hiou"):
        return hiou(float(run["old"]), float(run["new"]))
    return float(run[name])


@dataclass(frozen=True)
class Sel:
    """Which runs make a cell: a result folder, a task, and the report's row label (or a
    piece of the run's path when the label is long, as for the per_run folders)."""
    folder: str
    task: str
    row: str | None = None
    path: str | None = None

    def runs(self) -> list[dict[str, str]]:
        out = [r for r in runs_of(self.folder) if r["task"] == self.task
               and (self.row is None or r["row"] == self.row)
               and (self.path is None or self.path in r["run"])]
        return sorted(out, key=lambda r: int(r["seed"]))


def cell(sel: Sel | None, name: str) -> str:
    from incseg.report.tables import fmt_cell, mean_std
    if sel is None:
        return ""
    runs = sel.runs()
    if not runs:
        raise SystemExit(f"error: no run in experiments/results/{sel.folder} matches {sel}")
    mean, std, _n = mean_std(metric(r, name) for r in runs)
    return fmt_cell(mean, std)


def seeds(sel: Sel) -> str:
    return ",".join(r["seed"] for r in sel.runs())


def per_seed(sel: Sel) -> str:
    """all-mIoU per seed, new-class mIoU in brackets; empty for a single seed."""
    runs = sel.runs()
    if len(runs) < 2:
        return ""
    return " / ".join(f"{float(r['all']):.3f} ({float(r['new']):.3f})" for r in runs)


def markdown(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- the tables ----------------------------------------------------------------------------

def _two_tasks(rows: Sequence[tuple[str, Sel | None, Sel | None]]) -> str:
    """old / new / all on 15-5 and on 15-5s, a row per method."""
    body = [[label, *(cell(s, m) for s in (a, b) for m in ("old", "new", "all"))]
            for label, a, b in rows]
    return markdown(["method", "15-5 old", "15-5 new", "15-5 all", "15-5s old", "15-5s new",
                     "15-5s all"], ["---"] + ["---:"] * 6, body)


def _t3(row: str, task: str) -> Sel:
    return Sel(TABLE3, task, row=row)


def readme_replay() -> str:
    """The README's one table: MiB against MiB + DeepInversion replay."""
    return _two_tasks([
        ("MiB", _t3("MiB", "15-5"), _t3("MiB", "15-5s")),
        ("MiB + DI replay (mse, w = 0.1, default)", _t3("MiB + DI (mse) [weight=0.1]", "15-5"),
         _t3("MiB + DI (mse) [weight=0.1]", "15-5s")),
        ("MiB + DI replay (kl)", _t3("MiB + DI (kl) [weight=1.0]", "15-5"),
         _t3("MiB + DI (kl)", "15-5s")),
        ("MiB + DI replay (ukd)", _t3("MiB + DI (ukd)", "15-5"), _t3("MiB + DI (ukd)", "15-5s")),
    ])


def table3() -> str:
    return _two_tasks([
        ("MiB", _t3("MiB", "15-5"), _t3("MiB", "15-5s")),
        ("MiB + DI (mse, w = 1, paper)", _t3("MiB + DI (mse) [weight=1.0]", "15-5"),
         _t3("MiB + DI (mse) [weight=1.0]", "15-5s")),
        ("MiB + DI (mse, w = 0.1, default)", _t3("MiB + DI (mse) [weight=0.1]", "15-5"),
         _t3("MiB + DI (mse) [weight=0.1]", "15-5s")),
        ("MiB + DI (kl)", _t3("MiB + DI (kl) [weight=1.0]", "15-5"),
         _t3("MiB + DI (kl)", "15-5s")),
        ("MiB + DI (ukd)", _t3("MiB + DI (ukd)", "15-5"), _t3("MiB + DI (ukd)", "15-5s")),
        ("MiB + exemplars (mse, w = 1)", _t3("MiB + exemplars (mse)", "15-5"),
         _t3("MiB + exemplars (mse) [weight=1.0]", "15-5s")),
        ("MiB + exemplars (mse, w = 0.1)", None,
         _t3("MiB + exemplars (mse) [weight=0.1]", "15-5s")),
        ("MiB + noise (mse, w = 1)", _t3("MiB + noise (mse)", "15-5"),
         _t3("MiB + noise (mse)", "15-5s")),
    ])


def table3_weight() -> str:
    ws = ("0.1", "0.3", "1.0", "3.0")
    body = [[f"DI ({loss})", *(cell(_t3(f"MiB + DI ({loss}) [weight={w}]", "15-5"), "all")
                               for w in ws)] for loss in ("mse", "kl")]
    return markdown(["15-5 all, w", "0.1", "0.3", "1", "3"], ["---"] + ["---:"] * 4, body)


_SEEDS_HEADER = ["seeds", "old", "new", "all", "hIoU", "all per seed (new)"]


def _seed_rows(first: str, rows: Sequence[tuple[str, Sel]]) -> str:
    body = [[label, seeds(s), *(cell(s, m) for m in ("old", "new", "all", "hiou")), per_seed(s)]
            for label, s in rows]
    return markdown([first, *_SEEDS_HEADER], ["---"] + ["---:"] * 5 + ["---"], body)


def _newclass(task: str) -> str:
    kl = "MiB + DI (kl) [weight=1.0]" if task == "15-5" else "MiB + DI (kl)"
    return _seed_rows(f"{task}: MiB ...", [
        ("MiB", _t3("MiB", task)),
        ("MiB + DI (kl)", _t3(kl, task)),
        ("+ competition", Sel(NEWCLASS, task, path="bd90d9e1/")),
        ("+ teacher-label CE", Sel(NEWCLASS, task, path="858680a0/")),
        ("+ linear decay", Sel(NEWCLASS, task, path="e84b7f4f/")),
    ])


def methods_10_1() -> str:
    rows = ["FT", "LwF", "LwF-MC", "ILT", "EWC", "PI", "RW", "MiB", "MiB-M", "PLOP", "PLOP-M",
            "DKD", "DKD-M", "Joint"]
    return _seed_rows("10-1", [(r, Sel(METHODS, "10-1", row=r)) for r in rows])


def methods_15_5s() -> str:
    return _seed_rows("15-5s", [
        ("PI (500 at lr 0.001)", Sel(METHODS, "15-5s", row="PI")),
        ("RW (100 at lr 0.001)", Sel(METHODS, "15-5s", row="RW")),
        ("MiB-M, `memory.mix=concat`", Sel(METHODS, "15-5s", row="MiB-M")),
        ("PLOP-M, `memory.mix=concat`", Sel(METHODS, "15-5s", row="PLOP-M")),
    ])


def _bench(name: str) -> dict:
    return json.loads((RESULTS / "bench" / name).read_text())


def bench_methods() -> str:
    res = _bench("methods_amd-epyc_1thread_15-5.json")["results"]
    names = {"ft": "FT", "lwf": "LwF", "lwf_mc": "LwF-MC", "ilt": "ILT", "ewc": "EWC", "pi": "PI",
             "rw": "RW", "mib": "MiB", "plop": "PLOP", "dkd": "DKD", "mib-M": "MiB-M",
             "plop-M": "PLOP-M"}
    body = [[names.get(k, k), f"{v['pass_s']:.1f}" if v["pass_s"] >= 0.05 else "0",
             f"{v['iteration_s']:.3f}", f"{v['step_s']:.0f}", f"{v['step_vs_mib']:.2f}"]
            for k, v in res.items()]
    return markdown(["method", "pass before the step (s)", "iteration (s)", "step (s)",
                     "step / MiB's"], ["---"] + ["---:"] * 4, body)


REPLAY_COST = "replay_cost_amd-epyc_1thread_15-5s.json"


def bench_replay_cost() -> str:
    """What each replay keeps per old class and adds to a step (bench/replay_cost.py)."""
    res = _bench(REPLAY_COST)["results"]
    names = {"dkd": "DKD", "star": "STAR", "mib": "MiB"}

    def label(entry: str) -> str:
        for sep, suffix in (("+DI", " + DI"), ("-M", "-M")):
            if entry.endswith(sep):
                return names.get(entry[:-len(sep)], entry[:-len(sep)]) + suffix
        return names.get(entry, entry)

    body = [[label(k), f"{v['kept_bytes_per_class']:,.0f}", f"{v['making_s']:.0f}",
             f"{v['pass_s'] + v['end_s']:.1f}", str(v["batches"]), f"{v['iteration_s']:.3f}",
             f"{v['step_s']:.0f}", f"{v['step_vs_plain']:.2f}"] for k, v in res.items()]
    return markdown(["entry", "kept per old class (bytes)", "making the set (s)",
                     "passes (s)", "batches", "iteration (s)", "step (s)",
                     "step / the method alone's"], ["---"] + ["---:"] * 7, body)


def bench_models() -> str:
    models = _bench("models_amd-epyc_1thread_64px.json")["models"]
    names = {"bisenet_r18": "BiSeNet-R18", "bisenet_r50": "BiSeNet-R50",
             "deeplabv3_r50": "DeepLabV3-R50"}
    body = [[names.get(k, k), f"{m['parameters']:,}", f"{m['macs_at_512'] / 1e9:.1f}",
             f"{m['step_s'] * 1e3:.0f} / {m['step_cpu_s'] * 1e3:.0f}",
             f"{m['vs_bisenet_r18']['step_s']:.2f} / {m['vs_bisenet_r18']['step_cpu_s']:.2f}"]
            for k, m in models.items()]
    return markdown(["model", "parameters", "GMACs at 512 px", "step wall / CPU ms",
                     "x BiSeNet-R18 (wall / CPU)"], ["---", "---:", "---:", "---:", "---:"], body)


def bench_adaptive() -> str:
    """Each preset's replay set made with the fixed and with the adaptive inversion budget."""
    presets = _bench(ADAPTIVE_BENCH)["results"]["adaptive"]["presets"]

    def its(row: dict) -> str:
        i = row["iterations"]
        return f"{i['median']:g} ({i['min']}-{i['max']})"

    body = [[f"`{name}`", str(p["fixed"]["images"]),
             f"{sum(p['max_iterations'])}", f"{p['fixed']['seconds']:.1f}",
             f"{p['adaptive']['seconds']:.1f}", f"{p['seconds_ratio']:.2f}", its(p["adaptive"]),
             f"{p['adaptive']['batch_size']}",
             f"{p['fixed']['verifier_accuracy']:.2f} / {p['adaptive']['verifier_accuracy']:.2f}"]
            for name, p in presets.items()]
    return markdown(["preset", "images", "iterations (fixed)", "fixed (s)", "adaptive (s)",
                     "fixed / adaptive", "adaptive iterations: median (min-max)",
                     "adaptive batch", "verifier accuracy fixed / adaptive"],
                    ["---"] + ["---:"] * 8, body)


_ADAPTIVE_ROWS = (("15-5", "cpu"), ("15-5s", "cpu_small"))


def adaptive_downstream() -> str:
    """MiB + DeepInversion (KL) with each budget (``experiment=cpu/adaptive*``), 3 seeds."""
    rows = [(f"{task}, `{preset}`, {budget}", Sel(ADAPTIVE, task, path=f"/{budget}/"))
            for task, preset in _ADAPTIVE_ROWS for budget in ("fixed", "adaptive")]
    return _seed_rows("MiB + DI (kl)", rows)


def adaptive_sets() -> str:
    """What those runs' replay sets cost (``experiments/replay_sets.py``'s records)."""
    records = json.loads((RESULTS / ADAPTIVE / "replay_sets.json").read_text())
    body = []
    for task, preset in _ADAPTIVE_ROWS:
        for budget in ("fixed", "adaptive"):
            rs = [r for r in records if r["task"] == task and r["budget"] == budget]
            timed = [r for r in rs if r["seconds"] is not None]
            per_run = {}
            for r in timed:
                per_run[r["seed"]] = per_run.get(r["seed"], 0.0) + r["seconds"]
            body.append([
                f"{task}, `{preset}`, {budget}", str(len(rs)),
                f"{statistics.median(r['iterations']['median'] for r in rs):g}",
                f"{min(r['iterations']['min'] for r in rs)}-"
                f"{max(r['iterations']['max'] for r in rs)}",
                f"{sum(r['seconds'] for r in timed) / sum(r['images'] for r in timed):.2f}",
                " / ".join(f"{v:.0f}" for _, v in sorted(per_run.items())),
            ])
    return markdown(["MiB + DI (kl)", "sets", "iterations an image (median of the sets' "
                     "medians)", "range", "seconds an image", "seconds of generation a run "
                     "(per seed)"], ["---"] + ["---:"] * 5, body)


def readme_quickstart() -> str:
    """What `make run` printed and how long it took: its run's ``results.json`` and the
    ``timing.json`` written beside it (the whole command's wall time, set-up included)."""
    folder = RESULTS / QUICKSTART
    res = json.loads((folder / "results.json").read_text())
    timing = json.loads((folder / "timing.json").read_text())
    walls = res["provenance"]["wall_times_s"]

    def num(v: float | None) -> str:
        return "  -  " if v is None else f"{v:.3f}"

    head = f" {res['dataset']} {res['task']} {res['method']} seed{res['seed']}"
    rows = [f"{head} | old   new   all   avg   hiou"]
    for st in res["steps"]:
        rows.append(f"{' step ' + str(st['step']):<{len(head)}} | {num(st['miou_old'])} "
                    f"{num(st['miou_new'])} {num(st['miou_all'])}")
    f = res["final"]
    rows.append(f"{' final':<{len(head)}} | {num(f['old'])} {num(f['new'])} {num(f['all'])} "
                f"{num(f['avg'])} {num(f['hiou'])}")
    steps = ", ".join(f"step {k} {v:.0f} s" for k, v in walls.items())
    minutes, seconds = divmod(round(timing["make_run_wall_s"]), 60)
    took = f"**{minutes} min {seconds:02d} s**"
    return (f"On {timing['machine']} ({timing['threads']} threads), with an empty cache and the "
            f"set-up included, `make run` took {took} ({timing['date']}: "
            f"set-up and data about {timing['setup_and_data_s'] / 60:.1f} min, {steps}) and "
            "printed:\n\n```\n" + "\n".join(rows) + "\n```\n")


def _script(name: str):
    """A sibling script of ``experiments/`` (``diagnosis``, ``ranking``) as a module."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@cache
def _diagnosis_runs() -> dict[str, dict[str, dict]]:
    """The diagnosis conditions' run files, read once for the four tables that show them."""
    return _script("diagnosis").load(RESULTS / DIAGNOSIS)


def diagnosis() -> str:
    """The diagnosis tables (``experiments/diagnosis.py``) of the conditions' run files."""
    diag = _script("diagnosis")
    return (diag.report(_diagnosis_runs()) + "\n"
            + diag.pretraining(RESULTS / DIAGNOSIS))


def tau_against_voc(task: str, sels: dict[str, Sel]) -> tuple[str, str]:
    """(row label, tau-b cell): Kendall's tau-b between the mean all-mIoU of each row's runs
    and the published VOC figures of ``task`` (``experiments/ranking.py``)."""
    from incseg.report.tables import mean_std
    means = {r: mean_std(metric(x, "all") for x in s.runs())[0] for r, s in sels.items()}
    tau, over = _script("ranking").against_voc(task, means)
    return f"Kendall's tau-b over {', '.join(over)}", f"{tau:.2f}"


def ranking_methods() -> str:
    """The 10-1 methods table against the published VOC 10-1 figures, and Kendall's tau-b."""
    rk = _script("ranking")
    rows = ["FT", "LwF", "LwF-MC", "ILT", "EWC", "PI", "RW", "MiB", "MiB-M", "PLOP", "PLOP-M",
            "DKD", "DKD-M", "Joint"]
    sels = {r: Sel(METHODS, "10-1", row=r) for r in rows}
    body = [[r, seeds(s), cell(s, "all"), rk.published_cell("10-1", r)] for r, s in sels.items()]
    label, tau = tau_against_voc("10-1", sels)
    body.append([label, "", tau, ""])
    return markdown(["10-1", "seeds", "`shapes` all", "VOC 10-1 all, published (%)"],
                    ["---", "---:", "---:", "---:"], body)


def diagnosis_ranking() -> str:
    """Each diagnosis condition's all-mIoU per method and its tau-b against VOC 15-1."""
    diag = _script("diagnosis")
    rk = _script("ranking")
    labels = {"mib": "MiB", "plop": "PLOP", "dkd": "DKD", "joint": "Joint"}
    body = []
    for runs in _diagnosis_runs().values():
        suite = {labels[m]: r["final"]["all"] for m, r in runs.items() if m in labels}
        tau, over = rk.against_voc("15-5s", suite)
        body.append([diag.condition(next(iter(runs.values()))),
                     *(f"{suite[k]:.3f}" if k in suite else "" for k in labels.values()),
                     f"{tau:.2f} ({len(over)})"])
    head = ["condition", *labels.values(), "tau-b against VOC 15-1 (methods)"]
    return markdown(head, ["---"] + ["---:"] * 5, body)


def diagnosis_old_new() -> str:
    """MiB against PLOP, old and new classes: VOC 15-1 as published, then each condition."""
    diag = _script("diagnosis")
    pub = _script("ranking").PUBLISHED_VOC_OLD_NEW["15-5s"]
    (mo, mn), (po, pn) = pub["MiB"], pub["PLOP"]
    body = [["VOC 15-1, published (%)", f"{mo:g}", f"{mn:g}", f"{po:g}", f"{pn:g}",
             f"{mo / po:.2f}", f"{mn / pn:.2f}"]]
    for runs in _diagnosis_runs().values():
        if "mib" not in runs or "plop" not in runs:
            continue
        m, p = runs["mib"]["final"], runs["plop"]["final"]
        body.append([diag.condition(runs["mib"]), *(f"{x:.3f}" for x in
                     (m["old"], m["new"], p["old"], p["new"])),
                     f"{m['old'] / p['old']:.2f}", f"{m['new'] / p['new']:.2f}"])
    return markdown(["", "MiB old", "MiB new", "PLOP old", "PLOP new", "MiB / PLOP old",
                     "MiB / PLOP new"], ["---"] + ["---:"] * 6, body)


#: the diagnosis methods' own step-0 models, as the probe and curve tables name them
STEP0_MODELS = {"mib": "MiB's step 0", "plop": "PLOP's step 0", "dkd": "DKD's step 0"}


def diagnosis_probe() -> str:
    """The linear probes of each condition's frozen backbones (``experiments/probe.py``)."""
    diag = _script("diagnosis")
    data = _diagnosis_runs()
    probes = json.loads((RESULTS / DIAGNOSIS / "probe.json").read_text())
    names = {**STEP0_MODELS, "joint": "Joint's", "random": "random init"}
    order = list(names)
    body = []
    for cond, entry in probes.items():
        runs = data[cond]
        label = diag.condition(next(iter(runs.values())))
        for backbone, r in sorted(entry["probes"].items(),
                                  key=lambda kv: order.index(kv[0].split()[0])):
            method = backbone.split()[0]
            own = runs[method]["final"]["new"] if method in runs else None
            body.append([label, names[method], *(f"{r[k]:.3f}" for k in ("old", "new", "all")),
                         "" if own is None or method == "joint" else f"{own:.3f}"])
    return markdown(["condition", "frozen backbone", "probe old", "probe new", "probe all",
                     "the method's own new at the end"], ["---", "---"] + ["---:"] * 4, body)


#: the rows of a methods table, in the order of the field's tables (older methods first)
METHOD_ROWS = ("FT", "EWC", "PI", "RW", "LwF", "LwF-MC", "ILT", "MiB", "PLOP", "DKD", "MiB-M",
               "PLOP-M", "DKD-M", "Joint")


#: image replay against prototype replay (STAR, Chen et al., NeurIPS 2023): the report's labels
REPLAY_ROWS = ("MiB + DI (kl)", "DKD", "DKD + DI (kl)", "STAR", "STAR + DI (kl)", "STAR-M")


def pretrained_methods(folder: str, rows: Sequence[str] = METHOD_ROWS) -> str:
    """Every method of ``rows`` a folder of the segmentation-pretrained ``shapes`` benchmark
    holds, per task: mean +- std over the seeds there are, the published VOC figure, and tau-b.
    One folder is one CPU kind: figures agree only between runs on the same kind."""
    rk = _script("ranking")
    body = []
    for task, voc in (("15-5s", "15-1"), ("10-1", "10-1")):
        sels = {r: Sel(folder, task, row=r) for r in rows}
        sels = {r: s for r, s in sels.items() if s.runs()}
        if not sels:
            continue
        published = {r: rk.published_cell(task, r) for r in sels}
        for r, sel in sels.items():
            body.append([task, r, seeds(sel), cell(sel, "old"), cell(sel, "new"),
                         cell(sel, "all"), cell(sel, "hiou"),
                         f"VOC {voc}: {published[r]}" if published[r] else ""])
        if sum(map(bool, published.values())) >= 2:  # a rank needs a pair
            label, tau = tau_against_voc(task, sels)
            body.append([task, label, "", "", "", tau, "", ""])
    return markdown(["task", "method", "seeds", "old", "new", "all", "hIoU",
                     "published all (%)"], ["---", "---", "---:"] + ["---:"] * 4 + ["---"],
                    body)


#: the paper's all-mIoU (BiSeNet-R50 on VOC): Table 2 on 15-5 / 15-5s, Table 3's KL row on 15-5
#: (the paper did not run replay on 15-5s)
PAPER_ALL = {"FT": ("0.11", "0.04"), "LwF": ("0.54", "0.08"), "ILT": ("0.53", "0.23"),
             "MiB": ("0.60", "0.28"), "MiB + DI (kl)": ("0.32", ""), "Joint": ("0.72", "0.72")}


def pretrained_table2(folder: str) -> str:
    """The paper's Table 2 (FT, LwF, ILT, MiB, Joint on 15-5 and 15-5s) and its replay row
    (MiB + DI (kl)) from a folder of the segmentation-pretrained benchmark: mean +- std over
    the seeds it holds, a row without runs left out, a task without runs left empty."""
    from incseg.report.tables import mean_std
    body, pairs = [], ([], [])  # per task: (suite's mean all, the paper's all) of each row
    for label, paper in PAPER_ALL.items():
        sels = [Sel(folder, task, row=label) for task in ("15-5", "15-5s")]
        sels = [s if s.runs() else None for s in sels]
        if not any(sels):
            continue
        body.append([label, *(x for s in sels for x in (
            seeds(s) if s else "", *(cell(s, m) for m in ("old", "new", "all")))),
            " / ".join(v or "-" for v in paper)])
        for sel, value, pair in zip(sels, paper, pairs):
            if sel and value:
                pair.append((mean_std(metric(r, "all") for r in sel.runs())[0], float(value)))
    tau = [f"{_script('ranking').kendall_tau_b(*zip(*p)):.2f}" if len(p) >= 2 else ""
           for p in pairs]
    if any(tau):
        body.append(["Kendall's tau-b against the paper's all (rows with both)", "", "", "",
                     tau[0], "", "", "", tau[1], ""])
    return markdown(["method", "15-5 seeds", "15-5 old", "15-5 new", "15-5 all", "15-5s seeds",
                     "15-5s old", "15-5s new", "15-5s all", "paper all 15-5 / 15-5s"],
                    ["---"] + ["---:"] * 8 + ["---"], body)


def _learned_and_kept(run: dict) -> tuple[float, float, float, float]:
    """(step-0 mIoU, old at the end / step 0's old, a new class's mean IoU at the step that
    taught it, the same classes' mean IoU at the end): what is forgotten, what is never
    learned, what is learned and then lost."""
    steps, last = run["steps"], run["steps"][-1]["iou"]
    taught = [(c, st["iou"][str(c)]) for st in steps[1:] for c in st["classes"]]
    at_step = [v for _, v in taught if v is not None]
    at_end = [last[str(c)] for c, _ in taught if last.get(str(c)) is not None]
    return (steps[0]["miou_all"], run["final"]["old"] / steps[0]["miou_old"],
            sum(at_step) / len(at_step), sum(at_end) / len(at_end))


def _new_at_step(run: dict) -> tuple[float, ...]:
    """Each step's new classes on that step's test confusion, averaged over the steps' new
    classes: of a new class's pixels, the share predicted right, as background, as an old
    class; of the pixels predicted as it, the share that are right and that are background."""
    sums = [0.0] * 5
    n = 0
    for st in run["steps"][1:]:
        classes, counts = st["confusion"]["classes"], st["confusion"]["counts"]
        bg = classes.index(0)
        for c in st["classes"]:
            i = classes.index(c)
            row, col = counts[i], [r[i] for r in counts]
            old = sum(row[j] for j, k in enumerate(classes) if 0 < k and k not in st["classes"])
            if not sum(row) or not sum(col):
                continue
            for k, v in enumerate((row[i] / sum(row), row[bg] / sum(row), old / sum(row),
                                   row[i] / sum(col), col[bg] / sum(col))):
                sums[k] += v
            n += 1
    return tuple(v / n for v in sums)


#: per_run folder name of a method (``_m``: with a labelled memory) -> its row label
RUN_LABELS = {"ft": "FT", "ewc": "EWC", "pi": "PI", "rw": "RW", "lwf": "LwF", "lwf_mc": "LwF-MC",
              "ilt": "ILT", "mib": "MiB", "plop": "PLOP", "dkd": "DKD", "mib_m": "MiB-M",
              "plop_m": "PLOP-M", "dkd_m": "DKD-M"}


def _per_method_rows(folder: str, tasks: Sequence[str], methods: Sequence[str],
                     measure: Callable[[dict], tuple[float, ...]]) -> list[list[str]]:
    """[task, method, seeds, mean +- std of each of ``measure``'s figures] per task and method
    of a per_run folder, over the seeds it holds."""
    from incseg.report.tables import fmt_cell, mean_std
    body = []
    for task in tasks:
        for method in methods:
            files = sorted((RESULTS / folder / "per_run" / "shapes" / task / method)
                           .glob("seed*/results.json"))
            if not files:
                continue
            runs = [json.loads(f.read_text()) for f in files]
            cols = list(zip(*(measure(r) for r in runs)))
            body.append([task, RUN_LABELS[method], ",".join(str(r["seed"]) for r in runs),
                         *(fmt_cell(*mean_std(c)[:2]) for c in cols)])
    return body


def pretrained_new_at_step(folder: str, task: str) -> str:
    """Where a new class's pixels go at the step that teaches it, and where the pixels
    predicted as it come from (``_new_at_step``), mean +- std over seeds."""
    body = _per_method_rows(folder, [task], ["mib", "plop", "dkd", "mib_m", "plop_m", "dkd_m"],
                            _new_at_step)
    return markdown(["task", "method", "seeds", "new pixels: right", "as background",
                     "as an old class", "predicted new: right", "predicted new: background"],
                    ["---", "---", "---:"] + ["---:"] * 5, body)


def pretrained_forgetting(folder: str) -> str:
    """Per task and method of a pretrained-benchmark folder, mean +- std over seeds: the step-0
    model, the share of its old-class mIoU kept at the end, and the new classes when learned
    and at the end (``_learned_and_kept``)."""
    body = _per_method_rows(folder, ["15-5s", "10-1"], list(RUN_LABELS), _learned_and_kept)
    return markdown(["task", "method", "seeds", "step 0 all", "old at the end / step 0 old",
                     "new class at its step", "new classes at the end"],
                    ["---", "---", "---:"] + ["---:"] * 4, body)


def plop_pod_ablation(folder: str, task: str = "10-1") -> str:
    """PLOP with and without its POD terms beside MiB, each seed the ablations ran (folder
    ``ablations/<task>/<name>/seed<N>``): the all-mIoU, the old classes' share kept, a new class
    at its step, and the share of the pixels predicted as a new class that are background."""
    root = RESULTS / folder
    files = []  # per seed: MiB, PLOP, then each ablation of that seed
    for abl in sorted((root / "ablations" / task).glob("*/seed*/results.json"),
                      key=lambda f: (f.parent.name, f.parent.parent.name)):
        files += [root / "per_run" / "shapes" / task / m / abl.parent.name / "results.json"
                  for m in ("mib", "plop")] + [abl]
    rows = []
    for f in dict.fromkeys(files):
        run = json.loads(f.read_text())
        m = run["provenance"]["config"]["method"]
        label = m["label"]
        if m["name"] == "plop":
            label += (f" (POD {m['pod_weight']:g} on the features, "
                      f"{m['pod_logits_weight']:g} on the logits)")
        _, kept, at_step, _ = _learned_and_kept(run)
        from_bg = _new_at_step(run)[4]
        rows.append([task, label, str(run["seed"]), f"{run['final']['all']:.3f}", f"{kept:.3f}",
                     f"{at_step:.3f}", f"{from_bg:.2f}"])
    return markdown(["task", "method", "seed", "all", "old at the end / step 0 old",
                     "new class at its step", "predicted new: background"],
                    ["---", "---", "---:"] + ["---:"] * 4, rows)


#: per_run folder -> label of the takeover tables (prototype against image replay)
TAKEOVER_RUNS = {"joint": "Joint", "dkd": "DKD", "dkd_di": "DKD + DI (kl)", "star": "STAR",
                 "star_di": "STAR + DI (kl)", "star_m": "STAR-M"}


def _old_pixels_at_end(run: dict, old: Sequence[int]) -> dict[int | str, float]:
    """Where the test pixels of the ``old`` classes go at the last step: per class they are
    predicted as, the share of those pixels ("kept" when predicted as their own class)."""
    classes, counts = (run["steps"][-1]["confusion"][k] for k in ("classes", "counts"))
    rows = [counts[classes.index(c)] for c in old]
    total = sum(map(sum, rows))
    out: dict[int | str, float] = {"kept": sum(counts[classes.index(c)][classes.index(c)]
                                               for c in old) / total}
    for j, c in enumerate(classes):
        if c not in old:
            out[c] = sum(r[j] for r in rows) / total
    return out


def _pair_share(run: dict, old: int, new: int) -> float:
    """Of class ``old``'s test pixels at the last step, the share predicted as ``new``."""
    return _old_pixels_at_end(run, [old])[new]


@cache
def pretrained_takeover(folder: str, tasks: Sequence[str] = ("15-5s", "10-1"),
                        pair_floor: float = 0.1) -> tuple[str, str]:
    """Which new class takes the step-0 classes' pixels over by the end (STAR against DKD and
    image replay; Joint shows what the data alone confuse): per new class, the share of the old
    classes' test pixels predicted as it, mean over seeds; and, for each (old, new) pair whose
    pixels Joint confuses at ``pair_floor`` or more, the share of the old class's pixels."""
    from incseg.data.shapes_draw import class_names
    design = _script("diagnosis").design
    shares, pairs = [], []
    for task in tasks:
        root = RESULTS / folder / "per_run" / "shapes" / task
        runs = {m: [json.loads(f.read_text())
                    for f in sorted((root / m).glob("seed*/results.json"))]
                for m in TAKEOVER_RUNS}
        ref = runs["dkd"][0]
        old = [c for c in ref["steps"][0]["classes"] if c]
        new = [(i, c) for i, st in enumerate(ref["steps"][1:], 1) for c in st["classes"]]
        names = class_names(design(ref))
        per = {m: [_old_pixels_at_end(r, old) for r in rs] for m, rs in runs.items()}
        for d in (d for ds in per.values() for d in ds):
            d["all new"] = sum(d[c] for _, c in new)

        def mean(m: str, key, src=per) -> str:
            return f"{statistics.fmean(d[key] for d in src[m]):.3f}" if src[m] else ""
        shares.append([task, "", "seeds", *(",".join(str(r["seed"]) for r in rs)
                                            for rs in runs.values())])
        for step, c in new:
            shares.append([task, str(step), names[c], *(mean(m, c) for m in runs)])
        for label, key in (("all new classes", "all new"), ("background", 0), ("kept", "kept")):
            shares.append([task, "", label, *(mean(m, key) for m in runs)])
        for o in old:  # each old class's pixels on their own, for the pairs
            each = {m: [_old_pixels_at_end(r, [o]) for r in rs] for m, rs in runs.items()}
            for _, c in new:
                if statistics.fmean(d[c] for d in each["joint"]) >= pair_floor:
                    pairs.append([task, f"{names[o]} ({o}) → {names[c]} ({c})",
                                  *(mean(m, c, each) for m in runs)])
    labels = [TAKEOVER_RUNS[m] for m in TAKEOVER_RUNS]
    return (markdown(["task", "step", "old-class pixels predicted as", *labels],
                     ["---", "---:", "---"] + ["---:"] * len(labels), shares),
            markdown(["task", "old class → new class", *labels],
                     ["---", "---"] + ["---:"] * len(labels), pairs))


def diagnosis_curves() -> str:
    """Val mIoU after each epoch of step 0 and Joint (``experiments/val_curves.py``)."""
    diag = _script("diagnosis")
    data = _diagnosis_runs()
    names = {**STEP0_MODELS, "joint": "Joint"}
    body = []
    for f in sorted((RESULTS / DIAGNOSIS).glob("*/curves.json")):
        label = diag.condition(next(iter(data[f.parent.name].values())))
        for method, stages in sorted(json.loads(f.read_text()).items(),
                                     key=lambda kv: list(names).index(kv[0])):
            for curve in stages.values():
                body.append([label, names[method], str(len(curve)),
                             " ".join(f"{x:.2f}" for x in curve)])
    return markdown(["condition", "model", "epochs", "val mIoU after each epoch"],
                    ["---", "---", "---:", "---"], body)


TABLES: dict[str, Callable[[], str]] = {
    "diagnosis_curves": diagnosis_curves,
    "diagnosis_old_new": diagnosis_old_new,
    "diagnosis_probe": diagnosis_probe,
    "diagnosis": diagnosis,
    "diagnosis_ranking": diagnosis_ranking,
    "ranking_methods": ranking_methods,
    "segmentation_ranking": lambda: pretrained_methods(SEGMENTATION),
    "segmentation_intel": lambda: pretrained_methods(SEGMENTATION_INTEL),
    "segmentation_forgetting": lambda: pretrained_forgetting(SEGMENTATION),
    "segmentation_forgetting_intel": lambda: pretrained_forgetting(SEGMENTATION_INTEL),
    "segmentation_new_at_step": lambda: pretrained_new_at_step(SEGMENTATION, "10-1"),
    "plop_pod_intel": lambda: plop_pod_ablation(SEGMENTATION_INTEL),
    "segmentation_new_at_step_intel": lambda: pretrained_new_at_step(SEGMENTATION_INTEL,
                                                                     "10-1"),
    "segmentation_amd2": lambda: pretrained_methods(SEGMENTATION_AMD2),
    "segmentation_replay_amd2": lambda: pretrained_methods(SEGMENTATION_AMD2, REPLAY_ROWS),
    "segmentation_table2_amd2": lambda: pretrained_table2(SEGMENTATION_AMD2),
    "segmentation_forgetting_amd2": lambda: pretrained_forgetting(SEGMENTATION_AMD2),
    "segmentation_new_at_step_amd2": lambda: pretrained_new_at_step(SEGMENTATION_AMD2, "10-1"),
    "segmentation_takeover_amd2": lambda: pretrained_takeover(SEGMENTATION_AMD2)[0],
    "segmentation_takeover_pairs_amd2": lambda: pretrained_takeover(SEGMENTATION_AMD2)[1],
    "readme_quickstart": readme_quickstart,
    "readme_replay": readme_replay,
    "table3": table3,
    "table3_weight": table3_weight,
    "newclass_15-5": lambda: _newclass("15-5"),
    "newclass_15-5s": lambda: _newclass("15-5s"),
    "methods_10-1": methods_10_1,
    "methods_15-5s": methods_15_5s,
    "bench_methods": bench_methods,
    "bench_replay_cost": bench_replay_cost,
    "bench_models": bench_models,
    "bench_adaptive": bench_adaptive,
    "adaptive_downstream": adaptive_downstream,
    "adaptive_sets": adaptive_sets,
}


def fill(text: str) -> str:
    """``text`` with every table block replaced by the table the files give."""
    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"error: unknown table '{name}'; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + m.group(4)
    return BLOCK.sub(one, text)


def stale(text: str) -> list[str]:
    """The names of the table blocks of ``text`` that differ from what the files give."""
    return [m.group(2) for m in BLOCK.finditer(text) if fill(m.group(0)) != m.group(0)]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the README tables from "
                                 "experiments/results/ (or --check that they match).")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    bad = 0
    for path in READMES:
        text = path.read_text()
        if args.check:
            for name in stale(text):
                print(f"{path.relative_to(ROOT)}: table '{name}' differs from the result files; "
                      "run: python experiments/tables.py")
                bad += 1
        elif (new := fill(text)) != text:
            _write_atomic(path, new)
            print(f"rewrote the tables of {path.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
