from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from cnnmod.errors import StoreError
from cnnmod.storage.fileio import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    pack_bits,
    sha256_file,
    unpack_bits,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (2, 3, 5, 7), (4, 1, 3)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((mask.numel() + 7) // 8,)
    assert torch.equal(unpack_bits(packed, shape), mask)
    # Same bit order as numpy, so stores can be read with numpy alone.
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))


def test_unpack_rejects_wrong_size() -> None:
    packed = pack_bits(torch.ones(10, dtype=torch.bool))
    with pytest.raises(StoreError, match="cannot hold shape"):
        unpack_bits(packed, (3, 7))


def test_pack_rejects_non_bool() -> None:
    with pytest.raises(ValueError, match="bool"):
        pack_bits(torch.ones(3))


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    digest = atomic_write_text(path, "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    assert digest == sha256_file(path)
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_safetensors_round_trip_with_hash(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([True, False])}
    digest = atomic_save_safetensors(path, tensors, {"k": "v"})
    assert digest == sha256_file(path)
    loaded, meta = load_safetensors(path, digest)
    assert meta == {"k": "v"}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.safetensors"
    digest = atomic_save_safetensors(path, {"a": torch.ones(3)})

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_save_safetensors(path, {"a": torch.zeros(3)})
    assert sha256_file(path) == digest
    assert torch.equal(load_safetensors(path, digest)[0]["a"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_failed_serialisation_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    digest = atomic_save_safetensors(path, {"a": torch.ones(3)})
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses them
        shared = torch.zeros(4)
        atomic_save_safetensors(path, {"a": shared, "b": shared})
    assert sha256_file(path) == digest
    assert _leftovers(tmp_path) == []


def test_write_into_missing_directory_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nowhere"):
        atomic_write_text(tmp_path / "nowhere" / "a.txt", "x")


def test_hash_mismatch_names_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, {"a": torch.ones(3)})
    with pytest.raises(StoreError, match="t.safetensors.*sha256"):
        load_safetensors(path, "0" * 64)


def test_missing_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="gone.safetensors"):
        load_safetensors(tmp_path / "gone.safetensors", None)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_file_is_store_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, {"a": torch.ones(100)}, {"k": "v"})
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "garbage":
        data = b"not a safetensors file at all"
    else:
        data = data[:8] + b"\xff" + data[9:]  # the first byte of the JSON header
    path.write_bytes(data)
    with pytest.raises(StoreError, match="t.safetensors"):
        load_safetensors(path, None)


def test_the_same_tensors_and_metadata_save_to_the_same_bytes(tmp_path: Path) -> None:
    # safetensors writes metadata from a hash map: without sorting, the key order (and the sha256) changes by save
    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    metadata = {f"cnnmod.key{i}": "é\n\"" * i for i in range(8)}
    shas = {atomic_save_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata) for i in range(10)}
    assert len(shas) == 1
    loaded, read = load_safetensors(tmp_path / "0.safetensors", shas.pop())
    assert read == metadata and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
