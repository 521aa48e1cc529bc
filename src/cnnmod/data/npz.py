"""`.npz` files with x_train, y_train, x_test, y_test and classes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cnnmod.data.imageset import ImageSet
from cnnmod.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")


def read_npz(path: Path, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: .npz lacks {', '.join(missing)} (needs {', '.join(NPZ_KEYS)})")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read .npz ({e})") from None
    names = arrays["classes"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: 'classes' must be a 1-d array of strings, got {names.dtype} {names.shape}")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist())
    sets = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[:, :, :, None]
        try:
            sets.append(ImageSet(x, y, classes))
        except DataError as e:
            raise DataError(f"{path}: {split}: {e}") from None
    return sets[0], sets[1]
