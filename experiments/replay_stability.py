"""Why does MSE replay collapse on 15-5s? Replays the first iterations of one incremental step of
a finished run and records, per iteration, each loss term, the gradient norm each term alone
would produce, the largest student logit on the replay batch and the smallest BN running
variance the replay forward divides by.

    python experiments/replay_stability.py RUN_DIR --step 3 --iters 40 [--sharpness 20]
        [--variants '' 'replay.weight=0.1' 'replay.loss=kl'] [--plot FILE.png]
        [--out FILE.json] [KEY=VALUE ...]

RUN_DIR is a run finished up to step t-1 (``checkpoints/step<t-1>.pt`` and its config, from
``results.json`` or ``.hydra/config.yaml``);
KEY=VALUE are config overrides for the replayed step (``replay.loss=kl``,
``replay.weight=0.1``; ``train.grad_clip=10`` is this script's own: gradient-norm clipping).
The step is built as the protocol builds it (same seeds, same teacher, same replay set from the
cache), but trained by a plain loop so that every term's gradient can be measured; nothing is
written into RUN_DIR. ``--sharpness N`` adds the curvature test of ``replay.check``
(:mod:`incseg.stability`) on the first replay batch; ``--variants`` repeats the step under
several override sets. The output is a table per variant on stdout, with ``--out`` a JSON file
of the per-iteration records and with ``--plot`` a PNG of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from incseg.config import cache_dir_from_cfg, source_from_cfg, task_from_cfg
from incseg.io import atomic_path, atomic_write_json
from incseg.models.norm import running_statistics
from incseg.protocol import build_student
from incseg.stability import sgd_stability_bound


def _grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    if not term.requires_grad:
        return 0.0
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    sq = sum(float(g.pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(sq)


def _min_running_var(model: torch.nn.Module) -> float:
    return min(float(m.running_var.min()) for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.running_var is not None)


def run_config(run_dir: Path):
    """The run's resolved config: from its results.json (provenance) or its .hydra folder."""
    results = run_dir / "results.json"
    if results.exists():
        return OmegaConf.create(json.loads(results.read_text())["provenance"]["config"])
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        return OmegaConf.load(hydra_cfg)
    sys.exit(f"error: {run_dir} holds neither results.json nor .hydra/config.yaml; give a run "
             "directory")


def replay_step(run_dir: Path, step: int, iters: int, overrides: list[str],
                sharpness_iters: int = 0) -> tuple[list[dict], dict]:
    cfg = run_config(run_dir)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    cfg.data.num_workers = 0
    cfg.trainer.progress_bar = False
    task = task_from_cfg(cfg)
    if not 1 <= step < task.num_steps:
        sys.exit(f"error: --step {step} is not an incremental step of {task.name} "
                 f"(1..{task.num_steps - 1})")
    prev = run_dir / "checkpoints" / f"step{step - 1}.pt"
    if not prev.exists():
        sys.exit(f"error: {prev} is missing; run the protocol to step {step - 1} first")
    with tempfile.TemporaryDirectory() as tmp:
        # the student as the protocol builds it, from the run's step t-1 model (replay images
        # and figures go to a temporary run directory)
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / prev.name).symlink_to(prev.resolve())
        student = build_student(cfg, Path(tmp), cache_dir_from_cfg(cfg),
                                source_from_cfg(cfg, progress=False), task, step)
        module, dm = student.module, student.datamodule
        model = module.model
        dm.setup("fit")
        loader = dm.train_dataloader()
        real, synth = (loader.iterables["real"], loader.iterables["replay"]) \
            if dm.replay_dataset is not None else (loader, None)
        r = module.recipe
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                              weight_decay=r.weight_decay)
        total = int(cfg.train.epochs_incremental) * len(real)
        clip = cfg.train.get("grad_clip")
        module.train()
        records: list[dict] = []
        synth_iter = iter(synth) if synth is not None else None
        summary = {"lr": r.lr, "momentum": r.momentum, "nesterov": r.nesterov,
                   "stability_bound": sgd_stability_bound(r.lr, r.momentum, r.nesterov)}
        it = 0
        while it < iters:
            for images, labels, *_ in real:  # a labelled memory adds `known`
                if it >= iters:
                    break
                rep = None
                if synth_iter is not None:
                    try:
                        rep = next(synth_iter)
                    except StopIteration:
                        synth_iter = iter(synth)
                        rep = next(synth_iter)
                if it == 0 and sharpness_iters and rep is not None:
                    module.replay.spec.check = sharpness_iters
                    summary["replay_sharpness"] = module.replay.check_stability(
                        model, module.old_model, rep, r.lr, r.momentum, r.nesterov,
                        step)["sharpness"]
                lr = r.lr * max(0.0, 1.0 - it / total) ** r.poly_power
                for group in opt.param_groups:
                    group["lr"] = lr
                terms = module.training_loss(images, labels, rep)
                rec = {"iter": it, "lr": lr}
                for name, value in terms.items():
                    rec[name] = float(value.detach())
                    rec[f"grad_{name}"] = _grad_norm(value, params)
                if rep is not None:
                    with torch.no_grad(), running_statistics(model):
                        rec["max_abs_logit"] = float(model(rep).logits.abs().max())
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                opt.step()
                rec["min_running_var"] = _min_running_var(model)
                records.append(rec)
                it += 1
                if not math.isfinite(rec["loss"]):
                    return records, summary
    return records, summary


COLUMNS = ["iter", "loss", "seg", "kd", "replay", "grad_seg", "grad_kd", "grad_replay",
           "max_abs_logit", "min_running_var"]


def plot(variants: list[dict], path: Path, title: str) -> None:
    """Replay term, its gradient norm and the largest student logit per iteration, one line
    per variant (log scale: a diverging run grows geometrically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for v in variants:
        its = [r["iter"] for r in v["records"]]
        label = v["label"]
        if "replay_sharpness" in v:
            label += f" (curvature {v['replay_sharpness']:.0f})"
        for ax, key in zip(axes, ("replay", "grad_replay", "max_abs_logit")):
            # a dropped (unscorable) replay batch logs 0: not drawn on a log axis
            ax.plot(its, [r.get(key) or float("nan") for r in v["records"]], marker=".",
                    label=label)
    for ax, name in zip(axes, ("w * D_replay", "|grad of w * D_replay|",
                               "max |student logit| on replay")):
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", type=Path, help="JSON file of every variant's records")
    ap.add_argument("--sharpness", type=int, default=0, metavar="N",
                    help="N power iterations for the replay term's largest Hessian eigenvalue")
    ap.add_argument("--variants", nargs="+", default=[""], metavar="'K=V ...'",
                    help="override sets to compare, each one quoted string ('' = as the run)")
    ap.add_argument("--plot", type=Path, help="PNG of the variants side by side")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every variant")
    a = ap.parse_intermixed_args(argv)
    variants = []
    for extra in a.variants:
        overrides = [*a.overrides, *extra.split()]
        records, summary = replay_step(a.run_dir, a.step, a.iters, overrides, a.sharpness)
        label = extra or "as run"
        print(f"## {label}: {json.dumps(summary)}")
        print(" ".join(f"{c:>12}" for c in COLUMNS))
        for rec in records:
            print(" ".join(f"{rec.get(c, float('nan')):>12.4g}" for c in COLUMNS))
        variants.append({"label": label, "overrides": overrides, **summary,
                         "records": records})
    if a.out:
        atomic_write_json(a.out, {"run_dir": str(a.run_dir), "step": a.step,
                                  "variants": variants})
    if a.plot:
        plot(variants, a.plot, f"{a.run_dir} step {a.step}: the first {a.iters} iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
