"""Which of the formats a path holds, from its name or the names of the files inside it."""

from __future__ import annotations

from pathlib import Path

from cnnmod.data.cifar import is_cifar_marker
from cnnmod.data.files import is_archive, iter_names
from cnnmod.data.folder import parse_folder_name
from cnnmod.data.idx import is_idx_name
from cnnmod.data.tinyimagenet import parse_tiny_name
from cnnmod.errors import DataError

FORMATS = ("npz", "folder", "cifar", "tiny-imagenet", "idx")


def _format_of_name(name: str) -> str | None:
    """The format that a file at `name` (relative to the given path) proves, or None if it proves none."""
    tiny = parse_tiny_name(name)
    if tiny is not None and tiny[1] != "words.txt":
        return "tiny-imagenet"
    if parse_folder_name(name) is not None:
        return "folder"
    if is_cifar_marker(name):
        return "cifar"
    if is_idx_name(name) and name.count("/") <= 1:
        return "idx"
    return None


def detect_format(path: str | Path) -> str:
    """One of FORMATS for a file or directory; a DataError if it is none of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.lower().endswith(".npz"):
            return "npz"
        if is_idx_name(path.name):
            return "idx"
        if not is_archive(path):
            raise DataError(f"{path}: not a dataset cnnmod can read; expected a directory, "
                            "a .tar.gz/.tgz/.tar archive, a .npz file or idx files")
    for name in iter_names(path):
        fmt = _format_of_name(name)
        if fmt is not None:
            return fmt
    raise DataError(f"{path}: found no dataset in it (none of {', '.join(FORMATS)}); "
                    "expected e.g. <root>/{train,test}/<class>/*.jpg or cifar-10-batches-py/")
