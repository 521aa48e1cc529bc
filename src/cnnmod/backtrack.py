"""Backtracking (MC-BLN, MC-BI): which nodes can still influence the kept head outputs, for all classes at once.

Each graph operation is run on all-ones inputs with unit weights, and its vector-Jacobian product with the
0/1 "needed" mask of its output tells which input nodes feed a needed output: for the structural operations
handled here (convolution, pooling windows, dense layers, Add, concatenation, slicing, padding, reshapes)
that is exactly the receptive-field rule, computed with tensor operations. Operations not known here are
treated conservatively: if any output node is needed, every input node is.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .trace import CONV_FUNCTIONS, CONV_MODULES, RELU_FUNCTIONS, RELU_METHODS, TracedModel

_IDENTITY_MODULES = (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
                     nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AS_IS_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten)
_AS_IS_FUNCTIONS = (
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
    operator.getitem, torch.add, torch.mul, torch.cat, torch.flatten, torch.mean, torch.sum, torch.reshape,
    torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, F.pad, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
)
_IDENTITY_FUNCTIONS = (*RELU_FUNCTIONS, F.dropout, F.dropout2d)
_AS_IS_METHODS = (
    "view", "reshape", "flatten", "mean", "sum", "add", "add_", "mul", "mul_", "sub", "div", "permute",
    "transpose", "contiguous", "squeeze", "unsqueeze", "expand", "clone", *RELU_METHODS,
)


class _Conservative(Exception):
    pass


def _max_pool_as_windows(input: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                         dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:
    if dilation not in (1, (1, 1)) or return_indices:
        raise _Conservative
    return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode)


def _adaptive_max_as_windows(input: torch.Tensor, output_size: Any, return_indices: bool = False) -> torch.Tensor:
    if return_indices:
        raise _Conservative
    return F.adaptive_avg_pool2d(input, output_size)


def _structural_call(gm: fx.GraphModule, node: fx.Node, through_conv: bool) -> Callable[..., Any]:
    """A function with the node's call signature whose Jacobian has the node's dependency pattern."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, _IDENTITY_MODULES):
            return lambda x: x
        if isinstance(mod, _AS_IS_MODULES):
            return mod
        if isinstance(mod, CONV_MODULES):
            if not through_conv or mod.padding_mode != "zeros":
                raise _Conservative
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[mod.weight.dim() - 2]
            ones = torch.ones_like(mod.weight, device="cpu")
            return lambda x: conv(x, ones, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        if isinstance(mod, nn.Linear):
            ones = torch.ones_like(mod.weight, device="cpu")
            return lambda x: F.linear(x, ones)
        if isinstance(mod, nn.MaxPool2d):
            return lambda x: _max_pool_as_windows(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                                  mod.ceil_mode)
        if isinstance(mod, nn.AdaptiveMaxPool2d):
            return lambda x: F.adaptive_avg_pool2d(x, mod.output_size)
        raise _Conservative
    if node.op == "call_function":
        if node.target in _IDENTITY_FUNCTIONS:
            return lambda x, *a, **k: x
        if node.target in CONV_FUNCTIONS:
            if not through_conv:
                raise _Conservative
            return node.target  # weights arrive as ones
        if node.target is F.linear or node.target in _AS_IS_FUNCTIONS:
            return node.target  # type: ignore[return-value]
        if node.target is F.max_pool2d:
            return _max_pool_as_windows
        if node.target is F.adaptive_max_pool2d:
            return _adaptive_max_as_windows
        raise _Conservative
    if node.op == "call_method" and node.target in _AS_IS_METHODS:
        name = str(node.target)
        if name in RELU_METHODS:
            return lambda x, *a, **k: x
        return lambda x, *a, **k: getattr(x, name)(*a, **k)
    raise _Conservative


def _meta_values(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int) -> dict[str, Any]:
    """Every node's value when the graph runs on a batch of `batch` on the meta device (shapes only)."""
    values: dict[str, Any] = {}
    meta = copy.deepcopy(gm).to("meta")

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    Recorder(meta).run(torch.empty(batch, *input_shape, device="meta"))
    return values


def backtrack(
    model: TracedModel,
    site_masks: dict[str, torch.Tensor],
    head_need: torch.Tensor,
    through_conv: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Remove from each site mask the nodes that no needed head input depends on.

    `site_masks[s]` is (Kc, *shape) bool (one row per class), `head_need` is (Kc, F) bool.
    Returns the reduced site masks and the needed-mask of every tensor node (for parameter counting).
    """
    gm = model.graph
    batch = int(head_need.shape[0])
    values = _meta_values(gm, model.input_shape, batch)

    def tracked(n: object) -> bool:
        v = values.get(n.name) if isinstance(n, fx.Node) else None
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch

    need: dict[str, torch.Tensor] = {model.head.feature: head_need.clone()}
    untracked_used: set[str] = set()
    result: dict[str, torch.Tensor] = {}

    def add_need(n: fx.Node, mask: torch.Tensor) -> None:
        if n.name in need:
            need[n.name] |= mask
        else:
            need[n.name] = mask

    for node in reversed(list(gm.graph.nodes)):
        if node.op == "placeholder" and node.name in need:
            result[node.name] = need[node.name]
        if node.op in ("output", "placeholder", "get_attr") or node.name == model.head.node:
            continue
        inputs = [a for a in node.all_input_nodes if tracked(a)]
        if not tracked(node):
            if node.name in untracked_used:
                for a in inputs:
                    add_need(a, torch.ones(values[a.name].shape, dtype=torch.bool))
            continue
        cur = need.get(node.name)
        if cur is None:
            cur = torch.zeros(values[node.name].shape, dtype=torch.bool)
        if node.name in site_masks:
            cur = cur & site_masks[node.name]
        need[node.name] = cur
        result[node.name] = cur
        if node.target is operator.getitem and not tracked(node.args[0]) and isinstance(node.args[0], fx.Node):
            if cur.any():
                untracked_used.add(node.args[0].name)
            continue
        if not inputs or not cur.any():
            continue
        for a, contribution in _contributions(gm, node, cur, inputs, values, through_conv).items():
            add_need(a, contribution)
    masks = {name: result.get(name, torch.zeros_like(m)) for name, m in site_masks.items()}
    return masks, result


def _contributions(
    gm: fx.GraphModule,
    node: fx.Node,
    cur: torch.Tensor,
    inputs: list[fx.Node],
    values: dict[str, Any],
    through_conv: bool,
) -> dict[fx.Node, torch.Tensor]:
    leaves = {a.name: torch.ones(values[a.name].shape, requires_grad=True) for a in inputs}

    def substitute(a: fx.Node) -> Any:
        if a.name in leaves:
            return leaves[a.name].clone()
        v = values[a.name]
        return torch.ones(v.shape) if isinstance(v, torch.Tensor) else v

    try:
        fn = _structural_call(gm, node, through_conv)
        args = fx.node.map_arg(node.args, substitute)
        kwargs = fx.node.map_arg(node.kwargs, substitute)
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape != cur.shape:
                raise _Conservative
            grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=cur.float(), allow_unused=True)
    except Exception:  # anything unknown or failing is treated conservatively: the node needs all its inputs
        alive = cur.flatten(1).any(1)
        return {a: alive.view(-1, *([1] * (len(values[a.name].shape) - 1))).expand(values[a.name].shape).clone()
                for a in inputs}
    return {a: (g != 0) if g is not None else torch.zeros(values[a.name].shape, dtype=torch.bool)
            for a, g in zip(inputs, grads, strict=True)}
