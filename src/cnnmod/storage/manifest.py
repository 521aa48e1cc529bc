"""The one place where store and composition manifests are checked, field by field, before anything is loaded.

A schema here is plain data: a dict of field name -> expected shape, where a shape is a Python type, a tuple of
allowed literal values, a `List`, an `Optional`, a nested schema dict, or a `Check` (a predicate with the words
to say when it fails). `validate` walks manifest and schema together and raises StoreError naming the first
field that is missing, of the wrong type or out of range, e.g. `manifest.json: modules[3].class_index must be
an integer in [0, 10), got -1`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..errors import StoreError

__all__ = ["COMPOSITION_SCHEMA", "STORE_SCHEMA", "Check", "List", "Optional", "relative_file", "validate"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CLASSES = 100_000
MAX_SIDE = 8192
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Check:
    """A value accepted when `test(value)` is true; `expected` completes 'must be ...'."""

    test: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class List:
    item: Any
    min_length: int = 0
    max_length: int | None = None
    length_of: str | None = None  # a path like "channels" of a sibling integer field the length must equal


@dataclass(frozen=True)
class Optional:
    inner: Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def int_in(low: int, high: int) -> Check:
    return Check(lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def relative_file(value: Any) -> bool:
    """A path inside its folder: relative, forward slashes, no `..`, no empty or hidden parts."""
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    parts = PurePosixPath(value).parts
    return not value.startswith("/") and all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)


HEX64 = Check(lambda v: isinstance(v, str) and bool(_HEX64.match(v)), "64 lowercase hex digits (a sha256)")
FILE = Check(relative_file, "a relative file path inside the folder")
NAME = Check(lambda v: isinstance(v, str) and 0 < len(v) <= 1000 and "\x00" not in v, "a non-empty string")
FINITE = Check(_is_number, "a finite number")
POSITIVE = Check(lambda v: _is_number(v) and v > 0, "a finite number above 0")
SIDE = int_in(1, MAX_SIDE)

INPUT_SPEC = {
    "size": List(SIDE, 2, 2),
    "channels": int_in(1, MAX_CHANNELS),
    "mean": List(FINITE, 1, MAX_CHANNELS, length_of="channels"),
    "std": List(POSITIVE, 1, MAX_CHANNELS, length_of="channels"),
}

COMPACT_NETWORK = {  # a compact module's own network file (cnnmod.storage.compactstore)
    "file": FILE, "sha256": HEX64, "parameters": int_in(0, 1 << 40), "macs": int_in(0, 1 << 50),
    "bytes": int_in(0, 1 << 40),
}

STORE_SCHEMA: dict[str, Any] = {
    "format": ("cnnmod.store",),
    "version": (2,),
    "cnnmod_version": str,
    "parent": {
        "arch": NAME,
        "file": FILE,
        "sha256": HEX64,
        "fingerprint": HEX64,
        "classes": List(NAME, 1, MAX_CLASSES),
        "input_spec": INPUT_SPEC,
    },
    "sites": List({"name": NAME, "kind": ("relu", "conv"), "shape": List(int_in(1, 1 << 30), 1, 8)}, 1),
    "config": dict,
    "modules": List({"class": NAME, "class_index": int_in(0, MAX_CLASSES - 1), "file": FILE, "sha256": HEX64,
                     "jaccard": FINITE, "network": Optional(COMPACT_NETWORK)}, 1, MAX_CLASSES),
    "activity": Optional({"file": FILE, "sha256": HEX64, "site_kind": ("relu", "conv"),
                          "granularity": Optional(("node", "channel"))}),
    "provenance": dict,
    "compact": Optional({"engine": ("exact", "shared"), "shared": Optional({"file": FILE, "sha256": HEX64})}),
}

COMPOSITION_SCHEMA: dict[str, Any] = {
    "format": ("cnnmod.composition",),
    "version": (2,),
    "cnnmod_version": str,
    "scoring": ("softmax", "logit"),
    "groups": List({"store": FILE, "labels": List(NAME, 1, MAX_CLASSES)}, 1),
    "reverifiers": List({"store": FILE, "labels": List(NAME, 2, MAX_CLASSES)}),
}


def _describe(shape: Any) -> str:
    if isinstance(shape, Check):
        return shape.expected
    if isinstance(shape, tuple):
        return "one of " + ", ".join(repr(v) for v in shape)
    if isinstance(shape, type):
        names: dict[type, str] = {str: "a string", dict: "an object", int: "an integer", float: "a number"}
        return names.get(shape, shape.__name__)
    if isinstance(shape, List):
        return "a list"
    if isinstance(shape, dict):
        return "an object"
    return "valid"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(value: Any, shape: Any, where: str, siblings: dict[str, Any] | None, file: str) -> None:
    def fail(expected: str) -> None:
        raise StoreError(f"{file}: {where} must be {expected}, got {_shown(value)}; the file was edited or damaged")

    if isinstance(shape, Optional):
        if value is not None:
            _walk(value, shape.inner, where, siblings, file)
        return
    if isinstance(shape, Check):
        if not shape.test(value):
            fail(shape.expected)
    elif isinstance(shape, tuple):
        if not any(value == v and type(value) is type(v) for v in shape):
            fail(_describe(shape))
    elif isinstance(shape, type):
        if not isinstance(value, shape) or isinstance(value, bool):
            fail(_describe(shape))
    elif isinstance(shape, List):
        if not isinstance(value, list):
            fail("a list")
        low, high = shape.min_length, shape.max_length
        if shape.length_of is not None and siblings is not None and _is_int(siblings.get(shape.length_of)):
            low = high = siblings[shape.length_of]
        if len(value) < low or (high is not None and len(value) > high):
            fail(f"a list of {low} items" if low == high else f"a list of {low} to {high or 'any number of'} items")
        for i, item in enumerate(value):
            _walk(item, shape.item, f"{where}[{i}]", None, file)
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            fail("an object")
        for key, inner in shape.items():
            if key not in value and not isinstance(inner, Optional):
                raise StoreError(f"{file}: {where + '.' if where else ''}{key} is missing; the file was edited or "
                                 "damaged")
            _walk(value.get(key), inner, f"{where + '.' if where else ''}{key}", value, file)
    else:  # pragma: no cover - a schema error, not a user error
        raise TypeError(f"bad schema at {where}: {shape!r}")


def validate(manifest: Any, schema: dict[str, Any], file: str) -> dict[str, Any]:
    """`manifest` checked against `schema`; raises StoreError naming the first bad field of `file`."""
    _walk(manifest, schema, "", None, file)
    return manifest  # type: ignore[no-any-return]


def unique(values: list[Any], what: str, file: str) -> None:
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise StoreError(f"{file}: {what} {_shown(v)} appears twice; the file was edited or damaged")
        seen.add(v)
