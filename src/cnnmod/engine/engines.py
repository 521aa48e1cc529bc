"""Composition engines for compact modules: how the modules of one parent are run to get their (z_c, z_uc).

- `exact`: every module runs its own network. Modules of one parent run together: the layers they share (a
  frozen prefix of the parent) once, then their own layers as one stacked network (cnnmod.engine.channels.stack,
  modules padded to the widest): on a GPU as grouped convolutions; on a CPU channels-last with the module axis
  folded into the batch (cnnmod.engine.folding), since oneDNN runs grouped convolutions of a few channels per
  group at about 0.6 of the speed of one module's convolution on its own batch slice (13.3 against 8.3 ms for
  ten 16-channel modules: `python benchmarks/conv_widths.py`). Without a
  shared prefix, on a CPU, the modules run one after the other on the same batch. Each module's output is its own.
- `shared`: one network per parent holding the union of the modules' channels; one forward pass, and every
  module's head reads the shared features. It exists only where the decomposition wrote one (a shared-weight
  method); its vote can differ from `exact`, so `evaluate` reports both.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CnnmodError
from .channels import (
    ChannelPlan,
    _feature_index,
    _sorted_keep,
    cut_points,
    head_parameters,
    network_cost,
    split_at,
    stack,
)
from .inputs import InputSpec
from .modules import RunnerCache, relus_in_place

ENGINES = ("exact", "shared")
CHANNEL_ALIGN = 8
"""The exact engine pads each module's own channel counts to a multiple of this (zero channels) where that adds
at most a fifth of them (channels.ALIGN_MOST): on the shared ResNet-20, whose modules keep 15 or 16 channels a
space, their own layers ran in 0.87 of the time unpadded (`python benchmarks/compose_tail.py --align 1` against
without)."""
BATCHINGS = ("auto", "grouped", "folded", "each")


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""How compact modules' weights can be kept in a store: float16 halves their files. They run in float32 either way."""


def rounded_weights(net: fx.GraphModule, weights_dtype: str, what: str = "a module") -> fx.GraphModule:
    """A copy of `net` whose float32 weights hold values that `weights_dtype` represents exactly (still float32),
    so that storing them in that dtype loses nothing; `net` itself when the dtype is float32."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise CnnmodError(f"unknown weights dtype {weights_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
    dtype = WEIGHT_DTYPES[weights_dtype]
    if dtype == torch.float32:
        return net
    out = copy.deepcopy(net)
    with torch.no_grad():
        for name, tensor in (*out.named_parameters(), *out.named_buffers()):
            if tensor.dtype == torch.float32:
                stored = tensor.to(dtype)
                if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(tensor).all()):
                    raise CnnmodError(f"{name} of {what} has values beyond {weights_dtype}'s range "
                                      f"(largest {float(tensor.abs().max()):.4g}); keep its weights as float32")
                tensor.copy_(stored.to(torch.float32))
    return out


@dataclass(frozen=True)
class SharedNet:
    """The shared engine of one parent's modules: `trunk` maps images to the union's features (B, F_union);
    `columns[i]` are the positions, among those features, that module i's head reads (its kept channels).
    With a module selection the trunk still computes the whole union (it is one network)."""

    trunk: fx.GraphModule
    union: dict[int, torch.Tensor]
    columns: tuple[torch.Tensor, ...]
    features: torch.Tensor
    """For each union feature, its position among the parent's features (what the heads are indexed by)."""

    def select(self, rows: Sequence[int]) -> SharedNet:
        return SharedNet(self.trunk, self.union, tuple(self.columns[r] for r in rows), self.features)


@dataclass(frozen=True)
class CompactNets:
    """Materialised compact modules of one parent, in the order of their ModuleSet.

    `nets[i]` is module i's standalone network (B, C, H, W) -> (B, 2); `keeps[i]` its kept channels per space of
    `plan`. The heads that run are the ModuleSet's `head_weight` / `head_bias` (over the parent's full features),
    so score calibration applies to compact modules as to any other.
    """

    plan: ChannelPlan
    keeps: tuple[dict[int, torch.Tensor], ...]
    nets: tuple[fx.GraphModule, ...]
    shared: SharedNet | None = None
    engine: str = "exact"
    input_shape: tuple[int, ...] = ()
    """One sample's input shape (the parent's); lets the exact engine find the prefix all modules share."""
    base: fx.GraphModule | None = None
    """The parent's graph (what `plan` describes): the stacked form of the exact engine is built from it."""
    batching: str = "auto"
    """How the exact engine runs the modules' own layers: `grouped` (one grouped convolution per layer),
    `folded` (the stacked network with the module axis folded into the batch: each module's layers on its own
    batch slice, cnnmod.engine.folding), `each` (one module after the other), or `auto` (on a CPU folded where a
    shared prefix leaves small tails, else each; grouped on a GPU; measured in docs/RESULTS.md)."""
    weights_dtype: str = "float32"
    """How a store keeps these networks' weights (WEIGHT_DTYPES); with float16 they hold float16 values."""
    _runners: RunnerCache = field(default_factory=RunnerCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise CnnmodError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.engine == "shared" and self.shared is None:
            raise CnnmodError("these modules have no shared network; use the exact engine")
        if self.batching not in BATCHINGS:
            raise CnnmodError(f"unknown batching {self.batching!r}; choose from {', '.join(BATCHINGS)}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise CnnmodError(f"unknown weights dtype {self.weights_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")

    def select(self, rows: Sequence[int]) -> CompactNets:
        return replace(self, keeps=tuple(self.keeps[r] for r in rows), nets=tuple(self.nets[r] for r in rows),
                       shared=self.shared.select(rows) if self.shared is not None else None)

    def with_engine(self, engine: str) -> CompactNets:
        return replace(self, engine=engine)

    def stored_as(self, weights_dtype: str) -> CompactNets:
        """These modules with weights rounded to what `weights_dtype` holds, and kept in it by a store."""
        if weights_dtype == self.weights_dtype:
            return self
        nets = tuple(rounded_weights(n, weights_dtype, f"module {i}") for i, n in enumerate(self.nets))
        shared = self.shared
        if shared is not None:
            shared = replace(shared, trunk=rounded_weights(shared.trunk, weights_dtype, "the shared network"))
        return replace(self, nets=nets, shared=shared, weights_dtype=weights_dtype)

    def head_columns(self, i: int) -> torch.Tensor:
        head = self.plan.head
        keep = _sorted_keep(self.keeps[i], self.plan)
        return _feature_index(keep[self.plan.head_space], head.repeat)

    def networks(self, head_weight: torch.Tensor, head_bias: torch.Tensor) -> list[fx.GraphModule]:
        """Each module's network with the given heads (M, 2, F) and (M, 2) over the parent's features."""
        out = []
        for i, net in enumerate(self.nets):
            lin_weight, lin_bias = head_parameters(net, self.plan)
            weight = head_weight[i][:, self.head_columns(i)]
            if torch.equal(weight, lin_weight.detach()) and torch.equal(head_bias[i], lin_bias.detach()):
                out.append(net)
                continue
            net = copy.deepcopy(net)
            lin_weight, lin_bias = head_parameters(net, self.plan)
            with torch.no_grad():
                lin_weight.copy_(weight)
                lin_bias.copy_(head_bias[i])
            out.append(net)
        return out

    def runner(self, head_weight: torch.Tensor, head_bias: torch.Tensor, device: torch.device,
               engine: str | None = None) -> nn.Module:
        """A module (B, C, H, W) -> (B, M, 2) that runs these modules with the chosen engine. It is built once
        and kept while the heads, the weights and the device are the same (building the stacked network takes
        longer than running a pair's modules over a thousand images)."""
        engine = engine or self.engine
        sources: list[nn.Module] = [*self.nets, *([self.base] if self.base is not None else []),
                                    *([self.shared.trunk] if engine == "shared" and self.shared else [])]
        return self._runners.get((engine, str(device)), sources, (head_weight, head_bias),
                                 lambda: self._build_runner(head_weight, head_bias, device, engine))

    def _build_runner(self, head_weight: torch.Tensor, head_bias: torch.Tensor, device: torch.device,
                      engine: str) -> nn.Module:
        if engine == "shared":
            if self.shared is None:
                raise CnnmodError("these modules have no shared network; use the exact engine")
            return _SharedRunner(self.shared, head_weight, head_bias).to(device).eval()
        if engine != "exact":
            raise CnnmodError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        nets = self.networks(head_weight, head_bias)
        cut = common_prefix(nets, self.input_shape) if self.input_shape else None
        batching = self.batching
        if batching == "auto":
            batching = "grouped" if device.type != "cpu" else "folded" if cut is not None else "each"
        if batching in ("grouped", "folded") and self.base is not None and len(nets) > 1:
            stacked = relus_in_place(stack(self.base, self.plan, self.keeps, nets, cut=cut,
                                           input_shape=self.input_shape or None, align=CHANNEL_ALIGN))
            if batching == "folded":
                stacked = _folded_or_stacked(stacked, len(nets), self.input_shape)
            if device.type == "cpu":  # oneDNN's convolutions are 1.5-2x faster channels-last here (RESULTS.md)
                stacked = stacked.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            return stacked.to(device).eval()
        if cut is not None:  # the layers every module holds identically run once (bit-identical outputs)
            trunk = split_at(nets[0], cut)[0]
            return _Each([split_at(net, cut)[1] for net in nets], trunk).to(device).eval()
        return _Each(nets).to(device).eval()

    def parameters_per_module(self, input_shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """(parameters, multiply-accumulates per image) of every module's network."""
        return [network_cost(net, input_shape) for net in self.nets]


def _folded_or_stacked(stacked: fx.GraphModule, m: int, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """The folded form of a stacked network (cnnmod.engine.folding) where it gives the stacked network's outputs
    on a probe batch, else the stacked network itself: a graph that reads the batch size of a shared value
    (say) cannot be folded."""
    from .folding import fold

    probe = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0)) if input_shape else None
    try:
        folded = fold(copy.deepcopy(stacked), m)
        if probe is not None:
            with torch.no_grad():
                want, got = stacked(probe), folded(probe)
            scale = float(want.abs().max()) + 1
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
                return stacked
    except (CnnmodError, RuntimeError):
        return stacked
    return folded


class _Each(nn.Module):
    """Modules of one parent run in turn on the same batch (after the prefix they share, run once):
    (B, ...) -> (B, M, 2)."""

    def __init__(self, nets: Sequence[nn.Module], prefix: nn.Module | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.prefix = prefix if prefix is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prefix(x)
        return torch.stack([net(h) for net in self.nets], 1)


def _same_node(a: fx.Node, b: fx.Node) -> bool:
    return a.op == b.op and a.target == b.target and a.name == b.name and repr(a.args) == repr(b.args) \
        and repr(a.kwargs) == repr(b.kwargs)


def common_prefix(nets: Sequence[fx.GraphModule], input_shape: tuple[int, ...]) -> str | None:
    """The last cut point up to which every module's network is the same (same graph, bit-identical weights),
    or None. Everything before it can run once for all modules with bit-identical results."""
    if len(nets) < 2:
        return None
    first = nets[0]
    graphs = [list(net.graph.nodes) for net in nets]
    if len({len(g) for g in graphs}) != 1:
        return None
    cuts = dict(cut_points(first, input_shape))
    best = None
    for i, node in enumerate(graphs[0]):
        others = [g[i] for g in graphs[1:]]
        if not all(_same_node(node, o) for o in others):
            break
        if node.op == "call_module":
            mine = first.get_submodule(str(node.target)).state_dict()
            if not all(_equal_state(mine, net.get_submodule(str(node.target)).state_dict()) for net in nets[1:]):
                break
        if node.name in cuts and node.op != "output":
            best = node.name
    return best


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class _SharedRunner(nn.Module):
    """The union trunk once, then every module's head over the union features it keeps: (B, ...) -> (B, M, 2)."""

    def __init__(self, shared: SharedNet, head_weight: torch.Tensor, head_bias: torch.Tensor) -> None:
        super().__init__()
        self.trunk = shared.trunk
        weight = head_weight[:, :, shared.features]  # (M, 2, F_union): parent feature of each union feature
        reads = torch.zeros(len(shared.columns), 1, len(shared.features))
        for i, cols in enumerate(shared.columns):
            reads[i, 0, cols] = 1.0
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("weight", (weight * reads).contiguous())
        self.register_buffer("bias", head_bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bf,mof->bmo", self.trunk(x), self.weight) + self.bias


def run_engine(nets: CompactNets, spec: InputSpec, head_weight: torch.Tensor, head_bias: torch.Tensor,
               images: np.ndarray, batch_size: int, device: torch.device, progress: bool,
               engine: str | None = None) -> torch.Tensor:
    """(N, M, 2) outputs of compact modules on raw images."""
    from .modules import _batched  # the one batching helper of modules and parents

    runner = runner_for(nets, head_weight, head_bias, device, engine)
    return _batched(lambda x: runner(spec.prepare(x, device)), images, batch_size, progress, engine or nets.engine)


def runner_for(nets: CompactNets, head_weight: torch.Tensor, head_bias: torch.Tensor, device: torch.device,
               engine: str | None = None) -> nn.Module:
    return nets.runner(head_weight.to(torch.float32), head_bias.to(torch.float32), device, engine)


def union_keeps(plan: ChannelPlan, keeps: Sequence[Mapping[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per space, the channels that any module keeps."""
    out = {}
    for s in plan.spaces:
        parts = [_sorted_keep(k, plan)[s.index] for k in keeps]
        out[s.index] = torch.cat(parts).unique(sorted=True)
    return out


WITHIN = 0.001
"""The shared engine is the default only when its composed top-1 is within 0.1 point of exact (either way)."""


@dataclass(frozen=True)
class EngineResult:
    top1: float
    top5: float
    seconds: float


def choose_engine(results: Mapping[str, EngineResult]) -> str:
    """The faster engine whose composed top-1 is within 0.1 point of `exact` (exact itself always qualifies)."""
    exact = results["exact"].top1
    fits = [name for name, r in results.items() if abs(r.top1 - exact) <= WITHIN + 1e-9]
    return min(fits, key=lambda name: (results[name].seconds, name != "exact"))


def compact_parameters(modules: object) -> tuple[list[int], int]:
    """(each compact module's parameters, the parent's conv and linear parameters)."""
    from .channels import parent_cost

    compact: CompactNets = modules.compact  # type: ignore[attr-defined]
    parent = modules.parent  # type: ignore[attr-defined]
    shape = tuple(parent.model.input_shape)
    return [p for p, _ in compact.parameters_per_module(shape)], parent_cost(parent.model)[0]
