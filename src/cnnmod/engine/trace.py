"""Trace a classifier with torch.fx, fold BatchNorm, and find the sites cnnmod observes and masks.

Which operations a graph may hold, which of them are sites and how in-place forms are rewritten all come from
the op table (cnnmod.engine.ops); anything else is refused before any work, naming the layer.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import StoreError, TraceError
from . import ops

SiteKind = Literal["relu", "conv"]
SITE_KINDS: tuple[str, ...] = ("relu", "conv")


@dataclass(frozen=True)
class Site:
    """A node of the traced graph whose output is observed and masked; `shape` excludes the batch."""

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Head:
    """The final linear layer: `feature` is the graph node feeding it."""

    node: str
    feature: str
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class TracedModel:
    """A classifier as an inference-only fx graph (BatchNorm folded) with its head and sites."""

    graph: fx.GraphModule
    input_shape: tuple[int, ...]
    head: Head
    sites: dict[str, tuple[Site, ...]]
    batched: frozenset[str] = field(default_factory=frozenset)
    """Names of the nodes whose value carries the batch in its first dimension (the rest hold no node)."""

    def site_list(self, kind: str) -> tuple[Site, ...]:
        if kind not in self.sites:
            raise ValueError(f"unknown site kind {kind!r}; choose from {', '.join(SITE_KINDS)}")
        return self.sites[kind]


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a user recognises a graph node: its module path, or the function it calls."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return f"{node.name} ({node.target})"


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> TracedModel:
    """Trace `model` (an eval-mode copy; the original is untouched), fold BatchNorm, and locate head and sites.

    `input_shape` is one sample's shape, e.g. (3, 32, 32). Before anything runs, every operation is checked
    against the op table; then the traced graph is checked to equal the model on a seeded random batch, in the
    model's own device and dtype. The result lives on the CPU in float32 (cnnmod feeds float32 images and moves
    the parent to the device each command runs on); storing it needs no further check.
    """
    eager = copy.deepcopy(model).eval()
    if isinstance(eager, fx.GraphModule):
        gm = eager
    else:
        try:
            gm = fx.symbolic_trace(eager)
        except Exception as e:  # fx raises many types; all mean the same to the user
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {_first_line(e)}; make its control flow "
                "independent of input values or wrap the offending submodule as a leaf"
            ) from None
    gm.eval()
    check_supported(gm)
    layout = batch_layout(gm, tuple(input_shape))
    _check_batch(gm, layout)
    device, dtype = _device_and_dtype(gm)
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    reference = _run("the model", eager, example, input_shape)
    if make_out_of_place(gm, layout.values):
        gm.recompile()
    _check_equal(reference, _run("the traced model", gm, example, input_shape))
    gm.to(device="cpu", dtype=torch.float32)
    fold_batchnorm(gm)
    gm.recompile()
    _check_storable(gm)
    head = _find_head(gm)
    if head.feature not in layout.batched:
        raise TraceError(f"the input of the head {head.node} has no batch dimension first")
    sites = {kind: tuple(_sites(gm, layout, kind, head)) for kind in SITE_KINDS}
    return TracedModel(gm, tuple(input_shape), head, sites, layout.batched)


def check_supported(gm: fx.GraphModule) -> None:
    """Refuse, naming the first layer, a graph with an operation the op table does not support."""
    for node in gm.graph.nodes:
        reason = ops.refusal(gm, node)
        if reason is not None:
            raise TraceError(f"layer {node_label(gm, node)} {reason}")


@dataclass(frozen=True)
class BatchLayout:
    """Every node's value for a batch of 2 on the meta device, and which nodes carry that batch first."""

    values: dict[str, Any]
    batched: frozenset[str]
    tuples: frozenset[str]
    """Nodes whose value is a tuple of tensors that each carry the batch (`x.chunk(2, 1)`)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """One sample's shape at a batch-carrying node."""
        return tuple(self.values[name].shape[1:])


def meta_values(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int) -> dict[str, Any]:
    """Every node's value when `gm` runs on a batch of `batch` on the meta device (shapes only, no compute)."""
    return _meta_runs(gm, input_shape, (batch,))[0]


def _meta_runs(gm: fx.GraphModule, input_shape: tuple[int, ...],
               batches: Iterable[int]) -> list[dict[str, Any]]:
    meta = copy.deepcopy(gm).to("meta")
    dtype = _device_and_dtype(gm)[1]
    runs = []
    for batch in batches:
        recorder = _Recorder(meta)
        try:
            with torch.no_grad():
                recorder.run(torch.empty(batch, *input_shape, device="meta", dtype=dtype))
        except Exception as e:
            raise TraceError(f"the traced model fails on input of shape {tuple(input_shape)}: {_first_line(e)}"
                             ) from None
        runs.append(recorder.values)
    return runs


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def batch_layout(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> BatchLayout:
    """Which nodes carry the batch: their first dimension follows the batch size (2, then 3) and nothing else
    changes. Decided by running twice, never by a coincidence of sizes."""
    two, three = _meta_runs(gm, input_shape, (2, 3))

    def carries(a: Any, b: Any) -> bool:
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 and b.dim() >= 1
                and a.shape[0] == 2 and b.shape[0] == 3 and a.shape[1:] == b.shape[1:])

    batched = frozenset(n for n, v in two.items() if carries(v, three[n]))
    tuples = frozenset(
        n for n, v in two.items()
        if isinstance(v, (tuple, list)) and v and isinstance(three[n], (tuple, list)) and len(v) == len(three[n])
        and all(carries(a, b) for a, b in zip(v, three[n], strict=True))
    )
    return BatchLayout(two, batched, tuples)


def _check_batch(gm: fx.GraphModule, layout: BatchLayout) -> None:
    """Refuse an operation whose output mixes the samples of a batch or moves the batch dimension: a module's
    output for one image must depend on that image alone."""
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.name in layout.batched or node.name in layout.tuples:
            continue
        op = ops.lookup(gm, node)
        reads = [a for a in node.all_input_nodes if a.name in layout.batched or a.name in layout.tuples]
        if reads and op is not None and op.passes is not ops.Pass.SHAPE:
            raise TraceError(
                f"layer {node_label(gm, node)} mixes the samples of a batch or moves the batch dimension "
                "(its output does not have the batch first); cnnmod needs each image's output to depend on "
                "that image alone"
            )


def _device_and_dtype(gm: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's tensors live and its floating-point dtype (CPU float32 for a model without any)."""
    tensors = [*gm.parameters(), *gm.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, (floats[0] if floats else torch.float32)


def _run(what: str, net: nn.Module, example: torch.Tensor, input_shape: tuple[int, ...]) -> Any:
    try:
        with torch.no_grad():
            return net(example)
    except Exception as e:
        raise TraceError(
            f"{what} fails on input of shape {tuple(input_shape)} ({str(example.dtype).removeprefix('torch.')} "
            f"on {example.device}): {_first_line(e)}"
        ) from None


def _check_equal(reference: Any, traced: Any) -> None:
    """The traced graph, with in-place operations made out of place, must compute what the model computes."""
    if not (isinstance(reference, torch.Tensor) and isinstance(traced, torch.Tensor)):
        return  # not a classifier's logits: _find_head says so
    if reference.shape != traced.shape:
        raise TraceError(f"the traced model's output has shape {tuple(traced.shape)}, the model's "
                         f"{tuple(reference.shape)}")
    ref, out = reference.double(), traced.double()
    gap = float((ref - out).abs().max()) if ref.numel() else 0.0
    if not gap <= 1e-4 * (1.0 + float(ref.abs().max())):
        raise TraceError(
            f"the traced model differs from the model (max difference {gap:.3g}): an in-place operation writes "
            "into a tensor that is read elsewhere (a view?), or the model is random in eval mode (F.dropout "
            "without training=self.training?); make it out of place or deterministic"
        )


def _check_storable(gm: fx.GraphModule) -> None:
    from ..storage.graphio import check_storable  # graphio reads the op table too; imported here to keep trace light

    try:
        check_storable(gm)
    except StoreError as e:
        raise TraceError(f"the traced model cannot be stored: {e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def make_out_of_place(gm: fx.GraphModule, values: dict[str, Any]) -> bool:
    """Rewrite every in-place operation (by the op table) out of place; later readers of a tensor it mutated
    read its output instead. Whether a call is in place is decided for every node before anything changes,
    so a shared `nn.ReLU(inplace=True)` is in place at each of its call sites. Returns whether anything changed.
    """
    found = []
    for node in gm.graph.nodes:
        op = ops.lookup(gm, node)
        if op is not None and op.in_place is not None and _is_in_place(gm, node, op.in_place):
            found.append((node, op.in_place))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules: dict[str, str] = {}
    for node, how in found:
        if node.op == "call_module":
            assert how.flag is not None
            modules[str(node.target)] = how.flag
        else:
            if how.out_of_place is not None:
                node.target = how.out_of_place
            if how.flag is not None:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != how.flag}
                if how.position is not None and len(node.args) > how.position:
                    node.args = (*node.args[:how.position], False, *node.args[how.position + 1:])
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and isinstance(values.get(source.name), torch.Tensor):
            for user in list(source.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(source, node)
    for target, flag in modules.items():
        setattr(gm.get_submodule(target), flag, False)
    return bool(found)


def _is_in_place(gm: fx.GraphModule, node: fx.Node, how: ops.InPlace) -> bool:
    if how.always:
        return True
    if how.flag is None:
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), how.flag, False))
    if how.flag in node.kwargs:
        return bool(node.kwargs[how.flag])
    return how.position is not None and len(node.args) > how.position and bool(node.args[how.position])


def fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold every eval-mode BatchNorm that directly follows a conv or linear layer into that layer."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = gm.get_submodule(str(prev.target))
        op = ops.lookup(gm, prev)
        if op is None or op.kind != "module" or op.site != "conv" or bn.running_mean is None:
            continue  # only a conv or linear layer (by the op table) absorbs a BatchNorm
        assert isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear))
        _set_submodule(gm, str(prev.target), _folded(layer, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()


def _folded(layer: nn.modules.conv._ConvNd | nn.Linear,
            bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None
    scale = bn.weight.detach() if bn.affine else torch.ones_like(var)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(mean)
    factor = scale / torch.sqrt(var + bn.eps)
    new = copy.deepcopy(layer)
    weight = layer.weight.detach()
    new.weight = nn.Parameter(weight * factor.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(mean)
    new.bias = nn.Parameter((bias - mean) * factor + shift)
    return new


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _find_head(gm: fx.GraphModule) -> Head:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    last = output.args[0]
    if isinstance(last, fx.Node) and last.op == "call_module":
        mod = gm.get_submodule(str(last.target))
        if isinstance(mod, nn.Linear) and isinstance(last.args[0], fx.Node):
            bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)
            return Head(last.name, last.args[0].name, _cpu_float(mod.weight.detach()), _cpu_float(bias))
    if isinstance(last, fx.Node) and last.op == "call_function" and last.target is F.linear:
        w = _resolve_attr(gm, last.args[1] if len(last.args) > 1 else last.kwargs["weight"])
        b_node = last.args[2] if len(last.args) > 2 else last.kwargs.get("bias")
        b = _resolve_attr(gm, b_node) if b_node is not None else torch.zeros(w.shape[0])
        if isinstance(last.args[0], fx.Node):
            return Head(last.name, last.args[0].name, _cpu_float(w), _cpu_float(b))
    found = node_label(gm, last) if isinstance(last, fx.Node) else repr(last)
    raise TraceError(f"the model's output must come from a Linear layer (logits), found {found}")


def _cpu_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _resolve_attr(gm: fx.GraphModule, node: object) -> torch.Tensor:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = operator.attrgetter(str(node.target))(gm)
        if isinstance(value, torch.Tensor):
            return value.detach()
    raise TraceError("the final F.linear must take its weight and bias from module attributes")


def _sites(gm: fx.GraphModule, layout: BatchLayout, kind: str, head: Head) -> list[Site]:
    """Nodes whose op (by the table) is a site of `kind` and whose output carries the batch, except the head."""
    found = []
    for node in gm.graph.nodes:
        op = ops.lookup(gm, node)
        if op is not None and op.site == kind and node.name != head.node and node.name in layout.batched:
            found.append(Site(node.name, kind, layout.shape(node.name)))
    if not found:
        raise TraceError(f"the model has no {kind} sites to decompose (no {kind} layers before the head)")
    return found


def with_taps(gm: fx.GraphModule, taps: dict[str, nn.Module]) -> fx.GraphModule:
    """A copy of `gm` where each node named in `taps` feeds its module, whose output replaces it."""
    new = fx.GraphModule(copy.deepcopy(gm), copy.deepcopy(gm.graph))
    nodes = {n.name: n for n in new.graph.nodes}
    for i, (name, tap) in enumerate(taps.items()):
        target = f"cnnmod_tap_{i}"
        new.add_submodule(target, tap)
        node = nodes[name]
        with new.graph.inserting_after(node):
            tapped = new.graph.call_module(target, (node,))
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user, t=tapped: user is not t)
    new.graph.lint()
    new.recompile()
    return new
