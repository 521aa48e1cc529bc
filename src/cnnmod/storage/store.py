"""Stores: a folder with the parent (once), every module's bit-packed masks and head, and a JSON manifest.

    STORE/manifest.json            classes, input spec, sites, parameters, provenance, file hashes
    STORE/parent.safetensors       the traced, BatchNorm-folded parent as data (cnnmod.storage.graphio)
    STORE/modules/NNNN.safetensors masks (bit-packed, one per site) and the 2-output head
    STORE/activity.safetensors     per-class activity counts (only when asked for: `decompose --keep-activity`),
                                   so masks for another rho need no new pass; integers of the smallest dtype

A store is written into a temporary folder beside its destination and swapped into place (cnnmod.storage.outputs).
Loading checks the manifest against its schema (cnnmod.storage.manifest), every file's sha256, the parent's fingerprint,
and that every module file names that fingerprint; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..engine.activity import Activity, count_dtype
from ..engine.compose import ComposedClassifier, Reverifier, compose, with_reverifiers
from ..engine.inputs import InputSpec
from ..engine.modules import ModuleSet, Parent
from ..engine.trace import Site, trace_model
from ..errors import CnnmodError, StoreError
from .fileio import (
    atomic_save_safetensors,
    atomic_write_text,
    load_safetensors,
    pack_bits,
    sha256_file,
    unpack_bits,
)
from .graphio import load_graph, save_graph
from .manifest import COMPOSITION_SCHEMA, STORE_SCHEMA, unique, validate
from .outputs import folder_with_format, recover_interrupted, register_kind, write_folder

FORMAT = "cnnmod.store"
VERSION = 2
MAX_MANIFEST_BYTES = 64 << 20
PARENT_FINGERPRINT_KEY = "cnnmod.parent_fingerprint"


@dataclass(frozen=True)
class Store:
    """What a store folder holds, loaded and checked."""

    path: Path
    modules: ModuleSet
    activity: Activity | None
    provenance: dict[str, Any] = field(default_factory=dict)


def save_store(path: Path | str, modules: ModuleSet, activity: Activity | None = None,
               provenance: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a store folder atomically; with `overwrite`, an existing store (and nothing else) is replaced."""
    path = Path(path)
    with write_folder(path, "store", overwrite) as tmp:
        _write(tmp, modules, activity, provenance or {})
    return path


def _json(value: Any, file: str) -> str:
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError as e:
        raise StoreError(f"cannot write {file}: a value is not finite ({e}); check the options given") from None


def _write(folder: Path, modules: ModuleSet, activity: Activity | None, provenance: dict[str, Any]) -> None:
    parent = modules.parent
    parent_sha = save_graph(parent.model.graph, folder / "parent.safetensors")
    fingerprint = parent.fingerprint()
    (folder / "modules").mkdir()
    entries = []
    jaccard = modules.jaccard().tolist()
    for i, cls in enumerate(modules.class_indices):
        tensors = {f"mask.{s.name}": pack_bits(modules.masks[s.name][i]) for s in modules.sites}
        tensors["head.weight"] = modules.head_weight[i].contiguous()
        tensors["head.bias"] = modules.head_bias[i].contiguous()
        name = f"modules/{i:04d}.safetensors"
        sha = atomic_save_safetensors(folder / name, tensors, {PARENT_FINGERPRINT_KEY: fingerprint})
        entries.append({"class": parent.classes[cls], "class_index": cls, "file": name, "sha256": sha,
                        "jaccard": jaccard[i]})
    activity_entry = None
    if activity is not None:
        tensors = {f"counts.{k}": v.contiguous() for k, v in activity.counts.items()}
        tensors.update({f"others.{k}": v.contiguous() for k, v in activity.others.items()})
        tensors["group_sizes"] = activity.group_sizes.to(torch.int64)
        tensors["chosen"] = torch.tensor(activity.chosen, dtype=torch.long)
        sha = atomic_save_safetensors(folder / "activity.safetensors", tensors)
        activity_entry = {"file": "activity.safetensors", "sha256": sha, "site_kind": activity.sites[0].kind,
                          "granularity": activity.granularity}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "cnnmod_version": __version__,
        "parent": {
            "arch": parent.arch,
            "file": "parent.safetensors",
            "sha256": parent_sha,
            "fingerprint": fingerprint,
            "classes": list(parent.classes),
            "input_spec": parent.input_spec.to_json(),
        },
        "sites": [{"name": s.name, "kind": s.kind, "shape": list(s.shape)} for s in modules.sites],
        "config": modules.config,
        "modules": entries,
        "activity": activity_entry,
        "provenance": provenance,
    }
    if modules.compact is not None:  # compact modules: each also its own network file (cnnmod.storage.compactstore)
        from .compactstore import write_networks

        manifest["compact"] = write_networks(folder, modules, entries, fingerprint)
    atomic_write_text(folder / "manifest.json", _json(manifest, str(folder / "manifest.json")))


def _read_json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise StoreError(f"{file.parent} is not a cnnmod {what} (no manifest.json)")
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise StoreError(f"cannot read {file}: {e.strerror or e}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{file} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a cnnmod manifest")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{file} is not valid JSON ({str(e).splitlines()[0][:100]}); the {what} is damaged") \
            from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of a store folder, checked against its schema and with itself (see cnnmod.storage.manifest)."""
    path = Path(path)
    file = path / "manifest.json"
    manifest = _read_json(file, "store")
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("version") != VERSION:
        raise StoreError(f"{path} is store version {manifest.get('version')!r}; this cnnmod reads version {VERSION}: "
                         "decompose the model again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a cnnmod store manifest")
    validate(manifest, STORE_SCHEMA, str(file))
    classes = manifest["parent"]["classes"]
    unique(classes, "parent.classes entry", str(file))
    indices = [m["class_index"] for m in manifest["modules"]]
    unique(indices, "modules[].class_index", str(file))
    for i, entry in enumerate(manifest["modules"]):
        if entry["class_index"] >= len(classes):
            raise StoreError(f"{file}: modules[{i}].class_index {entry['class_index']} is out of range for "
                             f"{len(classes)} classes; the file was edited or damaged")
        if entry["class"] != classes[entry["class_index"]]:
            raise StoreError(f"{file}: modules[{i}].class {entry['class']!r} is not class "
                             f"{entry['class_index']} of the parent; the file was edited or damaged")
    unique([m["file"] for m in manifest["modules"]], "modules[].file", str(file))
    unique([s["name"] for s in manifest["sites"]], "sites[].name", str(file))
    if len({s["kind"] for s in manifest["sites"]}) != 1:
        raise StoreError(f"{file}: sites mix kinds; the file was edited or damaged")
    return manifest


def load_parent(path: Path | str, manifest: dict[str, Any] | None = None) -> Parent:
    path = Path(path)
    manifest = manifest or read_manifest(path)
    info = manifest["parent"]
    graph = load_graph(path / info["file"], info["sha256"])
    spec = InputSpec.from_json(info["input_spec"])
    try:
        traced = trace_model(graph, (spec.channels, *spec.size))
    except CnnmodError as e:
        raise StoreError(f"{path}: the stored parent cannot be rebuilt ({e})") from None
    if traced.head.num_classes != len(info["classes"]):
        raise StoreError(f"{path}/manifest.json: parent.classes lists {len(info['classes'])} classes but the "
                         f"parent has {traced.head.num_classes} outputs; the file was edited or damaged")
    parent = Parent(traced, tuple(info["classes"]), spec, info["arch"])
    if parent.fingerprint() != info["fingerprint"]:
        raise StoreError(f"{path}: the parent does not match its fingerprint; the store is damaged")
    return parent


def _module_tensors(path: Path, entry: dict[str, Any], fingerprint: str) -> dict[str, torch.Tensor]:
    tensors, metadata = load_safetensors(path / entry["file"], entry["sha256"])
    if metadata.get(PARENT_FINGERPRINT_KEY) != fingerprint:
        raise StoreError(f"{path / entry['file']} was made from another parent than {path}/parent.safetensors "
                         "(fingerprints differ): modules only work with the parent they were made from")
    return tensors


def load_store(path: Path | str, with_activity: bool = True) -> Store:
    """Load and check a store folder: schema, hashes, and every module bound to this parent."""
    path = Path(path)
    recover_interrupted(path)
    manifest = read_manifest(path)
    parent = load_parent(path, manifest)
    file = f"{path}/manifest.json"
    sites = tuple(Site(s["name"], s["kind"], tuple(s["shape"])) for s in manifest["sites"])
    if sites != parent.model.site_list(sites[0].kind):
        raise StoreError(f"{file}: sites do not match the parent's {sites[0].kind} sites; the file was edited "
                         "or damaged")
    features = parent.model.head.weight.shape[1]
    fingerprint = manifest["parent"]["fingerprint"]
    masks: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    weights, biases, indices = [], [], []
    for entry in manifest["modules"]:
        tensors = _module_tensors(path, entry, fingerprint)
        where = path / entry["file"]
        for s in sites:
            masks[s.name].append(unpack_bits(_tensor(tensors, f"mask.{s.name}", where), s.shape))
        weight, bias = _tensor(tensors, "head.weight", where), _tensor(tensors, "head.bias", where)
        if weight.shape != (2, features) or bias.shape != (2,) or not weight.is_floating_point() \
                or not bias.is_floating_point():
            raise StoreError(f"{where}: the head has shape {list(weight.shape)} and {list(bias.shape)}, not "
                             f"[2, {features}] and [2]; the store is damaged")
        weights.append(weight.float())
        biases.append(bias.float())
        indices.append(int(entry["class_index"]))
    activity = None
    if with_activity and manifest.get("activity"):
        activity = _load_activity(path, manifest["activity"], sites, len(parent.classes))
    modules = ModuleSet(parent, tuple(indices), sites, {k: torch.stack(v) for k, v in masks.items()},
                        torch.stack(weights), torch.stack(biases), dict(manifest["config"]))
    if manifest.get("compact") is not None or any(e.get("network") for e in manifest["modules"]):
        from .compactstore import load_networks

        modules = load_networks(path, manifest, modules)
    return Store(path, modules, activity, dict(manifest["provenance"]))


def require_activity(path: Path | str, command: str) -> None:
    """Refuse, in one line and before any work, a store that holds no activity counts (decomposed without
    --keep-activity) for a command that needs them."""
    if read_manifest(path).get("activity") is None:
        raise StoreError(f"{path} holds no activity counts: {command} needs a store decomposed with "
                         "`cnnmod decompose --keep-activity`")


def _tensor(tensors: dict[str, torch.Tensor], name: str, where: Path) -> torch.Tensor:
    if name not in tensors:
        raise StoreError(f"{where} has no tensor {name!r}; the store is damaged")
    return tensors[name]


_COUNT_TYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _load_activity(path: Path, entry: dict[str, Any], sites: tuple[Site, ...], num_classes: int) -> Activity:
    """The store's activity counts, checked against its sites and classes. A store written before counts were
    integers (float32 counts of every class's 2 groups, no `others`) is read into today's layout."""
    where = path / entry["file"]
    tensors, _ = load_safetensors(where, entry["sha256"])
    granularity = entry.get("granularity") or "node"
    counts = {s.name: _tensor(tensors, f"counts.{s.name}", where) for s in sites}
    group_sizes = _tensor(tensors, "group_sizes", where)
    chosen = _tensor(tensors, "chosen", where)
    damaged = StoreError(f"{where}: activity counts do not fit the store's sites and classes; the store is damaged")
    if chosen.dim() != 1 or chosen.is_floating_point() or group_sizes.dim() != 1 \
            or (chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= num_classes)) \
            or len(set(chosen.tolist())) != chosen.numel():
        raise damaged
    picked = tuple(int(c) for c in chosen.tolist())
    if not any(k.startswith("others.") for k in tensors):
        counts, others, group_sizes = _from_version_2(counts, group_sizes, picked, num_classes, damaged)
    else:
        others = {s.name: _tensor(tensors, f"others.{s.name}", where) for s in sites}
    rows = 2 * len(picked)
    for s in sites:
        shape = s.shape[:1] if granularity == "channel" else s.shape
        c, o = counts[s.name], others[s.name]
        if tuple(c.shape) != (rows, *shape) or tuple(o.shape) != shape \
                or c.dtype not in _COUNT_TYPES or o.dtype not in _COUNT_TYPES:
            raise damaged
    if group_sizes.shape[0] != rows + 1 or group_sizes.is_floating_point() or int(group_sizes.min()) < 0:
        raise damaged
    return Activity(sites, counts, others, group_sizes, picked, granularity)


def _from_version_2(counts: dict[str, torch.Tensor], group_sizes: torch.Tensor, chosen: tuple[int, ...],
                    num_classes: int, damaged: StoreError
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Float counts of all 2K groups -> integer counts of the chosen classes' groups, and the others'."""
    if group_sizes.shape[0] != 2 * num_classes or any(c.shape[:1] != (2 * num_classes,) for c in counts.values()):
        raise damaged
    rows = torch.tensor([g for c in chosen for g in (2 * c, 2 * c + 1)], dtype=torch.long)
    rest = torch.tensor([2 * c + 1 for c in range(num_classes) if c not in set(chosen)], dtype=torch.long)
    sizes = group_sizes.round().to(torch.int64)
    largest = int(sizes[rows].max()) if rows.numel() else 0
    new_counts, others = {}, {}
    for name, c in counts.items():
        whole = c.round().to(torch.int64)
        new_counts[name] = whole[rows].to(count_dtype(largest))
        others[name] = whole[rest].sum(0).to(torch.int64)
    return new_counts, others, torch.cat([sizes[rows], sizes[rest].sum().view(1)])


def store_files(path: Path | str) -> dict[str, str]:
    """sha256 of every file of a store, for reports."""
    path = Path(path)
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


COMPOSITION_FORMAT = "cnnmod.composition"


def save_composition(path: Path | str, composed: ComposedClassifier, overwrite: bool = False) -> Path:
    """A composed classifier as a folder: one store per parent group (its modules only) and the labels. With
    `overwrite`, an existing composition (and nothing else) is replaced."""
    path = Path(path)
    with write_folder(path, "composition", overwrite) as tmp:
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
        atomic_write_text(tmp / "manifest.json", _json(manifest, str(path / "manifest.json")))
    return path


def _write_group(folder: Path, modules: ModuleSet) -> None:
    folder.mkdir()
    _write(folder, modules, None, {})


def _member(path: Path, name: str) -> Path:
    """A store folder named by a composition manifest: a direct child of `path`, never a link out of it."""
    member = path / name
    if "/" in name or member.is_symlink() or not member.is_dir():
        raise StoreError(f"{path}/manifest.json names {name!r}, which is not a store folder inside {path}")
    return member


def load_composition(path: Path | str) -> ComposedClassifier:
    """Load a folder written by `save_composition`, or a plain store (all its modules, labelled by class)."""
    path = Path(path)
    recover_interrupted(path)
    file = path / "manifest.json"
    manifest = _read_json(file, "store or composition")
    if not isinstance(manifest, dict) or manifest.get("format") != COMPOSITION_FORMAT:
        return compose([load_store(path, with_activity=False).modules])
    if manifest.get("version") != VERSION:
        raise StoreError(f"{path} is composition version {manifest.get('version')!r}; this cnnmod reads version "
                         f"{VERSION}: compose it again")
    validate(manifest, COMPOSITION_SCHEMA, str(file))
    unique([e["store"] for e in [*manifest["groups"], *manifest["reverifiers"]]], "store", str(file))
    groups, labels = [], []
    for i, entry in enumerate(manifest["groups"]):
        modules = load_store(_member(path, entry["store"]), with_activity=False).modules
        if len(entry["labels"]) != len(modules):
            raise StoreError(f"{file}: groups[{i}] lists {len(entry['labels'])} labels for {len(modules)} modules; "
                             "the file was edited or damaged")
        groups.append(modules)
        labels.extend(entry["labels"])
    unique(labels, "label", str(file))
    reverifiers = []
    for i, rv in enumerate(manifest["reverifiers"]):
        modules = load_store(_member(path, rv["store"]), with_activity=False).modules
        unknown = [label for label in rv["labels"] if label not in labels]
        if unknown or len(rv["labels"]) != len(modules) or len(set(rv["labels"])) != len(rv["labels"]):
            raise StoreError(f"{file}: reverifiers[{i}] labels {rv['labels']} do not match the composition's labels "
                             f"or its {len(modules)} modules; the file was edited or damaged")
        reverifiers.append(Reverifier(tuple(rv["labels"]), modules))
    try:
        return with_reverifiers(compose(groups, labels, manifest["scoring"]), reverifiers)
    except CnnmodError as e:
        raise StoreError(f"{file}: {e}; the file was edited or damaged") from None


register_kind("store", folder=True, recognise=folder_with_format(FORMAT))
register_kind("composition", folder=True, recognise=folder_with_format(COMPOSITION_FORMAT))
