"""Channel spaces of a traced parent, and small networks that hold only some of their channels.

A *channel space* is a set of channel positions that must be kept or removed together: the output channels of
a convolution or hidden linear layer, joined with every tensor that an elementwise operation ties to them. A
residual `a + b` ties the channels of both operands, so a whole residual stage (the stem or the stage's first
block, and every block's last convolution) is one space with one keep set. That is the choice for residual ties:
one keep set per residual stage. The alternative, the union of both operands' keep sets at each Add, would make
every block of a stage pay for any channel that one block keeps and still needs the same positions on both
operands; one set per stage makes every Add a plain add of two equally small tensors.

A *channel map* links two spaces by a fixed shift: the option-A shortcut of CIFAR ResNets zero-pads the channels
of one stage into the next (`F.pad(x, (0, 0, 0, 0, p, q))`), so channel j of the new stage reads channel j - p of
the old one, or zero. In a small network the map becomes one appended zero channel and a gather.

Which operations pass channels through, tie them or map them comes from the op table's kinds plus a few
shape rules below; anything else is refused, naming the layer (`ChannelError`). Torch-Pruning computes the same
kind of groups, but it reads autograd nodes and treats a channel-dimension `F.pad` as elementwise, which merges
the three stages of an option-A ResNet into one group and breaks the head (measured: docs/RESULTS.md).

`materialize` turns a parent graph and one module's keep sets into a standalone fx network with sliced
convolutions, biases and a sliced 2-output head; `stack` turns several such networks of one parent into one
network of grouped convolutions whose output is (B, M, 2), equal to running each alone.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CnnmodError
from . import ops
from .trace import TracedModel, meta_values, node_label

__all__ = ["ChannelError", "ChannelPlan", "Layer", "Space", "channel_plan", "materialize", "stack",
           "network_cost", "parent_cost", "site_masks"]


class ChannelError(CnnmodError):
    """The parent has an operation whose channels cannot be followed (compact modules are not possible)."""


@dataclass(frozen=True)
class Space:
    """Channel positions kept or removed together; `nodes` are the graph nodes whose channels (dim 1) it is."""

    index: int
    size: int
    nodes: tuple[str, ...]
    prunable: bool


@dataclass(frozen=True)
class Layer:
    """A convolution or linear layer: which space its input and output channels belong to.

    `repeat` > 1 for a linear layer after a flatten of C x R values: input feature c * R + r reads channel c.
    `out_space` is None for the head."""

    node: str
    target: str
    in_space: int | None
    out_space: int | None
    repeat: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """`F.pad` on channels: channel j of `out_space` is channel j - `offset` of `in_space` (zero outside)."""

    node: str
    in_space: int
    out_space: int
    offset: int


@dataclass(frozen=True)
class ChannelPlan:
    """Every channel space of a parent and how its layers read and write them."""

    spaces: tuple[Space, ...]
    space_of: Mapping[str, int]
    layers: tuple[Layer, ...]
    maps: tuple[ChannelMap, ...]
    head: Layer
    input_space: int

    @property
    def prunable(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.spaces if s.prunable)

    def full(self) -> dict[int, torch.Tensor]:
        """Keep sets that keep everything."""
        return {s.index: torch.arange(s.size) for s in self.spaces}

    def sizes(self, keep: Mapping[int, torch.Tensor]) -> dict[int, int]:
        return {s.index: int(len(keep[s.index])) if s.index in keep else s.size for s in self.spaces}

    @property
    def head_space(self) -> int:
        """The space whose channels the head reads (a module's head columns are its kept channels there)."""
        if self.head.in_space is None:
            raise ChannelError(f"the head {self.head.target} reads no channel space, so it has no columns to keep")
        return self.head.in_space


class _Sets:
    """Union-find over provisional spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        return True


_ELEMENTWISE_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                       torch.div, "add", "sub", "mul", "div"}
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate}
_FLATTENS = {torch.flatten, "flatten", "view", "reshape", torch.reshape}


def channel_plan(model: TracedModel) -> ChannelPlan:
    """The channel spaces of a traced parent; raises ChannelError naming the first layer it cannot follow."""
    gm = model.graph
    values = meta_values(gm, model.input_shape, 2)
    sets = _Sets()
    of: dict[str, int] = {}
    layers: list[tuple[str, str, int | None, int | None, int]] = []
    maps: list[tuple[str, int, int, int]] = []
    input_spaces: list[int] = []
    head: tuple[str, str, int | None, int] | None = None

    def refuse(node: fx.Node, why: str) -> ChannelError:
        return ChannelError(f"compact modules need every layer's channels to be traceable: layer "
                            f"{node_label(gm, node)} {why}")

    def channels(name: str) -> int | None:
        v = values.get(name)
        return int(v.shape[1]) if isinstance(v, torch.Tensor) and v.dim() >= 2 else None

    def source(node: fx.Node) -> fx.Node:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node):
            raise refuse(node, "has no tensor input first")
        return arg

    def same(node: fx.Node, arg: fx.Node) -> None:
        if arg.name in of:
            of[node.name] = of[arg.name]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            c = channels(node.name)
            if c is not None:
                of[node.name] = sets.new(c)
                input_spaces.append(of[node.name])
            continue
        if node.op in ("output", "get_attr"):
            continue
        op = ops.lookup(gm, node)
        if op is None:
            raise refuse(node, "is not in the op table")
        if op.passes is ops.Pass.SHAPE:
            continue
        tensor_args = [a for a in node.all_input_nodes if a.name in of]
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.modules.conv._ConvNd):
                if module.groups != 1:
                    raise refuse(node, "is a grouped convolution")
                arg = source(node)
                if node.name == model.head.node:
                    raise refuse(node, "is a convolution used as the head")
                of[node.name] = sets.new(module.out_channels)
                layers.append((node.name, str(node.target), of.get(arg.name), of[node.name], 1))
                continue
            if isinstance(module, nn.Linear):
                arg = source(node)
                repeat = _repeat(values, arg.name, of, sets)
                if node.name == model.head.node:
                    head = (node.name, str(node.target), of.get(arg.name), repeat)
                    continue
                of[node.name] = sets.new(module.out_features)
                layers.append((node.name, str(node.target), of.get(arg.name), of[node.name], repeat))
                continue
            if isinstance(module, (nn.ReLU, nn.Dropout, nn.Identity, nn.modules.dropout._DropoutNd, *_POOLS,
                                   nn.Upsample)):
                same(node, source(node))
                continue
            if isinstance(module, nn.Flatten):
                arg = source(node)
                if module.start_dim != 1 or module.end_dim != -1:
                    raise refuse(node, "flattens other dimensions than all but the batch")
                same(node, arg)
                continue
            raise refuse(node, "changes channels in a way compact modules do not follow")
        target = node.target
        if op.passes is ops.Pass.ELEMENTWISE:
            if target in _ELEMENTWISE_BINARY and len(tensor_args) == 2:
                a, b = tensor_args
                if channels(a.name) != channels(b.name) or not sets.union(of[a.name], of[b.name]):
                    raise refuse(node, "combines tensors whose channels differ")
                of[node.name] = of[a.name]
            elif tensor_args:
                if channels(node.name) != channels(tensor_args[0].name):
                    raise refuse(node, "changes the channel count")
                same(node, tensor_args[0])
            continue
        if target is operator.getitem:
            arg = source(node)
            if arg.name in of and not _spatial_index(node.args[1]):
                raise refuse(node, "indexes the channel dimension")
            same(node, arg)
            continue
        if target is F.pad:
            arg = source(node)
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            dims = values[arg.name].dim() if isinstance(values.get(arg.name), torch.Tensor) else 0
            before, after = _channel_padding(pad, dims)
            if (before, after) == (0, 0):
                same(node, arg)
                continue
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
            if mode != "constant" or value not in (None, 0, 0.0) or before < 0 or after < 0 or arg.name not in of:
                raise refuse(node, "pads channels with something other than zeros")
            of[node.name] = sets.new(channels(node.name) or 0)
            maps.append((node.name, of[arg.name], of[node.name], before))
            continue
        if target in _POOL_FUNCTIONS or target in ("mean", "amax", torch.mean, torch.amax, "sum", torch.sum):
            arg = source(node)
            if target in _POOL_FUNCTIONS or _reduces_spatial_only(node, values):
                same(node, arg)
                continue
            raise refuse(node, "reduces over channels")
        if target in _FLATTENS:
            arg = source(node)
            v, out = values.get(arg.name), values.get(node.name)
            if isinstance(v, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() == 2 \
                    and out.shape[1] == v[0].numel():
                same(node, arg)  # channel c's values become features c * R .. c * R + R - 1
                continue
            raise refuse(node, "reshapes channels")
        if target in ("contiguous", "clone", "float"):
            same(node, source(node))
            continue
        raise refuse(node, "changes channels in a way compact modules do not follow")
    if head is None:
        raise ChannelError("compact modules need a Linear head")
    roots = sorted({sets.find(i) for i in range(len(sets.parent))})
    index = {r: i for i, r in enumerate(roots)}
    fixed = {sets.find(i) for i in input_spaces}
    members: dict[int, list[str]] = {i: [] for i in range(len(roots))}
    space_of = {}
    for name, s in of.items():
        space_of[name] = index[sets.find(s)]
        members[space_of[name]].append(name)
    spaces = tuple(Space(index[r], sets.size[r], tuple(members[index[r]]), r not in fixed) for r in roots)

    def sp(s: int | None) -> int | None:
        return index[sets.find(s)] if s is not None else None

    plan_layers = tuple(Layer(n, t, sp(i), sp(o), r) for n, t, i, o, r in layers)
    plan_maps = tuple(ChannelMap(n, index[sets.find(i)], index[sets.find(o)], off) for n, i, o, off in maps)
    head_layer = Layer(head[0], head[1], sp(head[2]), None, head[3])
    if len(input_spaces) != 1:
        raise ChannelError("compact modules need exactly one image input")
    return ChannelPlan(spaces, space_of, plan_layers, plan_maps, head_layer, index[sets.find(input_spaces[0])])


def _repeat(values: Mapping[str, object], name: str, of: Mapping[str, int], sets: _Sets) -> int:
    v = values.get(name)
    if not isinstance(v, torch.Tensor) or name not in of:
        return 1
    return int(v.shape[1]) // max(sets.size[sets.find(of[name])], 1)


def _spatial_index(index: object) -> bool:
    """`x[:, :, ::2, ::2]` and the like: the batch and channel dimensions are taken whole."""
    if not isinstance(index, tuple):
        return False
    whole = slice(None, None, None)
    return all(isinstance(i, slice) or i is Ellipsis for i in index) and (len(index) < 2 or index[1] == whole) \
        and (len(index) < 1 or index[0] == whole) and Ellipsis not in index[:2]


def _channel_padding(pad: object, dims: int) -> tuple[int, int]:
    """(before, after) of the channel dimension (dim 1) in an `F.pad` amount list over `dims` dimensions."""
    if not isinstance(pad, (tuple, list)) or len(pad) % 2:
        return (-1, -1)
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]  # last dimension first
    position = dims - 2  # pair index of dim 1
    if position >= len(pairs) or position < 0:
        return (0, 0)
    b, a = pairs[position]
    if len(pairs) > position + 1:
        return (-1, -1)  # pads the batch dimension
    return (int(b), int(a)) if isinstance(b, int) and isinstance(a, int) else (-1, -1)


def _reduces_spatial_only(node: fx.Node, values: Mapping[str, object]) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    source = node.args[0]
    v = values.get(source.name) if isinstance(source, fx.Node) else None
    if not isinstance(dims, (tuple, list)) or not isinstance(v, torch.Tensor):
        return False
    n = v.dim()
    return all(isinstance(d, int) and (d % n) >= 2 for d in dims)


# ----------------------------------------------------------------------------------------------------------
# Materialising one module


WeightLayer: TypeAlias = nn.Linear | nn.modules.conv._ConvNd
"""A layer that a plan slices: a convolution or a linear layer (its layers and its head are such layers)."""


def layer_at(net: nn.Module, target: str) -> WeightLayer:
    """The convolution or linear layer of `net` at `target`, a plan layer's or the head's (in a parent, or in a
    network that `materialize`, `stack` or `unstack` built from one)."""
    return cast(WeightLayer, net.get_submodule(target))


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    """A layer's bias parameter (not a copy), or None where it has none (built with `bias=False`)."""
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def head_parameters(net: nn.Module, plan: ChannelPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias parameters (not copies) of a module network's head: the Linear that `materialize`
    built, which always has a bias."""
    head = layer_at(net, plan.head.target)
    bias = layer_bias(head)
    if bias is None:
        raise CnnmodError(f"the head {plan.head.target} of a module network has no bias")
    return head.weight, bias


def _conv_like(layer: nn.modules.conv._ConvNd, in_channels: int, out_channels: int, groups: int,
               bias: bool) -> nn.modules.conv._ConvNd:
    """A new convolution of `layer`'s class and geometry, with other channel counts, groups and bias."""
    # type(layer) is Conv1d, Conv2d or Conv3d (the op table has no other convolution): their constructor runs, not
    # the abstract _ConvNd's (which also takes `transposed` and `output_padding`), so only keywords they share
    conv = cast(Callable[..., nn.modules.conv._ConvNd], type(layer))
    return conv(in_channels, out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=groups, bias=bias, padding_mode=layer.padding_mode)


def _sorted_keep(keep: Mapping[int, torch.Tensor], plan: ChannelPlan) -> dict[int, torch.Tensor]:
    out = {}
    for s in plan.spaces:
        k = keep.get(s.index)
        if k is None or not s.prunable:
            out[s.index] = torch.arange(s.size)
            continue
        k = torch.as_tensor(k, dtype=torch.long).flatten().unique(sorted=True)
        if len(k) == 0 or int(k.min()) < 0 or int(k.max()) >= s.size:
            raise CnnmodError(f"channel space {s.index} keeps {len(k)} channels out of range of {s.size}")
        out[s.index] = k
    return out


def _feature_index(channels: torch.Tensor, repeat: int) -> torch.Tensor:
    return (channels.view(-1, 1) * repeat + torch.arange(repeat).view(1, -1)).flatten()


def materialize(parent: fx.GraphModule, plan: ChannelPlan, keep: Mapping[int, torch.Tensor],
                head_weight: torch.Tensor, head_bias: torch.Tensor) -> fx.GraphModule:
    """A standalone network holding only the kept channels of every space: input (B, C, H, W) -> (B, 2).

    `head_weight` (2, F) and `head_bias` (2,) are the module's head over the parent's full features; its columns
    of removed channels are dropped. Its output equals the parent with every removed channel zeroed at each
    node of its space, and the head replaced, up to float rounding.
    """
    keep = _sorted_keep(keep, plan)
    gm = fx.GraphModule(copy.deepcopy(parent), copy.deepcopy(parent.graph))
    for layer in plan.layers:
        old = layer_at(gm, layer.target)
        rows = keep[layer.out_space] if layer.out_space is not None else None
        cols = _feature_index(keep[layer.in_space], layer.repeat) if layer.in_space is not None else None
        _set_submodule(gm, layer.target, _sliced(old, rows, cols))
    head = plan.head
    cols = _feature_index(keep[head.in_space], head.repeat) if head.in_space is not None else None
    weight = head_weight if cols is None else head_weight[:, cols]
    linear = nn.Linear(weight.shape[1], 2)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(head_bias)
    _set_submodule(gm, head.target, linear)
    nodes = {n.name: n for n in gm.graph.nodes}
    for m in plan.maps:
        _rewrite_map(gm, nodes[m.node], keep[m.in_space], keep[m.out_space], m.offset)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _sliced(layer: WeightLayer, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    weight = layer.weight.detach()
    old_bias = layer_bias(layer)
    bias = old_bias.detach() if old_bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        assert isinstance(layer, nn.modules.conv._ConvNd)
        new = _conv_like(layer, weight.shape[1], weight.shape[0], groups=1, bias=bias is not None)
    with torch.no_grad():
        new.weight = nn.Parameter(weight.clone().contiguous())
        if bias is not None:
            new.bias = nn.Parameter(bias.clone().contiguous())
    return new


def _map_index(kept_in: torch.Tensor, kept_out: torch.Tensor, offset: int, base: int = 0,
               zero: int | None = None) -> list[int]:
    """For each kept output channel, the position of its source among the kept inputs, or `zero`."""
    position = {int(c): i for i, c in enumerate(kept_in.tolist())}
    zero = len(kept_in) if zero is None else zero
    return [base + position[j - offset] if (j - offset) in position else zero for j in kept_out.tolist()]


def _rewrite_map(gm: fx.GraphModule, node: fx.Node, kept_in: torch.Tensor, kept_out: torch.Tensor,
                 offset: int, index: list[int] | None = None) -> fx.Node:
    """`F.pad(x, (.., before, after))` on channels -> `F.pad(x, (.., 0, 1))[:, index]`: one zero channel
    appended, then the kept output channels gathered from the kept inputs (or the zero channel)."""
    # channel_plan maps only an `F.pad` whose amounts are a tuple or list of ints (_channel_padding)
    pad = list(cast(Sequence[int], node.args[1] if len(node.args) > 1 else node.kwargs["pad"]))
    pad[-2], pad[-1] = 0, 1
    args = list(node.args)
    if len(args) > 1:
        args[1] = tuple(pad)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(pad)}
    if index is None:
        index = _map_index(kept_in, kept_out, offset)
    with gm.graph.inserting_after(node):
        gather = gm.graph.call_function(operator.getitem, (node, (slice(None, None, None), index)))
    node.replace_all_uses_with(gather, delete_user_cb=lambda user: user is not gather)
    return gather


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(parent_path) if parent_path else gm
    setattr(owner, name, module)


# ----------------------------------------------------------------------------------------------------------
# Several modules of one parent as one network


class StackedHead(nn.Module):
    """M two-output heads over M stacked feature blocks (B, M * F), or all over the same features (B, F), with
    `shared_input`: -> (B, M, 2)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shared_input: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (M, 2, F)
        self.bias = nn.Parameter(bias.clone())      # (M, 2)
        self.shared_input = shared_input

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            return torch.einsum("bf,mof->bmo", features.flatten(1), self.weight) + self.bias
        m = self.weight.shape[0]
        f = features.reshape(features.shape[0], m, -1)
        return torch.einsum("bmf,mof->bmo", f, self.weight) + self.bias


STACKED = "cnnmod_stacked"
"""The key of a stacked network's node metadata that says how the node holds the modules."""


@dataclass(frozen=True)
class StackedNode:
    """How a node of a stacked network (`stack`) holds M modules. Nodes without it run once for all modules.

    - `grouped_layer`: a convolution of M groups, or a block-diagonal linear layer, over stacked inputs;
    - `shared_input_layer`: a layer that reads a value shared by all modules and writes M blocks of channels;
    - `grouped_map` / `shared_input_map`: a channel gather (after a one-channel zero pad) from stacked or shared
      inputs; `index[i]` is module i's gather among its own input channels (its width is the zero channel);
    - `grouped_head` / `shared_input_head`: the StackedHead;
    - `tile`: a shared value repeated M times on channels, for an elementwise op that also reads a stacked one;
    - `per_sample`: any other op on stacked values (elementwise, pooling, flattening).
    """

    kind: str
    index: tuple[tuple[int, ...], ...] = ()


ALIGN_MOST = 5
"""`stack` aligns a width only where that adds at most a fifth of its channels: 15 -> 16 ran faster in every
timing on a CPU; 12 -> 16 gained nothing measurable (per convolution 8.6-8.9 ms against 8.3-10.0; the whole
12-channel composed classifier 0.77 unpadded, 0.87 padded, one noisy run each: docs/RESULTS.md, stop 21)."""


def stack(parent: fx.GraphModule, plan: ChannelPlan, keeps: Sequence[Mapping[int, torch.Tensor]],
          nets: Sequence[fx.GraphModule] | None = None, head_weights: torch.Tensor | None = None,
          head_biases: torch.Tensor | None = None, cut: str | None = None,
          input_shape: tuple[int, ...] | None = None, align: int = 1) -> fx.GraphModule:
    """M modules of one parent as one network, (B, C, H, W) -> (B, M, 2), equal to running each alone.

    Modules are padded to the widest module of each space with zero channels (zero weights and biases), so
    modules of different widths stack too; same-width modules need no padding. Every convolution becomes one
    grouped convolution (groups = M; one that reads a shared value reads it once), the channel maps one gather,
    and the heads one batched product. Weights come from `nets` (materialised modules, e.g. fine-tuned) or,
    without them, from the parent with `head_weights` (M, 2, F) and `head_biases` (M, 2).

    Everything up to the node `cut` runs once, with the first module's layers: the modules must be the same
    there (cnnmod.engine.engines.common_prefix finds such a prefix); `input_shape` (one sample's) is then needed too.

    `align` pads the modules' own spaces further, to a multiple of it (zero channels), where that adds at most
    1 / ALIGN_MOST of their channels: convolutions of 16 channels run faster than those of 15 on a CPU's vector
    units, while padding 12 to 16 gained nothing measurable. Spaces of the shared prefix keep their width.

    Each node's `meta[STACKED]` says how it holds the modules (`StackedNode`); cnnmod.engine.folding reads it.
    """
    if cut is not None and input_shape is None:
        raise CnnmodError("stacking with a shared prefix needs the input shape")
    keeps = [_sorted_keep(k, plan) for k in keeps]
    m = len(keeps)
    if m == 0:
        raise CnnmodError("nothing to stack")
    widths = {s.index: max(len(k[s.index]) for k in keeps) for s in plan.spaces}
    if nets is None:
        if head_weights is None or head_biases is None:
            raise CnnmodError("stacking needs module networks or heads")
        nets = [materialize(parent, plan, k, head_weights[i], head_biases[i]) for i, k in enumerate(keeps)]
    gm = fx.GraphModule(copy.deepcopy(parent), copy.deepcopy(parent.graph))
    order = [n.name for n in gm.graph.nodes]
    shared_until = order.index(cut) if cut is not None else -1
    if align > 1:
        fixed = {plan.space_of[n] for n in order[:shared_until + 1] if n in plan.space_of}
        fixed |= {s.index for s in plan.spaces if not s.prunable}
        padded = {s: -(-w // align) * align for s, w in widths.items()}
        widths = {s: padded[s] if s not in fixed and padded[s] * ALIGN_MOST <= w * ALIGN_MOST + w else w
                  for s, w in widths.items()}
    layer_of = {layer.node: layer for layer in plan.layers}
    map_of = {cm.node: cm for cm in plan.maps}
    stacked: set[str] = set()
    for i, node in enumerate(gm.graph.nodes):
        if i <= shared_until or node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.name in layer_of or node.name in map_of or node.name == plan.head.node \
                or any(a.name in stacked for a in node.all_input_nodes):
            stacked.add(node.name)
    nodes = {n.name: n for n in gm.graph.nodes}

    def reads_stacked(node_name: str) -> bool:
        arg = nodes[node_name].args[0]
        return isinstance(arg, fx.Node) and arg.name in stacked

    for layer in plan.layers:
        if layer.node not in stacked:  # shared: the first module's layer, run once
            _set_submodule(gm, layer.target, copy.deepcopy(nets[0].get_submodule(layer.target)))
            continue
        grouped = reads_stacked(layer.node)
        parts, biases = [], []
        for net in nets:
            small = layer_at(net, layer.target)
            w = small.weight.detach()
            w = _pad_dim(w, 0, widths[layer.out_space] if layer.out_space is not None else w.shape[0])
            if grouped and layer.in_space is not None:
                w = _pad_dim(w, 1, widths[layer.in_space] * layer.repeat)
            parts.append(w)
            small_bias = layer_bias(small)
            b = small_bias.detach() if small_bias is not None else torch.zeros(small.weight.shape[0])
            biases.append(_pad_dim(b, 0, w.shape[0]))
        old = gm.get_submodule(layer.target)
        if not isinstance(old, (nn.Linear, nn.modules.conv._ConvNd)):
            raise CnnmodError(f"cannot stack layer {layer.target}")
        weight = torch.cat(parts)
        nodes[layer.node].meta[STACKED] = StackedNode("grouped_layer" if grouped else "shared_input_layer")
        if isinstance(old, nn.Linear):
            if grouped:  # block-diagonal
                weight = torch.block_diag(*parts)
            new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0])
        else:
            new = _conv_like(old, weight.shape[1] * (m if grouped else 1), weight.shape[0],
                             groups=m if grouped else 1, bias=True)
        with torch.no_grad():
            new.weight = nn.Parameter(weight.contiguous())
            new.bias = nn.Parameter(torch.cat(biases))
        _set_submodule(gm, layer.target, new)
    head = plan.head
    head_grouped = reads_stacked(head.node)
    hw, hb = [], []
    for net in nets:
        lin_weight, lin_bias = head_parameters(net, plan)
        w = lin_weight.detach()
        if head_grouped and head.in_space is not None:
            w = _pad_dim(w, 1, widths[head.in_space] * head.repeat)
        hw.append(w)
        hb.append(lin_bias.detach())
    _set_submodule(gm, head.target, StackedHead(torch.stack(hw), torch.stack(hb), shared_input=not head_grouped))
    nodes[head.node].meta[STACKED] = StackedNode("grouped_head" if head_grouped else "shared_input_head")
    for cm in plan.maps:
        if cm.node not in stacked:
            _rewrite_map(gm, nodes[cm.node], keeps[0][cm.in_space], keeps[0][cm.out_space], cm.offset)
            continue
        w_in, w_out = widths[cm.in_space], widths[cm.out_space]
        one = not reads_stacked(cm.node)  # reads one shared copy
        zero = w_in if one else m * w_in
        index: list[int] = []
        local: list[list[int]] = []
        for i, k in enumerate(keeps):
            own = _map_index(k[cm.in_space], k[cm.out_space], cm.offset, zero=w_in)
            local.append(own + [w_in] * (w_out - len(own)))
            base = 0 if one else i * w_in
            index += [zero if j == w_in else base + j for j in local[-1]]
        gather = _rewrite_map(gm, nodes[cm.node], torch.empty(0), torch.empty(0), 0, index)
        gather.meta[STACKED] = StackedNode("shared_input_map" if one else "grouped_map", tuple(map(tuple, local)))
    if cut is not None:  # a stacked elementwise op that also reads a shared value reads it M times
        assert input_shape is not None
        dims = {name: v.dim() for name, v in meta_values(parent, input_shape, 2).items()
                if isinstance(v, torch.Tensor)}
        for node in list(gm.graph.nodes):
            if node.name not in stacked or node.name in layer_of or node.name in map_of or node.name == head.node:
                continue
            for arg in node.all_input_nodes:
                if arg.name not in stacked and arg.name in plan.space_of and arg.name in dims:
                    with gm.graph.inserting_before(node):
                        tiled = gm.graph.call_method("repeat", (arg, 1, m, *([1] * (dims[arg.name] - 2))))
                    tiled.meta[STACKED] = StackedNode("tile")
                    node.replace_input_with(arg, tiled)
    for node in gm.graph.nodes:
        if node.name in stacked and STACKED not in node.meta:
            node.meta[STACKED] = StackedNode("per_sample")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)


def unstack(stacked: fx.GraphModule, plan: ChannelPlan, keeps: Sequence[Mapping[int, torch.Tensor]],
            parent: fx.GraphModule) -> list[fx.GraphModule]:
    """The M standalone networks of a stacked network of same-width modules (e.g. after fine-tuning it)."""
    keeps = [_sorted_keep(k, plan) for k in keeps]
    if not same_widths(plan, keeps):
        raise CnnmodError("only modules of equal widths can be unstacked")
    features = plan_head_features(plan, parent)
    nets = [materialize(parent, plan, k, torch.zeros(2, features), torch.zeros(2)) for k in keeps]
    load_stacked(stacked, plan, nets)
    return nets


def same_widths(plan: ChannelPlan, keeps: Sequence[Mapping[int, torch.Tensor]]) -> bool:
    """Whether the modules keep as many channels as each other in every space (then they stack unpadded)."""
    return all(len(k.get(s.index, ())) == len(keeps[0].get(s.index, ())) for k in keeps for s in plan.spaces)


@torch.no_grad()
def load_stacked(stacked: fx.GraphModule, plan: ChannelPlan, nets: Sequence[fx.GraphModule]) -> None:
    """Copy the weights of a stacked network of same-width modules (`stack`, then e.g. fine-tuned and folded)
    into the M module networks, in place. A layer the stack runs once (a shared prefix) goes to every module."""
    m = len(nets)
    for layer in plan.layers:
        big = layer_at(stacked, layer.target)
        big_bias = layer_bias(big)
        for i, net in enumerate(nets):
            small = layer_at(net, layer.target)
            out, cols = small.weight.shape[0], small.weight.shape[1]
            w, b = big.weight.detach(), big_bias.detach() if big_bias is not None else None
            if m > 1 and w.shape[0] == m * out:
                w, b = w[i * out:(i + 1) * out], b[i * out:(i + 1) * out] if b is not None else None
                if isinstance(big, nn.Linear) and w.shape[1] == m * cols:  # block-diagonal
                    w = w[:, i * cols:(i + 1) * cols]
            if w.shape != small.weight.shape:
                raise CnnmodError(f"layer {layer.target} of the stacked network does not match the modules")
            small.weight.copy_(w)
            small_bias = layer_bias(small)
            if b is None:
                if small_bias is not None:
                    small_bias.zero_()
            elif small_bias is not None:
                small_bias.copy_(b)
            elif bool(b.any()):
                small.bias = nn.Parameter(b.clone())
    head = stacked.get_submodule(plan.head.target)
    assert isinstance(head, StackedHead)
    for i, net in enumerate(nets):
        lin_weight, lin_bias = head_parameters(net, plan)
        lin_weight.copy_(head.weight.detach()[i])
        lin_bias.copy_(head.bias.detach()[i])


def plan_head_features(plan: ChannelPlan, parent: fx.GraphModule) -> int:
    return int(layer_at(parent, plan.head.target).weight.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Sizes


def network_cost(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of the conv and linear layers of a network."""
    values = meta_values(gm, input_shape, 1)
    params = macs = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, StackedHead)):
            params += sum(p.numel() for p in module.parameters())
            out = values[node.name]
            if isinstance(module, nn.modules.conv._ConvNd):
                macs += out[0].numel() * module.weight[0].numel()
            elif isinstance(module, StackedHead):
                macs += module.weight.numel()
            else:
                macs += module.weight.numel()
    return params, macs


def parent_cost(model: TracedModel) -> tuple[int, int]:
    return network_cost(model.graph, model.input_shape)


def site_masks(model: TracedModel, plan: ChannelPlan, keep: Mapping[int, torch.Tensor],
               kind: str = "relu") -> dict[str, torch.Tensor]:
    """Node masks at the parent's sites for one module's keep sets (a site outside every space keeps all)."""
    keep = _sorted_keep(keep, plan)
    masks = {}
    for site in model.site_list(kind):
        mask = torch.zeros(site.shape, dtype=torch.bool)
        s = plan.space_of.get(site.name)
        if s is None or len(site.shape) == 0:
            mask[...] = True
        else:
            mask[keep[s]] = True
        masks[site.name] = mask
    return masks


# ----------------------------------------------------------------------------------------------------------
# Cutting a network where a single tensor carries everything forward


def cut_points(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[tuple[str, float]]:
    """Nodes through which everything flows (the only value computed so far that later nodes read), with the
    fraction of the network's multiply-accumulates done before them, in graph order."""
    values = meta_values(gm, input_shape, 1)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    macs_before = []
    total = 0
    for node in nodes:
        macs_before.append(total)
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                total += values[node.name][0].numel() * module.weight[0].numel()
    found = []
    for i, node in enumerate(nodes):
        if node.op != "call_function" and node.op != "call_module" and node.op != "call_method":
            continue
        live = [n for n in nodes[:i + 1] if last_use[n] > i and n.op != "get_attr"]
        if live == [node] and isinstance(values.get(node.name), torch.Tensor):
            found.append((node.name, (macs_before[i + 1] if i + 1 < len(nodes) else total) / max(total, 1)))
    return found


def split_at(gm: fx.GraphModule, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(images -> the cut node's value, the cut node's value -> output): two networks that share `gm`'s layers
    (the same parameter tensors), whose composition is `gm`. `cut` must be a node everything flows through."""
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    if cut not in names:
        raise CnnmodError(f"no node {cut!r} to cut at")
    position = names.index(cut)
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[:position + 1]:
        env[node] = head.node_copy(node, lambda n: env[n])
    head.output(env[nodes[position]])
    tail = fx.Graph()
    env = {nodes[position]: tail.placeholder("h")}
    for node in nodes[position + 1:]:
        try:
            env[node] = tail.node_copy(node, lambda n: env[n])
        except KeyError:
            raise CnnmodError(f"node {cut!r} is not a cut point: a later node reads an earlier value") from None
    first, second = fx.GraphModule(gm, head), fx.GraphModule(gm, tail)
    first.graph.eliminate_dead_code()
    first.recompile()
    return first, second
