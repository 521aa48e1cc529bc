"""Decode image files with Pillow into one uint8 (N, H, W, C) array."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from cnnmod.data.files import Source
from cnnmod.errors import DataError
from cnnmod.progress import show_progress

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


def decode_image(source: Source, where: str) -> np.ndarray:
    """One image as uint8 (H, W, 1) if grey, (H, W, 3) otherwise (alpha dropped, palette expanded)."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as im:
            im.load()
            mode = "L" if im.mode in _GREY_MODES else "RGB"
            arr = np.asarray(im.convert(mode) if im.mode != mode else im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image ({e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_images(items: Sequence[tuple[str, Source]], where: str, progress: bool = True) -> np.ndarray:
    """Decode `items` (name, content) in order. All must share one size; grey becomes RGB if any is colour."""
    if not items:
        raise DataError(f"{where}: no images found")
    out: np.ndarray | None = None
    first = ""
    bar = tqdm(items, desc=f"decoding {where}", unit="img", file=sys.stderr, disable=not show_progress(progress),
               leave=False)
    for i, (name, source) in enumerate(bar):
        arr = decode_image(source, f"{where}: {name}")
        if out is None:
            out, first = np.empty((len(items), *arr.shape), dtype=np.uint8), name
        elif arr.shape[:2] != out.shape[1:3]:
            h, w = arr.shape[:2]
            raise DataError(f"{where}: {name} is {w}x{h} but {first} is {out.shape[2]}x{out.shape[1]}; "
                            "all images of one split must share one size")
        if arr.shape[2] != out.shape[3]:
            if out.shape[3] == 1:
                out = np.repeat(out, 3, axis=3)
            else:
                arr = np.repeat(arr, 3, axis=2)
        out[i] = arr
    assert out is not None
    return out


def match_channels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give two NHWC uint8 arrays the same channel count, turning grey into RGB where the other is colour."""
    if a.shape[3] == 1 and b.shape[3] == 3:
        a = np.repeat(a, 3, axis=3)
    elif a.shape[3] == 3 and b.shape[3] == 1:
        b = np.repeat(b, 3, axis=3)
    return a, b
