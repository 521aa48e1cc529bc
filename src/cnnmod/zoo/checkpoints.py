"""Weights on disk: importing published checkpoints, and cnnmod's own model files.

Nothing here unpickles arbitrary objects: ``.th``/``.pt`` files are read with ``weights_only=True`` and
cnnmod model files are safetensors with JSON metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from cnnmod.engine.inputs import InputSpec
from cnnmod.errors import ModelError, StoreError
from cnnmod.storage.outputs import register_kind, safetensors_with_metadata, write_file
from cnnmod.zoo.registry import arch_of, create_model

MODEL_FILE_FORMAT = "cnnmod-model"
MODEL_FILE_VERSION = "1"

register_kind("model", folder=False, recognise=safetensors_with_metadata("format", MODEL_FILE_FORMAT))

_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError,
                SafetensorError)


@dataclass(frozen=True)
class ModelFileInfo:
    """What a cnnmod model file says about its model, besides the weights."""

    arch: str
    classes: tuple[str, ...]
    input_spec: InputSpec
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return path.suffix == ".safetensors"
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < 100_000_000


_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.th``/``.pt`` checkpoint (bare or under ``state_dict``, ``model_state_dict`` or ``model``;
    a ``module.`` prefix, as DataParallel writes it, removed) or of a ``.safetensors`` file."""
    if not path.is_file():
        raise StoreError(f"checkpoint {path} does not exist")
    try:
        if _is_safetensors(path):
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        obj = _unpickle(path)
    except _READ_ERRORS as e:
        raise StoreError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
    if isinstance(obj, Mapping):  # a training checkpoint: the weights under one of the usual keys
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        obj = obj if nested is None else nested
    if not isinstance(obj, Mapping) or not obj:
        raise StoreError(f"checkpoint {path} holds no state_dict (a mapping of names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise StoreError(f"checkpoint {path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        state[str(key).removeprefix("module.")] = value
    return state


def _unpickle(path: Path) -> object:
    """`torch.load` of weights only. Its unpickler raises whatever the bytes provoke (IndexError, TypeError,
    struct.error, ...) on a damaged file, so every ordinary exception is a file that cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise pickle.UnpicklingError(f"not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    """ModelError naming the first few missing and unexpected keys, or the first shape mismatch."""
    expected = model.state_dict()
    # BatchNorm step counters are not weights; published checkpoints leave them out.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(_name_keys("missing", missing))
    if unexpected:
        problems.append(_name_keys("unexpected", unexpected))
    if not problems:
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                problems.append(f"'{key}' has shape {tuple(value.shape)}, {arch} expects "
                                f"{tuple(expected[key].shape)}")
                break
    if problems:
        raise ModelError(f"{source} does not fit architecture {arch}: {'; '.join(problems)}")


def _name_keys(what: str, keys: Sequence[str], shown: int = 3) -> str:
    """`missing key 'a'`, or `missing keys 'a', 'b', 'c' (and 4 more)`."""
    names = ", ".join(f"'{k}'" for k in keys[:shown])
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{what} key{'s' if len(keys) > 1 else ''} {names}{more}"


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint into ``model`` in place, strictly, and return it.

    Accepts the pytorch_resnet_cifar10 ``.th`` format (a dict with ``state_dict``, keys prefixed ``module.``),
    a bare state_dict saved with ``torch.save``, or a ``.safetensors`` file.
    """
    path = Path(path)
    state = _read_state_dict(path)
    arch = arch_of(model) or type(model).__name__
    _check_fits(model, state, arch, f"checkpoint {path.name}")
    model.load_state_dict(state, strict=False)
    return model


def save_model_file(path: str | os.PathLike[str], model: nn.Module, arch: str, classes: Sequence[str],
                    input_spec: InputSpec, extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s weights and metadata to a safetensors file, atomically; returns the path. With
    ``overwrite``, an existing cnnmod model file (and nothing else) is replaced."""
    path = Path(path)
    classes = tuple(str(c) for c in classes)
    try:
        extra_json = json.dumps(dict(extra or {}), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"extra metadata for {path.name} is not JSON-serialisable: {_one_line(e)}") from None
    metadata = {
        "format": MODEL_FILE_FORMAT,
        "format_version": MODEL_FILE_VERSION,
        "arch": arch,
        "num_classes": str(len(classes)),
        "classes": json.dumps(list(classes)),
        "input_spec": json.dumps(input_spec.to_json()),
        "extra": extra_json,
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise StoreError(f"cannot write {path}: {_one_line(e)}") from None

    return write_file(path, "model", write, overwrite)


def read_model_file_info(path: str | os.PathLike[str]) -> ModelFileInfo:
    """The metadata of a cnnmod model file, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except _READ_ERRORS as e:
        raise StoreError(f"cannot read model file {path}: {_one_line(e)}") from None
    return _info_from_metadata(meta, path)


def _info_from_metadata(meta: Mapping[str, str], path: Path) -> ModelFileInfo:
    if meta.get("format") != MODEL_FILE_FORMAT:
        raise StoreError(f"{path} is not a cnnmod model file (no '{MODEL_FILE_FORMAT}' metadata)")
    if meta.get("format_version") != MODEL_FILE_VERSION:
        raise StoreError(f"{path} has model file version {meta.get('format_version')!r}; "
                         f"this cnnmod reads version {MODEL_FILE_VERSION}")
    try:
        classes = tuple(str(c) for c in json.loads(meta["classes"]))
        info = ModelFileInfo(arch=meta["arch"], classes=classes,
                             input_spec=InputSpec.from_json(json.loads(meta["input_spec"])),
                             extra=json.loads(meta["extra"]))
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path} has corrupt metadata: {_one_line(e)}") from None
    if num_classes != len(classes):
        raise StoreError(f"{path} says num_classes={num_classes} but lists {len(classes)} classes")
    return info


def load_model_file(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelFileInfo]:
    """Rebuild a model saved by ``save_model_file`` from the registry; returned in eval mode on the CPU."""
    path = Path(path)
    info = read_model_file_info(path)
    model = create_model(info.arch, num_classes=info.num_classes, in_channels=info.input_spec.channels)
    state = _read_state_dict(path)
    _check_fits(model, state, info.arch, f"model file {path.name}")
    model.load_state_dict(state, strict=False)
    return model.eval(), info
