"""Backtracking (MC-BLN, MC-BI): which nodes can still influence the kept head outputs, for all classes at once.

Classes are the batch: row c of every mask belongs to class c. Walking the graph backwards, each operation
passes the 0/1 "needed" mask of its output to its inputs the way the op table (cnnmod.engine.ops) says:

- elementwise operations pass it position by position (reduced over broadcast dimensions);
- exact operations run their stand-in (unit weights: a convolution with an all-ones kernel, a max-pool as an
  average over the same windows, a reshape as itself) on all-ones inputs, and the vector-Jacobian product with
  the needed mask marks the input nodes that feed a needed output: exactly the receptive-field rule;
- conservative operations need every input node of a class as soon as any output node of it is needed; the
  decomposition records which nodes these were (`conservative_nodes`).

MC-BLN stops at convolutions (every input of a needed convolution stays needed); MC-BI passes through them.
Which nodes carry the batch comes from the tracer, never from a coincidence of sizes, and the batch is never
run with one row, where `.squeeze()` would drop it. Any failure is an error naming the layer, never a silent
"keep everything".
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from ..errors import TraceError
from . import ops
from .trace import TracedModel, batch_layout, meta_values, node_label


@dataclass(frozen=True)
class _Step:
    """How the needed mask of one node reaches its inputs."""

    mode: Literal["elementwise", "jacobian", "all"]
    call: fx.Node
    """The node whose arguments are the inputs: the node itself, or for `parts[i]` the node making `parts`."""
    fn: Callable[..., Any] | None = None
    index: Any = None
    conservative: bool = False


def _batched(model: TracedModel) -> frozenset[str]:
    return model.batched or batch_layout(model.graph, model.input_shape).batched


def _step(gm: fx.GraphModule, node: fx.Node, batched: frozenset[str], through_conv: bool) -> _Step:
    call, index = node, None
    source = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(source, fx.Node) and source.name not in batched:
        call, index = source, node.args[1]  # one part of a tuple of batched tensors (chunk, split)
    op = ops.lookup(gm, call)
    if op is None:
        raise TraceError(f"cannot backtrack through layer {node_label(gm, call)}: it is not in the op table")
    if op.convolution and not through_conv:
        return _Step("all", call)  # MC-BLN backtracks through dense layers only
    if op.passes is ops.Pass.SHAPE:
        raise TraceError(f"layer {node_label(gm, call)} reads only shapes but its output carries the batch")
    if op.passes is ops.Pass.ELEMENTWISE and index is None:
        return _Step("elementwise", call)
    module = gm.get_submodule(str(call.target)) if call.op == "call_module" else None
    fn = op.make_stand_in(call, module)
    if fn is None:
        return _Step("all", call, conservative=True)
    return _Step("jacobian", call, fn, index)


def _walked(model: TracedModel, batched: frozenset[str]) -> list[fx.Node]:
    """The nodes backtracking visits, last first: those that carry the batch, except the head."""
    return [n for n in reversed(list(model.graph.graph.nodes))
            if n.name in batched and n.op in ("call_module", "call_function", "call_method")
            and n.name != model.head.node]


def conservative_nodes(model: TracedModel, through_conv: bool) -> list[str]:
    """Names of the nodes that backtracking passes conservatively (no exact dependency pattern), in graph order;
    for a part of a tuple (`x, indices = pool(x)`), the node making the tuple."""
    batched = _batched(model)
    gm = model.graph
    names: dict[str, None] = {}
    for node in reversed(_walked(model, batched)):
        step = _step(gm, node, batched, through_conv)
        if step.conservative:
            names[step.call.name] = None
    return list(names)


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
    rows = int(head_need.shape[0])
    batch = max(rows, 2)  # with one row, `.squeeze()` would drop the batch dimension
    if batch != rows:
        head_need = _pad(head_need, batch)
        site_masks = {k: _pad(v, batch) for k, v in site_masks.items()}
    batched = _batched(model)
    values = meta_values(gm, model.input_shape, batch)
    need: dict[str, torch.Tensor] = {model.head.feature: head_need.clone()}

    def add_need(name: str, mask: torch.Tensor) -> None:
        need[name] = need[name] | mask if name in need else mask

    for node in _walked(model, batched):
        cur = need.get(node.name)
        if cur is None:
            cur = torch.zeros(values[node.name].shape, dtype=torch.bool)
        if node.name in site_masks:
            cur = cur & site_masks[node.name]
        need[node.name] = cur
        if not cur.any():
            continue
        step = _step(gm, node, batched, through_conv)
        inputs = [a for a in step.call.all_input_nodes if a.name in batched]
        for a, contribution in _contributions(gm, node, step, cur, inputs, values).items():
            add_need(a.name, contribution)
    tensors = {n.name for n in gm.graph.nodes if n.name in batched}
    result = {name: mask[:rows] for name, mask in need.items() if name in tensors}
    masks = {name: result[name] if name in result else torch.zeros_like(m[:rows]) for name, m in site_masks.items()}
    return masks, result


def _pad(mask: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([mask, mask[-1:].expand(rows - mask.shape[0], *mask.shape[1:])])


def _contributions(
    gm: fx.GraphModule,
    node: fx.Node,
    step: _Step,
    cur: torch.Tensor,
    inputs: list[fx.Node],
    values: dict[str, Any],
) -> dict[fx.Node, torch.Tensor]:
    """The needed mask each batched input of `node` gets from `cur`, the needed mask of the node's output."""
    if step.mode == "all":
        alive = cur.flatten(1).any(1)
        return {a: alive.view(-1, *([1] * (len(values[a.name].shape) - 1))).expand(values[a.name].shape).clone()
                for a in inputs}
    if step.mode == "elementwise":
        return {a: _unbroadcast(gm, node, cur, tuple(values[a.name].shape)) for a in inputs}
    assert step.fn is not None
    leaves = {a.name: torch.ones(values[a.name].shape, requires_grad=True) for a in inputs}

    def substitute(a: fx.Node) -> Any:
        if a.name in leaves:
            return leaves[a.name].clone()
        v = values[a.name]
        return torch.ones(v.shape) if isinstance(v, torch.Tensor) else v

    args = fx.node.map_arg(step.call.args, substitute)
    kwargs = fx.node.map_arg(step.call.kwargs, substitute)
    try:
        with torch.enable_grad():
            out = step.fn(*args, **kwargs)
            if step.index is not None:
                out = out[step.index]
            if not isinstance(out, torch.Tensor) or out.shape != cur.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"its stand-in gives {shape}, the layer {tuple(cur.shape)}")
            grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=cur.float(), allow_unused=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"cannot backtrack through layer {node_label(gm, node)}: {first}") from None
    return {a: (g != 0) if g is not None else torch.zeros(values[a.name].shape, dtype=torch.bool)
            for a, g in zip(inputs, grads, strict=True)}


def _unbroadcast(gm: fx.GraphModule, node: fx.Node, need: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The needed mask of an elementwise operation's input of `shape`: its output's, OR-ed over the dimensions
    the input was broadcast along."""
    if need.dim() != len(shape):
        raise TraceError(f"cannot backtrack through layer {node_label(gm, node)}: an input of shape {shape} is "
                         f"broadcast to {tuple(need.shape)} across the batch dimension")
    dims = [d for d, (n, s) in enumerate(zip(need.shape, shape, strict=True)) if s == 1 and n != 1]
    return need.any(dim=tuple(dims), keepdim=True) if dims else need
