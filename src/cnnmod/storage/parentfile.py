"""Parent files: one model as data, readable by every cnnmod command without the code that defined it.

A parent file is one safetensors file: the traced, BatchNorm-folded graph as `cnnmod.storage.graphio` writes it
(JSON description under the metadata key `cnnmod.graph`, weights as tensors) plus, under `cnnmod.parent`,
what a parent is besides its graph: class names, input spec (size, channels, normalisation), architecture name,
and the sha256 fingerprint of the folded weights, checked when the file is read. Nothing is unpickled and no
user code is imported to read one.

`cnnmod import` writes them; every command that takes a MODEL reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine.inputs import InputSpec
from ..engine.modules import Parent
from ..engine.trace import trace_model
from ..errors import StoreError
from .fileio import load_safetensors
from .graphio import METADATA_KEY as GRAPH_KEY
from .graphio import graph_from_data, graph_to_data
from .outputs import register_kind, safetensors_with_metadata, write_file

__all__ = ["PARENT_KEY", "is_parent_file", "load_parent_file", "save_parent_file"]

PARENT_KEY = "cnnmod.parent"
FORMAT = "cnnmod.parent"
VERSION = 1

_is_parent = safetensors_with_metadata(PARENT_KEY)
register_kind("parent", folder=False, recognise=_is_parent)


def is_parent_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a readable safetensors file with parent metadata (never raises)."""
    return _is_parent(Path(path))


def save_parent_file(path: str | os.PathLike[str], parent: Parent, overwrite: bool = False,
                     source: Mapping[str, Any] | None = None) -> Path:
    """Write `parent` as a parent file (atomically; an existing one is replaced only with `overwrite`).

    `source` (JSON-able) records where the parent came from. StoreError names a layer that cannot be stored.
    """
    desc, tensors = graph_to_data(parent.model.graph)
    info = {
        "format": FORMAT,
        "version": VERSION,
        "arch": parent.arch,
        "classes": list(parent.classes),
        "input_spec": parent.input_spec.to_json(),
        "fingerprint": parent.fingerprint(),
        "source": dict(source or {}),
    }
    try:
        metadata = {GRAPH_KEY: json.dumps(desc, allow_nan=False, separators=(",", ":")),
                    PARENT_KEY: json.dumps(info, allow_nan=False)}
    except (TypeError, ValueError) as e:
        raise StoreError(f"the parent's description cannot be written as JSON: {e}") from None

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata=metadata)

    return write_file(Path(path), "parent", write, overwrite)


def load_parent_file(path: str | os.PathLike[str]) -> Parent:
    """Read a parent file written by `save_parent_file`; StoreError names whatever is wrong with it."""
    path = Path(path)
    tensors, metadata = load_safetensors(path)
    try:
        info = json.loads(metadata[PARENT_KEY])
        desc = json.loads(metadata[GRAPH_KEY])
    except KeyError as e:
        raise StoreError(f"{path} is not a cnnmod parent file (no {e} metadata)") from None
    except ValueError as e:
        raise StoreError(f"{path} is a damaged parent file: unreadable metadata ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise StoreError(f"{path} is not a cnnmod parent file")
    if info.get("version") != VERSION:
        raise StoreError(f"{path} is parent file version {info.get('version')!r}; this cnnmod reads version {VERSION}")
    try:
        spec = InputSpec.from_json(info["input_spec"])
        classes = tuple(str(c) for c in info["classes"])
        arch, fingerprint = str(info["arch"]), str(info["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path} is a damaged parent file: its metadata lacks or garbles {e}") from None
    try:
        graph = graph_from_data(desc, tensors)
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from None
    parent = Parent(trace_model(graph, (spec.channels, *spec.size)), classes, spec, arch)
    if parent.num_classes != parent.model.head.num_classes:
        raise StoreError(f"{path} names {parent.num_classes} classes for a model with "
                         f"{parent.model.head.num_classes} outputs; the file is damaged")
    if parent.fingerprint() != fingerprint:
        raise StoreError(f"{path}: the weights do not match their fingerprint; the file is damaged")
    return parent
