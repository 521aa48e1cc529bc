"""Compact modules in a store: each module's own small network as a file of its own.

    STORE/modules/NNNN.net.safetensors   module NNNN as a standalone network: its graph as data (storage/graphio.py),
                                         its sliced weights, its kept channels, its parent's fingerprint
    STORE/modules/prefix.net.safetensors (when the modules share their first layers) those layers' weights, once:
                                         a network of its own (images -> the cut's features)
    STORE/modules/shared.safetensors     (optional) the shared engine's network: the union of the modules'
                                         channels, features out

The first layers that every module holds identically (a frozen prefix of the parent, or a narrowed prefix
fine-tuned for all of them) are stored once, in the prefix file; a module's file holds the rest of its weights
and names the prefix file by name and sha256. Ten ResNet-20 modules then take 0.24 + 10 x 0.07 of the parent's
bytes instead of 10 x 0.31.

With `decompose --weights-dtype float16` these files keep float16 weights (the metadata key
`cnnmod.weights_dtype` says so), half the bytes; the modules were rounded to float16 values when they were made
(CompactNets.stored_as), and they load back as float32 networks that run exactly what was measured.

A module's network file (with the prefix file it names, beside it) is loadable and runnable without the
parent's weights (`load_module_network`). Loading a store checks more: the network must be exactly the parent's
graph sliced to the kept channels it names (only weights may differ), so a file from another parent or another
keep set is refused naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..engine.channels import (
    ChannelPlan,
    _sorted_keep,
    channel_plan,
    materialize,
    network_cost,
    plan_head_features,
    split_at,
)
from ..engine.engines import WEIGHT_DTYPES, CompactNets, SharedNet, common_prefix, union_keeps
from ..errors import StoreError
from .fileio import atomic_save_safetensors, load_safetensors
from .graphio import METADATA_KEY, graph_from_data, graph_to_data

KEEP_KEY = "cnnmod.keep"
FINGERPRINT_KEY = "cnnmod.parent_fingerprint"  # the same key as the module files of cnnmod.storage.store
INPUT_KEY = "cnnmod.input_shape"
PREFIX_KEY = "cnnmod.prefix"  # {"file", "sha256"}: the prefix file (same folder) holding this network's first layers
WEIGHTS_DTYPE_KEY = "cnnmod.weights_dtype"  # present when the weights are stored in a dtype other than float32
PREFIX_FILE = "modules/prefix.net.safetensors"
MAX_KEEP_BYTES = 16 << 20


@dataclass(frozen=True)
class _Prefix:
    """The store's prefix file: its name beside the module files, its sha256, and the tensors it holds."""

    name: str
    sha256: str
    tensors: dict[str, torch.Tensor]

    def reference(self) -> str:
        return json.dumps({"file": self.name, "sha256": self.sha256}, separators=(",", ":"))


def save_network(path: Path, net: fx.GraphModule, keep: dict[int, torch.Tensor], fingerprint: str,
                 input_shape: tuple[int, ...], prefix: _Prefix | None = None, weights_dtype: str = "float32") -> str:
    """Write one module network (graph as data, weights, kept channels, parent fingerprint); returns its sha256.
    With `prefix`, the weights equal to the prefix file's are left to that file, which the network names."""
    desc, tensors = graph_to_data(net)
    tensors = _stored(tensors, weights_dtype, path)
    metadata = {
        METADATA_KEY: json.dumps(desc, allow_nan=False, separators=(",", ":")),
        KEEP_KEY: json.dumps({str(s): [int(c) for c in k.tolist()] for s, k in sorted(keep.items())},
                             separators=(",", ":")),
        FINGERPRINT_KEY: fingerprint,
        INPUT_KEY: json.dumps(list(input_shape)),
        **_dtype_metadata(weights_dtype),
    }
    if prefix is not None:
        held = {k for k, v in tensors.items() if k in prefix.tensors and _same_tensor(v, prefix.tensors[k])}
        if held:
            tensors = {k: v for k, v in tensors.items() if k not in held}
            metadata[PREFIX_KEY] = prefix.reference()
    return atomic_save_safetensors(path, tensors, metadata)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _stored(tensors: dict[str, torch.Tensor], weights_dtype: str, path: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors in `weights_dtype`. The networks' own weights already hold its values
    (CompactNets.stored_as); a head calibrated since is rounded here, in this file only: the store runs the heads
    of its mask files, kept in float32."""
    dtype = WEIGHT_DTYPES[weights_dtype]
    if dtype == torch.float32:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float32:
            stored = tensor.to(dtype)
            if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(tensor).all()):
                raise StoreError(f"{path}: {name} has values beyond {weights_dtype}'s range; keep the modules' "
                                 "weights as float32")
            tensor = stored
        out[name] = tensor
    return out


def _dtype_metadata(weights_dtype: str) -> dict[str, str]:
    return {} if weights_dtype == "float32" else {WEIGHTS_DTYPE_KEY: weights_dtype}


def _as_float32(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors as the networks run them: weights stored in a smaller float dtype, back in float32."""
    name = metadata.get(WEIGHTS_DTYPE_KEY)
    if name is None:
        return tensors
    if name not in WEIGHT_DTYPES:
        raise StoreError(f"{path} stores its weights as {name!r}, which this cnnmod cannot read "
                         f"({', '.join(WEIGHT_DTYPES)})")
    dtype = WEIGHT_DTYPES[name]
    return {k: v.to(torch.float32) if v.dtype == dtype else v for k, v in tensors.items()}


def _save_prefix(folder: Path, net: fx.GraphModule, fingerprint: str, weights_dtype: str = "float32"
                 ) -> tuple[_Prefix, int]:
    """Write the layers every module shares as a network of their own; returns it and its file's bytes."""
    desc, tensors = graph_to_data(net)
    tensors = _stored(tensors, weights_dtype, folder / PREFIX_FILE)
    sha = atomic_save_safetensors(folder / PREFIX_FILE, tensors, {
        METADATA_KEY: json.dumps(desc, allow_nan=False, separators=(",", ":")), FINGERPRINT_KEY: fingerprint,
        **_dtype_metadata(weights_dtype)})
    return _Prefix(Path(PREFIX_FILE).name, sha, tensors), (folder / PREFIX_FILE).stat().st_size


def _prefix_tensors(path: Path, text: str) -> dict[str, torch.Tensor]:
    """The tensors of the prefix file that the network file at `path` names (beside it, checked by sha256)."""
    try:
        ref = json.loads(text, parse_constant=_refuse)
    except (ValueError, RecursionError):
        ref = None
    name = ref.get("file") if isinstance(ref, dict) else None
    sha = ref.get("sha256") if isinstance(ref, dict) else None
    if not (isinstance(name, str) and isinstance(sha, str) and name == Path(name).name and name not in ("", ".", "..")
            and len(sha) == 64):
        raise StoreError(f"{path}: its reference to the prefix file that holds its first layers is unreadable")
    where = path.parent / name
    if not where.is_file():
        raise StoreError(f"{path} reads its first layers from {where}, which is missing: copy the module files "
                         "with the prefix file beside them")
    return _as_float32(*load_safetensors(where, sha), where)


def load_module_network(path: Path | str, expected_sha256: str | None = None
                        ) -> tuple[fx.GraphModule, dict[int, torch.Tensor], str]:
    """A module's network from its file (and the store's prefix file it names, beside it), without the parent:
    (network, kept channels per space, parent fingerprint)."""
    path = Path(path)
    tensors, metadata = load_safetensors(path, expected_sha256)
    tensors = _as_float32(tensors, metadata, path)
    text, keep_text = metadata.get(METADATA_KEY), metadata.get(KEEP_KEY)
    if text is None or keep_text is None or len(keep_text) > MAX_KEEP_BYTES:
        raise StoreError(f"{path} is not a compact module network (no graph or kept channels)")
    if PREFIX_KEY in metadata:
        shared = _prefix_tensors(path, metadata[PREFIX_KEY])
        if set(shared) & set(tensors):
            raise StoreError(f"{path} holds weights its prefix file holds too; the store is damaged")
        tensors = {**shared, **tensors}
    try:
        desc = json.loads(text, parse_constant=_refuse)
        raw = json.loads(keep_text, parse_constant=_refuse)
        net = graph_from_data(desc, tensors)
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path} has an unreadable description: {' '.join(str(e).split())}") from None
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isdigit() and len(k) < 7 and isinstance(v, list)
                                            and all(type(c) is int for c in v) for k, v in raw.items()):
        raise StoreError(f"{path}: the kept channels are not lists of channel numbers per space")
    keep = {int(k): torch.tensor(v, dtype=torch.long) for k, v in raw.items()}
    return net.eval(), keep, str(metadata.get(FINGERPRINT_KEY, ""))


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def write_networks(folder: Path, modules: Any, entries: list[dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    """Write every compact module's network beside its mask file, add `network` to its manifest entry, and
    return the manifest's `compact` block."""
    compact: CompactNets = modules.compact
    parent = modules.parent
    shape = tuple(parent.model.input_shape)
    nets = compact.networks(modules.head_weight, modules.head_bias)
    dtype = compact.weights_dtype
    block: dict[str, Any] = {"engine": compact.engine, "shared": None, "prefix": None, "weights_dtype": dtype}
    cut = common_prefix(nets, shape)
    prefix = None
    if cut is not None:
        prefix, size = _save_prefix(folder, split_at(nets[0], cut)[0], fingerprint, dtype)
        block["prefix"] = {"file": PREFIX_FILE, "sha256": prefix.sha256, "bytes": size, "cut": cut}
    for i, (net, keep, entry) in enumerate(zip(nets, compact.keeps, entries, strict=True)):
        name = f"modules/{i:04d}.net.safetensors"
        keep = {s: k for s, k in _sorted_keep(keep, compact.plan).items() if compact.plan.spaces[s].prunable}
        sha = save_network(folder / name, net, keep, fingerprint, shape, prefix, dtype)
        params, macs = network_cost(net, shape)
        entry["network"] = {"file": name, "sha256": sha, "parameters": params, "macs": macs,
                            "bytes": (folder / name).stat().st_size}
    if compact.shared is not None:
        name = "modules/shared.safetensors"
        keep = {s: k for s, k in compact.shared.union.items() if compact.plan.spaces[s].prunable}
        sha = save_network(folder / name, compact.shared.trunk, keep, fingerprint, shape, prefix, dtype)
        block["shared"] = {"file": name, "sha256": sha}
    return block


def _expected_graph(parent_graph: fx.GraphModule, plan: ChannelPlan, keep: dict[int, torch.Tensor]) -> dict:
    features = plan_head_features(plan, parent_graph)
    expected = materialize(parent_graph, plan, keep, torch.zeros(2, features), torch.zeros(2))
    return graph_to_data(expected)[0]


def _checked_keep(keep: dict[int, torch.Tensor], plan: ChannelPlan, where: Path) -> dict[int, torch.Tensor]:
    prunable = set(plan.prunable)
    if set(keep) != prunable:
        raise StoreError(f"{where}: it names kept channels of spaces {sorted(keep)}, but the parent's prunable "
                         f"spaces are {sorted(prunable)}; the store is damaged")
    for s, k in keep.items():
        size = plan.spaces[s].size
        if len(k) == 0 or len(k) > size or int(k.min()) < 0 or int(k.max()) >= size \
                or not torch.equal(k, k.unique(sorted=True)):
            raise StoreError(f"{where}: the kept channels of space {s} are not distinct channels of 0..{size - 1} "
                             "in order; the store is damaged")
    return keep


def load_networks(path: Path, manifest: dict[str, Any], modules: Any) -> Any:
    """`modules` (loaded from the mask files) with their compact networks, each checked against the parent."""
    import dataclasses

    block = manifest.get("compact")
    entries = manifest["modules"]
    if block is None or any(e.get("network") is None for e in entries):
        raise StoreError(f"{path}/manifest.json: a compact store needs its compact block and every module's "
                         "network; the file was edited or damaged")
    parent = modules.parent
    fingerprint = manifest["parent"]["fingerprint"]
    try:
        plan = channel_plan(parent.model)
    except Exception as e:  # a parent whose channels cannot be followed cannot have compact modules
        raise StoreError(f"{path}: the parent has no channel plan for compact modules ({e})") from None
    nets, keeps = [], []
    for entry in entries:
        where = path / entry["network"]["file"]
        net, keep, owner = load_module_network(where, entry["network"]["sha256"])
        if owner != fingerprint:
            raise StoreError(f"{where} was made from another parent than {path}/parent.safetensors "
                             "(fingerprints differ): modules only work with the parent they were made from")
        keep = _checked_keep(keep, plan, where)
        desc = graph_to_data(net)[0]
        if desc != _expected_graph(parent.model.graph, plan, keep):
            raise StoreError(f"{where} is not the parent's network sliced to the channels it names; the store is "
                             "damaged")
        nets.append(net)
        keeps.append(keep)
    shared = None
    if block.get("shared") is not None:
        where = path / block["shared"]["file"]
        trunk, union, owner = load_module_network(where, block["shared"]["sha256"])
        if owner != fingerprint:
            raise StoreError(f"{where} was made from another parent (fingerprints differ)")
        union = _checked_keep(union, plan, where)
        expected = union_keeps(plan, keeps)
        if any(not torch.equal(union[s], expected[s]) for s in union) \
                or graph_to_data(trunk)[0] != graph_to_data(trunk_network(parent.model.graph, plan, union))[0]:
            raise StoreError(f"{where} is not the parent's network sliced to the union of the modules' channels; "
                             "the store is damaged")
        shared = build_shared(plan, keeps, trunk)
    dtype = block.get("weights_dtype", "float32")
    if dtype not in WEIGHT_DTYPES:
        raise StoreError(f"{path}/manifest.json: the modules' weights dtype {dtype!r} is not one of "
                         f"{', '.join(WEIGHT_DTYPES)}; the file was edited or damaged")
    compact = CompactNets(plan, tuple(keeps), tuple(nets), shared, "exact", tuple(parent.model.input_shape),
                          parent.model.graph, weights_dtype=dtype)
    if block.get("engine") == "shared" and shared is not None:
        compact = compact.with_engine("shared")
    return dataclasses.replace(modules, compact=compact)


def trunk_network(parent_graph: fx.GraphModule, plan: ChannelPlan, keep: dict[int, torch.Tensor],
                  source: fx.GraphModule | None = None) -> fx.GraphModule:
    """The parent sliced to `keep` without its head: images -> kept features (weights from `source` if given)."""
    features = plan_head_features(plan, parent_graph)
    net = materialize(parent_graph, plan, keep, torch.zeros(2, features), torch.zeros(2))
    if source is not None:
        net.load_state_dict({k: v for k, v in source.state_dict().items()
                             if not k.startswith(plan.head.target + ".")}, strict=False)
    from ..engine.channels import _set_submodule

    _set_submodule(net, plan.head.target, torch.nn.Identity())
    net.recompile()
    return net.eval()


def build_shared(plan: ChannelPlan, keeps: list[dict[int, torch.Tensor]], trunk: fx.GraphModule) -> SharedNet:
    """The shared engine over a union trunk (images -> union features): each module's head columns in it."""
    union = union_keeps(plan, keeps)
    head = plan.head
    position = {int(c): i for i, c in enumerate(union[plan.head_space].tolist())}
    columns = []
    for keep in keeps:
        kept = _sorted_keep(keep, plan)[plan.head_space]
        cols = torch.tensor([position[int(c)] for c in kept.tolist()], dtype=torch.long)
        columns.append((cols.view(-1, 1) * head.repeat + torch.arange(head.repeat)).flatten())
    from ..engine.channels import _feature_index

    return SharedNet(trunk, union, tuple(columns), _feature_index(union[plan.head_space], head.repeat))


def module_sizes(path: Path, manifest: dict[str, Any], modules: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parent's size and each module's: parameters, multiply-accumulates per image and file bytes, each also
    as a fraction of the parent's. A compact module is its network file; where the modules share their first
    layers it also needs the store's prefix file, so `file_bytes_with_prefix` is what one module takes on its own.
    A masking module runs the whole parent (its MACs are the parent's) and its file holds masks and a head, which
    run only with the parent's file."""
    from ..engine.channels import parent_cost

    params, macs = parent_cost(modules.parent.model)
    parent_bytes = (path / manifest["parent"]["file"]).stat().st_size
    parent = {"parameters": params, "macs": macs, "file_bytes": parent_bytes}
    rows = []
    if modules.compact is not None:
        prefix = (manifest.get("compact") or {}).get("prefix")
        prefix_bytes = (path / prefix["file"]).stat().st_size if prefix else 0
        for entry in manifest["modules"]:
            net = entry["network"]
            mask_bytes = (path / entry["file"]).stat().st_size
            rows.append({"standalone": True, "weights_dtype": modules.compact.weights_dtype,
                         "parameters": net["parameters"], "macs": net["macs"],
                         "file_bytes": net["bytes"], "file_bytes_with_prefix": net["bytes"] + prefix_bytes,
                         "prefix_file_bytes": prefix_bytes, "mask_file_bytes": mask_bytes})
    else:
        from ..workflows.metrics import parameter_counts

        kept = parameter_counts(modules).kept
        for entry, p in zip(manifest["modules"], kept, strict=True):
            rows.append({"standalone": False, "parameters": p, "macs": macs,
                         "file_bytes": (path / entry["file"]).stat().st_size})
    for row in rows:
        for key in ("parameters", "macs", "file_bytes", "file_bytes_with_prefix"):
            if key in row:
                base = parent["file_bytes"] if key.startswith("file_bytes") else parent[key]
                row[f"{key}_fraction"] = row[key] / base if base else None
    return parent, rows
