"""A restricted unpickler for the CIFAR python files: it builds dicts, lists, bytes, ints, numpy arrays only.

The official files are protocol-2 pickles written by Python 2 and read with encoding='bytes'. Any global
other than the few that rebuild a numpy array is refused, so loading cannot run code from the file.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np

from cnnmod.errors import DataError

_real_reconstruct: Any = np.empty(0).__reduce__()[0]  # numpy.core / numpy._core .multiarray._reconstruct


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("_reconstruct may only build a numpy.ndarray")
    return _real_reconstruct(cls, shape, typecode)


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise pickle.UnpicklingError("numpy.dtype may only be built from a type code")
    code = spec.decode("ascii") if isinstance(spec, bytes) else spec
    dt = np.dtype(code, align=bool(align), copy=bool(copy))
    if dt.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dt


def _codecs_encode(text: Any, encoding: Any) -> bytes:
    """How Python 3 writes bytes in a protocol-2 pickle: _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as str -> latin1 bytes")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_pickle(data: bytes, where: str) -> Any:
    """Unpickle `data` (a CIFAR batch file) without running code; any failure is a DataError."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where}: not a CIFAR batch file, or an unsafe one ({e})") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
            MemoryError, OverflowError) as e:
        raise DataError(f"{where}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
