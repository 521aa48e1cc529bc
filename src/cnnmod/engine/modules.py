"""Parents and modules: a module is the parent with a keep-mask per site and a 2-output head."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CnnmodError
from ..progress import show_progress
from . import ops
from .inputs import InputSpec, batch_slices
from .trace import Site, TracedModel, trace_model

MASKED_ENGINES = ("exact", "shared")


class RunnerCache:
    """Networks built for inference, each kept under a key until the weights they were built from change: a
    weight tensor replaced or changed in place (its version counter) or different extra tensors (heads) rebuild
    it. One entry per key, so the cache holds what the last calls used."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[tuple, tuple[torch.Tensor, ...], nn.Module]] = {}

    def get(self, key: Any, sources: Sequence[nn.Module], tensors: Sequence[torch.Tensor],
            build: Callable[[], nn.Module]) -> nn.Module:
        state = tuple((t.data_ptr(), t._version, tuple(t.shape)) for m in sources
                      for t in (*m.parameters(), *m.buffers()))
        hit = self._entries.get(key)
        if hit is not None and hit[0] == state and len(hit[1]) == len(tensors) and all(
                a.shape == b.shape and torch.equal(a, b.to(a.device)) for a, b in zip(hit[1], tensors, strict=True)):
            return hit[2]
        net = build()
        self._entries[key] = (state, tuple(t.detach().clone() for t in tensors), net)
        return net

    def __reduce__(self) -> tuple[type, tuple]:
        return RunnerCache, ()  # copies and pickles start empty: a copy's weights are other tensors


@dataclass(frozen=True)
class Parent:
    """A trained classifier, traced and BatchNorm-folded, with its class names and input spec."""

    model: TracedModel
    classes: tuple[str, ...]
    input_spec: InputSpec
    arch: str = "custom"
    _inference: RunnerCache = field(default_factory=RunnerCache, init=False, repr=False, compare=False)

    @classmethod
    def from_model(cls, model: nn.Module, input_spec: InputSpec, classes: Sequence[str],
                   arch: str = "custom") -> Parent:
        if len(set(classes)) != len(classes):
            raise CnnmodError("class names must be unique")
        traced = trace_model(model, (input_spec.channels, *input_spec.size))
        if traced.head.num_classes != len(classes):
            raise CnnmodError(
                f"the model has {traced.head.num_classes} outputs but {len(classes)} class names were given"
            )
        return cls(traced, tuple(classes), input_spec, arch)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            shown = ", ".join(self.classes[:8]) + (", ..." if len(self.classes) > 8 else "")
            raise CnnmodError(f"unknown class {name!r}; this parent knows: {shown}") from None

    def fingerprint(self) -> str:
        """sha256 over the folded weights: identifies the parent a module belongs to."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.graph.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def logits(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
               progress: bool = False) -> torch.Tensor:
        device = resolve_device(device)
        net = self._inference.get(str(device), [self.model.graph], [],
                                  lambda: inference_network(self.model).to(device).eval())
        return _batched(lambda x: net(self.input_spec.prepare(x, device)), images, batch_size, progress, "parent")


def resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _batched(fn: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, batch_size: int, progress: bool,
             desc: str) -> torch.Tensor:
    """`fn` over `images` in batches, without autograd; outputs concatenated on the CPU. No batch holds one
    image (a single image runs twice), so a model with `x.squeeze()` before its head keeps its batch."""
    outs = []
    with torch.inference_mode():
        parts = batch_slices(len(images), batch_size)
        for part in tqdm(parts, desc=desc, disable=not show_progress(progress), leave=False):
            batch = images[part]
            out = fn(batch) if len(batch) != 1 else fn(batch[np.zeros(2, dtype=np.int64)])[:1]
            outs.append(out.float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


class _Repeat(nn.Module):
    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.times, *([1] * (x.dim() - 1)))


class _MaskTap(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask: torch.Tensor
        self.register_buffer("mask", mask.unsqueeze(1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.unflatten(0, (self.mask.shape[0], -1)).mul_(self.mask)
        return x


class _MaskedReLU(nn.Module):
    """A ReLU applied in place (its input is a new tensor nothing else reads), then its masks (None: all kept)."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.mask: torch.Tensor | None
        self.register_buffer("mask", None if mask is None else mask.unsqueeze(1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(x)
        if self.mask is not None:
            y.unflatten(0, (self.mask.shape[0], -1)).mul_(self.mask)
        return y


def inference_network(traced: TracedModel) -> fx.GraphModule:
    """A copy of the parent's graph for inference without autograd, its ReLUs in place where that is safe
    (`relus_in_place`: the same values, one batch-sized tensor fewer to allocate per site; about 10% faster on the
    CIFAR ResNets on a CPU, `benchmarks/decompose_cost.py`)."""
    gm = traced.graph
    return relus_in_place(fx.GraphModule(copy.deepcopy(gm), copy.deepcopy(gm.graph)))


_FRESH_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_RELUS = (torch.relu, torch.nn.functional.relu)


def relus_in_place(net: fx.GraphModule) -> fx.GraphModule:
    """`net` (changed in place and returned) with each ReLU whose input is a fresh tensor read by nothing else (the
    output of a convolution, linear layer or BatchNorm, or a sum, difference or product of two tensors) run in
    place: the same values, for inference."""
    changed = False
    for node in list(net.graph.nodes):
        is_relu = (node.op == "call_function" and node.target in _RELUS) or \
            (node.op == "call_module" and isinstance(net.get_submodule(str(node.target)), nn.ReLU))
        source = node.args[0] if node.args else None
        if not is_relu or len(node.args) != 1 or any(k != "inplace" for k in node.kwargs) \
                or not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        fresh = (source.op == "call_module" and isinstance(net.get_submodule(str(source.target)), _FRESH_LAYERS)) \
            or (source.op == "call_function" and source.target in ops.FRESH_FUNCTIONS
                and len(source.args) == 2 and not source.kwargs
                and all(isinstance(a, fx.Node) for a in source.args))
        if not fresh:
            continue
        node.op, node.target, node.args, node.kwargs = "call_function", torch.relu_, (source,), {}
        changed = True
    if changed:
        net.graph.lint()
        net.recompile()
    return net


def masked_network(traced: TracedModel, sites: Sequence[Site], masks: dict[str, torch.Tensor],
                   copies: int) -> fx.GraphModule:
    """The parent's graph running `copies` masked copies of each batch (stacked along the batch), the mask of copy
    i being `masks[site][i]`.

    Exact shortcuts: the graph runs once on the batch up to the first site whose masks do not keep everything in
    every copy, and only the values alive there are repeated (unless one of them is not a batched tensor, a size
    say: then the input is repeated); a mask that keeps everything is not applied; a ReLU whose input nothing else
    reads runs in place and applies its masks itself."""
    from .activity import relu_in_place

    gm = traced.graph
    net = fx.GraphModule(copy.deepcopy(gm), copy.deepcopy(gm.graph))
    nodes = list(net.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    trivial = {s.name: bool(masks[s.name].all()) for s in sites}
    first = next((s.name for s in sites if not trivial[s.name]), traced.head.node)
    cut = position[first] - 1  # nodes[:cut + 1] run once

    def crossing(at: int) -> list[fx.Node]:
        return [n for n in nodes[:at + 1] if any(position[u.name] > at for u in n.users)]

    alive = crossing(cut)
    if any(n.op != "get_attr" and n.name not in traced.batched for n in alive):
        cut = max(i for i, n in enumerate(nodes) if n.op == "placeholder")
        alive = crossing(cut)
    for i, n in enumerate(alive):
        if n.op == "get_attr":
            continue  # parameters and constants are shared by every copy
        target = f"cnnmod_repeat_{i}"
        net.add_submodule(target, _Repeat(copies))
        later = [u for u in n.users if position[u.name] > cut]
        with net.graph.inserting_after(nodes[cut] if n.op == "placeholder" else n):
            repeated = net.graph.call_module(target, (n,))
        for u in later:
            u.replace_input_with(n, repeated)
    for i, site in enumerate(sites):
        if position[site.name] <= cut:
            continue  # before the copies are made: every copy keeps all of it
        node = next(n for n in net.graph.nodes if n.name == site.name)
        mask = None if trivial[site.name] else masks[site.name]
        target = f"cnnmod_mask_{i}"
        if site.kind == "relu" and relu_in_place(net, node, traced.batched):
            net.add_submodule(target, _MaskedReLU(mask))
            node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
        elif mask is not None:
            net.add_submodule(target, _MaskTap(mask))
            later = list(node.users)
            with net.graph.inserting_after(node):
                tapped = net.graph.call_module(target, (node,))
            for u in later:
                u.replace_input_with(node, tapped)
    net.graph.lint()
    net.delete_all_unused_submodules()
    net.recompile()
    return net


class _MultiHead(nn.Module):
    """M two-output heads applied to the M stacked copies of the batch; output (B, M, 2)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = self.weight.shape[0]
        f = features.flatten(1).unflatten(0, (m, -1))
        return torch.baddbmm(self.bias.unsqueeze(1), f, self.weight.transpose(1, 2)).transpose(0, 1)


class _SharedHeads(_MultiHead):
    """M two-output heads all reading the same features (the shared engine); output (B, M, 2)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bf,mkf->bmk", features.flatten(1), self.weight) + self.bias


class _Features(nn.Module):
    def __init__(self, modules: int) -> None:
        super().__init__()
        self.modules_count = modules

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1).unflatten(0, (self.modules_count, -1)).transpose(0, 1)


@dataclass(frozen=True)
class ModuleSet:
    """Modules of one parent: masks (M, *site.shape) per site and heads (M, 2, F), (M, 2).

    `class_indices[i]` is the parent class that module i recognises.
    """

    parent: Parent
    class_indices: tuple[int, ...]
    sites: tuple[Site, ...]
    masks: dict[str, torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    config: dict = field(default_factory=dict)
    compact: Any = None
    """cnnmod.engine.engines.CompactNets for compact modules (each its own small network, `--method compact`): then
    `logits` runs those networks (with these heads) instead of masking the parent."""
    engine: str = "exact"
    """How `logits` runs modules that mask their parent: `exact`, each module's own masked network (M passes of
    the parent), or `shared`, one pass of the parent masked by the union of the modules' masks, every head reading
    those features (cnnmod.engine.engines). Compact modules carry their engine in `compact`."""

    def __post_init__(self) -> None:
        if self.engine not in MASKED_ENGINES:
            raise CnnmodError(f"unknown engine {self.engine!r}; choose from {', '.join(MASKED_ENGINES)}")

    def with_engine(self, engine: str) -> ModuleSet:
        """The same modules run by another engine."""
        if self.compact is not None:
            return replace(self, compact=self.compact.with_engine(engine))
        return replace(self, engine=engine)

    def __len__(self) -> int:
        return len(self.class_indices)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.parent.classes[i] for i in self.class_indices)

    def select(self, classes: Sequence[str]) -> ModuleSet:
        """The modules for these class names, in this order."""
        names = self.class_names
        rows = []
        twice = sorted({c for c in classes if list(classes).count(c) > 1})
        if twice:
            raise CnnmodError(f"class {twice[0]!r} is asked for twice")
        for c in classes:
            if c not in names:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise CnnmodError(f"no module for class {c!r}; modules exist for: {shown}")
            rows.append(names.index(c))
        idx = torch.tensor(rows, dtype=torch.long)
        return ModuleSet(
            self.parent, tuple(self.class_indices[r] for r in rows), self.sites,
            {k: v[idx] for k, v in self.masks.items()}, self.head_weight[idx], self.head_bias[idx], self.config,
            self.compact.select(rows) if self.compact is not None else None, self.engine,
        )

    def require_masked(self, what: str) -> None:
        """Refuse an operation that works on masks of the parent for compact modules (their own networks)."""
        if self.compact is not None:
            raise CnnmodError(f"{what} works on modules that mask their parent; these are compact modules "
                              "(decomposed with --method compact), each its own network")

    def network(self, device: torch.device | str | None = None, features: bool = False) -> nn.Module:
        """All modules as one network: input (B, C, H, W) -> (B, M, 2), masks stacked, one forward pass.
        With `features`, the output is what each module's head reads, (B, M, F)."""
        self.require_masked("one masked network of all modules")
        traced = self.parent.model
        net = masked_network(traced, self.sites, self.masks, len(self))
        head = _Features(len(self)) if features else _MultiHead(self.head_weight, self.head_bias)
        _replace_head(net, traced.head.node, head)
        return net.to(resolve_device(device)).eval()

    def shared_network(self, device: torch.device | str | None = None) -> nn.Module:
        """The shared engine: the parent masked by the union of the modules' masks (a node is kept when any module
        keeps it), one forward pass, every module's head reading those features: (B, C, H, W) -> (B, M, 2)."""
        self.require_masked("the shared engine of masked modules")
        traced = self.parent.model
        union = {s.name: self.masks[s.name].any(0, keepdim=True) for s in self.sites}
        net = masked_network(traced, self.sites, union, 1)
        _replace_head(net, traced.head.node, _SharedHeads(self.head_weight, self.head_bias))
        return net.to(resolve_device(device)).eval()

    def logits(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
               progress: bool = False, chunk: int = 16) -> torch.Tensor:
        """Raw (z_c, z_uc) of every module for every image, (N, M, 2), by this set's engine; the exact engine runs
        modules `chunk` at a time."""
        device = resolve_device(device)
        if self.compact is not None:
            from .engines import run_engine

            return run_engine(self.compact, self.parent.input_spec, self.head_weight, self.head_bias, images,
                              batch_size, device, progress)
        if self.engine == "shared":
            return self._run(self.shared_network(device), images, batch_size, device, progress, "modules")
        parts = []
        for start in range(0, len(self), chunk):
            names = self.class_names[start:start + chunk]
            net = self.select(names).network(device)
            parts.append(self._run(net, images, max(1, batch_size // len(names)), device, progress, "modules"))
        return torch.cat(parts, dim=1)

    def logits_of(self, batch_size: int = 256, device: torch.device | str | None = None,
                  progress: bool = False) -> Callable[[np.ndarray], torch.Tensor]:
        """`logits` as a function of the images alone."""
        return lambda images: self.logits(images, batch_size, device, progress)

    def features(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
                 progress: bool = False) -> torch.Tensor:
        """What each module's head reads, with the module's masks applied: (N, M, F)."""
        self.require_masked("reading masked features")
        device = resolve_device(device)
        net = self.network(device, features=True)
        return self._run(net, images, max(1, batch_size // len(self)), device, progress, "features")

    def _run(self, net: nn.Module, images: np.ndarray, batch_size: int, device: torch.device, progress: bool,
             desc: str) -> torch.Tensor:
        return _batched(lambda x: net(self.parent.input_spec.prepare(x, device)), images, batch_size, progress, desc)

    def scores(self, images: np.ndarray, scoring: str = "softmax", batch_size: int = 256,
               device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
        """Each module's score for each image, (N, M): softmax(z_c, z_uc)[0], or z_c for `logit` scoring."""
        if scoring not in ("softmax", "logit"):
            raise CnnmodError(f"unknown scoring {scoring!r}; choose softmax or logit")
        return score_from_logits(self.logits(images, batch_size, device, progress), scoring)

    def jaccard(self) -> torch.Tensor:
        """Kept nodes over all nodes, over all sites, per module (counted a few modules at a time: a sum over a
        bool tensor converts all of it to int64 first)."""
        kept = torch.zeros(len(self), dtype=torch.float64)
        for s in self.sites:
            flat = self.masks[s.name].flatten(1)
            step = max(1, (1 << 22) // max(1, flat.shape[1]))
            for start in range(0, len(self), step):
                kept[start:start + step] += flat[start:start + step].sum(1).double()
        total = sum(s.numel for s in self.sites)
        return (kept / total).float()


def score_from_logits(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """(N, M, 2) module outputs -> (N, M) scores."""
    return logits.softmax(-1)[..., 0] if scoring == "softmax" else logits[..., 0]


def _replace_head(gm: fx.GraphModule, head_node: str, new_head: nn.Module) -> None:
    node = next(n for n in gm.graph.nodes if n.name == head_node)
    gm.add_submodule("cnnmod_head", new_head)
    with gm.graph.inserting_after(node):
        replacement = gm.graph.call_module("cnnmod_head", (node.args[0],))
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
