"""The paper's Table 1 for one parent: every variant at every site kind, with both scorings."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.compose import SCORINGS
from ..engine.decompose import VARIANTS, DecomposeConfig, derive_modules, observe
from ..engine.modules import ModuleSet, Parent, score_from_logits
from ..engine.trace import SITE_KINDS
from ..progress import show_progress
from ..workflows.metrics import topk_accuracy


def compare_variants(
    parent: Parent,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    base: DecomposeConfig | None = None,
    sites: Sequence[str] = SITE_KINDS,
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per (sites, variant): parent and composed top-1/top-5 for each scoring, mean Jaccard index.

    One observation pass per site kind serves all variants; module sets identical to one already evaluated
    (same masks and heads) reuse its outputs.
    """
    base = base or DecomposeConfig()
    images, labels = test
    targets = torch.as_tensor(labels)
    parent_logits = parent.logits(images, batch_size, device, progress)
    parent_acc = (topk_accuracy(parent_logits, targets, 1), topk_accuracy(parent_logits, targets, 5))
    rows, seen = [], {}
    for kind in sites:
        start = time.perf_counter()
        activity = observe(parent, *train, base.replace(sites=kind), None, batch_size, device, progress)
        observe_seconds = time.perf_counter() - start
        for variant in tqdm(variants, desc=f"{kind} variants", disable=not show_progress(progress), leave=False):
            config = base.replace(sites=kind, variant=variant)
            modules = derive_modules(parent, activity, config)
            key = _digest(modules)
            if key not in seen:
                seen[key] = modules.logits(images, batch_size, device, progress)
            logits = seen[key]
            row = {"sites": kind, "variant": variant, "parent_top1": parent_acc[0], "parent_top5": parent_acc[1],
                   "jaccard": float(modules.jaccard().mean()), "observe_seconds": observe_seconds}
            for scoring in SCORINGS:
                scores = score_from_logits(logits, scoring)
                row[f"{scoring}_top1"] = topk_accuracy(scores, targets, 1)
                row[f"{scoring}_top5"] = topk_accuracy(scores, targets, 5)
            rows.append(row)
    return rows


def _digest(modules: ModuleSet) -> str:
    h = hashlib.sha256()
    for name in sorted(modules.masks):
        h.update(name.encode())
        h.update(modules.masks[name].numpy().tobytes())
    h.update(modules.head_weight.numpy().tobytes())
    h.update(modules.head_bias.numpy().tobytes())
    return h.hexdigest()
