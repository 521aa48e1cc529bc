"""Trace a classifier with torch.fx, fold BatchNorm, and find the sites cnnmod observes and masks."""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import TraceError

SiteKind = Literal["relu", "conv"]
SITE_KINDS: tuple[str, ...] = ("relu", "conv")

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
RELU_METHODS = ("relu", "relu_")
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
OTHER_ACTIVATION_MODULES = (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.ReLU6, nn.PReLU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.SELU, nn.CELU, nn.Hardsigmoid, nn.GLU, nn.Softmax, nn.LogSoftmax,
)
OTHER_ACTIVATION_FUNCTIONS = (
    torch.sigmoid, torch.tanh, F.gelu, F.elu, F.leaky_relu, F.silu, F.hardswish, F.relu6, F.prelu,
    F.softplus, F.mish, F.hardtanh, F.selu, F.celu, F.hardsigmoid, F.glu, F.softmax, F.log_softmax,
    torch.softmax, F.sigmoid, F.tanh,
)
OTHER_ACTIVATION_METHODS = ("sigmoid", "tanh", "softmax", "log_softmax")


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
    return f"{node.name} ({node.target})"


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> TracedModel:
    """Trace `model` (a copy; the original is untouched), fold BatchNorm, and locate head and sites.

    `input_shape` is one sample's shape, e.g. (3, 32, 32).
    """
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        try:
            gm = fx.symbolic_trace(copy.deepcopy(model))
        except Exception as e:  # fx raises many types; all mean the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {first}; make its control flow independent "
                "of input values or wrap the offending submodule as a leaf"
            ) from None
    gm.eval()
    _make_relus_out_of_place(gm)
    fold_batchnorm(gm)
    _check_activations(gm)
    gm.recompile()
    example = torch.zeros(2, *input_shape)
    shapes = _propagate_shapes(gm, example)
    head = _find_head(gm)
    sites = {
        "relu": tuple(_sites(gm, shapes, "relu", head)),
        "conv": tuple(_sites(gm, shapes, "conv", head)),
    }
    return TracedModel(gm, tuple(input_shape), head, sites)


def _make_relus_out_of_place(gm: fx.GraphModule) -> None:
    """Rewrite in-place ReLUs out of place; later readers of the mutated tensor read the ReLU's output."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        inplace = False
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.ReLU):
                inplace, mod.inplace = mod.inplace, False
        elif node.op == "call_function" and node.target in (torch.relu_, F.relu_):
            inplace, node.target = True, torch.relu
        elif node.op == "call_function" and node.target is F.relu:
            inplace = bool(node.kwargs.get("inplace", False)) or (len(node.args) > 1 and bool(node.args[1]))
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            node.args = node.args[:1]
        elif node.op == "call_method" and node.target == "relu_":
            inplace, node.target = True, "relu"
        source = node.args[0] if node.args else None
        if inplace and isinstance(source, fx.Node):
            for user in list(source.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(source, node)


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
        if not isinstance(layer, (*CONV_MODULES, nn.Linear)) or bn.running_mean is None:
            continue
        _set_submodule(gm, str(prev.target), _folded(layer, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()


def _folded(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear,
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


def _check_activations(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        bad = (
            (node.op == "call_module"
             and isinstance(gm.get_submodule(str(node.target)), OTHER_ACTIVATION_MODULES))
            or (node.op == "call_function" and node.target in OTHER_ACTIVATION_FUNCTIONS)
            or (node.op == "call_method" and node.target in OTHER_ACTIVATION_METHODS)
        )
        if bad:
            raise TraceError(
                f"layer {node_label(gm, node)} is not a ReLU; cnnmod decomposes ReLU networks "
                "(remove output softmax from the model, or replace the activation)"
            )


def _propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every tensor-valued node."""
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == example.shape[0]:
                shapes[n.name] = tuple(out.shape[1:])
            return out

    try:
        with torch.no_grad():
            Recorder(gm).run(example)
    except Exception as e:
        raise TraceError(
            f"the traced model fails on input of shape {tuple(example.shape[1:])}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None
    return shapes


def _find_head(gm: fx.GraphModule) -> Head:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    last = output.args[0]
    if isinstance(last, fx.Node) and last.op == "call_module":
        mod = gm.get_submodule(str(last.target))
        if isinstance(mod, nn.Linear) and isinstance(last.args[0], fx.Node):
            bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)
            return Head(last.name, last.args[0].name, mod.weight.detach().clone(), bias.clone())
    if isinstance(last, fx.Node) and last.op == "call_function" and last.target is F.linear:
        w = _resolve_attr(gm, last.args[1] if len(last.args) > 1 else last.kwargs["weight"])
        b_node = last.args[2] if len(last.args) > 2 else last.kwargs.get("bias")
        b = _resolve_attr(gm, b_node) if b_node is not None else torch.zeros(w.shape[0])
        if isinstance(last.args[0], fx.Node):
            return Head(last.name, last.args[0].name, w.clone(), b.clone())
    found = node_label(gm, last) if isinstance(last, fx.Node) else repr(last)
    raise TraceError(f"the model's output must come from a Linear layer (logits), found {found}")


def _resolve_attr(gm: fx.GraphModule, node: object) -> torch.Tensor:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = operator.attrgetter(str(node.target))(gm)
        if isinstance(value, torch.Tensor):
            return value.detach()
    raise TraceError("the final F.linear must take its weight and bias from module attributes")


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (
        (node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.ReLU))
        or (node.op == "call_function" and node.target in RELU_FUNCTIONS)
        or (node.op == "call_method" and node.target in RELU_METHODS)
    )


def is_conv_or_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (*CONV_MODULES, nn.Linear))
    return node.op == "call_function" and node.target in (*CONV_FUNCTIONS, F.linear)


def _sites(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], kind: str, head: Head) -> list[Site]:
    test = is_relu if kind == "relu" else is_conv_or_linear
    found = []
    for node in gm.graph.nodes:
        if node.name != head.node and node.name in shapes and test(gm, node):
            found.append(Site(node.name, kind, shapes[node.name]))
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
