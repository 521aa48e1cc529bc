"""The one table of operations cnnmod supports, read by the tracer, backtracking and the graph store.

Every node of a traced parent calls a module, a function or a tensor method (its torch.fx target). For each
supported target, one `Op` says:

- `site`: whether the node's output is a site, and of which kind (`relu`, or `conv` for convolutions and
  hidden linear layers);
- `passes`: how backtracking (MC-BLN, MC-BI) carries the "needed" mask of the node's output back to its inputs
  (`Pass`); `stand_in` builds the unit-weight function whose Jacobian pattern is the node's dependency
  pattern, or says that the node's parameters have none (then the node is backtracked conservatively, and
  cnnmod records it);
- `name` and, for a module, `fields`: how the graph store writes it (graphio): the stable name in the file and
  the constructor arguments it records;
- `in_place`: for an in-place form, how the tracer rewrites it out of place.

A target that is not in the table is refused by all three consumers, naming the layer; supporting a new
operation is one entry here. The table is a value: `TABLE.with_ops(...)` returns an extended copy, and the
consumers read the module attribute `TABLE` whenever they look something up.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["FRESH_FUNCTIONS", "TABLE", "InPlace", "Op", "OpTable", "Pass", "lookup", "refusal", "NOT_RELU"]

Kind = Literal["module", "function", "method"]
StandIn = Callable[[fx.Node, "nn.Module | None"], "Callable[..., Any] | None"]

FRESH_FUNCTIONS = (operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul)
"""Functions whose result is a new tensor (never a view of an argument): a ReLU that alone reads it may run in
place."""


class Pass(Enum):
    """How backtracking carries the needed nodes of an operation's output to its inputs."""

    ELEMENTWISE = "elementwise"
    """Output node i reads the node at position i of each tensor input (after broadcasting): exact."""
    EXACT = "exact"
    """The Jacobian pattern of the stand-in (unit weights, all-ones inputs) is the dependency: exact."""
    CONSERVATIVE = "conservative"
    """No known pattern: every input node of a sample is needed when any output node of it is."""
    SHAPE = "shape"
    """Reads only shapes (`x.size(0)`, `x.shape`): no output node depends on an input node's value."""


@dataclass(frozen=True)
class InPlace:
    """How an in-place form is made out of place: a new target, and/or a flag (argument or attribute) to clear.

    `position` is the flag's positional index for functions; for modules `flag` names the attribute.
    `always` marks targets that are in place whatever their arguments (`torch.relu_`, `x += y`).
    """

    out_of_place: Callable[..., Any] | str | None = None
    flag: str | None = None
    position: int | None = None
    always: bool = False


@dataclass(frozen=True)
class Op:
    """One supported fx target and everything cnnmod needs to know about it."""

    kind: Kind
    target: type[nn.Module] | Callable[..., Any] | str
    name: str
    passes: Pass
    site: str | None = None
    stand_in: StandIn | None = None
    fields: tuple[str, ...] = ()
    has_bias: bool = False
    in_place: InPlace | None = None
    convolution: bool = False
    """MC-BLN stops here (it backtracks through dense layers only); MC-BI passes through."""
    accepts: Callable[[fx.Node], str | None] | None = None
    """Returns why this particular use cannot be supported (e.g. `getattr(x, "T")`), or None."""

    def module_config(self, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments the store records for `module`."""
        config = {name: getattr(module, name) for name in self.fields}
        if self.has_bias:
            config["bias"] = getattr(module, "bias", None) is not None
        return config

    def config_keys(self) -> frozenset[str]:
        return frozenset(self.fields) | ({"bias"} if self.has_bias else frozenset())

    def make_stand_in(self, node: fx.Node, module: nn.Module | None) -> Callable[..., Any] | None:
        """A callable with the node's call signature whose Jacobian pattern is its dependency pattern, or None
        when the node's parameters have no known pattern (the node is then backtracked conservatively)."""
        if self.passes is Pass.CONSERVATIVE:
            return None
        if self.stand_in is not None:
            return self.stand_in(node, module)
        if self.kind == "module":
            assert module is not None
            return module
        if self.kind == "method":
            name = str(self.target)
            return lambda x, *a, **k: getattr(x, name)(*a, **k)
        return self.target  # type: ignore[return-value]


@dataclass(frozen=True)
class OpTable:
    """Ops indexed by target (what a graph node calls) and by name (what a stored graph names)."""

    ops: tuple[Op, ...]
    _by_target: Mapping[tuple[str, Any], Op] = field(init=False, repr=False, compare=False)
    _by_name: Mapping[tuple[str, str], Op] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_target: dict[tuple[str, Any], Op] = {}
        by_name: dict[tuple[str, str], Op] = {}
        for op in self.ops:
            key = (op.kind, op.target)
            if key in by_target or (op.kind, op.name) in by_name:
                raise ValueError(f"the op table lists {op.kind} {op.name} twice (an alias of another entry?)")
            by_target[key] = op
            by_name[(op.kind, op.name)] = op
        object.__setattr__(self, "_by_target", MappingProxyType(by_target))
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))

    def with_ops(self, *ops: Op) -> OpTable:
        """A copy of this table with more ops."""
        return OpTable((*self.ops, *ops))

    def for_target(self, kind: str, target: object) -> Op | None:
        """The op of a module type, function or method name; None if unsupported."""
        try:
            return self._by_target.get((kind, target))
        except TypeError:  # an unhashable target
            return None

    def for_name(self, kind: str, name: object) -> Op | None:
        """The op a stored graph names; None if unknown."""
        return self._by_name.get((kind, name)) if isinstance(name, str) else None

    def lookup(self, gm: fx.GraphModule, node: fx.Node) -> Op | None:
        """The op a graph node calls; None for placeholders, outputs, attributes and unsupported targets."""
        if node.op == "call_module":
            return self.for_target("module", type(gm.get_submodule(str(node.target))))
        if node.op == "call_function":
            return self.for_target("function", node.target)
        if node.op == "call_method":
            return self.for_target("method", node.target)
        return None

    def names(self, kind: str) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops if op.kind == kind)


def lookup(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """`TABLE.lookup`, reading the table in force now."""
    return TABLE.lookup(gm, node)


def refusal(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why `node` cannot be supported (a short clause), or None when the table supports it."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    op = TABLE.lookup(gm, node)
    if op is None:
        if _is_other_activation(gm, node):
            return "is not a ReLU; cnnmod decomposes ReLU networks (remove output softmax from the model, " \
                   "or replace the activation)"
        return "is not an operation cnnmod supports (see cnnmod.engine.ops for the table of supported operations)"
    return op.accepts(node) if op.accepts is not None else None


# ----------------------------------------------------------------------------------------------------------
# Stand-ins: unit-weight functions with the dependency pattern of an operation.


def _arg(node: fx.Node, position: int, name: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _conv_ones(node: fx.Node, module: nn.Module | None) -> Callable[..., Any]:
    assert isinstance(module, nn.modules.conv._ConvNd)
    ones = torch.ones(module.weight.shape)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ones.dim() - 2]
    stride, dilation, groups = module.stride, module.dilation, module.groups
    if module.padding_mode == "zeros":
        padding = module.padding
        return lambda x: conv(x, ones, None, stride, padding, dilation, groups)
    pad, mode = module._reversed_padding_repeated_twice, module.padding_mode
    return lambda x: conv(F.pad(x, pad, mode=mode), ones, None, stride, 0, dilation, groups)


def _linear_ones(node: fx.Node, module: nn.Module | None) -> Callable[..., Any]:
    assert isinstance(module, nn.Linear)
    ones = torch.ones(module.weight.shape)
    return lambda x: F.linear(x, ones)


def _identity(node: fx.Node, module: nn.Module | None) -> Callable[..., Any]:
    return lambda x, *a, **k: x


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _unit(value: Any) -> bool:
    return all(v == 1 for v in value) if isinstance(value, (tuple, list)) else value == 1


def _max_pool_module(dims: int) -> StandIn:
    """A max-pool's dependency is its windows: an average pool over the same windows (undilated only)."""

    def make(node: fx.Node, module: nn.Module | None) -> Callable[..., Any] | None:
        assert isinstance(module, nn.modules.pooling._MaxPoolNd)
        if not _unit(module.dilation) or module.return_indices:
            return None
        k, s, p, c = module.kernel_size, module.stride, module.padding, module.ceil_mode
        return lambda x: _AVG_POOL[dims](x, k, s, p, c)

    return make


def _max_pool_function(dims: int) -> StandIn:
    def make(node: fx.Node, module: nn.Module | None) -> Callable[..., Any] | None:
        if not _unit(_arg(node, 4, "dilation", 1)) or _arg(node, 6, "return_indices", False):
            return None

        def windows(input: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                    ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:
            return _AVG_POOL[dims](input, kernel_size, stride, padding, ceil_mode)

        return windows

    return make


def _adaptive_max_module(dims: int) -> StandIn:
    def make(node: fx.Node, module: nn.Module | None) -> Callable[..., Any] | None:
        assert isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd)
        if module.return_indices:
            return None
        size = module.output_size
        return lambda x: _ADAPTIVE_AVG_POOL[dims](x, size)  # type: ignore[arg-type]

    return make


def _adaptive_max_function(dims: int) -> StandIn:
    def make(node: fx.Node, module: nn.Module | None) -> Callable[..., Any] | None:
        if _arg(node, 2, "return_indices", False):
            return None
        return lambda input, output_size, return_indices=False: _ADAPTIVE_AVG_POOL[dims](input, output_size)

    return make


TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
"""`x.shape` and the like: the only attributes of a tensor a graph may read (fx records them as getattr)."""


def _tensor_attribute(node: fx.Node) -> str | None:
    if len(node.args) != 2 or node.args[1] not in TENSOR_ATTRIBUTES:
        return f"reads attribute {node.args[1:]!r} of a tensor; only {', '.join(sorted(TENSOR_ATTRIBUTES))} are " \
               "supported"
    return None


# ----------------------------------------------------------------------------------------------------------
# The table.

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BATCHNORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL_FIELDS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_DROPOUT = ("p", "inplace")
_INPLACE_ATTRIBUTE = InPlace(flag="inplace")


def _module(cls: type[nn.Module], passes: Pass, fields: tuple[str, ...] = (), **kw: Any) -> Op:
    return Op("module", cls, f"torch.nn.{cls.__name__}", passes, fields=fields, **kw)


def _function(target: Callable[..., Any], name: str, passes: Pass, **kw: Any) -> Op:
    return Op("function", target, name, passes, **kw)


def _method(name: str, passes: Pass, **kw: Any) -> Op:
    return Op("method", name, name, passes, **kw)


def _modules() -> list[Op]:
    E, X = Pass.ELEMENTWISE, Pass.EXACT
    ops = [
        _module(nn.ReLU, E, ("inplace",), site="relu", in_place=_INPLACE_ATTRIBUTE),
        _module(nn.Linear, X, ("in_features", "out_features"), has_bias=True, site="conv", stand_in=_linear_ones),
        _module(nn.Flatten, X, ("start_dim", "end_dim")),
        _module(nn.Unflatten, X, ("dim", "unflattened_size")),
        _module(nn.Identity, E),
        _module(nn.Dropout, E, _DROPOUT, in_place=_INPLACE_ATTRIBUTE),
        _module(nn.Upsample, X, ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")),
    ]
    for dims, (conv, max_pool, avg_pool, adaptive_avg, adaptive_max, batchnorm, dropout) in {
        1: (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.BatchNorm1d,
            nn.Dropout1d),
        2: (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.BatchNorm2d,
            nn.Dropout2d),
        3: (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.BatchNorm3d,
            nn.Dropout3d),
    }.items():
        ops += [
            _module(conv, X, _CONV, has_bias=True, site="conv", stand_in=_conv_ones, convolution=True),
            _module(max_pool, X, _MAX_POOL, stand_in=_max_pool_module(dims)),
            _module(avg_pool, X, _AVG_POOL_FIELDS + (("divisor_override",) if dims > 1 else ())),
            _module(adaptive_avg, X, ("output_size",)),
            _module(adaptive_max, X, ("output_size", "return_indices"), stand_in=_adaptive_max_module(dims)),
            _module(batchnorm, E, _BATCHNORM),  # left in the graph only where no conv/linear precedes it
            _module(dropout, E, _DROPOUT, in_place=_INPLACE_ATTRIBUTE),
        ]
    for pads in ((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d),
                 (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
                 (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)):
        ops += [_module(pad, X, ("padding",)) for pad in pads]
    ops += [_module(pad, X, ("padding", "value"))
            for pad in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)]
    return ops


def _functions() -> list[Op]:
    E, X, S = Pass.ELEMENTWISE, Pass.EXACT, Pass.SHAPE
    relu_flag = InPlace(flag="inplace", position=1)
    dropout_flag = InPlace(flag="inplace", position=3)
    ops = [
        # Python operators on tensors: `a + b`, `x[:, :4]`, `x += y` (rewritten to `x + y`).
        _function(operator.add, "_operator.add", E),
        _function(operator.sub, "_operator.sub", E),
        _function(operator.mul, "_operator.mul", E),
        _function(operator.truediv, "_operator.truediv", E),
        _function(operator.neg, "_operator.neg", E),
        _function(operator.iadd, "_operator.iadd", E, in_place=InPlace(operator.add, always=True)),
        _function(operator.isub, "_operator.isub", E, in_place=InPlace(operator.sub, always=True)),
        _function(operator.imul, "_operator.imul", E, in_place=InPlace(operator.mul, always=True)),
        _function(operator.itruediv, "_operator.itruediv", E, in_place=InPlace(operator.truediv, always=True)),
        _function(operator.getitem, "_operator.getitem", X),
        _function(builtins.getattr, "builtins.getattr", S, accepts=_tensor_attribute),
        # torch functions
        _function(torch.add, "torch.add", E),
        _function(torch.sub, "torch.sub", E),
        _function(torch.mul, "torch.mul", E),
        _function(torch.div, "torch.div", E),
        _function(torch.relu, "torch.relu", E, site="relu"),
        _function(torch.relu_, "torch.relu_", E, site="relu", in_place=InPlace(torch.relu, always=True)),
        _function(torch.cat, "torch.cat", X),
        _function(torch.stack, "torch.stack", X),
        _function(torch.flatten, "torch.flatten", X),
        _function(torch.reshape, "torch.reshape", X),
        _function(torch.squeeze, "torch.squeeze", X),
        _function(torch.unsqueeze, "torch.unsqueeze", X),
        _function(torch.transpose, "torch.transpose", X),
        _function(torch.permute, "torch.permute", X),
        _function(torch.chunk, "torch.chunk", X),
        _function(torch.split, "torch.split", X),
        _function(torch.mean, "torch.mean", X),
        _function(torch.sum, "torch.sum", X),
        _function(torch.amax, "torch.amax", X),  # amax spreads gradient over ties: all-ones gives every window
        # torch.nn.functional (F.relu_ is torch.relu_, F.conv2d is torch.conv2d: one entry each)
        _function(F.relu, "torch.nn.functional.relu", E, site="relu", in_place=relu_flag),
        _function(F.linear, "torch.nn.functional.linear", X, site="conv"),
        _function(F.pad, "torch.nn.functional.pad", X),
        _function(F.interpolate, "torch.nn.functional.interpolate", X),
        _function(F.dropout, "torch.nn.functional.dropout", E, in_place=dropout_flag),
        _function(F.dropout1d, "torch.nn.functional.dropout1d", E, in_place=dropout_flag),
        _function(F.dropout2d, "torch.nn.functional.dropout2d", E, in_place=dropout_flag),
        _function(F.dropout3d, "torch.nn.functional.dropout3d", E, in_place=dropout_flag),
    ]
    for dims in (1, 2, 3):
        f = f"torch.nn.functional.{{}}{dims}d"
        ops += [
            _function(getattr(F, f"conv{dims}d"), f.format("conv"), X, site="conv", convolution=True),
            _function(getattr(F, f"max_pool{dims}d"), f.format("max_pool"), X, stand_in=_max_pool_function(dims)),
            _function(getattr(F, f"avg_pool{dims}d"), f.format("avg_pool"), X),
            _function(getattr(F, f"adaptive_avg_pool{dims}d"), f.format("adaptive_avg_pool"), X),
            _function(getattr(F, f"adaptive_max_pool{dims}d"), f.format("adaptive_max_pool"), X,
                      stand_in=_adaptive_max_function(dims)),
        ]
    return ops


def _methods() -> list[Op]:
    E, X, S = Pass.ELEMENTWISE, Pass.EXACT, Pass.SHAPE
    ops = [
        _method("relu", E, site="relu"),
        _method("relu_", E, site="relu", in_place=InPlace("relu", always=True)),
        _method("size", S),
        _method("dim", S),
        _method("contiguous", E),
        _method("clone", E),
        _method("float", E),
        _method("neg", E),
    ]
    for name in ("add", "sub", "mul", "div"):
        ops += [_method(name, E), _method(f"{name}_", E, in_place=InPlace(name, always=True))]
    ops += [_method(name, X) for name in (
        "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "expand",
        "expand_as", "repeat", "chunk", "split", "mean", "sum", "amax",
    )]
    return ops


TABLE = OpTable((*_modules(), *_functions(), *_methods()))
"""Every operation cnnmod supports. Replace (e.g. `TABLE.with_ops(...)`) to support another."""


# Activations cnnmod refuses with a dedicated message: it decomposes ReLU networks.
NOT_RELU: Mapping[str, tuple[Any, ...]] = MappingProxyType({
    "module": (nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.ReLU6, nn.PReLU,
               nn.Softplus, nn.Mish, nn.Hardtanh, nn.SELU, nn.CELU, nn.Hardsigmoid, nn.GLU, nn.Softmax,
               nn.LogSoftmax),
    "function": (torch.sigmoid, torch.tanh, F.gelu, F.elu, F.leaky_relu, F.silu, F.hardswish, F.relu6, F.prelu,
                 F.softplus, F.mish, F.hardtanh, F.selu, F.celu, F.hardsigmoid, F.glu, F.softmax, F.log_softmax,
                 torch.softmax, F.sigmoid, F.tanh),
    "method": ("sigmoid", "tanh", "softmax", "log_softmax"),
})


def _is_other_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), NOT_RELU["module"])
    if node.op == "call_function":
        return _contains(NOT_RELU["function"], node.target)
    return node.target in NOT_RELU["method"]


def _contains(items: Iterable[Any], target: object) -> bool:
    return any(item is target for item in items)
