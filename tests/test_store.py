"""Store folders: what is saved loads back bit for bit, damage is reported as StoreError, writes are atomic,
and nothing is unpickled."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cnnmod.storage.store
from cnnmod.engine.activity import Activity
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.modules import ModuleSet, Parent
from cnnmod.errors import StoreError
from cnnmod.storage.outputs import OutputError
from cnnmod.storage.store import load_store, read_manifest, save_store, store_files
from fixtures.nets import RandomConvNet, parent_of

PROVENANCE = {"model": "random.safetensors", "data": "noise", "seconds": 0.5}


def noise(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float NCHW images for RandomConvNet (1x6x6) and labels 0..3."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, n)


@pytest.fixture(scope="module")
def parent() -> Parent:
    return parent_of(RandomConvNet(seed=0).eval(), (6, 6), classes=["w", "x", "y", "z"])


@pytest.fixture(scope="module")
def decomposed(parent: Parent) -> tuple[ModuleSet, Activity]:
    images, labels = noise(80, seed=1)
    return decompose(parent, images, labels, DecomposeConfig(samples_per_class=12), progress=False)


@pytest.fixture(scope="module")
def subset(parent: Parent) -> tuple[ModuleSet, Activity]:
    """Modules for two classes, named out of order: a store that differs from `decomposed`."""
    images, labels = noise(80, seed=1)
    return decompose(parent, images, labels, DecomposeConfig(samples_per_class=12, rho=0.2), classes=["z", "x"],
                     progress=False)


@pytest.fixture
def saved(decomposed: tuple[ModuleSet, Activity], tmp_path: Path) -> Path:
    return save_store(tmp_path / "store", *decomposed, PROVENANCE)


def edit_manifest(store: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def flip_last_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))


def assert_same_modules(a: ModuleSet, b: ModuleSet) -> None:
    assert a.class_indices == b.class_indices
    assert a.class_names == b.class_names
    assert a.sites == b.sites
    assert a.config == b.config
    assert a.parent.classes == b.parent.classes and a.parent.input_spec == b.parent.input_spec
    assert a.parent.fingerprint() == b.parent.fingerprint()
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert a.masks[name].dtype == b.masks[name].dtype == torch.bool
        assert torch.equal(a.masks[name], b.masks[name]), name
    assert torch.equal(a.head_weight, b.head_weight)
    assert torch.equal(a.head_bias, b.head_bias)


# ---------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["decomposed", "subset"])
def test_round_trip_is_bit_identical(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    modules, activity = request.getfixturevalue(which)
    path = save_store(tmp_path / "store", modules, activity, PROVENANCE)
    assert path == tmp_path / "store"
    store = load_store(path)
    assert_same_modules(modules, store.modules)
    assert store.provenance == PROVENANCE
    assert store.activity is not None
    assert store.activity.sites == activity.sites
    assert store.activity.chosen == activity.chosen
    assert torch.equal(store.activity.group_sizes, activity.group_sizes)
    assert store.activity.counts.keys() == activity.counts.keys()
    for name, counts in activity.counts.items():
        assert torch.equal(store.activity.counts[name], counts), name
    images, _ = noise(16, seed=7)
    for scoring in ("softmax", "logit"):
        assert torch.equal(store.modules.scores(images, scoring), modules.scores(images, scoring))
    assert torch.equal(store.modules.parent.logits(images), modules.parent.logits(images))


def test_subset_keeps_the_order_classes_were_named(subset: tuple[ModuleSet, Activity], tmp_path: Path) -> None:
    store = load_store(save_store(tmp_path / "store", *subset))
    assert store.modules.class_names == ("z", "x")
    assert store.modules.parent.classes == ("w", "x", "y", "z")  # the whole parent is kept


def test_load_without_activity_and_store_without_activity(decomposed: tuple[ModuleSet, Activity],
                                                          saved: Path, tmp_path: Path) -> None:
    assert load_store(saved, with_activity=False).activity is None
    bare = save_store(tmp_path / "bare", decomposed[0])
    assert not (bare / "activity.safetensors").exists()
    assert read_manifest(bare)["activity"] is None
    store = load_store(bare)
    assert store.activity is None and store.provenance == {}
    assert_same_modules(decomposed[0], store.modules)


def test_manifest_records_hashes_of_the_files(saved: Path) -> None:
    manifest = read_manifest(saved)
    files = store_files(saved)
    assert manifest["parent"]["sha256"] == files["parent.safetensors"]
    assert manifest["activity"]["sha256"] == files["activity.safetensors"]
    for entry in manifest["modules"]:
        assert entry["sha256"] == files[entry["file"]]
    assert [m["class"] for m in manifest["modules"]] == ["w", "x", "y", "z"]


# ---------------------------------------------------------------------------------------------------------
# Damage is a StoreError
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "match"), [
    (None, "not a cnnmod store"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    ("[1, 2]", "not a cnnmod store manifest"),
    ('{"format": "something.else", "version": 1}', "not a cnnmod store manifest"),
    ('{"format": "cnnmod.store", "version": 99}', "version 99"),
])
def test_read_manifest_errors(content: str | bytes | None, match: str, tmp_path: Path) -> None:
    if isinstance(content, str):
        (tmp_path / "manifest.json").write_text(content)
    elif isinstance(content, bytes):
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match=match):
        read_manifest(tmp_path)
    with pytest.raises(StoreError, match=match):
        load_store(tmp_path)


def test_tampered_parent_file_is_store_error(saved: Path) -> None:
    flip_last_bytes(saved / "parent.safetensors")
    with pytest.raises(StoreError, match=r"parent\.safetensors.*sha256"):
        load_store(saved)


def test_tampered_module_file_is_store_error(saved: Path) -> None:
    flip_last_bytes(saved / "modules" / "0002.safetensors")
    with pytest.raises(StoreError, match=r"0002\.safetensors.*sha256"):
        load_store(saved)


def test_tampered_activity_file_is_store_error_unless_skipped(saved: Path) -> None:
    flip_last_bytes(saved / "activity.safetensors")
    with pytest.raises(StoreError, match=r"activity\.safetensors.*sha256"):
        load_store(saved)
    assert load_store(saved, with_activity=False).activity is None  # the modules alone are still fine


def test_missing_module_file_is_store_error(saved: Path) -> None:
    (saved / "modules" / "0001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"0001\.safetensors"):
        load_store(saved)


def test_edited_parent_fingerprint_is_store_error(saved: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["parent"]["fingerprint"] = "0" * 64

    edit_manifest(saved, edit)
    with pytest.raises(StoreError, match="fingerprint"):
        load_store(saved)


def test_swapped_parent_with_matching_hash_is_store_error(saved: Path, tmp_path: Path,
                                                          decomposed: tuple[ModuleSet, Activity]) -> None:
    """Another parent of the same architecture, with the manifest's sha256 updated to match the new file:
    only the fingerprint tells that the modules belong to a different parent."""
    other_parent = parent_of(RandomConvNet(seed=5).eval(), (6, 6), classes=["w", "x", "y", "z"])
    modules = decomposed[0]
    other = ModuleSet(other_parent, modules.class_indices, modules.sites, modules.masks, modules.head_weight,
                      modules.head_bias, modules.config)
    donor = save_store(tmp_path / "donor", other)
    (saved / "parent.safetensors").write_bytes((donor / "parent.safetensors").read_bytes())
    sha = read_manifest(donor)["parent"]["sha256"]

    def edit(m: dict[str, Any]) -> None:
        m["parent"]["sha256"] = sha

    edit_manifest(saved, edit)
    with pytest.raises(StoreError, match="fingerprint"):
        load_store(saved)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["parent"].pop("input_spec"), id="parent-field-missing"),
    pytest.param(lambda m: m["modules"][0].pop("sha256"), id="module-hash-missing"),
    pytest.param(lambda m: m["sites"][0].update(shape=[1, 2, 3]), id="site-shape-changed"),
    pytest.param(lambda m: m.update(modules=[]), id="no-modules"),
])
def test_inconsistent_manifest_is_store_error(saved: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    edit_manifest(saved, edit)
    with pytest.raises(StoreError, match=str(saved)):
        load_store(saved)


# ---------------------------------------------------------------------------------------------------------
# Writes: no silent overwrite, atomic replacement
# ---------------------------------------------------------------------------------------------------------


def test_save_without_overwrite_refuses_and_keeps_the_old_store(saved: Path,
                                                                subset: tuple[ModuleSet, Activity]) -> None:
    before = store_files(saved)
    with pytest.raises(OutputError, match="--overwrite"):
        save_store(saved, *subset)
    assert store_files(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["store"]


def test_save_into_an_existing_unrelated_folder_refuses(subset: tuple[ModuleSet, Activity], tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputError, match="exists"):
        save_store(tmp_path / "photos", *subset)
    with pytest.raises(OutputError, match="not a cnnmod store"):
        save_store(tmp_path / "photos", *subset, overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_overwrite_replaces_the_store(saved: Path, subset: tuple[ModuleSet, Activity]) -> None:
    save_store(saved, *subset, overwrite=True)
    store = load_store(saved)
    assert_same_modules(subset[0], store.modules)
    assert store.provenance == {}
    assert sorted(p.name for p in (saved / "modules").iterdir()) == ["0000.safetensors", "0001.safetensors"]
    assert sorted(p.name for p in saved.parent.iterdir()) == ["store"]  # no temporary or old folders left


def test_failed_overwrite_keeps_the_old_store(saved: Path, subset: tuple[ModuleSet, Activity],
                                              decomposed: tuple[ModuleSet, Activity],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = store_files(saved)

    def disk_full(path: Path | str, text: str) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cnnmod.storage.store, "atomic_write_text", disk_full)  # the manifest, written last
    with pytest.raises(OSError, match="No space left"):
        save_store(saved, *subset, overwrite=True)
    assert store_files(saved) == before
    assert_same_modules(decomposed[0], load_store(saved).modules)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["store"]


def test_failed_first_save_leaves_nothing(subset: tuple[ModuleSet, Activity], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(cnnmod.storage.store, "atomic_save_safetensors", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_store(tmp_path / "store", *subset)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Loading executes nothing from the files
# ---------------------------------------------------------------------------------------------------------


def test_load_store_never_unpickles(saved: Path, decomposed: tuple[ModuleSet, Activity],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> Any:
        raise AssertionError("load_store unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    store = load_store(saved)
    assert_same_modules(decomposed[0], store.modules)
    assert store.activity is not None
