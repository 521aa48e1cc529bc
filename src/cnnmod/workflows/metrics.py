"""Accuracy, per-class precision/recall, and module size (Jaccard index, kept parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn

from ..engine import ops
from ..engine.backtrack import backtrack
from ..engine.modules import ModuleSet


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k highest scores (k is capped at the column count)."""
    if len(targets) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == targets.view(-1, 1)).any(1).float().mean())


def precision_recall(pred: torch.Tensor, targets: torch.Tensor,
                     num_classes: int) -> tuple[list[float], list[float | None]]:
    """Per-class precision and recall; a class never predicted has precision 0, a class with no samples has no
    recall (None), since 0 would read as "every image missed"."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    support = confusion.sum(1)
    recall = tp / support.clamp(min=1)
    return precision.tolist(), [r if n > 0 else None for r, n in zip(recall.tolist(), support.tolist(), strict=True)]


@dataclass(frozen=True)
class ParameterCount:
    kept: list[int]    # per module, once channels no needed node uses are pruned
    parent: int        # the parent's conv and linear parameters


def parameter_counts(modules: ModuleSet, classes_per_pass: int = 16) -> ParameterCount:
    """Parameters of conv/linear layers each module still uses once dead channels are removed."""
    model = modules.parent.model
    gm = model.graph
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and _is_layer(ops.lookup(gm, n))]
    parent_total = sum(p.numel() for n in layers for p in gm.get_submodule(str(n.target)).parameters())
    kept: list[int] = []
    for start in range(0, len(modules), classes_per_pass):
        rows = slice(start, start + classes_per_pass)
        head_need = modules.head_weight[rows].abs().sum(1) > 0
        _, need = backtrack(model, {k: v[rows] for k, v in modules.masks.items()}, head_need, through_conv=True)
        total = 2 * head_need.sum(1).long() + 2
        for n in layers:
            if n.name == model.head.node:
                continue
            layer = cast(nn.Conv2d | nn.Linear, gm.get_submodule(str(n.target)))
            out_alive = _channels(need.get(n.name), head_need.shape[0], layer.weight.shape[0])
            source = n.args[0]
            in_alive = _channels(need.get(source.name) if hasattr(source, "name") else None,
                                 head_need.shape[0], layer.weight.shape[1] * getattr(layer, "groups", 1))
            groups = getattr(layer, "groups", 1)
            total += out_alive.sum(1) * in_alive.sum(1) * layer.weight[0, 0].numel() // groups
            if layer.bias is not None:
                total += out_alive.sum(1)
        kept.extend(int(t) for t in total)
    return ParameterCount(kept, parent_total)


def _is_layer(op: ops.Op | None) -> bool:
    """A conv or linear module (by the op table): the layers whose parameters are counted."""
    return op is not None and op.kind == "module" and op.site == "conv"


def _channels(need: torch.Tensor | None, rows: int, channels: int) -> torch.Tensor:
    if need is None:
        return torch.zeros(rows, channels, dtype=torch.long)
    alive = need.flatten(2).any(2) if need.dim() > 2 else need
    return alive.long()
