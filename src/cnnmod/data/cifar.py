"""The official CIFAR-10 (`cifar-10-batches-py/`) and CIFAR-100 (`cifar-100-python/`) python format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnmod.data.files import read_bytes, read_files
from cnnmod.data.imageset import ImageSet
from cnnmod.data.pickles import load_pickle
from cnnmod.errors import DataError

CIFAR10_FILES = ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
CIFAR100_FILES = ("meta", "train", "test")


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _is_cifar_name(name: str) -> bool:
    """The batch files, at the root or one directory down (`cifar-10-batches-py/data_batch_1`)."""
    return name.count("/") <= 1 and (_basename(name) in CIFAR10_FILES or _basename(name) in CIFAR100_FILES)


def read_cifar(path: Path, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    files = read_files(path, _is_cifar_name)
    by_base: dict[str, list[str]] = {}
    for name in files:
        by_base.setdefault(_basename(name), []).append(name)
    for base, names in by_base.items():
        if len(names) > 1:
            raise DataError(f"{path}: holds several CIFAR files named {base} ({', '.join(names[:3])})")

    def load(base: str) -> dict[bytes, Any]:
        where = f"{path}: {by_base[base][0]}"
        obj = load_pickle(read_bytes(files[by_base[base][0]], where), where)
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a dict, got {type(obj).__name__}")
        return obj

    if "batches.meta" in by_base:
        missing = [f for f in CIFAR10_FILES if f not in by_base]
        if missing:
            raise DataError(f"{path}: CIFAR-10 files missing: {', '.join(missing)}")
        classes = _names(load("batches.meta"), b"label_names", f"{path}: batches.meta")
        trains = [_batch(load(f"data_batch_{i}"), b"labels", f"{path}: data_batch_{i}") for i in range(1, 6)]
        train = (np.concatenate([t[0] for t in trains]), np.concatenate([t[1] for t in trains]))
        test = _batch(load("test_batch"), b"labels", f"{path}: test_batch")
    elif "meta" in by_base:
        missing = [f for f in CIFAR100_FILES if f not in by_base]
        if missing:
            raise DataError(f"{path}: CIFAR-100 files missing: {', '.join(missing)}")
        classes = _names(load("meta"), b"fine_label_names", f"{path}: meta")
        train = _batch(load("train"), b"fine_labels", f"{path}: train")
        test = _batch(load("test"), b"fine_labels", f"{path}: test")
    else:
        raise DataError(f"{path}: no CIFAR-10 (batches.meta) or CIFAR-100 (meta) file found")
    try:
        return ImageSet(*train, classes), ImageSet(*test, classes)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _names(meta: dict[bytes, Any], key: bytes, where: str) -> tuple[str, ...]:
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: no list of class names under {key.decode()!r}")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def _batch(d: dict[bytes, Any], label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 3072 bytes in CHW order -> uint8 (N, 32, 32, 3), with their int64 labels."""
    data, labels = d.get(b"data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, 3072), got {shape}")
    if not isinstance(labels, (list, np.ndarray)):
        raise DataError(f"{where}: no labels under {label_key.decode()!r}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels under {label_key.decode()!r} are not a list of integers")
    if len(y) != len(data):
        raise DataError(f"{where}: {len(data)} images but {len(y)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), y.astype(np.int64)


def is_cifar_marker(name: str) -> bool:
    """A file name that only the CIFAR python format uses (its class-name and batch files)."""
    return _is_cifar_name(name) and _basename(name) not in ("train", "test")
