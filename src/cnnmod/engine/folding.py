"""A stacked network with the module axis folded into the batch: M modules' values as (M * B, C, ...).

`channels.stack` holds M modules side by side on channels, (B, M * C, ...), so each of their convolutions is one
grouped convolution. On a CPU, oneDNN runs grouped convolutions of a few channels per group slowly: ten modules'
16-channel 3x3 convolutions over 256 images of 8x8 took 13.3 ms as one grouped convolution, 8.3 ms as ten
convolutions each on its module's batch slice, and the parent's one 64-channel convolution 10.6 ms (channels-last;
`python benchmarks/conv_widths.py`). `fold` rewrites a stacked network so that every stacked value is
(M * B, C, ...), module i's samples at rows i * B to (i + 1) * B: a grouped layer becomes M dense ones, each on
its module's rows, and the rest of the graph (elementwise ops, pooling, flattening) runs on the folded batch
unchanged. Values shared by all modules stay (B, C, ...) and are folded where a stacked node first reads them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CnnmodError
from .channels import STACKED, StackedHead, StackedNode, _conv_like, _set_submodule

__all__ = ["fold", "folded_blocks"]


def folded_blocks(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, M * C, ...) -> (M * B, C, ...): the M channel blocks of each sample become M batch slices. A
    channels-last input gives a channels-last output."""
    b, mc = x.shape[:2]
    rest = x.shape[2:]
    c = mc // m
    if _channels_last(x):
        h, w = rest
        moved = x.permute(0, 2, 3, 1).reshape(b, h, w, m, c).permute(3, 0, 1, 2, 4)
        return moved.reshape(m * b, h, w, c).permute(0, 3, 1, 2)
    return x.reshape(b, m, c, *rest).transpose(0, 1).reshape(m * b, c, *rest)


def _rows(x: torch.Tensor, m: int) -> list[torch.Tensor]:
    if x.shape[0] % m:
        raise CnnmodError(f"a folded batch of {x.shape[0]} rows does not hold {m} modules")
    return list(x.chunk(m))


class FoldedLayers(nn.Module):
    """M layers (convolutions or linear ones), layer i on batch slice i: (M * B, C_in, ...) -> (M * B, C_out, ...)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(part) for layer, part in zip(self.layers, _rows(x, len(self.layers)), strict=True)])


class FoldOutput(nn.Module):
    """A layer that reads a shared value and writes M channel blocks, then folds them: (B, ...) -> (M * B, ...)."""

    def __init__(self, layer: nn.Module, m: int) -> None:
        super().__init__()
        self.layer = layer
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return folded_blocks(self.layer(x), self.m)


class FoldedGather(nn.Module):
    """Module i's channel gather: from its batch slice of a folded value, (M * B, C, ...) -> (M * B, W, ...), or,
    with `shared`, from a value all modules share, (B, C, ...) -> (M * B, W, ...). Channels-last in, channels-last
    out (gathered along the innermost dimension, without a change of layout)."""

    def __init__(self, index: Sequence[Sequence[int]], shared: bool = False) -> None:
        super().__init__()
        self.index: torch.Tensor
        self.register_buffer("index", torch.tensor([list(i) for i in index], dtype=torch.long), persistent=False)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, width = self.index.shape
        if _channels_last(x):  # gathered as rows of a (rows * H * W, C) matrix: the fast gather of a CPU
            inner = x.permute(0, 2, 3, 1)  # (rows, H, W, C), contiguous
            rows, h, w, c = inner.shape
            if self.shared:
                picked = inner.reshape(-1, c).index_select(1, self.index.flatten()).reshape(rows, h, w, m, width)
                return picked.permute(3, 0, 1, 2, 4).reshape(m * rows, h, w, width).permute(0, 3, 1, 2)
            parts = [p.reshape(-1, c).index_select(1, i).reshape(-1, h, w, width)
                     for p, i in zip(_rows(inner, m), self.index, strict=True)]
            return torch.cat(parts).permute(0, 3, 1, 2)
        if self.shared:
            return folded_blocks(x.index_select(1, self.index.flatten()), m)
        return torch.cat([p.index_select(1, i) for p, i in zip(_rows(x, m), self.index, strict=True)])


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class FoldedHead(nn.Module):
    """M two-output heads, head i on batch slice i: (M * B, F...) -> (B, M, 2)."""

    def __init__(self, head: StackedHead) -> None:
        super().__init__()
        self.weight = head.weight  # (M, 2, F)
        self.bias = head.bias      # (M, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = self.weight.shape[0]
        f = features.reshape(m, features.shape[0] // m, -1)
        return torch.einsum("mbf,mof->bmo", f, self.weight) + self.bias


def _split_layer(layer: nn.Module, m: int) -> list[nn.Module]:
    """The M dense layers of a grouped convolution (groups = M) or a block-diagonal linear layer."""
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
        raise CnnmodError(f"cannot fold a {type(layer).__name__} of {m} modules")
    bias = layer.bias.detach() if isinstance(layer.bias, torch.Tensor) else None
    weight = layer.weight.detach()
    out = weight.shape[0] // m
    parts: list[nn.Module] = []
    for i in range(m):
        w = weight[i * out:(i + 1) * out]
        if isinstance(layer, nn.Linear):
            cols = weight.shape[1] // m
            w = w[:, i * cols:(i + 1) * cols]
            new: nn.Module = nn.Linear(w.shape[1], out, bias=bias is not None)
        elif layer.groups == m:
            new = _conv_like(layer, w.shape[1], out, groups=1, bias=bias is not None)
        else:
            raise CnnmodError(f"cannot fold a {type(layer).__name__} of {m} modules")
        with torch.no_grad():
            new.weight = nn.Parameter(w.clone().contiguous())
            if bias is not None:
                new.bias = nn.Parameter(bias[i * out:(i + 1) * out].clone())
        parts.append(new)
    return parts


def _is_channel_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.pad


def fold(stacked: fx.GraphModule, m: int) -> fx.GraphModule:
    """`stacked` (changed in place and returned) with its module axis folded into the batch; the same outputs.
    Raises CnnmodError for a node the fold does not know how to rewrite (then run the stacked network as it is)."""
    graph = stacked.graph
    for node in list(graph.nodes):
        info: StackedNode | None = node.meta.get(STACKED)
        if info is None:
            continue
        if info.kind == "grouped_layer":
            layer = stacked.get_submodule(str(node.target))
            _set_submodule(stacked, str(node.target), FoldedLayers(_split_layer(layer, m)))
        elif info.kind == "shared_input_layer":
            layer = stacked.get_submodule(str(node.target))
            _set_submodule(stacked, str(node.target), FoldOutput(layer, m))
        elif info.kind == "grouped_head":
            head = stacked.get_submodule(str(node.target))
            assert isinstance(head, StackedHead)
            _set_submodule(stacked, str(node.target), FoldedHead(head))
        elif info.kind in ("grouped_map", "shared_input_map"):
            source = node.args[0]
            if not isinstance(source, fx.Node) or not _is_channel_pad(source):
                raise CnnmodError(f"cannot fold the channel gather {node.name}")
            name = f"folded_gather_{node.name}"
            stacked.add_submodule(name, FoldedGather(info.index, shared=info.kind == "shared_input_map"))
            with graph.inserting_after(node):
                gather = graph.call_module(name, (source,))
            node.replace_all_uses_with(gather)
            graph.erase_node(node)
        elif info.kind == "tile":
            value, _, times, *ones = node.args
            if node.target != "repeat" or times != m:
                raise CnnmodError(f"cannot fold the tiled value {node.name}")
            node.args = (value, m, 1, *ones)
        elif info.kind == "shared_input_head":
            continue
        elif info.kind == "per_sample":
            if node.op == "call_function" and node.target is operator.getitem and _reads_batch(node):
                raise CnnmodError(f"cannot fold {node.name}: it indexes the batch")
        else:
            raise CnnmodError(f"cannot fold a stacked node of kind {info.kind!r}")
    graph.lint()
    stacked.delete_all_unused_submodules()
    stacked.recompile()
    return stacked


def _reads_batch(node: fx.Node) -> bool:
    index = node.args[1] if len(node.args) > 1 else None
    first = index[0] if isinstance(index, tuple) and index else index
    return not (isinstance(first, slice) and first == slice(None, None, None))
