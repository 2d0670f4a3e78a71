"""``model.pretrained=corpus``: a ResNet backbone pretrained once on the procedural corpus
(``incseg.data.corpus``), used by ``shapes`` as ImageNet weights are used by PASCAL VOC.

The backbone is trained as an image classifier (global average pooling of the last stage, one
linear layer, cross-entropy over the corpus' 64 shape-texture classes), as ImageNet backbones
are trained before a segmenter is built on them.
The result is content-keyed in the cache like the step-0 model (corpus, recipe, backbone and
suite version), written atomically under a file lock, so a sweep, every method and every task
share one; its manifest records what it cost and how well it names held-out corpus images.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from incseg.data.corpus import CorpusParams, _render_range
from incseg.data.shapes import default_workers, map_in_order
from incseg.errors import ConfigError
from incseg.io import atomic_path, atomic_write_json, content_key, entry_lock
from incseg.models.backbones import RESNETS, ResNetBackbone

log = logging.getLogger("incseg.protocol")

#: the recipe's keys and defaults (SGD + cosine with a linear warm-up, as classifiers train)
RECIPE_DEFAULTS = {"epochs": 4, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                   "weight_decay": 1.0e-4, "warmup_iters": 50, "holdout": 1000, "seed": 0}
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the datasets' normalisation
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def corpus_spec(node: Mapping | None) -> tuple[CorpusParams, dict]:
    """(corpus parameters, training recipe) of a ``dataset.corpus`` node; one line on a bad
    key."""
    node = dict(node or {})
    params = CorpusParams.from_dict(node.pop("params", None))
    recipe = dict(RECIPE_DEFAULTS)
    given = dict(node.pop("train", None) or {})
    unknown = sorted(set(given) - set(recipe)) + sorted(node)
    if unknown:
        raise ConfigError(f"unknown dataset.corpus key(s) {', '.join(map(str, unknown))}; valid: "
                          "params.*, train.{" + ", ".join(recipe) + "}")
    recipe.update(given)
    if int(recipe["epochs"]) < 1 or int(recipe["batch_size"]) < 2:
        raise ConfigError("dataset.corpus.train needs epochs >= 1 and batch_size >= 2 "
                          "(BatchNorm after global pooling needs two images)")
    return params, recipe


def corpus_entry(cache: Path, backbone: str, params: CorpusParams, recipe: dict) -> Path:
    key = content_key("corpus_backbone", {"backbone": backbone, "corpus": params.to_dict(),
                                          "train": recipe})
    return Path(cache) / "pretrain" / f"{backbone}-{key}.pt"


def render_corpus(params: CorpusParams, start: int, stop: int,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images [start, stop) of the corpus (uint8 N x H x W x 3, int64 N labels), in up to
    two forked processes when that is safe; the bytes do not depend on the process count."""
    chunk = 250
    jobs = [(params.to_dict(), a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
    with tqdm(total=stop - start, desc="pretraining corpus", unit="img", leave=False,
              disable=not progress, file=sys.stderr) as bar:
        out = map_in_order(_render_range, jobs, default_workers() if len(jobs) > 1 else 1,
                           lambda job: job[2] - job[1], bar)
    return np.concatenate([a for a, _ in out]), np.concatenate([b for _, b in out])


class CorpusClassifier(nn.Module):
    """A ResNet backbone with global average pooling and one linear layer over the labels."""

    def __init__(self, backbone: str, num_labels: int):
        super().__init__()
        self.backbone = ResNetBackbone(backbone)
        self.fc = nn.Linear(self.backbone.out_channels[1], num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[-1].mean(dim=(2, 3)))


def _batch(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN) / _STD


def train_corpus_backbone(backbone: str, params: CorpusParams, recipe: dict,
                          progress: bool = True) -> tuple[dict, dict]:
    """Render the corpus, train the classifier; returns (backbone state dict, manifest)."""
    t0 = time.perf_counter()
    holdout = int(recipe["holdout"])
    images, labels = render_corpus(params, 0, params.n_images + holdout, progress)
    x_tr, y_tr = images[:params.n_images], torch.from_numpy(labels[:params.n_images])
    x_ho, y_ho = images[params.n_images:], torch.from_numpy(labels[params.n_images:])
    t_render = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(int(recipe["seed"]))
    with torch.random.fork_rng():
        torch.manual_seed(int(recipe["seed"]))
        model = CorpusClassifier(backbone, params.num_labels)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": float(recipe["weight_decay"])},
                           {"params": rest, "weight_decay": 0.0}], lr=float(recipe["lr"]),
                          momentum=float(recipe["momentum"]), nesterov=True)
    bs, epochs = int(recipe["batch_size"]), int(recipe["epochs"])
    per_epoch = params.n_images // bs  # drop the last partial batch (BatchNorm needs >= 2)
    if per_epoch < 1:
        raise ConfigError(f"dataset.corpus: {params.n_images} images make no batch of "
                          f"{bs}; raise params.n_images or lower train.batch_size")
    total, warm = epochs * per_epoch, int(recipe["warmup_iters"])
    base = float(recipe["lr"])

    def lr_at(it: int) -> float:
        if it < warm:
            return base * (it + 1) / warm
        return 0.5 * base * (1 + np.cos(np.pi * (it - warm) / max(1, total - warm)))

    model.train()
    bar = tqdm(total=total, desc=f"pretraining {backbone} (once; cached)", unit="it",
               leave=False, disable=not progress, file=sys.stderr)
    it, losses = 0, []
    try:
        for _ in range(epochs):
            order = torch.randperm(params.n_images, generator=gen)
            flips = torch.rand(params.n_images, generator=gen) < 0.5
            for b in range(per_epoch):
                idx = order[b * bs:(b + 1) * bs]
                x = _batch(x_tr[idx.numpy()])
                f = flips[idx]
                x[f] = x[f].flip(-1)
                for g in opt.param_groups:
                    g["lr"] = lr_at(it)
                loss = nn.functional.cross_entropy(model(x), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                it += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    finally:
        bar.close()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(_batch(x_ho[a:a + 256])) for a in range(0, len(x_ho), 256)])
    manifest = {
        "kind": "corpus_backbone", "backbone": backbone, "corpus": params.to_dict(),
        "train": recipe, "iterations": total, "render_s": round(t_render, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "final_loss": round(float(np.mean(losses[-per_epoch:])), 4),
        "holdout": holdout_scores(scores, y_ho) if holdout else None,
        "threads": torch.get_num_threads(),
    }
    return model.backbone.state_dict(), manifest


def holdout_scores(scores: torch.Tensor, target: torch.Tensor) -> dict:
    """Top-1 and top-5 accuracy of class scores (N x C) against labels (N)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {"top1": round(float((top[:, 0] == target).float().mean()), 4),
            "top5": round(float((top == target[:, None]).any(1).float().mean()), 4),
            "images": int(target.shape[0])}


def corpus_backbone(cfg: DictConfig, cache: Path, progress: bool = True) -> Path:
    """The cached corpus-pretrained weights of ``cfg.model.backbone``, trained now if missing."""
    backbone = str(cfg.model.get("backbone"))
    if backbone not in RESNETS:
        raise ConfigError(f"model.pretrained=corpus pretrains a ResNet backbone, and "
                          f"model.backbone={backbone} is not one ({', '.join(sorted(RESNETS))}); "
                          "pass model.pretrained=null (or imagenet) with this model")
    node = OmegaConf.select(cfg, "dataset.corpus")
    if node is None:
        raise ConfigError("model.pretrained=corpus needs a dataset.corpus node (the shapes "
                          "preset has one); pass model.pretrained=null or imagenet for "
                          f"dataset={cfg.dataset.name}")
    params, recipe = corpus_spec(OmegaConf.to_container(node, resolve=True))
    path = corpus_entry(cache, backbone, params, recipe)
    with entry_lock(path):
        if path.is_file():
            return path
        log.info("pretraining the %s backbone on the procedural corpus (%d images, %d epochs; "
                 "once, then cached in %s)", backbone, params.n_images, recipe["epochs"],
                 path.parent)
        state, manifest = train_corpus_backbone(backbone, params, recipe, progress)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        atomic_write_json(path.with_suffix(".json"), manifest)
        ho = manifest["holdout"] or {}
        log.info("corpus backbone ready in %.0f s (held-out top-1 accuracy %s)",
                 manifest["total_s"], ho.get("top1"))
    return path


def corpus_manifest(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
