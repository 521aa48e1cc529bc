"""Decomposition: concern and tangling identification, output channeling, backtracking (DESIGN.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .activity import Activity, plan_samples, record_activity
from .backtrack import backtrack, conservative_nodes
from .errors import CnnmodError
from .modules import ModuleSet, Parent

VARIANTS = ("ci", "bln", "bi")
GRANULARITIES = ("node", "channel")


@dataclass(frozen=True)
class DecomposeConfig:
    """Every parameter of a decomposition; defaults are the ones that lose no measurable accuracy."""

    samples_per_class: int = 1000
    tangling_ratio: float = 1.0
    rho: float = 0.0
    granularity: str = "node"
    variant: str = "bi"
    sites: str = "relu"
    delta: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise CnnmodError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.granularity not in GRANULARITIES:
            raise CnnmodError(f"unknown granularity {self.granularity!r}; choose node or channel")
        if self.sites not in ("relu", "conv"):
            raise CnnmodError(f"unknown sites {self.sites!r}; choose relu or conv")
        if not 0 <= self.rho < 1:
            raise CnnmodError(f"rho must be in [0, 1), got {self.rho}")
        if self.samples_per_class < 1 or not 0 <= self.tangling_ratio < math.inf or not 0 <= self.delta < math.inf:
            raise CnnmodError("samples per class must be >= 1, tangling ratio and delta finite and >= 0")
        if self.seed < 0:
            raise CnnmodError(f"the seed must be 0 or more, got {self.seed}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DecomposeConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: object) -> DecomposeConfig:
        return DecomposeConfig.from_json({**self.to_json(), **changes})


def observe(
    parent: Parent,
    images: np.ndarray,
    labels: np.ndarray,
    config: DecomposeConfig = DecomposeConfig(),
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Activity:
    """The one pass over sample data: per-class activity counts at every site of `config.sites`."""
    chosen = [parent.class_index(c) for c in classes] if classes else list(range(parent.num_classes))
    if len(set(chosen)) != len(chosen):
        raise CnnmodError("a class was named twice")
    if len(labels) and (labels.min() < 0 or labels.max() >= parent.num_classes):
        raise CnnmodError(f"labels must lie in [0, {parent.num_classes}) to match the parent's classes")
    plan = plan_samples(labels, parent.num_classes, chosen, config.samples_per_class,
                        config.tangling_ratio, config.seed, parent.classes)
    return record_activity(parent.model, config.sites, images, plan, parent.input_spec, batch_size, device,
                           progress)


def keep_masks(activity: Activity, rho: float, granularity: str, use_tangling: bool) -> dict[str, torch.Tensor]:
    """CI (and TI) masks for the chosen classes: nodes whose activity rate exceeds `rho`. (Kc, *shape) bool."""
    chosen = torch.tensor(activity.chosen, dtype=torch.long)
    n = activity.group_sizes
    n_ci = (n[2 * chosen] + n[2 * chosen + 1]).clamp(min=1)
    n_ti = (n[1::2].sum() - n[2 * chosen + 1]).clamp(min=1)
    masks = {}
    for site in activity.sites:
        counts = activity.counts[site.name]
        ci = counts[2 * chosen] + counts[2 * chosen + 1]
        ti = counts[1::2].sum(0, keepdim=True) - counts[2 * chosen + 1]
        if granularity == "channel" and len(site.shape) > 1:
            ci, ti = _per_channel(ci), _per_channel(ti)
        positions = 1 if granularity == "node" else int(np.prod(site.shape[1:]))
        shape = (-1, *([1] * (ci.dim() - 1)))
        keep = ci / (n_ci.view(shape) * positions) > rho
        if use_tangling:
            keep |= ti / (n_ti.view(shape) * positions) > rho
        if granularity == "channel" and len(site.shape) > 1:
            keep = keep.view(*keep.shape, *([1] * (len(site.shape) - 1))).expand(-1, *site.shape)
        masks[site.name] = keep.contiguous()
    return masks


def _per_channel(counts: torch.Tensor) -> torch.Tensor:
    return counts.flatten(2).sum(2)


def channel_heads(weight: torch.Tensor, bias: torch.Tensor,
                  classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output channeling: (Kc, 2, F) and (Kc, 2) heads; row 0 concerned, row 1 the mean of the others."""
    k = weight.shape[0]
    idx = torch.tensor(list(classes), dtype=torch.long)
    w_c, b_c = weight[idx], bias[idx]
    w_uc = (weight.sum(0, keepdim=True) - w_c) / max(k - 1, 1)
    b_uc = (bias.sum() - b_c) / max(k - 1, 1)
    return torch.stack([w_c, w_uc], 1), torch.stack([b_c, b_uc], 1)


def derive_modules(parent: Parent, activity: Activity, config: DecomposeConfig = DecomposeConfig()) -> ModuleSet:
    """Masks and heads for every observed class, from the recorded counts (no further pass over data)."""
    if activity.sites[0].kind != config.sites:
        raise CnnmodError(f"the activity was recorded at {activity.sites[0].kind} sites, not {config.sites}")
    masks = keep_masks(activity, config.rho, config.granularity, config.tangling_ratio > 0)
    head = parent.model.head
    weight, bias = channel_heads(head.weight, head.bias, activity.chosen)
    record = config.to_json()
    if config.variant != "ci":
        removed = (weight[:, 1] >= config.delta) & (weight[:, 0] <= -config.delta)
        weight = weight * (~removed).unsqueeze(1).to(weight.dtype)
        through_conv = config.variant == "bi"
        masks = _backtracked(parent, masks, ~removed, through_conv=through_conv)
        # nodes with no exact dependency pattern (by the op table): backtracking kept all their inputs
        record["conservative_ops"] = conservative_nodes(parent.model, through_conv)
    return ModuleSet(parent, activity.chosen, activity.sites, masks, weight, bias, record)


def _backtracked(parent: Parent, masks: dict[str, torch.Tensor], head_need: torch.Tensor,
                 through_conv: bool, classes_per_pass: int = 16) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in masks}
    for start in range(0, head_need.shape[0], classes_per_pass):
        rows = slice(start, start + classes_per_pass)
        part, _ = backtrack(parent.model, {k: v[rows] for k, v in masks.items()}, head_need[rows], through_conv)
        for k, v in part.items():
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def decompose(
    parent: Parent,
    images: np.ndarray,
    labels: np.ndarray,
    config: DecomposeConfig = DecomposeConfig(),
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[ModuleSet, Activity]:
    """Decompose `parent` into one module per class (all classes, or `classes`) in one pass over the samples."""
    activity = observe(parent, images, labels, config, classes, batch_size, device, progress)
    return derive_modules(parent, activity, config), activity
