"""Programs written by `torch.export.save` (`.pt2`), turned into the torch.fx vocabulary that cnnmod traces.

An exported program is a graph of ATen operators (`aten.conv2d`, `aten.batch_norm`, `aten.relu`, ...) with the
weights as inputs. cnnmod's tracer, backtracking and parent files speak torch-level fx (`nn.Conv2d` modules,
`torch.relu`, `operator.add`, ...), so each operator is rewritten into its torch-level equivalent: convolutions,
linear layers and BatchNorm become modules holding the program's weights (so BatchNorm folds as usual), the
rest become the functions and methods they came from. An operator without an equivalent is refused, naming it.

The rewritten graph is checked against the program itself on a random input before it is returned.

Loading a `.pt2` file unpickles parts of it, as `torch.export.load` does: open only files you trust.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

__all__ = ["ExportedModel", "from_exported", "load_exported"]

aten = torch.ops.aten
_INT_MAX = 2**62  # slice ends at or above this mean "to the end"


@dataclass(frozen=True)
class ExportedModel:
    """A program rewritten as a GraphModule; `input_shape` is one sample's (C, H, W), None where not fixed."""

    graph: fx.GraphModule
    input_shape: tuple[int | None, ...]


def load_exported(path: str | os.PathLike[str]) -> ExportedModel:
    """Read a `torch.export.save` file (this unpickles, as torch.export.load does) and rewrite it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ModelError(f"cannot read {path.name} as a torch.export program: not a .pt2 archive (a zip file)")
    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch logs a traceback of its own before raising
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001  (torch raises many types for a file that is no program)
        raise ModelError(f"cannot read {path.name} as a torch.export program: {_one_line(e)}") from None
    finally:
        quiet.setLevel(level)
    return from_exported(program, path.name)


def from_exported(program: torch.export.ExportedProgram, where: str = "the exported program") -> ExportedModel:
    """Rewrite an ExportedProgram as a torch-level GraphModule that computes the same function."""
    model = _Translator(program, where).run()
    _check_same(program, model, where)
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _Tuple:
    """A multi-output operator (BatchNorm, max-pool with indices): only the outputs in `items` can be used."""

    def __init__(self, items: dict[int, fx.Node], op: str) -> None:
        self.items = items
        self.op = op


@functools.cache
def _reserved() -> frozenset[str]:
    probe = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(dir(probe)) | frozenset(vars(probe))


_NOT_RELU = {"sigmoid", "tanh", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu",
             "celu", "mish", "softplus", "relu6", "prelu", "_prelu_kernel", "glu", "softmax", "_softmax",
             "log_softmax", "_log_softmax"}  # fmt: skip
_DROPPED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async",
            "sym_constrain_range"}  # fmt: skip
_IDENTITY = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "clone", "alias", "detach",
             "lift_fresh_copy", "contiguous"}  # fmt: skip


class _Translator:
    def __init__(self, program: torch.export.ExportedProgram, where: str) -> None:
        from torch.export.graph_signature import InputKind, OutputKind

        self.program = program
        self.where = where
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}
        self.tensors: dict[str, tuple[str, torch.Tensor]] = {}  # placeholder -> (qualified name, tensor)
        self.attrs: dict[str, fx.Node] = {}
        self.modules: dict[tuple[Any, ...], str] = {}
        self.names: set[str] = set()
        self.user_inputs: list[str] = []
        signature = program.graph_signature
        for spec in signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind == InputKind.USER_INPUT:
                self.user_inputs.append(str(name))
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = str(spec.target)
                tensor = program.state_dict.get(target)
                if tensor is None:
                    tensor = program.constants.get(target)
                if not isinstance(tensor, torch.Tensor):
                    raise ModelError(f"{where}: input '{target}' of the program holds no tensor")
                self.tensors[str(name)] = (target, _as_float32(tensor))
            else:
                raise ModelError(f"{where}: the program takes a {spec.kind.name.lower()} input, which cannot be "
                                 "decomposed")
        if len(self.user_inputs) != 1:
            raise ModelError(f"{where}: the program takes {len(self.user_inputs)} inputs; a classifier takes one "
                             "batch of images")
        user_outputs = [s for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
        if len(user_outputs) != 1 or len(signature.output_specs) != 1:
            raise ModelError(f"{where}: the program returns {len(user_outputs)} outputs or changes its buffers; "
                             "export a classifier in eval mode (model.eval()) that returns its logits")
        self.output_name = getattr(user_outputs[0].arg, "name", None)
        self.batch = ""
        self.handlers = self._handlers()

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> ExportedModel:
        input_shape: tuple[int | None, ...] = ()
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.tensors:
                    continue
                value = node.meta.get("val")
                if not isinstance(value, torch.Tensor) or value.dim() != 4:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ModelError(f"{self.where}: the program's input has shape {shape}, not (N, C, H, W)")
                self.batch = str(value.shape[0])
                input_shape = tuple(int(s) if isinstance(s, int) else None for s in value.shape[1:])
                self.env[node.name] = self.graph.placeholder("x")
            elif node.op == "call_function":
                self.env[node.name] = self._call(node)
            elif node.op == "output":
                result = self._value(node.args[0])
                if isinstance(result, (tuple, list)):
                    result = result[0] if len(result) == 1 else result
                if not isinstance(result, fx.Node):
                    raise ModelError(f"{self.where}: the program's output is not one tensor")
                self.graph.output(result)
            else:
                raise ModelError(f"{self.where}: node '{node.name}' ({node.op} {node.target}) cannot be decomposed")
        draft = fx.GraphModule(self.root, self.graph)
        draft.graph.eliminate_dead_code()
        draft.graph.lint()
        gm = fx.GraphModule(draft, draft.graph)  # holds only the layers and tensors the graph still uses
        gm.eval()
        return ExportedModel(gm, input_shape)

    # ------------------------------------------------------------------------------------------------------
    def _fail(self, node: fx.Node, why: str) -> ModelError:
        return ModelError(f"{self.where}: node '{node.name}' ({_op_name(node.target)}) {why}")

    def _value(self, a: Any) -> Any:
        """The new graph's value for an argument of the program's graph."""
        if isinstance(a, fx.Node):
            if a.name in self.tensors:
                return self._attr(a.name)
            if a.name not in self.env:
                raise ModelError(f"{self.where}: node '{a.name}' is used before it is defined")
            value = self.env[a.name]
            if isinstance(value, _Tuple):
                raise ModelError(f"{self.where}: all outputs of {value.op} are used; only the first is supported")
            return value
        if isinstance(a, (list, tuple)):
            return type(a)(self._value(v) for v in a)
        return a

    def _attr(self, placeholder: str) -> fx.Node:
        if placeholder not in self.attrs:
            target, tensor = self.tensors[placeholder]
            name = self._unique(target)
            self.root.register_buffer(name, tensor.clone())
            self.attrs[placeholder] = self.graph.get_attr(name)
        return self.attrs[placeholder]

    def _tensor(self, node: fx.Node, a: Any, what: str) -> torch.Tensor:
        if isinstance(a, fx.Node) and a.name in self.tensors:
            return self.tensors[a.name][1]
        raise self._fail(node, f"takes a {what} computed in the graph; cnnmod needs it stored as a weight")

    def _unique(self, qualified: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", qualified).strip("_") or "layer"
        if base[0].isdigit() or base in _reserved() or base.startswith("__"):
            base = f"m_{base}"
        name, i = base, 2
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def _module(self, key: tuple[Any, ...], qualified: str, build: Callable[[], nn.Module],
                *args: Any) -> fx.Node:
        if key not in self.modules:
            name = self._unique(qualified)
            self.root.add_module(name, build().eval())
            self.modules[key] = name
        return self.graph.call_module(self.modules[key], args)

    def _fn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def _method(self, name: str, *args: Any) -> fx.Node:
        return self.graph.call_method(name, args)

    # ------------------------------------------------------------------------------------------------------
    def _call(self, node: fx.Node) -> Any:
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            value = self.env.get(source.name) if isinstance(source, fx.Node) else None
            if isinstance(value, _Tuple):
                if not isinstance(index, int) or index not in value.items:
                    raise self._fail(node, f"uses output {index} of {value.op}; only the first is supported")
                return value.items[index]
            return self._fn(operator.getitem, self._value(source), self._value(index))
        if not isinstance(target, torch._ops.OpOverload):
            raise self._fail(node, "is not an ATen operator")
        base = target._schema.name.split("::")[-1]
        inplace = base.endswith("_") and not base.startswith("_")
        stem = base[:-1] if inplace else base
        a = _bind(target, node)
        if stem in _DROPPED:
            return None
        if stem in _IDENTITY:
            return self._value(next(iter(a.values())))
        if stem in _NOT_RELU:
            raise self._fail(node, "is not a ReLU; cnnmod decomposes ReLU networks (remove an output softmax "
                                   "from the model before exporting it, or replace the activation)")
        handler = self.handlers.get(target) or self.handlers.get(stem)
        if handler is None:
            raise self._fail(node, "has no equivalent that cnnmod can decompose (it takes convolutions, linear "
                                   "layers, BatchNorm, ReLU, pooling, additions, concatenation and reshapes)")
        result = handler(node, a)
        if inplace and isinstance(node.args[0], fx.Node) and isinstance(result, fx.Node):
            self.env[node.args[0].name] = result  # later readers of the mutated tensor read the result
        return result

    def _handlers(self) -> dict[Any, Callable[[fx.Node, dict[str, Any]], Any]]:
        v = self._value
        table: dict[Any, Callable[[fx.Node, dict[str, Any]], Any]] = {
            "conv1d": self._conv, "conv2d": self._conv, "convolution": self._conv,
            "linear": self._linear, "addmm": self._addmm, "mm": self._addmm,
            "batch_norm": self._batch_norm, "_native_batch_norm_legit_no_training": self._batch_norm,
            "relu": lambda n, a: self._fn(torch.relu, v(a["self"])),
            "add": lambda n, a: self._arith(operator.add, n, a),
            "sub": lambda n, a: self._arith(operator.sub, n, a),
            "rsub": lambda n, a: self._fn(operator.sub, v(a["other"]), self._scaled(v(a["self"]), a.get("alpha"))),
            "mul": lambda n, a: self._fn(operator.mul, v(a["self"]), v(a["other"])),
            "div": self._div,
            "max_pool2d": self._max_pool, "max_pool2d_with_indices": self._max_pool,
            "avg_pool2d": lambda n, a: self._fn(
                F.avg_pool2d, v(a["self"]), list(a["kernel_size"]), list(a["stride"]) or None, list(a["padding"]),
                bool(a["ceil_mode"]), bool(a["count_include_pad"]), a["divisor_override"]),
            "adaptive_avg_pool2d": lambda n, a: self._fn(F.adaptive_avg_pool2d, v(a["self"]),
                                                         list(a["output_size"])),
            "_adaptive_avg_pool2d": lambda n, a: self._fn(F.adaptive_avg_pool2d, v(a["self"]),
                                                          list(a["output_size"])),
            "adaptive_max_pool2d": lambda n, a: _Tuple(
                {0: self._fn(F.adaptive_max_pool2d, v(a["self"]), list(a["output_size"]))}, "adaptive_max_pool2d"),
            "mean": lambda n, a: (self._fn(torch.mean, v(a["self"]), list(a["dim"]), bool(a["keepdim"]))
                                  if a.get("dim") is not None else self._fn(torch.mean, v(a["self"]))),
            "sum": lambda n, a: (self._fn(torch.sum, v(a["self"]), list(a["dim"]), bool(a["keepdim"]))
                                 if a.get("dim") is not None else self._fn(torch.sum, v(a["self"]))),
            "flatten": lambda n, a: self._fn(torch.flatten, v(a["self"]), a["start_dim"], a["end_dim"]),
            "view": self._reshape, "reshape": self._reshape, "_unsafe_view": self._reshape,
            "cat": lambda n, a: self._fn(torch.cat, list(v(a["tensors"])), a["dim"]),
            "slice": self._slice,
            "select": lambda n, a: self._fn(operator.getitem, v(a["self"]),
                                            (slice(None),) * _dim(n, a["dim"]) + (a["index"],)),
            "pad": lambda n, a: self._fn(F.pad, v(a["self"]), list(a["pad"]), a["mode"], a["value"]),
            "constant_pad_nd": lambda n, a: self._fn(F.pad, v(a["self"]), list(a["pad"]), "constant",
                                                     float(a["value"])),
            "squeeze": lambda n, a: (self._method("squeeze", v(a["self"]), *_dims(a.get("dim")))),
            "unsqueeze": lambda n, a: self._method("unsqueeze", v(a["self"]), a["dim"]),
            "permute": lambda n, a: self._method("permute", v(a["self"]), list(a["dims"])),
            "transpose": lambda n, a: self._method("transpose", v(a["self"]), a["dim0"], a["dim1"]),
            "t": lambda n, a: self._method("transpose", v(a["self"]), 0, 1),
            "sym_size": lambda n, a: self._method("size", v(a["self"]), a["dim"]),
            "_to_copy": self._to_float, "to": self._to_float,
        }
        return table

    # ------------------------------------------------------------------------------------------------------
    def _conv(self, node: fx.Node, a: dict[str, Any]) -> fx.Node:
        weight = self._tensor(node, a["weight"], "weight")
        bias = None if a.get("bias") is None else self._tensor(node, a["bias"], "bias")
        dims = weight.dim() - 2
        if a.get("transposed"):
            raise self._fail(node, "is a transposed convolution, which cannot be decomposed")
        if dims not in (1, 2):
            raise self._fail(node, f"is a {dims}-D convolution; cnnmod decomposes 1-D and 2-D convolutions")
        groups = int(a["groups"])

        def tup(value: Any) -> Any:
            if isinstance(value, str):
                return value
            values = [int(x) for x in (value if isinstance(value, (list, tuple)) else [value])]
            return tuple(values * dims if len(values) == 1 else values)

        stride, padding, dilation = tup(a["stride"]), tup(a["padding"]), tup(a["dilation"])
        cls = nn.Conv1d if dims == 1 else nn.Conv2d

        def build() -> nn.Module:
            kernel: Any = tuple(int(k) for k in weight.shape[2:])
            conv = cls(weight.shape[1] * groups, weight.shape[0], kernel, stride=stride,
                       padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
            conv.weight = nn.Parameter(weight.clone())
            if bias is not None:
                conv.bias = nn.Parameter(bias.clone())
            return conv

        key = ("conv", a["weight"].name, getattr(a.get("bias"), "name", None), stride, padding, dilation, groups)
        return self._module(key, _owner(self.tensors[a["weight"].name][0]), build, self._value(a["input"]))

    def _linear_module(self, node: fx.Node, x: Any, w_arg: fx.Node, b_arg: Any) -> fx.Node:
        weight = self._tensor(node, w_arg, "weight")
        bias = None if b_arg is None else self._tensor(node, b_arg, "bias")
        if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
            raise self._fail(node, "has weights of shapes a linear layer cannot hold")

        def build() -> nn.Module:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight = nn.Parameter(weight.clone())
            if bias is not None:
                linear.bias = nn.Parameter(bias.clone())
            return linear

        key = ("linear", w_arg.name, getattr(b_arg, "name", None))
        return self._module(key, _owner(self.tensors[w_arg.name][0]), build, self._value(x))

    def _linear(self, node: fx.Node, a: dict[str, Any]) -> fx.Node:
        return self._linear_module(node, a["input"], a["weight"], a.get("bias"))

    def _addmm(self, node: fx.Node, a: dict[str, Any]) -> fx.Node:
        """`addmm(bias, x, weight.t())` and `mm(x, weight.t())`: what core ATen makes of a linear layer."""
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            raise self._fail(node, "scales its terms (beta, alpha), which cannot be decomposed")
        transposed = a["mat2"]
        ok = (isinstance(transposed, fx.Node) and transposed.op == "call_function"
              and _op_stem(transposed.target) in ("t", "permute", "transpose")
              and isinstance(transposed.args[0], fx.Node) and transposed.args[0].name in self.tensors
              and (_op_stem(transposed.target) != "permute" or list(transposed.args[1]) == [1, 0]))  # type: ignore[arg-type]
        if not ok:
            raise self._fail(node, "multiplies by a matrix that is not a stored weight (transposed)")
        return self._linear_module(node, a["mat1"], transposed.args[0], a.get("self"))

    def _batch_norm(self, node: fx.Node, a: dict[str, Any]) -> Any:
        if a.get("training"):
            raise self._fail(node, "runs BatchNorm in training mode; export the model after model.eval()")
        mean = self._tensor(node, a["running_mean"], "running mean")
        var = self._tensor(node, a["running_var"], "running variance")
        weight = None if a.get("weight") is None else self._tensor(node, a["weight"], "weight")
        bias = None if a.get("bias") is None else self._tensor(node, a["bias"], "bias")
        value = a["input"].meta.get("val") if isinstance(a["input"], fx.Node) else None
        dim = value.dim() if isinstance(value, torch.Tensor) else 4
        if dim not in (2, 3, 4):
            raise self._fail(node, f"normalises a {dim}-D tensor, which cannot be decomposed")
        cls = nn.BatchNorm2d if dim == 4 else nn.BatchNorm1d
        eps, momentum = float(a["eps"]), a.get("momentum")

        def build() -> nn.Module:
            bn = cls(mean.shape[0], eps=eps, momentum=0.1 if momentum is None else float(momentum),
                     affine=weight is not None)
            if weight is not None:
                bn.weight = nn.Parameter(weight.clone())
                bn.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros_like(weight))
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            return bn

        key = ("bn", a["running_mean"].name, eps)
        out = self._module(key, _owner(self.tensors[a["running_mean"].name][0]), build, self._value(a["input"]))
        return out if _op_stem(node.target) == "batch_norm" else _Tuple({0: out}, "batch_norm")

    def _max_pool(self, node: fx.Node, a: dict[str, Any]) -> Any:
        out = self._fn(F.max_pool2d, self._value(a["self"]), list(a["kernel_size"]), list(a["stride"]) or None,
                       list(a["padding"]), list(a["dilation"]), bool(a["ceil_mode"]))
        return _Tuple({0: out}, "max_pool2d_with_indices") if "indices" in _op_stem(node.target) else out

    def _to_float(self, node: fx.Node, a: dict[str, Any]) -> Any:
        if a.get("dtype") not in (None, torch.float32):
            raise self._fail(node, f"converts to {a.get('dtype')}; cnnmod runs parents in float32")
        return self._value(a["self"])

    def _scaled(self, value: Any, alpha: Any) -> Any:
        return value if alpha in (None, 1) else self._fn(operator.mul, value, alpha)

    def _arith(self, fn: Callable[[Any, Any], Any], node: fx.Node, a: dict[str, Any]) -> fx.Node:
        return self._fn(fn, self._value(a["self"]), self._scaled(self._value(a["other"]), a.get("alpha")))

    def _div(self, node: fx.Node, a: dict[str, Any]) -> fx.Node:
        if a.get("rounding_mode") is not None:
            raise self._fail(node, "divides with rounding, which cannot be decomposed")
        return self._fn(operator.truediv, self._value(a["self"]), self._value(a["other"]))

    def _slice(self, node: fx.Node, a: dict[str, Any]) -> Any:
        start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
        if isinstance(end, int) and end >= _INT_MAX:
            end = None
        if start in (None, 0) and end is None and step in (None, 1):
            return self._value(a["self"])
        index = (slice(None),) * _dim(node, a["dim"]) + (slice(self._value(start), self._value(end), step),)
        return self._fn(operator.getitem, self._value(a["self"]), index)

    def _reshape(self, node: fx.Node, a: dict[str, Any]) -> fx.Node:
        """A reshape keeps the batch free: the program was traced at one batch size, cnnmod runs others."""
        source = a["self"]
        before = source.meta.get("val") if isinstance(source, fx.Node) else None
        after = node.meta.get("val")
        shape = self._value(list(a["size"] if "size" in a else a["shape"]))
        if (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() >= 1
                and after.dim() >= 1 and str(before.shape[0]) == str(after.shape[0]) == self.batch
                and all(isinstance(s, int) for s in after.shape[1:])):
            shape = [-1, *(int(s) for s in after.shape[1:])]
        return self._fn(torch.reshape, self._value(source), tuple(shape))


def _bind(op: torch._ops.OpOverload, node: fx.Node) -> dict[str, Any]:
    """The operator's arguments by name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(op._schema.arguments):  # keyword-only arguments come last in a schema
        if not arg.kwarg_only and i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _dim(node: fx.Node, dim: int) -> int:
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    rank = value.dim() if isinstance(value, torch.Tensor) else 4
    return dim % rank if dim < 0 else dim


def _dims(dim: Any) -> tuple[Any, ...]:
    if dim is None:
        return ()
    return (tuple(dim),) if isinstance(dim, (list, tuple)) else (dim,)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def _op_stem(target: Any) -> str:
    return _op_name(target).removeprefix("aten.").rstrip("_") if isinstance(target, torch._ops.OpOverload) else ""


def _owner(qualified: str) -> str:
    """`features.0.weight` -> `features.0`: the layer a weight belongs to."""
    owner, _, _ = qualified.rpartition(".")
    return owner or qualified


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return tensor.float() if tensor.is_floating_point() else tensor


def _check_same(program: torch.export.ExportedProgram, model: ExportedModel, where: str) -> None:
    """The rewritten graph computes what the program computes, on one random batch."""
    user = {getattr(s.arg, "name", None) for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    value = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user).meta.get("val")
    if not all(isinstance(s, int) for s in value.shape[1:]):
        return  # an input size that is not fixed: checked when cnnmod traces it at the size it is given
    batch = int(value.shape[0]) if isinstance(value.shape[0], int) else 2
    x = torch.randn(batch, *(int(s) for s in value.shape[1:]), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = program.module()(x)
            got = model.graph(x)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{where}: the program does not run on a random input: {_one_line(e)}") from None
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        raise ModelError(f"{where}: cnnmod's rewrite of the program returns another shape; please report it")
    difference = float((expected.float() - got.float()).abs().max()) if expected.numel() else 0.0
    if difference > 1e-4 * (1.0 + float(expected.abs().max())):
        raise ModelError(f"{where}: cnnmod's rewrite of the program differs from it by {difference:.3g}; "
                         "please report it")
