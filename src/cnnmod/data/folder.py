"""Image-folder trees: `<root>/{train,test}/<class>/<image>`, as a directory or a tar archive of one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnmod.data import decode
from cnnmod.data.files import Source, is_image_name, read_files, single_root
from cnnmod.data.imageset import ImageSet
from cnnmod.errors import DataError

SPLIT_DIRS = ("train", "test", "val")  # 'val' stands for 'test' when there is no 'test'


def parse_folder_name(name: str) -> tuple[str, str, str] | None:
    """(root, split, class) of an image at `[root/]split/class/file`, else None."""
    parts = name.split("/")
    if len(parts) not in (3, 4) or parts[-3] not in SPLIT_DIRS or not is_image_name(name):
        return None
    return (parts[0] if len(parts) == 4 else ""), parts[-3], parts[-2]


def read_folder(path: Path, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    files = read_files(path, lambda n: parse_folder_name(n) is not None)
    parsed = {n: p for n in files if (p := parse_folder_name(n)) is not None}
    single_root({p[0] for p in parsed.values()}, str(path))
    present = {p[1] for p in parsed.values()}
    if "train" not in present:
        raise DataError(f"{path}: no images under train/<class>/; "
                        "expected <root>/{train,test}/<class>/*.jpg")
    test_dir = "test" if "test" in present else "val" if "val" in present else None
    if test_dir is None:
        raise DataError(f"{path}: no images under test/<class>/ (or val/<class>/)")
    classes = tuple(sorted({p[2] for p in parsed.values() if p[1] in ("train", test_dir)}))
    index = {c: i for i, c in enumerate(classes)}
    sets = []
    for split in ("train", test_dir):
        names = sorted((n for n, p in parsed.items() if p[1] == split), key=lambda n: (parsed[n][2], n))
        items: list[tuple[str, Source]] = [(n, files[n]) for n in names]
        labels = np.array([index[parsed[n][2]] for n in names], dtype=np.int64)
        sets.append((decode.decode_images(items, f"{path} {split}", progress), labels))
    (x_train, y_train), (x_test, y_test) = sets
    x_train, x_test = decode.match_channels(x_train, x_test)
    return ImageSet(x_train, y_train, classes), ImageSet(x_test, y_test, classes)
