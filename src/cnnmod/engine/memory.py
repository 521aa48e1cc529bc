"""How much memory a decomposition will need, said before it starts, and refused when it will not fit.

The estimate adds to what the process holds now (interpreter, torch, the data, the parent) the largest of what
the decomposition holds at once: the counts of one pass (the smallest integer dtype per site; kept counts of every
pass with --keep-activity), every module's masks (one byte per node and class), and either one batch through the
counting network (its live activations, from the traced shapes) or backtracking a few classes at a time.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CnnmodError
from .activity import SamplePlan, count_dtype, count_shape, positions
from .trace import TracedModel, meta_values

GB = 1e9
_SLACK = 1.10  # allocator overhead: freed blocks the C library keeps, fragmentation


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: `process` is resident now; `counts` (one pass's, or every pass's when kept), `masks` (every
    module's), `batch` and `backtrack` are the parts, and `extra` what the decomposition adds at its peak: the
    larger of observing (counts and one batch) and deriving masks (counts, masks and backtracking), with the
    masks of earlier passes, plus the allocator's overhead."""

    process: int
    counts: int
    masks: int
    batch: int
    backtrack: int
    classes: int
    classes_per_pass: int
    extra: int

    @property
    def total(self) -> int:
        return self.process + self.extra

    def describe(self) -> str:
        passes = -(-self.classes // max(1, self.classes_per_pass))
        how = f" in {passes} passes of {self.classes_per_pass} classes" if passes > 1 else ""
        return (f"memory: about {_gb(self.total)} GB for {self.classes} classes{how} (counts {_gb(self.counts)}, "
                f"masks {_gb(self.masks)}, one batch {_gb(self.batch)}, backtracking {_gb(self.backtrack)}, "
                f"process now {_gb(self.process)} GB)")

    def to_json(self) -> dict[str, int]:
        return {"process": self.process, "counts": self.counts, "masks": self.masks, "batch": self.batch,
                "backtrack": self.backtrack, "total": self.total}


def _gb(n: int) -> str:
    return f"{n / GB:.2f}"


def resident_bytes() -> int:
    """This process's resident set size now (0 where /proc is absent)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less under a cgroup limit; None when unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                found.append(int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(0, min(found)) if found else None


def release_free_memory() -> None:
    """Hand the C library's freed heap memory back to the system (glibc's malloc_trim), so that the batches of one
    pass do not leave the next one a fragmented heap to grow; a no-op elsewhere."""
    gc.collect()  # a traced network is a reference cycle: its buffers go only when the collector runs
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _bytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def activation_peak(model: TracedModel, batch: int) -> int:
    """The largest set of tensors alive at once when the parent runs on `batch` images (fx frees each value after
    its last use), from the traced shapes on the meta device; plus a layer's workspace and the input batch as
    uint8 and float32."""
    gm = model.graph
    values = meta_values(gm, model.input_shape, 2)
    nodes = list(gm.graph.nodes)
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last[a.name] = i
    scale = {n.name: (batch / 2 if n.name in model.batched else 1.0) for n in nodes}
    live: dict[str, float] = {}
    peak = largest = 0.0
    for i, node in enumerate(nodes):
        value = values.get(node.name)
        parts = value if isinstance(value, (tuple, list)) else [value]
        live[node.name] = sum(_bytes(v) for v in parts) * scale[node.name]
        largest = max(largest, live[node.name])
        peak = max(peak, sum(live.values()))
        for a in node.all_input_nodes:
            if last.get(a.name) == i:
                live.pop(a.name, None)
    image = int(np.prod(model.input_shape))
    # a convolution's workspace (its output in the blocked layout of the CPU kernels) about doubles the largest
    return int(peak + largest + batch * image * (1 + 4 + 4))


def _sites_numel(model: TracedModel, kind: str) -> int:
    return sum(s.numel for s in model.site_list(kind))


def backtrack_peak(model: TracedModel, rows: int) -> int:
    """Backtracking `rows` classes at once: a bool mask per tensor node, and float vector-Jacobian products of the
    largest layer."""
    batched = [n for n in model.graph.graph.nodes if n.name in model.batched]
    values = meta_values(model.graph, model.input_shape, 2)
    sizes = [_bytes(values[n.name]) // 2 // values[n.name].element_size() for n in batched
             if isinstance(values.get(n.name), torch.Tensor)]
    rows = max(rows, 2)
    return int(rows * sum(sizes) + rows * 4 * 5 * max(sizes, default=0))


def estimate_decomposition(model: TracedModel, site_kind: str, plans: Sequence[SamplePlan], granularity: str,
                           batch_size: int, keep_activity: bool, backtrack_rows: int) -> MemoryEstimate:
    """The peak memory of decomposing with these per-pass plans (see the module's docstring)."""
    sites = model.site_list(site_kind)
    classes = sum(len(p.chosen) for p in plans)
    per_pass = []
    for plan in plans:
        sizes = plan.group_sizes()
        largest, others = int(sizes[:-1].max(initial=0)), int(sizes[-1])
        total = 0
        for s in sites:
            cells = int(np.prod(count_shape(s, granularity)))
            scale = positions(s, granularity)
            total += cells * ((plan.num_groups - 1) * count_dtype(largest * scale).itemsize
                              + count_dtype(others * scale).itemsize)
        per_pass.append(total)
    nodes = _sites_numel(model, site_kind)
    largest_pass = max((len(p.chosen) for p in plans), default=0)
    several = len(plans) > 1
    counts = max(per_pass, default=0)
    kept = sum(per_pass) if keep_activity else 0
    whole = nodes * classes if several else 0  # every module's masks, filled pass by pass
    masks = nodes * largest_pass
    batch = activation_peak(model, batch_size) + batch_size * max((s.numel for s in sites), default=0) * 4
    backtrack = backtrack_peak(model, backtrack_rows)
    prior = whole + kept - (counts if keep_activity else 0)
    peak = max(prior + counts + batch, prior + counts + masks + backtrack, whole + 2 * kept if several else 0)
    return MemoryEstimate(
        process=resident_bytes(),
        counts=kept if keep_activity else counts,
        masks=whole or masks,
        batch=batch,
        backtrack=backtrack,
        classes=classes,
        classes_per_pass=largest_pass,
        extra=int(_SLACK * peak),
    )


def room(processes_here: int = 1) -> int | None:
    """Bytes one process may add: what is available, shared among the processes on this machine (None: unknown)."""
    available = available_bytes()
    return None if available is None else available // max(1, processes_here)


def refusal(estimate: MemoryEstimate, share: int, shrink: dict[str, MemoryEstimate],
            processes_here: int = 1) -> CnnmodError:
    """The one-line error for a decomposition that will not fit in `share` bytes, naming the options that make it
    fit (`shrink`: option -> the estimate with it)."""
    helps = [f"{option} (about {_gb(e.total)} GB)" for option, e in shrink.items() if e.extra <= share]
    where = f" per process ({processes_here} on this machine)" if processes_here > 1 else ""
    advice = ("use " + " or ".join(helps)) if helps else ("use --granularity channel with --classes-per-pass 1 and a "
                                                          "smaller --batch-size, or a machine with more memory")
    return CnnmodError(f"decomposing {estimate.classes} classes needs about {_gb(estimate.extra)} GB beyond the "
                       f"{_gb(estimate.process)} GB this process holds, but {_gb(share)} GB are available{where}: "
                       f"{advice}")
