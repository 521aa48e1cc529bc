"""A cache of decoded datasets as uncompressed .npz files, keyed by the source's path, size, mtime, format."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cnnmod.data.files import iter_names
from cnnmod.data.imageset import ImageSet
from cnnmod.errors import CnnmodError, DataError
from cnnmod.storage.outputs import register_kind, write_file

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
        a = _mapped_arrays(file)
        classes = tuple(str(c) for c in a["classes"].tolist())
        return (ImageSet(a["train_images"], a["train_labels"], classes),
                ImageSet(a["test_images"], a["test_labels"], classes))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
        return None  # corrupt or from another layout: decode again and overwrite it


_IMAGES = ("train_images", "test_images")
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def _mapped_arrays(file: Path) -> dict[str, np.ndarray]:
    """The cache file's arrays, images memory-mapped (copy-on-write) from the uncompressed .npz: a command then holds
    in memory only the images it reads, not the whole dataset. Labels and classes are read."""
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in _ARRAYS if k not in _IMAGES}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as f:
        for key in _IMAGES:
            info = archive.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with np.load(file, allow_pickle=False) as z:
                    arrays[key] = z[key]
                continue
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER)
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"{file}: no zip member header at {info.header_offset}")
            name_length = int.from_bytes(header[26:28], "little")
            extra_length = int.from_bytes(header[28:30], "little")
            f.seek(info.header_offset + _LOCAL_HEADER + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject or fortran:
                raise ValueError(f"{file}: {key} is not a plain array")
            arrays[key] = np.memmap(f, dtype=dtype, mode="c", offset=f.tell(), shape=shape) if int(np.prod(shape)) \
                else np.zeros(shape, dtype=dtype)
    return arrays


def release_mapped_pages(images: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped cache array that reading has mapped so far (they stay in the page cache,
    and a later read maps them again). The kernel maps pages around each one read, so reading every fifth image
    would otherwise hold the whole file in the process's resident memory. A no-op for arrays in memory."""
    base: object = images
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapped = getattr(base, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


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
