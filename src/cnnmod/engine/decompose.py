"""Decomposition: concern and tangling identification, output channeling, backtracking (DESIGN.md)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..errors import CnnmodError
from .activity import Activity, SamplePlan, plan_samples, positions, record_activity, sum_rows
from .backtrack import backtrack, conservative_nodes
from .distributed import SINGLE, Shard
from .memory import release_free_memory
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


def chosen_classes(parent: Parent, labels: np.ndarray, classes: Sequence[str] | None = None) -> list[int]:
    """Parent class indices of `classes` (all classes when None), checked against the labels."""
    chosen = [parent.class_index(c) for c in classes] if classes else list(range(parent.num_classes))
    if len(set(chosen)) != len(chosen):
        raise CnnmodError("a class was named twice")
    if len(labels) and (labels.min() < 0 or labels.max() >= parent.num_classes):
        raise CnnmodError(f"labels must lie in [0, {parent.num_classes}) to match the parent's classes")
    return chosen


def plan_for(parent: Parent, labels: np.ndarray, config: DecomposeConfig, chosen: Sequence[int]) -> SamplePlan:
    """The samples observed for the `chosen` classes (with every class's TI share), drawn from the seed alone."""
    return plan_samples(labels, parent.num_classes, chosen, config.samples_per_class, config.tangling_ratio,
                        config.seed, parent.classes)


def observe(
    parent: Parent,
    images: np.ndarray,
    labels: np.ndarray,
    config: DecomposeConfig = DecomposeConfig(),
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    shard: Shard = SINGLE,
) -> Activity:
    """The one pass over sample data: per-class activity counts at every site of `config.sites`, per node, or per
    channel when `config.granularity` is channel (then only channel masks can be derived from them)."""
    plan = plan_for(parent, labels, config, chosen_classes(parent, labels, classes))
    return record_activity(parent.model, config.sites, images, plan, parent.input_spec, batch_size, device,
                           progress, config.granularity, shard)


def keep_masks(activity: Activity, rho: float, granularity: str, use_tangling: bool) -> dict[str, torch.Tensor]:
    """CI (and TI) masks for the chosen classes: nodes whose activity rate exceeds `rho`. (Kc, *shape) bool.

    Computed a few classes at a time in integers (float64 for the rate when rho > 0), so nothing of the size of
    the counts is made in float."""
    if granularity == "node" and activity.granularity == "channel":
        raise CnnmodError("the activity holds channel counts only (decomposed with --granularity channel); node "
                          "masks need a decomposition with --granularity node")
    kc = len(activity.chosen)
    n = activity.group_sizes.to(torch.int64)
    n_ci = (n[0:2 * kc:2] + n[1:2 * kc:2]).clamp(min=1)
    n_ti = (n[1:2 * kc:2].sum() + n[2 * kc] - n[1:2 * kc:2]).clamp(min=1)
    masks = {}
    for site in activity.sites:
        counts = activity.counts[site.name]
        by_channel = granularity == "channel" and len(site.shape) > 1
        reduce = by_channel and activity.granularity == "node"
        scale = positions(site, "channel") if by_channel else 1
        ti_total = activity.tangling_total(site.name) if use_tangling else None
        if ti_total is not None and reduce:
            ti_total = _per_channel(ti_total.unsqueeze(0))[0]
        keep = torch.empty((kc, *site.shape), dtype=torch.bool)
        step = max(1, (1 << 20) // max(1, counts[0].numel()))
        for a in range(0, kc, step):
            b = min(kc, a + step)
            odd = counts[2 * a + 1:2 * b:2]
            ci = counts[2 * a:2 * b:2].to(torch.int64) + odd
            ci = _per_channel(ci) if reduce else ci
            part = _exceeds(ci, n_ci[a:b] * scale, rho)
            if ti_total is not None:
                ti = ti_total - (_per_channel(odd.to(torch.int64)) if reduce else odd)
                part |= _exceeds(ti, n_ti[a:b] * scale, rho)
            if by_channel:
                part = part.view(*part.shape, *([1] * (len(site.shape) - 1))).expand(-1, *site.shape)
            keep[a:b] = part
        masks[site.name] = keep
    return masks


def _exceeds(counts: torch.Tensor, totals: torch.Tensor, rho: float) -> torch.Tensor:
    """counts / totals > rho, row by row (totals: one per row)."""
    if rho == 0:
        return counts > 0
    shape = (-1, *([1] * (counts.dim() - 1)))
    return counts.to(torch.float64) / totals.view(shape).to(torch.float64) > rho


def _per_channel(counts: torch.Tensor) -> torch.Tensor:
    return counts.flatten(2).sum(2) if counts.dim() > 2 else counts


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
        _backtrack_in_place(parent, masks, ~removed, through_conv=through_conv)
        # nodes with no exact dependency pattern (by the op table): backtracking kept all their inputs
        record["conservative_ops"] = conservative_nodes(parent.model, through_conv)
    return ModuleSet(parent, activity.chosen, activity.sites, masks, weight, bias, record)


CLASSES_PER_BACKTRACK = 16


def _backtrack_in_place(parent: Parent, masks: dict[str, torch.Tensor], head_need: torch.Tensor,
                        through_conv: bool, classes_per_pass: int = CLASSES_PER_BACKTRACK) -> None:
    """Backtrack `masks` (our own tensors) a few classes at a time, writing each result over its rows."""
    for start in range(0, head_need.shape[0], classes_per_pass):
        rows = slice(start, start + classes_per_pass)
        part, _ = backtrack(parent.model, {k: v[rows] for k, v in masks.items()}, head_need[rows], through_conv)
        for k, v in part.items():
            masks[k][rows] = v


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


@dataclass(frozen=True)
class Decomposition:
    """What `decompose_in_passes` made: the modules, the counts when they were kept, how many samples were
    observed (over every pass), in how many passes, and the seconds spent observing and deriving masks."""

    modules: ModuleSet
    activity: Activity | None
    samples_observed: int
    passes: int
    seconds: dict[str, float]


def pass_classes(chosen: Sequence[int], classes_per_pass: int | None) -> list[list[int]]:
    """The chosen classes split into passes of at most `classes_per_pass` (one pass when None)."""
    step = classes_per_pass or max(1, len(chosen))
    if step < 1:
        raise CnnmodError(f"classes per pass must be at least 1, got {step}")
    return [list(chosen[i:i + step]) for i in range(0, len(chosen), step)]


def decompose_in_passes(
    parent: Parent,
    images: np.ndarray,
    labels: np.ndarray,
    config: DecomposeConfig = DecomposeConfig(),
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    classes_per_pass: int | None = None,
    keep_activity: bool = False,
    shard: Shard = SINGLE,
) -> Decomposition:
    """`decompose`, holding the counts of at most `classes_per_pass` classes at a time (each pass also observes
    every class's TI share), dropping them once the masks are made unless `keep_activity`, and sharing the samples
    among torch.distributed processes (`shard`). The masks equal those of one pass in one process, bit for bit."""
    chosen = chosen_classes(parent, labels, classes)
    plans = [plan_for(parent, labels, config, subset) for subset in pass_classes(chosen, classes_per_pass)]
    masks: dict[str, torch.Tensor] = {}
    weights, biases, kept = [], [], []
    observed, row, modules = 0, 0, None
    seconds = {"observe": 0.0, "derive": 0.0}
    for plan in plans:
        start = time.perf_counter()
        activity = record_activity(parent.model, config.sites, images, plan, parent.input_spec, batch_size, device,
                                   progress, config.granularity, shard)
        observed += activity.num_samples
        release_free_memory()  # the batches' activations, before the masks are made
        seconds["observe"] += time.perf_counter() - start
        start = time.perf_counter()
        modules = derive_modules(parent, activity, config)
        seconds["derive"] += time.perf_counter() - start
        if keep_activity:
            kept.append(activity)
        del activity
        if len(plans) > 1:  # each pass's masks go straight into the whole set's: never two copies of them all
            for s in modules.sites:
                if s.name not in masks:
                    masks[s.name] = torch.empty((len(chosen), *s.shape), dtype=torch.bool)
                masks[s.name][row:row + len(modules)] = modules.masks[s.name]
            weights.append(modules.head_weight)
            biases.append(modules.head_bias)
            row += len(modules)
        release_free_memory()
    assert modules is not None
    if len(plans) > 1:
        modules = ModuleSet(parent, tuple(chosen), modules.sites, masks, torch.cat(weights), torch.cat(biases),
                            modules.config)
    merged = (kept[0] if len(kept) == 1 else merge_activities(kept)) if kept else None
    return Decomposition(modules, merged, observed, len(plans), seconds)


def merge_activities(parts: Sequence[Activity]) -> Activity:
    """The activity of one pass over every part's classes, from passes over disjoint classes of one plan.

    Each pass counted the TI shares of the classes outside it as its `others`; a class's TI share is the same
    samples whether or not it was chosen, so the others of all passes together are the first pass's others less
    the TI shares that later passes counted as their own."""
    first = parts[0]
    counts, others = {}, {}
    for s in first.sites:
        dtype = functools.reduce(torch.promote_types, [p.counts[s.name].dtype for p in parts])
        counts[s.name] = torch.cat([p.counts[s.name].to(dtype) for p in parts])
        rest = first.others[s.name].to(torch.int64)
        for p in parts[1:]:
            rest = rest - sum_rows(p.counts[s.name][1::2])
        others[s.name] = rest.to(first.others[s.name].dtype)
    sizes = [p.group_sizes.to(torch.int64) for p in parts]
    rest_size = sizes[0][-1] - sum(int(z[1:-1:2].sum()) for z in sizes[1:])
    group_sizes = torch.cat([*[z[:-1] for z in sizes], rest_size.view(1)])
    return Activity(first.sites, counts, others, group_sizes, tuple(c for p in parts for c in p.chosen),
                    first.granularity)
