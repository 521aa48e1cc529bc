"""Files of a dataset, read from a directory or streamed from a tar archive without extracting it."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnmod.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# What a damaged archive raises while it is streamed.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)

Source = bytes | Path
"""A file's content in memory (from an archive) or its path on disk (from a directory)."""


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def _skip(name: str) -> bool:
    """Names that are never dataset content: macOS resource forks and hidden files."""
    return any(part == "__MACOSX" or part.startswith("._") for part in name.split("/"))


def iter_names(path: Path) -> Iterator[str]:
    """Relative posix names of the regular files under a directory or inside an archive."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            rel = Path(root).relative_to(path).as_posix()
            for f in sorted(files):
                name = f if rel == "." else f"{rel}/{f}"
                if not _skip(name):
                    yield name
        return
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = _member_name(member)
                if member.isfile() and not _skip(name):
                    yield name
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt archive ({e})") from None


def read_files(path: Path, keep: Callable[[str], bool]) -> dict[str, Source]:
    """Files whose relative name passes `keep`: bytes when streamed from an archive, paths in a directory."""
    if path.is_dir():
        return {name: path / name for name in iter_names(path) if keep(name)}
    out: dict[str, Source] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = _member_name(member)
                if member.isfile() and not _skip(name) and keep(name):
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    data = f.read()
                    if len(data) != member.size:
                        raise DataError(f"{path}: truncated archive, {name} is cut short")
                    out[name] = data
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt archive ({e})") from None
    return out


def read_bytes(source: Source, where: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: cannot read {source} ({e.strerror or e})") from None


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def single_root(roots: set[str], where: str) -> str:
    """The one root directory ('' for the top) that a dataset's files share; an error if there are several."""
    if len(roots) > 1:
        shown = ", ".join(sorted(r or "." for r in roots)[:4])
        raise DataError(f"{where}: holds several dataset roots ({shown}); point at one of them")
    return next(iter(roots), "")


def dataset_stem(path: Path) -> str:
    """A dataset's name from its path: the file name without its archive suffix, or the directory name."""
    name = path.resolve().name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".npz", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
