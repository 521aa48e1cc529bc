"""Small file helpers shared by everything that writes a store: atomic writes, hashes, packed masks.

Every write goes to a temporary file in the destination directory, is flushed and fsynced, and is then
renamed over the destination, so a reader never sees a half-written file and a failed write leaves the
old file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from cnnmod.errors import StoreError

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_safetensors",
    "pack_bits",
    "process_umask",
    "sha256_file",
    "unpack_bits",
]

_CHUNK = 1 << 20
# Bit weights, most significant first: the same bit order as numpy.packbits.
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def process_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; only possible (and needed) on POSIX."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary path in `path`'s directory; renamed onto `path` on success, removed on failure."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
        if isinstance(e, safetensors.SafetensorError):
            raise StoreError(f"cannot write {path}: {str(e).splitlines()[0] if str(e) else 'disk full?'}") from e
        raise
    try:
        _fsync_dir(path.parent)
    except OSError:
        pass  # the file is in place; a directory that cannot be fsynced (some filesystems) is not an error


def _write_with(path: Path | str, write: Callable[[Path], None]) -> str:
    """Run `write(tmp)`, fsync the temporary file, hash it and rename it onto `path`; returns the sha256."""
    path = Path(path)
    with _temp_beside(path) as tmp:
        write(tmp)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
            os.fsync(f.fileno())
    return digest.hexdigest()


def atomic_write_bytes(path: Path | str, data: bytes) -> str:
    """Write `data` to `path` atomically; returns the sha256 hex of what was written."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()

    return _write_with(path, write)


def atomic_write_text(path: Path | str, text: str) -> str:
    """Write `text` as UTF-8 to `path` atomically; returns the sha256 hex of what was written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save `tensors` (contiguous, not sharing memory) and string `metadata` as one safetensors file,
    atomically; returns the sha256 hex of the file written."""

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        if metadata is not None and len(metadata) > 1:
            _sort_metadata(tmp)

    return _write_with(path, write)


def _sort_metadata(path: Path) -> None:
    """Put the header's metadata in key order, in place: safetensors writes it from a hash map, so the same
    tensors and metadata would otherwise give files (and sha256s) that differ from one save to the next. The
    header keeps its length (the same JSON in another order), so the tensors' bytes do not move."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:  # always, unless safetensors changes how it writes JSON: then keep its file
            f.seek(8)
            f.write(text.ljust(size, b" "))


def load_safetensors(
    path: Path | str, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, checked against `expected_sha256` when given.

    A missing, truncated or corrupt file, or one whose hash differs, raises StoreError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} does not exist or is not a file")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            raise StoreError(
                f"{path} has sha256 {actual[:12]}... but {expected_sha256[:12]}... was expected: "
                "the file was changed or damaged; restore it or save it again"
            )
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(
            f"{path} is not a readable safetensors file ({reason}): restore or re-save it"
        ) from e
    return tensors, dict(metadata)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor of any shape into a 1-D uint8 tensor, 8 elements a byte, first element in the
    most significant bit (as numpy.packbits); the shape is not stored."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_bits needs a bool tensor, got {mask.dtype}")
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape`. A packed tensor of the wrong size or dtype
    raises StoreError (it came from a damaged store)."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise StoreError(
            f"packed mask of {packed.numel()} {packed.dtype} values cannot hold shape {list(shape)} "
            f"({(numel + 7) // 8} uint8 bytes expected): the store is damaged"
        )
    bits = (packed.unsqueeze(1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)
