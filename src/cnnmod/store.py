"""Stores: a folder with the parent (once), every module's bit-packed masks and head, and a JSON manifest.

    STORE/manifest.json            classes, input spec, sites, parameters, provenance, file hashes
    STORE/parent.safetensors       the traced, BatchNorm-folded parent as data (cnnmod.graphio)
    STORE/modules/NNNN.safetensors masks (bit-packed, one per site) and the 2-output head
    STORE/activity.safetensors     per-class activity counts, so masks for another rho need no new pass

A store is written into a temporary folder beside its destination and renamed into place. Loading checks
every file's sha256 and the parent's fingerprint; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .activity import Activity
from .compose import ComposedClassifier, Reverifier, compose, with_reverifiers
from .errors import StoreError
from .fileio import (
    atomic_save_safetensors,
    atomic_write_text,
    load_safetensors,
    pack_bits,
    sha256_file,
    unpack_bits,
)
from .graphio import load_graph, save_graph
from .inputs import InputSpec
from .modules import ModuleSet, Parent
from .trace import Site, trace_model

FORMAT = "cnnmod.store"
VERSION = 1


@dataclass(frozen=True)
class Store:
    """What a store folder holds, loaded and checked."""

    path: Path
    modules: ModuleSet
    activity: Activity | None
    provenance: dict[str, Any] = field(default_factory=dict)


def save_store(path: Path | str, modules: ModuleSet, activity: Activity | None = None,
               provenance: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a store folder atomically; an existing folder is replaced only with `overwrite`."""
    path = Path(path)
    with _atomic_folder(path, overwrite) as tmp:
        _write(tmp, modules, activity, provenance or {})
    return path


@contextmanager
def _atomic_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; renamed into place when the block succeeds, else removed."""
    if path.exists() and not overwrite:
        raise StoreError(f"{path} exists; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename a finished folder into place; an existing one is moved aside first and removed after."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _write(folder: Path, modules: ModuleSet, activity: Activity | None, provenance: dict[str, Any]) -> None:
    parent = modules.parent
    parent_sha = save_graph(parent.model.graph, folder / "parent.safetensors")
    (folder / "modules").mkdir()
    entries = []
    jaccard = modules.jaccard().tolist()
    for i, cls in enumerate(modules.class_indices):
        tensors = {f"mask.{s.name}": pack_bits(modules.masks[s.name][i]) for s in modules.sites}
        tensors["head.weight"] = modules.head_weight[i].contiguous()
        tensors["head.bias"] = modules.head_bias[i].contiguous()
        name = f"modules/{i:04d}.safetensors"
        sha = atomic_save_safetensors(folder / name, tensors)
        entries.append({"class": parent.classes[cls], "class_index": cls, "file": name, "sha256": sha,
                        "jaccard": jaccard[i]})
    activity_entry = None
    if activity is not None:
        tensors = {f"counts.{k}": v.contiguous() for k, v in activity.counts.items()}
        tensors["group_sizes"] = activity.group_sizes
        tensors["chosen"] = torch.tensor(activity.chosen, dtype=torch.long)
        sha = atomic_save_safetensors(folder / "activity.safetensors", tensors)
        activity_entry = {"file": "activity.safetensors", "sha256": sha, "site_kind": activity.sites[0].kind}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "cnnmod_version": __version__,
        "parent": {
            "arch": parent.arch,
            "file": "parent.safetensors",
            "sha256": parent_sha,
            "fingerprint": parent.fingerprint(),
            "classes": list(parent.classes),
            "input_spec": parent.input_spec.to_json(),
        },
        "sites": [{"name": s.name, "kind": s.kind, "shape": list(s.shape)} for s in modules.sites],
        "config": modules.config,
        "modules": entries,
        "activity": activity_entry,
        "provenance": provenance,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))


def read_manifest(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise StoreError(f"{path} is not a cnnmod store (no manifest.json)")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{file} is not valid JSON ({e}); the store is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a cnnmod store manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{path} is store version {manifest.get('version')}; this cnnmod reads version {VERSION}")
    return manifest


def load_parent(path: Path | str, manifest: dict[str, Any] | None = None) -> Parent:
    path = Path(path)
    manifest = manifest or read_manifest(path)
    try:
        info = manifest["parent"]
        graph = load_graph(path / info["file"], info["sha256"])
        spec = InputSpec.from_json(info["input_spec"])
        parent = Parent(trace_model(graph, (spec.channels, *spec.size)), tuple(info["classes"]), spec, info["arch"])
        expected = info["fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}/manifest.json lacks or garbles a parent field ({e})") from None
    if parent.fingerprint() != expected:
        raise StoreError(f"{path}: the parent does not match its fingerprint; the store is damaged")
    return parent


def load_store(path: Path | str, with_activity: bool = True) -> Store:
    """Load and check a store folder."""
    path = Path(path)
    manifest = read_manifest(path)
    parent = load_parent(path, manifest)
    try:
        sites = tuple(Site(s["name"], s["kind"], tuple(s["shape"])) for s in manifest["sites"])
        known = {s.name: s for s in parent.model.site_list(sites[0].kind)} if sites else {}
        if any(known.get(s.name) != s for s in sites):
            raise StoreError(f"{path}: the manifest's sites do not match the parent's graph")
        masks: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        weights, biases, indices = [], [], []
        for entry in manifest["modules"]:
            tensors, _ = load_safetensors(path / entry["file"], entry["sha256"])
            for s in sites:
                masks[s.name].append(unpack_bits(tensors[f"mask.{s.name}"], s.shape))
            weights.append(tensors["head.weight"])
            biases.append(tensors["head.bias"])
            indices.append(int(entry["class_index"]))
        activity = None
        if with_activity and manifest.get("activity"):
            entry = manifest["activity"]
            tensors, _ = load_safetensors(path / entry["file"], entry["sha256"])
            activity = Activity(sites, {s.name: tensors[f"counts.{s.name}"] for s in sites},
                                tensors["group_sizes"], tuple(int(c) for c in tensors["chosen"].tolist()))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StoreError(f"{path}: manifest and files disagree ({type(e).__name__}: {e}); the store is damaged") \
            from None
    if not weights:
        raise StoreError(f"{path} holds no modules")
    modules = ModuleSet(parent, tuple(indices), sites, {k: torch.stack(v) for k, v in masks.items()},
                        torch.stack(weights), torch.stack(biases), dict(manifest.get("config", {})))
    return Store(path, modules, activity, dict(manifest.get("provenance", {})))


def store_files(path: Path | str) -> dict[str, str]:
    """sha256 of every file of a store, for reports."""
    path = Path(path)
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


COMPOSITION_FORMAT = "cnnmod.composition"


def save_composition(path: Path | str, composed: ComposedClassifier, overwrite: bool = False) -> Path:
    """A composed classifier as a folder: one store per parent group (its modules only) and the labels."""
    path = Path(path)
    with _atomic_folder(path, overwrite) as tmp:
        groups, offset = [], 0
        for i, group in enumerate(composed.groups):
            _write_group(tmp / f"group{i}", group)
            groups.append({"store": f"group{i}", "labels": list(composed.labels[offset:offset + len(group)])})
            offset += len(group)
        reverifiers = []
        for i, rv in enumerate(composed.reverifiers):
            _write_group(tmp / f"reverify{i}", rv.modules)
            reverifiers.append({"store": f"reverify{i}", "labels": list(rv.labels)})
        manifest = {"format": COMPOSITION_FORMAT, "version": VERSION, "cnnmod_version": __version__,
                    "scoring": composed.scoring, "groups": groups, "reverifiers": reverifiers}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    return path


def _write_group(folder: Path, modules: ModuleSet) -> None:
    folder.mkdir()
    _write(folder, modules, None, {})


def load_composition(path: Path | str) -> ComposedClassifier:
    """Load a folder written by `save_composition`, or a plain store (all its modules, labelled by class)."""
    path = Path(path)
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != COMPOSITION_FORMAT:
        return compose([load_store(path, with_activity=False).modules])
    try:
        groups, labels = [], []
        for entry in manifest["groups"]:
            groups.append(load_store(path / entry["store"], with_activity=False).modules)
            labels.extend(entry["labels"])
        reverifiers = [Reverifier(tuple(rv["labels"]), load_store(path / rv["store"], with_activity=False).modules)
                       for rv in manifest.get("reverifiers", [])]
        return with_reverifiers(compose(groups, labels, manifest["scoring"]), reverifiers)
    except (KeyError, TypeError) as e:
        raise StoreError(f"{file} lacks or garbles a field ({e}); the composition is damaged") from None
