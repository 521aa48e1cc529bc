"""Save and load a traced parent model as data: no pickles, no user code needed to load it.

A `torch.fx.GraphModule` is described by a JSON document (every node in order, and each leaf module's
type and constructor arguments) plus its tensors. Only the operations of the op table (cnnmod.engine.ops) can be
stored, under the stable names the table gives them; loading looks every name up in the same table, never
imports or resolves a name taken from the file, and checks every identifier that fx would put into generated
code.
"""

from __future__ import annotations

import functools
import json
import keyword
import math
import operator
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from cnnmod.engine import ops
from cnnmod.errors import StoreError
from cnnmod.storage.fileio import atomic_save_safetensors, load_safetensors

__all__ = ["check_storable", "graph_from_data", "graph_to_data", "load_graph", "save_graph"]

FORMAT = "cnnmod.graph"
VERSION = 1
METADATA_KEY = "cnnmod.graph"

_STORABLE_HINT = (
    "only standard layers (Conv, Linear, ReLU, pooling, padding, Flatten, Dropout, Identity, BatchNorm) "
    "and common tensor functions, as listed in cnnmod.engine.ops, can be stored"
)

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        str(dtype).removeprefix("torch."): dtype
        for dtype in (
            torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
            torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
        )
    }
)  # fmt: skip
_MEMORY_FORMATS: Mapping[str, torch.memory_format] = MappingProxyType(
    {
        "contiguous_format": torch.contiguous_format,
        "channels_last": torch.channels_last,
        "preserve_format": torch.preserve_format,
    }
)
_OPS = frozenset({"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"})
_PATH_PART = re.compile(r"[A-Za-z0-9_]+")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# ----------------------------------------------------------------------------------------------------
# Names that fx puts into generated code: checked on save and on load.


@functools.cache
def _reserved_attributes() -> frozenset[str]:
    """Attribute names of a GraphModule instance, which no stored module or tensor may shadow."""
    probe = GraphModule(nn.Module(), Graph())
    return frozenset(dir(probe)) | frozenset(vars(probe))


def _is_identifier(name: object) -> bool:
    return isinstance(name, str) and name.isidentifier() and name.isascii() and not keyword.iskeyword(name)


def _check_path(path: object, what: str) -> str:
    """A dotted attribute path such as `layer1.0.conv1`: plain ASCII parts that shadow nothing."""
    if not isinstance(path, str) or not path:
        raise StoreError(f"{what} has an invalid attribute path {path!r}")
    for part in path.split("."):
        if not _PATH_PART.fullmatch(part) or part.startswith("__") or part in _reserved_attributes():
            raise StoreError(f"{what} has an invalid attribute path {path!r} (part {part!r})")
    return path


# ----------------------------------------------------------------------------------------------------
# Arguments <-> JSON. Everything that is not a JSON scalar is a one-key object naming its kind.


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, torch.Size):
        return {"size": [int(s) for s in value]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, where) for v in value]}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in _DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        for name, fmt in _MEMORY_FORMATS.items():
            if value is fmt:
                return {"memory_format": name}
    raise StoreError(f"{where} has an argument of type {type(value).__name__} that cannot be stored")


def _decode(value: Any, env: Mapping[str, Node] | None, where: str) -> Any:
    """Inverse of `_encode`; node references must be in `env` (nodes defined earlier), or no env at all."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise StoreError(f"{where} has a malformed argument {_short(value)}")
    ((kind, body),) = value.items()
    if kind == "node":
        if env is None or not isinstance(body, str) or body not in env:
            raise StoreError(f"{where} refers to node {_short(body)}, which is not defined before it")
        return env[body]
    if kind in ("tuple", "list", "slice") and isinstance(body, list):
        items = [_decode(v, env, where) for v in body]
        if kind == "tuple":
            return tuple(items)
        if kind == "list":
            return items
        if len(items) == 3:
            return slice(*items)
    elif kind == "float" and body in _NONFINITE:
        return _NONFINITE[body]
    elif kind == "size" and isinstance(body, list) and all(type(s) is int for s in body):
        return torch.Size(body)
    elif kind == "ellipsis" and body is True:
        return Ellipsis
    elif kind == "dtype" and body in _DTYPES:
        return _DTYPES[body]
    elif kind == "memory_format" and body in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[body]
    raise StoreError(f"{where} has an argument of unknown kind {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------------
# Saving


def _function_name(target: Any) -> str | None:
    op = ops.TABLE.for_target("function", target)
    return op.name if op is not None else None


def _refused_use(node: Node, op: ops.Op | None, where: str) -> None:
    """A supported target used in a way the table refuses (e.g. `getattr(x, "T")`)."""
    reason = op.accepts(node) if op is not None and op.accepts is not None else None
    if reason is not None:
        raise StoreError(f"{where} {reason}, which cannot be stored")


def _describe_target(node: Node) -> str:
    target = node.target
    return getattr(target, "__module__", "") + "." + getattr(target, "__qualname__", repr(target))


def _encode_target(node: Node, gm: GraphModule, modules: dict[str, Any]) -> str:
    where = f"node '{node.name}'"
    if node.op == "placeholder":
        if not _is_identifier(node.target):
            raise StoreError(f"{where} is an input named {node.target!r}, which cannot be stored")
        return str(node.target)
    if node.op == "output":
        return "output"
    if node.op == "call_function":
        name = _function_name(node.target)
        if name is None:
            raise StoreError(
                f"{where} calls {_describe_target(node)}, which cannot be stored: {_STORABLE_HINT}"
            )
        _refused_use(node, ops.TABLE.for_target("function", node.target), where)
        return name
    if node.op == "call_method":
        method = ops.TABLE.for_target("method", node.target)
        if method is None:
            raise StoreError(
                f"{where} calls method .{node.target}(), which cannot be stored: {_STORABLE_HINT}"
            )
        _refused_use(node, method, where)
        return str(node.target)
    target = _check_path(node.target, where)
    if node.op == "call_module":
        module = gm.get_submodule(target)
        spec = ops.TABLE.for_target("module", type(module))
        if spec is None:
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise StoreError(
                f"{where} calls module '{target}' of type {kind}, which cannot be stored: {_STORABLE_HINT}"
            )
        type_name = spec.name
        config = {k: _encode(v, where) for k, v in spec.module_config(module).items()}
        expected = set(_build_module(type_name, spec, config, where).state_dict())
        if set(module.state_dict()) != expected:
            raise StoreError(
                f"{where} calls module '{target}' ({type_name}) that holds extra or missing tensors "
                f"{sorted(set(module.state_dict()) ^ expected)}, which cannot be stored"
            )
        modules[target] = {"type": type_name, "config": config, "training": module.training}
    return target


def _storable_tensor(tensor: torch.Tensor, seen: set[int], where: str) -> torch.Tensor:
    """A CPU, contiguous tensor that shares memory with no other tensor saved (safetensors needs that)."""
    if tensor.layout != torch.strided or str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
        raise StoreError(f"{where} is a {tensor.layout} {tensor.dtype} tensor, which cannot be stored")
    tensor = tensor.detach().cpu()
    storage = tensor.untyped_storage()
    if (
        not tensor.is_contiguous()
        or storage.data_ptr() in seen
        or storage.nbytes() != tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        storage = tensor.untyped_storage()
    if tensor.numel():
        seen.add(storage.data_ptr())
    return tensor


def graph_to_data(gm: GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A JSON-able description of `gm` and its tensors by qualified name.

    Raises StoreError naming the first node that uses something outside the op table.
    """
    desc, raw = _describe(gm)
    seen: set[int] = set()
    tensors = {name: _storable_tensor(t, seen, f"tensor '{name}'") for name, t in sorted(raw.items())}
    return desc, tensors


def check_storable(gm: GraphModule) -> None:
    """Raise StoreError, naming the node, if `gm` cannot be stored; copies no tensor."""
    _, raw = _describe(gm)
    for name, tensor in raw.items():
        if tensor.layout != torch.strided or str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
            raise StoreError(f"tensor '{name}' is a {tensor.layout} {tensor.dtype} tensor, which cannot be stored")


def _describe(gm: GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON-able description of `gm` and its tensors as they are (any device, maybe sharing memory)."""
    if not isinstance(gm, GraphModule):
        raise StoreError(f"only a torch.fx.GraphModule can be stored, not {type(gm).__name__}")
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        raise StoreError("a GraphModule traced with pytree inputs (concrete_args) cannot be stored")
    modules: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    raw: dict[str, torch.Tensor] = {}
    nodes = []
    for node in gm.graph.nodes:  # modules first, so that get_attr can tell module tensors from others
        if node.op == "call_module":
            _encode_target(node, gm, modules)
    for node in gm.graph.nodes:
        where = f"node '{node.name}'"
        if node.op not in _OPS or not _is_identifier(node.name):
            raise StoreError(f"{where} ({node.op}) cannot be stored")
        target = _encode_target(node, gm, modules)
        if node.op == "get_attr":
            owner, _, field = target.rpartition(".")
            if owner in modules:  # e.g. `self.conv.weight` where `self.conv` is also called
                if field not in gm.get_submodule(owner).state_dict():
                    raise StoreError(f"{where} reads '{target}', which is not a tensor of its module")
            else:
                value = operator.attrgetter(target)(gm)
                if not isinstance(value, torch.Tensor):
                    raise StoreError(f"{where} reads '{target}', a {type(value).__name__}, not a tensor")
                is_param = isinstance(value, nn.Parameter)
                attrs[target] = {
                    "kind": "parameter" if is_param else "buffer",
                    "requires_grad": bool(value.requires_grad) if is_param else False,
                }
                raw[target] = value
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": [_encode(a, where) for a in node.args],
                "kwargs": {_check_kwarg(k, where): _encode(v, where) for k, v in node.kwargs.items()},
            }
        )
    for path in modules:
        for key, tensor in gm.get_submodule(path).state_dict().items():
            raw[f"{path}.{key}"] = tensor
    desc = {
        "format": FORMAT,
        "version": VERSION,
        "training": gm.training,
        "modules": modules,
        "attrs": attrs,
        "nodes": nodes,
    }
    return desc, raw


def _check_kwarg(key: object, where: str) -> str:
    if not _is_identifier(key):
        raise StoreError(f"{where} has an invalid keyword argument name {_short(key)}")
    return str(key)


def save_graph(gm: GraphModule, path: Path | str) -> str:
    """Write `gm` to one safetensors file (description in its metadata) atomically; returns its sha256."""
    desc, tensors = graph_to_data(gm)
    text = json.dumps(desc, allow_nan=False, separators=(",", ":"))
    return atomic_save_safetensors(path, tensors, {METADATA_KEY: text})


# ----------------------------------------------------------------------------------------------------
# Loading


def _build_module(type_name: str, spec: ops.Op, config: Any, where: str) -> nn.Module:
    """The module described by `config`, with its tensors on the meta device (no memory, no RNG use)."""
    keys = spec.config_keys()
    if not isinstance(config, dict) or set(config) != keys:
        raise StoreError(
            f"{where} has a {type_name} config with keys {_short(config)}, expected {sorted(keys)}"
        )
    kwargs = {k: _decode(v, None, where) for k, v in config.items()}
    try:
        with torch.device("meta"):
            return spec.target(**kwargs)  # type: ignore[operator]
    except (TypeError, ValueError, RuntimeError) as e:
        raise StoreError(f"{where} has a {type_name} config that does not build: {e}") from e


def _install(root: nn.Module, path: str, value: nn.Module | torch.Tensor, where: str) -> None:
    """Put a module, parameter or buffer at a dotted path under `root`, creating plain containers."""
    *parents, field = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            if part in owner._parameters or part in owner._buffers:
                raise StoreError(f"{where} lies inside tensor '{part}'")
            child = nn.Module()
            owner.add_module(part, child)
        elif type(child) is not nn.Module:
            raise StoreError(f"{where} lies inside module '{part}', which holds no other attributes")
        owner = child
    if field in owner._modules or field in owner._parameters or field in owner._buffers:
        raise StoreError(f"{where} is defined twice")
    try:
        if isinstance(value, nn.Module):
            owner.add_module(field, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(field, value)
        else:
            owner.register_buffer(field, value)
    except (KeyError, TypeError) as e:
        raise StoreError(f"{where} cannot be installed: {e}") from e


def _build_root(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, set[str]]:
    """A plain module tree holding every stored module and tensor; returns it and the tensor names used."""
    root = nn.Module()
    used: set[str] = set()
    modules, attrs = desc["modules"], desc["attrs"]
    if not isinstance(modules, dict) or not isinstance(attrs, dict):
        raise StoreError("the description's 'modules' and 'attrs' must be objects")
    for path, entry in modules.items():
        where = f"module '{path}'"
        _check_path(path, where)
        if not isinstance(entry, dict) or set(entry) != {"type", "config", "training"}:
            raise StoreError(f"{where} has a malformed entry {_short(entry)}")
        type_name = entry["type"]
        spec = ops.TABLE.for_name("module", type_name)
        if spec is None:
            raise StoreError(f"{where} has type {_short(type_name)}, which is not a storable layer")
        module = _build_module(type_name, spec, entry["config"], where)
        state = {}
        for key in module.state_dict():
            name = f"{path}.{key}"
            if name not in tensors:
                raise StoreError(f"{where} misses its tensor '{name}'")
            state[key] = tensors[name]
            used.add(name)
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            reason = " ".join(str(e).split())
            raise StoreError(f"{where} does not fit its tensors: {reason}") from e
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise StoreError(f"{where} has tensors that were not loaded")
        module.train(entry["training"] is True)
        _install(root, path, module, where)
    for path, entry in attrs.items():
        where = f"tensor '{path}'"
        _check_path(path, where)
        if (
            not isinstance(entry, dict)
            or set(entry) != {"kind", "requires_grad"}
            or entry["kind"] not in ("parameter", "buffer")
            or not isinstance(entry["requires_grad"], bool)
        ):
            raise StoreError(f"{where} has a malformed entry {_short(entry)}")
        if path not in tensors:
            raise StoreError(f"{where} is described but not stored")
        tensor = tensors[path]
        if entry["kind"] == "parameter":
            tensor = nn.Parameter(tensor, requires_grad=entry["requires_grad"])
        _install(root, path, tensor, where)
        used.add(path)
    return root, used


def _resolve_target(op: str, target: Any, root: nn.Module, desc: dict[str, Any], where: str) -> Any:
    if not isinstance(target, str):
        raise StoreError(f"{where} has a malformed target {_short(target)}")
    if op == "placeholder":
        if not _is_identifier(target) or target == "self":
            raise StoreError(f"{where} has an invalid input name {_short(target)}")
        return target
    if op == "output":
        if target != "output":
            raise StoreError(f"{where} has output target {_short(target)}")
        return target
    if op == "call_function":
        function = ops.TABLE.for_name("function", target)
        if function is None:
            raise StoreError(f"{where} calls {_short(target)}, which is not a storable function")
        return function.target
    if op == "call_method":
        if ops.TABLE.for_name("method", target) is None:
            raise StoreError(f"{where} calls method {_short(target)}, which is not a storable method")
        return target
    _check_path(target, where)
    if op == "call_module" and target not in desc["modules"]:
        raise StoreError(f"{where} calls module '{target}', which is not described")
    if op == "get_attr":
        owner, _, field = target.rpartition(".")
        known = target in desc["attrs"] or (
            owner in desc["modules"] and field in root.get_submodule(owner).state_dict()
        )
        if not known:
            raise StoreError(f"{where} reads '{target}', which is not a stored tensor")
    return target


def _build_graph(desc: dict[str, Any], root: nn.Module) -> Graph:
    nodes = desc["nodes"]
    if not isinstance(nodes, list):
        raise StoreError("the description's 'nodes' must be a list")
    graph = Graph()
    env: dict[str, Node] = {}
    outputs = 0
    for index, entry in enumerate(nodes):
        where = f"node #{index}"
        if not isinstance(entry, dict) or set(entry) != {"op", "name", "target", "args", "kwargs"}:
            raise StoreError(f"{where} is malformed: {_short(entry)}")
        op, name = entry["op"], entry["name"]
        if op not in _OPS:
            raise StoreError(f"{where} has unknown op {_short(op)}")
        if not _is_identifier(name) or name in env:
            raise StoreError(f"{where} has an invalid or repeated name {_short(name)}")
        where = f"node '{name}'"
        if outputs:
            raise StoreError(f"{where} follows the output node")
        if not isinstance(entry["args"], list) or not isinstance(entry["kwargs"], dict):
            raise StoreError(f"{where} has malformed args or kwargs")
        target = _resolve_target(op, entry["target"], root, desc, where)
        args = tuple(_decode(a, env, where) for a in entry["args"])
        kwargs = {_check_kwarg(k, where): _decode(v, env, where) for k, v in entry["kwargs"].items()}
        if op == "output":
            outputs += 1
            if len(args) != 1 or kwargs:
                raise StoreError(f"{where} must have exactly one argument")
        node = env[name] = graph.create_node(op, target, args, kwargs, name=name)
        if op in ("call_function", "call_method"):
            kind = "function" if op == "call_function" else "method"
            spec = ops.TABLE.for_name(kind, entry["target"])
            reason = spec.accepts(node) if spec is not None and spec.accepts is not None else None
            if reason is not None:
                raise StoreError(f"{where} {_short(reason)}, which is not allowed")
    if outputs != 1:
        raise StoreError("the graph has no output node")
    return graph


def graph_from_data(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GraphModule:
    """Rebuild the GraphModule that `graph_to_data` described; raises StoreError on anything inconsistent.

    Only whitelisted module types are constructed and only whitelisted functions are referenced.
    """
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise StoreError(f"the description is not a {FORMAT} document")
    if desc.get("version") != VERSION:
        raise StoreError(
            f"the description has version {_short(desc.get('version'))}, this cnnmod reads version {VERSION}"
        )
    if set(desc) != {"format", "version", "training", "modules", "attrs", "nodes"}:
        raise StoreError(f"the description has keys {sorted(desc)}, which do not match version {VERSION}")
    root, used = _build_root(desc, tensors)
    extra = sorted(set(tensors) - used)
    if extra:
        raise StoreError(f"the file holds tensors the description does not use: {_short(extra)}")
    graph = _build_graph(desc, root)
    try:
        graph.lint()
        gm = GraphModule(root, graph, class_name="GraphModule")
        gm.recompile()
    except (RuntimeError, SyntaxError, ValueError, TypeError, AttributeError) as e:
        raise StoreError(f"the graph does not rebuild: {' '.join(str(e).split())}") from e
    gm.train(desc["training"] is True)
    for path, entry in desc["modules"].items():
        gm.get_submodule(path).train(entry["training"] is True)
    return gm


def load_graph(path: Path | str, expected_sha256: str | None = None) -> GraphModule:
    """Load a GraphModule written by `save_graph`, checking its sha256 when given.

    Any problem with the file raises StoreError naming it.
    """
    path = Path(path)
    tensors, metadata = load_safetensors(path, expected_sha256)
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise StoreError(f"{path} holds no '{METADATA_KEY}' description: it is not a saved cnnmod model")
    try:
        desc = json.loads(text, parse_constant=_reject_constant)
        return graph_from_data(desc, tensors)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise StoreError(f"{path} has an unreadable description: {' '.join(str(e).split())}") from e
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
