"""Every way a model comes into cnnmod, as a Parent: what `MODEL` may be on the command line.

- a cnnmod model file (`cnnmod train` writes them: architecture, classes and input spec inside);
- a parent file (`cnnmod import` writes them: the traced graph as data, classes and input spec inside) or a
  store folder (its parent);
- `FILE.py:NAME` or `package.module:NAME`: a user's `nn.Module` class or a function returning one, with
  `weights` (a state dict: `.pt`/`.pth`/`.th` read with `weights_only=True`, or `.safetensors`);
- a `.pt2` file written by `torch.export.save` (loading one unpickles, as torch.export.load does);
- a zoo architecture (`resnet20`, `resnet110`, any CIFAR ResNet of depth 6n+2) with `weights`, or a checkpoint
  of one with `arch`.

The input spec (size, channels, per-channel mean and std) comes from the file where the file holds one, else
from the flags, else from the model (a `.pt2` program's input, the first convolution's channels), the data's
image size, and the zoo's defaults.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..engine.inputs import MAX_CHANNELS, InputSpec
from ..engine.modules import Parent
from ..errors import CnnmodError, ModelError

__all__ = ["MAX_INPUT_SIDE", "InputOptionError", "ModelSource", "describe_spec", "make_input_spec", "open_model",
           "parse_input_size"]

MAX_INPUT_SIDE = 4096


class InputOptionError(ModelError):
    """An input flag whose value does not fit the model (e.g. 3 means for a 1-channel model)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.reason = message


@dataclass(frozen=True)
class ModelSource:
    """MODEL as the user gave it, with the flags that say how to read it and what input it takes."""

    model: str
    arch: str | None = None
    weights: Path | None = None
    input_size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __str__(self) -> str:
        return self.model if self.weights is None else f"{self.model} --weights {self.weights}"

    def input_flags(self) -> list[str]:
        """The input flags given (they cannot apply to a file that holds its own input spec)."""
        names = {"input_size": "--input-size", "channels": "--channels", "mean": "--mean", "std": "--std"}
        return [flag for f in fields(self) if (flag := names.get(f.name)) and getattr(self, f.name) is not None]


def parse_input_size(text: str) -> tuple[int, int]:
    """`32` -> (32, 32); `224x160` -> (224, 160). ValueError says what is wrong."""
    parts = str(text).strip().lower().replace("*", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a size: write H or HxW (e.g. 32 or 224x160)")
    sides = [int(p) for p in parts]
    if any(not 1 <= s <= MAX_INPUT_SIDE for s in sides):
        raise ValueError(f"{text!r} is not a size between 1 and {MAX_INPUT_SIDE} pixels")
    return (sides[0], sides[-1])


def describe_spec(spec: InputSpec) -> str:
    """`3x32x32, mean 0.485,0.456,0.406, std 0.229,0.224,0.225`"""
    def numbers(values: Sequence[float]) -> str:
        return ",".join(f"{v:g}" for v in values)

    return (f"{spec.channels}x{spec.size[0]}x{spec.size[1]}, mean {numbers(spec.mean)}, "
            f"std {numbers(spec.std)}")


# --------------------------------------------------------------------------------------------------------------


def open_model(source: ModelSource, classes: Sequence[str] | None = None, *,
               default_size: tuple[int, int] | None = None, default_channels: int | None = None,
               allow_random: bool = False) -> Parent:
    """The parent that `source` names.

    `classes` name the model's outputs where the file does not (the dataset's classes); without them outputs
    are numbered. `default_size` and `default_channels` (the data's images) apply where neither flags nor the
    model fix the input. `allow_random` lets a zoo name go without weights (to inspect an architecture).
    """
    from .usercode import parse_code_ref

    text = source.model
    path = Path(text).expanduser()
    ref = parse_code_ref(text)
    if ref is not None and not path.exists():
        return _from_code(source, ref, classes, default_size, default_channels)
    if path.is_dir():
        return _from_store(source, path)
    if path.is_file():
        return _from_file(source, path, classes, default_size, default_channels)
    if "/" in text or "\\" in text or "." in text:
        raise ModelError(f"MODEL {text} does not exist (a model file, FILE.py:NAME, package.module:NAME or a "
                         "zoo architecture: cnnmod inspect --models)")
    if source.arch is not None and source.arch != text:
        raise ModelError(f"MODEL names architecture {text}, --arch {source.arch}: give one")
    from ..zoo import model_info

    try:
        model_info(text)
    except ModelError as e:
        raise ModelError(f"MODEL {text} is no file, and {e}") from None
    return _from_zoo(source, text, source.weights, classes, allow_random)


def _no_flags(source: ModelSource, what: str, spec: InputSpec | None = None) -> None:
    flags = source.input_flags() + (["--weights"] if source.weights is not None else [])
    if flags:
        held = f" ({describe_spec(spec)})" if spec is not None else ""
        raise ModelError(f"{', '.join(flags)} cannot apply: {source.model} is {what} that holds its own weights and "
                         f"input spec{held}")


def _numbered(model: nn.Module, spec: InputSpec, where: str) -> tuple[str, ...]:
    """Class names 0..K-1 for a model that names none: K from one forward pass."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, spec.channels, *spec.size))
    except Exception as e:  # noqa: BLE001  (the user's model may raise anything)
        raise ModelError(f"{where} fails on {spec.channels}x{spec.size[0]}x{spec.size[1]} inputs: "
                         f"{_one_line(e)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError(f"{where} does not return logits of shape (batch, classes)")
    return tuple(str(i) for i in range(out.shape[1]))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _per_channel(values: tuple[float, ...] | None, channels: int, option: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise InputOptionError(option, f"gives {len(values)} values for a {channels}-channel input: give one value"
                                       + ("" if channels == 1 else f" or {channels}"))
    return tuple(values)


def _spec(source: ModelSource, size: tuple[int, int] | None, channels: int, where: str) -> InputSpec:
    size = source.input_size or size
    if size is None:
        raise ModelError(f"{where} does not say its input size: give --input-size H or HxW")
    return make_input_spec(size, channels, source.mean, source.std)


def make_input_spec(size: tuple[int, int], channels: int, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> InputSpec:
    """An input spec; `mean` and `std` hold one value (for every channel) or one per channel, and default to
    ImageNet's for 3 channels and 0.5 otherwise. InputOptionError names the flag whose value does not fit."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise InputOptionError("--channels", f"{channels} is not between 1 and {MAX_CHANNELS}")
    if not all(1 <= int(s) <= MAX_INPUT_SIDE for s in size):
        raise InputOptionError("--input-size", f"{size[0]}x{size[1]} is not between 1 and {MAX_INPUT_SIDE} pixels")
    default = InputSpec.default(size, channels)
    mean = _per_channel(mean, channels, "--mean") or default.mean
    std = _per_channel(std, channels, "--std") or default.std
    if any(not math.isfinite(s) or s <= 0 for s in std) or any(not math.isfinite(m) for m in mean):
        raise InputOptionError("--std", "must be finite and positive, and --mean finite")
    return InputSpec((int(size[0]), int(size[1])), channels, tuple(float(m) for m in mean),
                     tuple(float(s) for s in std))


def _channels(source: ModelSource, model: nn.Module | None, default: int | None) -> int:
    """--channels, else the first convolution's, else as many as --mean or --std give, else the data's, else 3."""
    if source.channels is not None:
        return source.channels
    if model is not None:
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                return int(m.in_channels)
    for values in (source.mean, source.std):
        if values is not None and len(values) > 1:
            return len(values)
    return default or 3


def _parent(model: nn.Module, spec: InputSpec, classes: Sequence[str] | None, arch: str, where: str) -> Parent:
    names = tuple(classes) if classes else _numbered(model, spec, where)
    return Parent.from_model(model.eval(), spec, names, arch)


# --------------------------------------------------------------------------------------------------------------


def _from_store(source: ModelSource, path: Path) -> Parent:
    from .store import load_parent

    if not (path / "manifest.json").is_file():
        raise ModelError(f"{path} is a folder, not a model (nor a cnnmod store)")
    parent = load_parent(path)
    _no_flags(source, "a store", parent.input_spec)
    return parent


def _from_code(source: ModelSource, ref: object, classes: Sequence[str] | None, default_size: tuple[int, int] | None,
               default_channels: int | None) -> Parent:
    from .usercode import CodeRef, build_user_model, describe

    assert isinstance(ref, CodeRef)
    if source.arch is not None:
        raise ModelError(f"--arch names a zoo architecture; {ref} is the user's code: leave --arch out")
    model = build_user_model(ref)
    if source.weights is not None:
        load_state(model, source.weights, describe(ref))
    spec = _spec(source, default_size, _channels(source, model, default_channels), str(ref))
    return _parent(model, spec, classes, describe(ref), str(ref))


def load_state(model: nn.Module, weights: Path, arch: str) -> nn.Module:
    """Load a state dict file into `model` strictly; ModelError names a few missing and unexpected keys."""
    from ..zoo.checkpoints import _check_fits, _read_state_dict

    state = _read_state_dict(Path(weights))
    _check_fits(model, state, arch, f"weights {Path(weights).name}")
    model.load_state_dict(state, strict=False)
    return model


def _from_zoo(source: ModelSource, arch: str, weights: Path | None, classes: Sequence[str] | None,
              allow_random: bool) -> Parent:
    from ..zoo import create_model, load_weights, model_info

    info = model_info(arch)
    if weights is None and not allow_random:
        raise ModelError(f"{arch} is an architecture: give its weights with --weights FILE")
    num_classes = len(classes) if classes else (head_size(weights, arch) if weights is not None else 10)
    channels = source.channels or info.in_channels  # a zoo model's channels change only with --channels
    model = create_model(arch, num_classes=num_classes, in_channels=channels)
    if weights is not None:
        load_weights(model, weights)
    spec = _spec(source, info.input_size, channels, arch)
    return _parent(model, spec, classes, arch, arch)


def head_size(path: Path, arch: str) -> int:
    """The number of classes of a checkpoint of a zoo architecture: rows of its last Linear layer."""
    from ..zoo import create_model
    from ..zoo.checkpoints import _read_state_dict

    model = create_model(arch, num_classes=10)
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    state = _read_state_dict(Path(path))
    weight = state.get(f"{last}.weight")
    if weight is None:
        raise ModelError(f"{Path(path).name} has no '{last}.weight': it is not a {arch} checkpoint")
    return int(weight.shape[0])


# --------------------------------------------------------------------------------------------------------------


def _from_file(source: ModelSource, path: Path, classes: Sequence[str] | None,
               default_size: tuple[int, int] | None, default_channels: int | None) -> Parent:
    metadata = _safetensors_metadata(path)
    if metadata is not None:
        return _from_safetensors(source, path, metadata, classes, default_size, default_channels)
    if _is_exported(path):
        return _from_exported(source, path, classes, default_size)
    if source.arch:
        if source.weights is not None:
            raise ModelError(f"{path.name} and --weights {source.weights.name} both give weights: give one")
        return _from_zoo(source, source.arch, path, classes, False)
    _readable_checkpoint(path)
    raise ModelError(f"{path.name} is a plain checkpoint (weights without code): name its architecture with "
                     "--arch, or give MODEL as FILE.py:NAME --weights with the code that defines it")


def _readable_checkpoint(path: Path) -> None:
    from ..zoo.checkpoints import _read_state_dict

    try:
        _read_state_dict(path)
    except CnnmodError as e:
        raise ModelError(f"{path.name} is no model cnnmod reads: not a cnnmod model or parent file, not a .pt2 "
                         f"program, and not a checkpoint ({_one_line(e)})") from None


def _damaged(path: Path, what: str, why: str) -> ModelError:
    return ModelError(f"{path.name} is a damaged {what} ({why}): restore it or write it again")


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file (read from its header only); None for a file of another format."""
    claims = path.suffix == ".safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            first = f.read(1)
            if len(head) < 8 or first != b"{":
                if claims:
                    raise _damaged(path, "safetensors file", "no safetensors header")
                return None
            (size,) = struct.unpack("<Q", head)
            if not 0 < size < 100_000_000:
                if claims:
                    raise _damaged(path, "safetensors file", "its header length is impossible")
                return None
            rest = f.read(size - 1)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    if len(rest) < size - 1:
        raise _damaged(path, "safetensors file", "it ends inside its header")
    try:
        header = json.loads(first + rest)
    except (ValueError, UnicodeDecodeError):
        raise _damaged(path, "safetensors file", "its header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _from_safetensors(source: ModelSource, path: Path, metadata: dict[str, str], classes: Sequence[str] | None,
                      default_size: tuple[int, int] | None, default_channels: int | None) -> Parent:
    from safetensors import SafetensorError, safe_open

    from ..zoo.checkpoints import MODEL_FILE_FORMAT
    from .graphio import METADATA_KEY as GRAPH_KEY
    from .parentfile import PARENT_KEY

    if PARENT_KEY in metadata:
        what = "cnnmod parent file"
    elif metadata.get("format") == MODEL_FILE_FORMAT or "arch" in metadata:
        what = "cnnmod model file"
    elif GRAPH_KEY in metadata:
        what = "cnnmod graph file"
    else:
        what = "safetensors file"
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, what, _one_line(e)) from None
    if what == "cnnmod parent file":
        from .parentfile import load_parent_file

        parent = load_parent_file(path)
        _no_flags(source, "a parent file", parent.input_spec)
        return parent
    if what == "cnnmod model file":
        from ..zoo import load_model_file, read_model_file_info

        info = read_model_file_info(path)
        if source.arch and source.arch != info.arch:
            raise ModelError(f"{path.name} holds a {info.arch}, not a {source.arch}")
        _no_flags(source, "a cnnmod model file", info.input_spec)
        model, info = load_model_file(path)
        return Parent.from_model(model, info.input_spec, info.classes, info.arch)
    if what == "cnnmod graph file":  # a store's parent.safetensors: the graph without classes or input spec
        from .graphio import load_graph

        if source.weights is not None or source.arch:
            raise ModelError(f"{path.name} is a cnnmod graph with its weights: --weights and --arch do not apply")
        graph = load_graph(path)
        spec = _spec(source, default_size, _channels(source, graph, default_channels), path.name)
        return _parent(graph, spec, classes, path.stem, path.name)
    if source.arch:
        if source.weights is not None:
            raise ModelError(f"{path.name} and --weights {source.weights.name} both give weights: give one")
        return _from_zoo(source, source.arch, path, classes, False)
    raise ModelError(f"{path.name} is a plain checkpoint (weights without code): name its architecture with "
                     "--arch, or give MODEL as FILE.py:NAME --weights with the code that defines it")


def _is_exported(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return path.suffix == ".pt2"
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "archive_format" or n.endswith("/archive_format") for n in z.namelist())
    except Exception:  # noqa: BLE001 - a damaged directory raises anything (undecodable names, odd versions)
        return path.suffix == ".pt2"


def _from_exported(source: ModelSource, path: Path, classes: Sequence[str] | None,
                   default_size: tuple[int, int] | None) -> Parent:
    from .exported import load_exported

    if source.weights is not None or source.arch:
        raise ModelError(f"{path.name} is a torch.export program with its weights: --weights and --arch do not "
                         "apply")
    exported = load_exported(path)
    channels, height, width = exported.input_shape
    if source.channels is not None and channels is not None and source.channels != channels:
        raise InputOptionError("--channels", f"is {source.channels}, but {path.name} takes {channels}-channel "
                                             "inputs")
    size = (height, width) if height is not None and width is not None else default_size
    spec = _spec(source, size, channels or _channels(source, exported.graph, None), path.name)
    return _parent(exported.graph, spec, classes, path.stem, path.name)
