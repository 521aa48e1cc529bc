"""One pass over sample data that counts, per sample group, how often every node of every site is active.

The observed samples are sorted by group, so a batch holds a few runs of one group each. Each site's tap turns the
batch into 0/1 activity once (into one scratch buffer shared by all taps) and adds one reduction per run (a product
with a vector of ones) to integer counts of the smallest dtype that holds them: no scatter, no float counts. A
ReLU site whose input is a fresh tensor that nothing else reads is replaced by a module that applies the ReLU in
place and counts its output (counting fused with the ReLU). With channel granularity only per-channel counts are
kept (summed over positions): C numbers per site and group instead of C x H x W.

Several processes (cnnmod.engine.distributed) each observe a contiguous share of the batches (cut as one process cuts
them, so every image goes through the same kernels in any number of processes) and sum their counts: integers,
so the result is the same for any number of processes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.cache import release_mapped_pages
from ..errors import CnnmodError
from ..progress import show_progress
from . import ops
from .distributed import SINGLE, Shard
from .inputs import InputSpec, batch_slices
from .trace import Site, TracedModel

COUNT_GRANULARITIES = ("node", "channel")


@dataclass(frozen=True)
class SamplePlan:
    """Which samples are observed, and the group of each.

    For the i-th chosen class, group 2i holds its CI samples outside its TI share and group 2i+1 its TI share;
    the last group, 2 * len(chosen), holds the TI shares of the classes not chosen. Class chosen[i]'s CI set is
    groups 2i and 2i+1; its TI set is every other odd group and the last one.
    """

    indices: np.ndarray
    groups: np.ndarray
    num_classes: int
    chosen: tuple[int, ...]

    @property
    def num_groups(self) -> int:
        return 2 * len(self.chosen) + 1

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.groups, minlength=self.num_groups)


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
    position = {int(c): i for i, c in enumerate(chosen)}
    others = 2 * len(position)
    ti_share = 0
    if tangling_ratio > 0 and num_classes > 1:
        ti_share = max(1, round(samples_per_class * tangling_ratio / (num_classes - 1)))
    rng = np.random.default_rng(seed)
    indices, groups = [], []
    missing = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        order = members[rng.permutation(len(members))]
        wanted = max(samples_per_class, ti_share) if c in position else ti_share
        take = order[: min(wanted, len(order))]
        if c in position:
            if len(take) == 0:
                missing.append(c)
            in_share = np.arange(len(take)) < ti_share
            group = 2 * position[c] + in_share.astype(np.int64)
        else:
            group = np.full(len(take), others, dtype=np.int64)
        indices.append(take)
        groups.append(group)
    if missing:
        first = min(missing, key=lambda c: position[c])
        name = repr(class_names[first]) if class_names is not None else f"index {first}"
        raise CnnmodError(f"the data holds no samples of class {name}; decompose other classes")
    idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    grp = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    return SamplePlan(idx, grp, num_classes, tuple(int(c) for c in chosen))


def sum_rows(t: torch.Tensor, cells: int = 1 << 22) -> torch.Tensor:
    """`t.sum(0)` in int64, a few rows at a time: summing a small integer type into int64 in one call converts
    the whole tensor to int64 first (eight bytes per cell)."""
    total = torch.zeros(t.shape[1:], dtype=torch.int64, device=t.device)
    step = max(1, cells // max(1, t[0].numel())) if t.shape[0] else 1
    for start in range(0, t.shape[0], step):
        total += t[start:start + step].sum(0, dtype=torch.int64)
    return total


def count_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds counts up to `largest`."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def count_shape(site: Site, granularity: str) -> tuple[int, ...]:
    """The shape of one group's counts at `site`: every node, or (channel granularity) one per channel."""
    return site.shape[:1] if granularity == "channel" else site.shape


def positions(site: Site, granularity: str) -> int:
    """How many nodes one count stands for: 1, or a channel's positions (H x W) with channel counts."""
    return int(np.prod(site.shape[1:])) if granularity == "channel" and len(site.shape) > 1 else 1


@dataclass(frozen=True)
class Activity:
    """Per-group counts of active (> 0) observations, for each site: integers of the smallest dtype that holds them,
    of shape (2 * len(chosen), *site.shape), or (2 * len(chosen), C) with `granularity == "channel"` (active
    positions summed over each channel).

    Rows 2i and 2i+1 are chosen[i]'s groups (as in SamplePlan); `others[site]` counts the TI shares of the classes
    not chosen (the plan's last group). `group_sizes` holds the 2 * len(chosen) + 1 group sizes, that one last.
    """

    sites: tuple[Site, ...]
    counts: dict[str, torch.Tensor]
    others: dict[str, torch.Tensor]
    group_sizes: torch.Tensor
    chosen: tuple[int, ...]
    granularity: str = "node"

    @property
    def num_samples(self) -> int:
        return int(self.group_sizes.sum())

    def row(self, cls: int) -> int:
        """The position of parent class `cls` among the chosen classes (its groups are 2 * row and 2 * row + 1)."""
        try:
            return self.chosen.index(cls)
        except ValueError:
            raise CnnmodError(f"the recorded activity holds no samples of class index {cls}") from None

    def class_counts(self, site: str, classes: Sequence[int]) -> torch.Tensor:
        """Counts over each class's own (CI) samples, (len(classes), *shape), in int64."""
        rows = torch.tensor([self.row(c) for c in classes], dtype=torch.long)
        counts = self.counts[site]
        return counts[2 * rows].to(torch.int64) + counts[2 * rows + 1]

    def tangling_total(self, site: str) -> torch.Tensor:
        """Counts over every TI share (the odd groups and the others'), (*shape) in int64."""
        return sum_rows(self.counts[site][1::2]) + self.others[site]


class _Batch:
    """What the taps of one counting network share: the runs of groups in the current batch, and one scratch
    buffer for its 0/1 activity and a vector of ones (so no tap allocates a batch-sized tensor)."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, int]] = []
        self._scratch = torch.empty(0)
        self._ones = torch.empty(0)

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """`x > 0` as float 0/1 in the shared scratch buffer."""
        n = x.numel()
        if self._scratch.numel() < n or self._scratch.device != x.device:
            self._scratch = torch.empty(n, dtype=torch.float32, device=x.device)
        return torch.gt(x, 0, out=self._scratch[:n].view(x.shape))

    def clear(self) -> None:
        """Drop the buffers (the network that holds this object may live on in a reference cycle until the
        garbage collector runs)."""
        self.runs = []
        self._scratch = torch.empty(0)
        self._ones = torch.empty(0)

    def ones(self, n: int, device: torch.device) -> torch.Tensor:
        if self._ones.numel() < n or self._ones.device != device:
            self._ones = torch.ones(1, max(n, 256), dtype=torch.float32, device=device)
        return self._ones[:, :n]


class _CountTap(nn.Module):
    """Adds the active nodes of each run of the batch to its group's counts; returns its input."""

    def __init__(self, counts: torch.Tensor, others: torch.Tensor, batch: _Batch, per_channel: bool) -> None:
        super().__init__()
        self.counts = counts
        self.others = others
        self.batch = batch
        self.per_channel = per_channel

    def count(self, x: torch.Tensor) -> None:
        active = self.batch.active(x)
        for group, start, stop in self.batch.runs:
            part = active[start:stop]
            n = stop - start
            if self.per_channel:
                # per sample exact in float32 (at most 2^24 positions), summed over samples in float64
                total = part.reshape(n, part.shape[1], -1).sum(2).sum(0, dtype=torch.float64)
            else:
                total = (self.batch.ones(n, x.device) @ part.reshape(n, -1)).view(self.others.shape)
            row = self.counts[group] if group < self.counts.shape[0] else self.others
            row.add_(total.to(row.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count(x)
        return x


class _CountingReLU(_CountTap):
    """A ReLU applied in place to a tensor that nothing else reads, counted on the way out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(x)
        self.count(y)
        return y


def relu_in_place(gm: fx.GraphModule, node: fx.Node, batched: frozenset[str]) -> bool:
    """Whether ReLU site `node` may run in place: its input is a new tensor (a conv/linear layer's output or an
    arithmetic result, never a view or a value passed through) that carries the batch and is read by it alone."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or len(source.users) != 1 or source.name not in batched:
        return False
    if len(node.args) > 1 or any(k != "inplace" for k in node.kwargs):
        return False
    if source.op == "call_function" and source.target in ops.FRESH_FUNCTIONS:
        return all(not isinstance(a, fx.Node) or a.name in batched for a in source.args)
    op = ops.lookup(gm, source)
    return source.op == "call_module" and op is not None and op.site == "conv"


def counting_network(model: TracedModel, sites: Sequence[Site], counts: dict[str, torch.Tensor],
                     others: dict[str, torch.Tensor], batch: _Batch, granularity: str) -> fx.GraphModule:
    """A copy of the parent's graph that counts active nodes at `sites` into `counts` (and `others`, for the plan's
    last group) as it runs."""
    gm = model.graph
    net = fx.GraphModule(copy.deepcopy(gm), copy.deepcopy(gm.graph))
    nodes = {n.name: n for n in net.graph.nodes}
    for i, site in enumerate(sites):
        per_channel = granularity == "channel" and len(site.shape) > 1
        node = nodes[site.name]
        target = f"cnnmod_count_{i}"
        if site.kind == "relu" and relu_in_place(net, node, model.batched):
            net.add_submodule(target, _CountingReLU(counts[site.name], others[site.name], batch, per_channel))
            node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
            continue
        net.add_submodule(target, _CountTap(counts[site.name], others[site.name], batch, per_channel))
        with net.graph.inserting_after(node):
            tapped = net.graph.call_module(target, (node,))
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user, t=tapped: user is not t)
    net.graph.lint()
    net.delete_all_unused_submodules()
    net.recompile()
    return net


def _runs(groups: np.ndarray) -> list[tuple[int, int, int]]:
    """(group, start, stop) of each run of equal values in `groups` (sorted, so each group is one run)."""
    if len(groups) == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1])
    stops = np.concatenate([starts[1:], [len(groups)]])
    return [(int(groups[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def activity_counts(sites: Sequence[Site], plan: SamplePlan, granularity: str, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Zeroed counts for `plan` at `sites`: the chosen classes' groups, and the others' group, each in the smallest
    integer dtype that holds its largest count."""
    sizes = plan.group_sizes()
    largest, others = int(sizes[:-1].max(initial=0)), int(sizes[-1])
    counts = {s.name: torch.zeros((plan.num_groups - 1, *count_shape(s, granularity)),
                                  dtype=count_dtype(largest * positions(s, granularity)), device=device)
              for s in sites}
    rest = {s.name: torch.zeros(count_shape(s, granularity), dtype=count_dtype(others * positions(s, granularity)),
                                device=device)
            for s in sites}
    return counts, rest


def record_activity(
    model: TracedModel,
    site_kind: str,
    images: np.ndarray,
    plan: SamplePlan,
    input_spec: InputSpec,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    granularity: str = "node",
    shard: Shard = SINGLE,
) -> Activity:
    """Run the parent once over the planned samples (this shard's share of them) and count active nodes per group
    at every site; with several processes the counts are summed over them."""
    if granularity not in COUNT_GRANULARITIES:
        raise CnnmodError(f"unknown granularity {granularity!r}; choose node or channel")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sites = model.site_list(site_kind)
    counts, others = activity_counts(sites, plan, granularity, device)
    batch = _Batch()
    net = counting_network(model, sites, counts, others, batch, granularity).to(device)
    net.eval()
    order = np.argsort(plan.groups, kind="stable")
    idx, grp = plan.indices[order], plan.groups[order]
    # whole batches per process, cut as one process cuts them: every image is computed in the same batch (the
    # same kernels, the same floats) whatever the number of processes
    slices = batch_slices(len(idx), batch_size)
    slices = slices[shard.part(len(slices))]
    bar = tqdm(total=sum(p.stop - p.start for p in slices), desc="observing", unit="img",
               disable=not show_progress(progress), leave=False)
    with torch.inference_mode():
        for part in slices:
            rows = idx[part]
            if len(rows) == 1:  # a batch of one runs twice, counted once: `.squeeze()` would drop the batch
                batch.runs = [(int(grp[part][0]), 0, 1)]
                rows = np.repeat(rows, 2)
            else:
                batch.runs = _runs(grp[part])
            net(input_spec.prepare(images[rows], device))
            release_mapped_pages(images)
            bar.update(len(idx[part]))
    bar.close()
    batch.clear()
    del net
    shard.sum_([*counts.values(), *others.values()])
    sizes = torch.as_tensor(plan.group_sizes(), dtype=torch.int64)
    return Activity(tuple(sites), {k: v.cpu() for k, v in counts.items()}, {k: v.cpu() for k, v in others.items()},
                    sizes, plan.chosen, granularity)
