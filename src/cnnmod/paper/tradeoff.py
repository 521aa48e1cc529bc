"""The size/accuracy curve: masks for many rho values from one recorded pass, each evaluated; optionally, next to
them, compact decompositions of the same parent at several keep fractions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageSet
from ..engine.channels import channel_plan
from ..engine.compact import CompactConfig, decompose_compact
from ..engine.decompose import DecomposeConfig, derive_modules
from ..engine.modules import Parent, score_from_logits
from ..errors import CnnmodError
from ..progress import compact_progress, show_progress
from ..storage.store import load_store
from ..workflows.evaluate import evaluate, relabel
from ..workflows.metrics import parameter_counts, topk_accuracy

COMPACT_TRAIN_IMAGES = 20_000
"""The fine-tune budget of each compact point unless told otherwise (`cnnmod decompose` uses 300,000)."""


@dataclass(frozen=True)
class Sweep:
    arch: str
    rows: list[dict]


@dataclass(frozen=True)
class CompactPoints:
    """Compact decompositions of the store's parent to set beside the rho sweep: one per keep fraction (used as
    both the stream and the inner keep fraction), each fine-tuned on `train_images` images of `train`."""

    keeps: tuple[float, ...]
    train: ImageSet
    train_images: int = COMPACT_TRAIN_IMAGES
    seed: int = 0


def sweep(store_path: Path, data: ImageSet, rhos: Sequence[float], granularities: Sequence[str],
          batch_size: int = 256, device: torch.device | str | None = None, progress: bool = True,
          scoring: str = "softmax", compact: CompactPoints | None = None) -> Sweep:
    """One row per (granularity, rho): masks from the store's recorded activity, composed top-1 on `data`; then
    one row per compact keep fraction, for the same classes, on the same images."""
    store = load_store(store_path)
    if store.activity is None:
        raise CnnmodError(f"{store_path} holds no activity counts; decompose again to record them")
    base = DecomposeConfig.from_json(store.modules.config)
    parent = store.modules.parent
    names = tuple(parent.classes[i] for i in store.activity.chosen)
    labels = relabel(data.labels, data.classes, names)
    images = data.images[labels >= 0]
    targets = torch.as_tensor(labels[labels >= 0])
    columns = torch.tensor(store.activity.chosen)
    if compact is not None:
        channel_plan(parent.model)  # a parent whose channels cannot be followed is refused before the sweep
    parent_top1 = topk_accuracy(parent.logits(images, batch_size, device)[:, columns], targets, 1)
    rows = []
    combos = [(g, r) for g in granularities for r in rhos]
    for granularity, rho in tqdm(combos, desc="trade-off", disable=not show_progress(progress)):
        config = base.replace(rho=rho, granularity=granularity)
        modules = derive_modules(parent, store.activity, config)
        scores = score_from_logits(modules.logits(images, batch_size, device), scoring)
        kept = parameter_counts(modules)
        rows.append({"method": "paper", "granularity": granularity, "rho": rho,
                     "jaccard": float(modules.jaccard().mean()),
                     "kept_parameters": float(np.mean(kept.kept)) / kept.parent,
                     "top1": topk_accuracy(scores, targets, 1), "top5": topk_accuracy(scores, targets, 5),
                     "parent_top1": parent_top1})
    if compact is not None:
        for keep in compact.keeps:
            row = compact_point(parent, names, compact.train, images, targets.numpy(), keep, compact, scoring,
                                batch_size, device, progress)
            rows.append({**row, "parent_top1": parent_top1})
    return Sweep(parent.arch, rows)


def compact_point(parent: Parent, names: Sequence[str], train: ImageSet, images: np.ndarray, targets: np.ndarray,
                  keep: float, points: CompactPoints, scoring: str = "softmax", batch_size: int = 256,
                  device: torch.device | str | None = None, progress: bool = True) -> dict:
    """Compact modules of `parent` for `names` that keep the fraction `keep` of every channel space after the shared
    prefix, fine-tuned on `train`, and their composed accuracy on `images` (`targets` index `names`)."""
    config = CompactConfig(stream_keep=keep, inner_keep=keep, train_images=points.train_images, seed=points.seed)
    train_labels = relabel(train.labels, train.classes, parent.classes)
    start = time.perf_counter()
    with compact_progress(config.train_images, f"compact keep={keep:g}", progress) as tick:
        modules, _ = decompose_compact(parent, train.images[train_labels >= 0], train_labels[train_labels >= 0],
                                       config, names, tick, device)
    seconds = time.perf_counter() - start
    result = evaluate(modules, images, targets, scoring, batch_size, device, progress)
    composed = result.composed[scoring]
    return {"method": "compact", "keep": keep, "stream_keep": keep, "inner_keep": keep,
            "train_images": config.train_images, "jaccard": result.jaccard_mean,
            "kept_parameters": result.kept_parameters_mean, "top1": composed.top1, "top5": composed.top5,
            "seconds": seconds}
