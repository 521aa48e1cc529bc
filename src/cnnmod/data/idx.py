"""idx files (MNIST, Fashion-MNIST): `{train,t10k}-{images,labels}-idx{3,1}-ubyte[.gz]` in one directory."""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from cnnmod.data.files import Source, dataset_stem, read_bytes, read_files, single_root
from cnnmod.data.imageset import ImageSet
from cnnmod.errors import DataError

IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

_IDX_DTYPES: dict[int, np.dtype] = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def is_idx_name(name: str) -> bool:
    return IDX_NAME.match(name.rsplit("/", 1)[-1]) is not None


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """The array in an idx file: magic 0x0000 <type> <ndim>, ndim big-endian uint32 sizes, then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{where}: bad idx magic number {data[:4].hex() or '(empty file)'}")
    ndim, dtype = data[3], _IDX_DTYPES[data[2]]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: idx header cut short")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(dims)
    if len(data) - header != count * dtype.itemsize:
        raise DataError(f"{where}: idx file holds {len(data) - header} data bytes, "
                        f"its header {dims} says {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a native-order copy that owns its memory


def _load(files: dict[str, Source], names: dict[tuple[str, str], str], split: str, kind: str,
          path: Path) -> np.ndarray:
    key = (split, kind)
    if key not in names:
        raise DataError(f"{path}: no {split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte[.gz] file")
    name = names[key]
    where = f"{path}: {name}"
    data = read_bytes(files[name], where)
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where}: truncated or corrupt gzip file ({e})") from None
    arr = parse_idx(data, where)
    if kind == "images" and (arr.dtype != np.uint8 or arr.ndim not in (3, 4)):
        raise DataError(f"{where}: images must be uint8 (N, H, W), got {arr.dtype} {arr.shape}")
    if kind == "labels" and (arr.dtype.kind not in "iu" or arr.ndim != 1):
        raise DataError(f"{where}: labels must be integers (N,), got {arr.dtype} {arr.shape}")
    return arr


def read_idx(path: Path, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    files = read_files(path, lambda n: is_idx_name(n) and n.count("/") <= 1)
    single_root({n.rsplit("/", 1)[0] if "/" in n else "" for n in files}, str(path))
    names: dict[tuple[str, str], str] = {}
    for n in sorted(files):  # a plain file wins over its .gz twin: sorted() puts it first
        m = IDX_NAME.match(n.rsplit("/", 1)[-1])
        assert m is not None
        names.setdefault((m.group(1), m.group(2)), n)
    classes = FASHION_CLASSES if "fashion" in dataset_stem(path).lower() else DIGIT_CLASSES
    sets = []
    for split in ("train", "t10k"):
        x, y = _load(files, names, split, "images", path), _load(files, names, split, "labels", path)
        if len(x) != len(y):
            raise DataError(f"{path}: {split} has {len(x)} images but {len(y)} labels")
        if x.ndim == 3:
            x = x[:, :, :, None]
        try:
            sets.append(ImageSet(x, y.astype(np.int64), classes))
        except DataError as e:
            raise DataError(f"{path}: {split}: {e}") from None
    return sets[0], sets[1]

