"""A cache of decoded datasets as uncompressed .npz files, keyed by the source's path, size, mtime, format."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cnnmod.data.files import iter_names
from cnnmod.data.imageset import ImageSet
from cnnmod.errors import CnnmodError, DataError
from cnnmod.outputs import register_kind, write_file

READER_VERSION = 1
"""Bump when a reader changes what it returns, so that older cache files are no longer used."""

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")


def default_cache_dir() -> Path:
    env = os.environ.get("CNNMOD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnmod"


def cache_key(path: Path, fmt: str) -> str:
    """sha256 of the absolute path, size and mtime (of each file, for a directory), format, reader version."""
    path = path.resolve()
    st = path.stat()
    stamp: list[object] = [str(path), fmt, READER_VERSION, st.st_size, st.st_mtime_ns]
    if path.is_dir():
        for name in iter_names(path):
            fst = (path / name).stat()
            stamp.append([name, fst.st_size, fst.st_mtime_ns])
    return hashlib.sha256(json.dumps(stamp).encode("utf-8")).hexdigest()


def cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.npz"


def load_cached(cache_dir: Path, key: str) -> tuple[ImageSet, ImageSet] | None:
    """The cached train and test sets, or None if there is no cache file or it cannot be read."""
    file = cache_file(cache_dir, key)
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            a = {k: z[k] for k in _ARRAYS}
        classes = tuple(str(c) for c in a["classes"].tolist())
        return (ImageSet(a["train_images"], a["train_labels"], classes),
                ImageSet(a["test_images"], a["test_labels"], classes))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
        return None  # corrupt or from another layout: decode again and overwrite it


def _is_cache_file(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return set(_ARRAYS) <= set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return True  # a damaged cache file of ours (the name is ours): replace it


register_kind("dataset cache", folder=False, recognise=_is_cache_file)


def save_cached(cache_dir: Path, key: str, train: ImageSet, test: ImageSet) -> None:
    """Write the cache file atomically (temporary file, then rename); warn and go on if that fails."""
    file = cache_file(cache_dir, key)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, train_images=train.images, train_labels=train.labels, test_images=test.images,
                     test_labels=test.labels, classes=np.array(train.classes, dtype=np.str_))

    try:
        write_file(file, "dataset cache", write, overwrite=True)
    except (OSError, CnnmodError) as e:
        warnings.warn(f"cnnmod: could not write the dataset cache {file} ({e}); "
                      "set CNNMOD_CACHE to a writable directory", stacklevel=3)
