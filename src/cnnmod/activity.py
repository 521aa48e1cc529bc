"""One pass over sample data that counts, per class, how often every node of every site is active."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import CnnmodError
from .inputs import InputSpec, batch_slices
from .progress import show_progress
from .trace import Site, TracedModel, with_taps


@dataclass(frozen=True)
class SamplePlan:
    """Which samples are observed, and the group of each: `2 * class + (in the class's TI share)`.

    Class c's CI set is all its observed samples; its TI set is the TI share of every other class.
    """

    indices: np.ndarray
    groups: np.ndarray
    num_classes: int
    chosen: tuple[int, ...]

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.groups, minlength=2 * self.num_classes)


def plan_samples(
    labels: np.ndarray,
    num_classes: int,
    chosen: Sequence[int],
    samples_per_class: int,
    tangling_ratio: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> SamplePlan:
    """Draw CI samples for the chosen classes and TI shares from every class, determined by `seed` alone."""
    if samples_per_class < 1:
        raise CnnmodError("samples per class must be at least 1")
    if tangling_ratio < 0:
        raise CnnmodError("the tangling ratio must be 0 or more")
    chosen_set = set(chosen)
    ti_share = 0
    if tangling_ratio > 0 and num_classes > 1:
        ti_share = max(1, round(samples_per_class * tangling_ratio / (num_classes - 1)))
    rng = np.random.default_rng(seed)
    indices, groups = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        order = members[rng.permutation(len(members))]
        wanted = max(samples_per_class, ti_share) if c in chosen_set else ti_share
        take = order[: min(wanted, len(order))]
        in_share = np.arange(len(take)) < ti_share
        indices.append(take)
        groups.append(2 * c + in_share.astype(np.int64))
    idx, grp = np.concatenate(indices), np.concatenate(groups)
    missing = [c for c in chosen if not np.any(grp // 2 == c)]
    if missing:
        name = repr(class_names[missing[0]]) if class_names is not None else f"index {missing[0]}"
        raise CnnmodError(f"the data holds no samples of class {name}; decompose other classes")
    return SamplePlan(idx, grp, num_classes, tuple(int(c) for c in chosen))


@dataclass(frozen=True)
class Activity:
    """Per-group counts of active (> 0) observations for each node of each site.

    `counts[site]` has shape (2K, *site.shape); `group_sizes[g]` is how many samples group g holds.
    Class c's CI samples are groups 2c and 2c+1 only if c was chosen; otherwise only its TI share, 2c+1.
    """

    sites: tuple[Site, ...]
    counts: dict[str, torch.Tensor]
    group_sizes: torch.Tensor
    chosen: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return int(self.group_sizes.shape[0]) // 2

    @property
    def num_samples(self) -> int:
        return int(self.group_sizes.sum())


class _CountTap(nn.Module):
    """Adds the batch's active nodes to the counts of each sample's group; ReLU outputs are never negative,
    so their sign is already the 0/1 activity (one cheap op instead of compare + convert)."""

    def __init__(self, counts: torch.Tensor, batch_groups: list[torch.Tensor], non_negative: bool) -> None:
        super().__init__()
        self.counts = counts
        self.batch_groups = batch_groups
        self.non_negative = non_negative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = torch.sign(x) if self.non_negative else (x > 0).to(self.counts.dtype)
        self.counts.index_add_(0, self.batch_groups[0], active)
        return x


def record_activity(
    model: TracedModel,
    site_kind: str,
    images: np.ndarray,
    plan: SamplePlan,
    input_spec: InputSpec,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Activity:
    """Run the parent once over the planned samples and count active nodes per group at every site."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sites = model.site_list(site_kind)
    groups = 2 * plan.num_classes
    counts = {s.name: torch.zeros((groups, *s.shape), dtype=torch.float32, device=device) for s in sites}
    current: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)]
    taps: dict[str, nn.Module] = {s.name: _CountTap(counts[s.name], current, site_kind == "relu") for s in sites}
    net = with_taps(model.graph, taps).to(device)
    net.eval()
    order = np.argsort(plan.groups, kind="stable")
    idx, grp = plan.indices[order], plan.groups[order]
    bar = tqdm(total=len(idx), desc="observing", unit="img", disable=not show_progress(progress), leave=False)
    with torch.inference_mode():
        for batch in batch_slices(len(idx), batch_size):  # no batch of one: `.squeeze()` would drop it
            current[0] = torch.as_tensor(grp[batch], device=device)
            net(input_spec.prepare(images[idx[batch]], device))
            bar.update(len(idx[batch]))
    bar.close()
    sizes = torch.as_tensor(plan.group_sizes(), dtype=torch.float32)
    return Activity(sites, {k: v.cpu() for k, v in counts.items()}, sizes, plan.chosen)
