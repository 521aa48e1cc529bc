"""load_dataset: detect the format, read it (or its cached decoding), and pick classes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cnnmod.data.cache import cache_key, default_cache_dir, load_cached, save_cached
from cnnmod.data.cifar import read_cifar
from cnnmod.data.detect import FORMATS, detect_format
from cnnmod.data.files import dataset_stem
from cnnmod.data.folder import read_folder
from cnnmod.data.idx import is_idx_name, read_idx
from cnnmod.data.imageset import Dataset, ImageSet
from cnnmod.data.npz import read_npz
from cnnmod.data.tinyimagenet import read_tiny_imagenet
from cnnmod.errors import DataError

Reader = Callable[[Path, bool], tuple[ImageSet, ImageSet]]

_READERS: dict[str, Reader] = {
    "npz": read_npz,
    "folder": read_folder,
    "cifar": read_cifar,
    "tiny-imagenet": read_tiny_imagenet,
    "idx": read_idx,
}
_UNCACHED = ("npz",)  # already arrays on disk: a cache copy would only double them


def load_dataset(path: str | Path, format: str | None = None, classes: Sequence[str] | None = None,
                 cache_dir: Path | None = None, progress: bool = True, write_cache: bool = True) -> Dataset:
    """Read a dataset in any of FORMATS (detected from `path` unless `format` names one).

    Decoded arrays are cached under `cache_dir` (default $CNNMOD_CACHE or ~/.cache/cnnmod), so a second load
    reads one .npz (memory-mapped: only the images read take memory); without `write_cache` a cache is read but
    never written. `classes` keeps those classes only, relabelled 0..k-1 in the order given.
    """
    path = Path(path).expanduser()
    if path.is_file() and is_idx_name(path.name):
        path = path.parent
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    sets: tuple[ImageSet, ImageSet] | None = None
    if format not in _UNCACHED:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = cache_key(path, format)
        sets = load_cached(directory, key)
    if sets is None:
        sets = _READERS[format](path, progress)
        if format not in _UNCACHED and write_cache:
            save_cached(directory, key, *sets)
            # the cache, memory-mapped, in place of the decoded arrays: pages the caller does not read stay on disk
            sets = load_cached(directory, key) or sets
    dataset = Dataset(dataset_stem(path), *sets)
    return dataset if classes is None else dataset.subset(classes)
