"""The size/accuracy curve: masks for many rho values from one recorded pass, each evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageSet
from ..decompose import DecomposeConfig, derive_modules
from ..errors import CnnmodError
from ..evaluate import relabel
from ..metrics import parameter_counts, topk_accuracy
from ..modules import score_from_logits
from ..progress import show_progress
from ..store import load_store


@dataclass(frozen=True)
class Sweep:
    arch: str
    rows: list[dict]


def sweep(store_path: Path, data: ImageSet, rhos: Sequence[float], granularities: Sequence[str],
          batch_size: int = 256, device: torch.device | str | None = None, progress: bool = True,
          scoring: str = "softmax") -> Sweep:
    """One row per (granularity, rho): masks from the store's recorded activity, composed top-1 on `data`."""
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
    parent_top1 = topk_accuracy(parent.logits(images, batch_size, device)[:, columns], targets, 1)
    rows = []
    combos = [(g, r) for g in granularities for r in rhos]
    for granularity, rho in tqdm(combos, desc="trade-off", disable=not show_progress(progress)):
        config = base.replace(rho=rho, granularity=granularity)
        modules = derive_modules(parent, store.activity, config)
        scores = score_from_logits(modules.logits(images, batch_size, device), scoring)
        kept = parameter_counts(modules)
        rows.append({"granularity": granularity, "rho": rho, "jaccard": float(modules.jaccard().mean()),
                     "kept_parameters": float(np.mean(kept.kept)) / kept.parent,
                     "top1": topk_accuracy(scores, targets, 1), "top5": topk_accuracy(scores, targets, 5),
                     "parent_top1": parent_top1})
    return Sweep(parent.arch, rows)
