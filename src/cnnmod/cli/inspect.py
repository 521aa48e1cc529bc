"""`cnnmod inspect`: what a store or model holds, or which architectures the zoo has."""

from __future__ import annotations

from pathlib import Path

import click

from .app import cli, emit, json_option, reports_errors
from .common import ModelSource, describe_spec, open_parent, optional_model_options


@cli.command()
@optional_model_options
@click.option("--models", "list_zoo", is_flag=True, help="List the zoo's architectures.")
@json_option
@reports_errors
def inspect(model: ModelSource | None, list_zoo: bool, as_json: bool) -> None:
    """Describe a store folder, a model (a zoo name without --weights: its architecture), or (with --models)
    the zoo."""
    if list_zoo or model is None:
        from ..zoo import list_models, model_info

        infos = [model_info(n) for n in list_models()]
        emit(as_json, {"models": [{"name": i.name, "input_size": list(i.input_size), "in_channels": i.in_channels,
                                   "description": i.description} for i in infos]},
             "\n".join(f"{i.name:22s} {i.in_channels}x{i.input_size[0]}x{i.input_size[1]}  {i.description}"
                       for i in infos))
        return
    path = Path(model.model)
    if path.is_dir():
        _inspect_store(path, as_json)
    else:
        _inspect_model(model, as_json)


def _inspect_store(path: Path, as_json: bool) -> None:
    from ..storage.compactstore import module_sizes
    from ..storage.store import load_store, read_manifest

    store = load_store(path, with_activity=False)
    m = store.modules
    sites = [{"name": s.name, "shape": list(s.shape), "nodes": s.numel} for s in m.sites]
    jaccard = m.jaccard().tolist()
    parent_size, sizes = module_sizes(path, read_manifest(path), m)
    payload = {
        "store": str(path), "arch": m.parent.arch, "parent_classes": list(m.parent.classes),
        "input_spec": m.parent.input_spec.to_json(), "config": m.config, "sites": sites,
        "nodes_per_module": sum(s.numel for s in m.sites), "parent": parent_size,
        "modules": [{"class": c, "jaccard": j, **size}
                    for c, j, size in zip(m.class_names, jaccard, sizes, strict=True)],
        "provenance": store.provenance,
    }
    lines = [f"store {path}: {len(m)} modules of {m.parent.arch} ({len(m.parent.classes)} classes, input "
             f"{m.parent.input_spec.channels}x{m.parent.input_spec.size[0]}x{m.parent.input_spec.size[1]})",
             f"config: {m.config}",
             f"{len(sites)} {m.sites[0].kind} sites, {payload['nodes_per_module']} nodes per module"]
    conservative = m.config.get("conservative_ops") or []
    if conservative:  # recorded by the decomposition: no exact dependency pattern, all inputs kept
        lines.append(f"backtracked conservatively (every input kept): {', '.join(conservative)}")
    if m.compact is not None:
        lines.append(f"compact modules, each its own network; weights stored as {m.compact.weights_dtype}")
    if isinstance(store.provenance.get("chosen_by"), str):
        lines.append(f"method: --method auto took {store.provenance['chosen_by']}")
    if isinstance(store.provenance.get("cost"), dict):
        lines.append(_cost_line(store.provenance["cost"]))
    if store.provenance.get("held_out") is not None:
        lines.append(_held_out_line(store.provenance["held_out"]))
    lines.append(f"parent: {parent_size['parameters']} parameters, {parent_size['macs']} MACs per image, "
                 f"{parent_size['file_bytes']} bytes")
    lines += [f"  {c:20s} Jaccard {j:.4f}  parameters {s['parameters_fraction']:.1%}  MACs {s['macs_fraction']:.1%}  "
              f"file {s['file_bytes_fraction']:.1%}{_file_note(s)}"
              for c, j, s in zip(m.class_names, jaccard, sizes, strict=True)]
    emit(as_json, payload, "\n".join(lines))


def _cost_line(cost: dict) -> str:
    """What making the modules cost, next to training the parent (the store's record of a compact decomposition).

    The record is free-form provenance that a person may have edited: a field of the wrong type is named in the line
    instead of failing the whole description."""
    training, energy = cost.get("parent_training", {}), cost.get("energy", {})
    for name, table in (("parent_training", training), ("energy", energy)):
        if not isinstance(table, dict):
            return f"cost: not shown (provenance.cost.{name} is {table!r}, not a table)"
    fields = {"images_seen": cost.get("images_seen", 0), "seconds": cost.get("seconds", 0.0),
              "energy.kwh": energy.get("kwh", 0.0),
              "fraction_of_parent_training_energy": cost.get("fraction_of_parent_training_energy"),
              "parent_training.kwh": training.get("kwh", 0.0)}
    for name, value in fields.items():
        optional = name == "fraction_of_parent_training_energy" and value is None
        if not optional and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"cost: not shown (provenance.cost.{name} is {value!r}, not a number)"
    measured = training.get("measure", "a median step")  # older stores estimated the epoch from ten steps
    line = (f"cost: {fields['images_seen']} images seen, {fields['seconds']:.0f} s, "
            f"{fields['energy.kwh']:.6f} kWh")
    share = fields["fraction_of_parent_training_energy"]
    if share is None:
        return line
    return (f"{line} = {share:.2%} of training the parent for {training.get('epochs')} epochs "
            f"({fields['parent_training.kwh']:.4f} kWh; training epoch measured as {measured})")


def _held_out_line(held_out: object) -> str:
    """The parent's and the composed top-1 on the test images `decompose` checked the modules on (a possibly edited
    record: a field of the wrong type is named instead)."""
    try:
        images, composed, parent = (held_out["images"], held_out["composed"]["top1"],  # type: ignore[index]
                                    held_out["parent"]["top1"])  # type: ignore[index]
    except (TypeError, KeyError):
        return f"check on test images: not shown (provenance.held_out is {held_out!r})"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (images, composed, parent)):
        return f"check on test images: not shown (provenance.held_out is {held_out!r})"
    from ..workflows.evaluate import describe_held_out

    return describe_held_out(images, composed, parent)


def _file_note(size: dict) -> str:
    if not size["standalone"]:
        return " (masks: runs with the parent)"
    if size.get("prefix_file_bytes"):
        return f" ({size['file_bytes_with_prefix_fraction']:.1%} with the prefix file all modules share)"
    return ""


def _inspect_model(source: ModelSource, as_json: bool) -> None:
    parent = open_parent(source, None, allow_random=True)  # a file's classes, else numbered outputs
    model = parent.model
    payload = {
        "model": str(source), "arch": parent.arch, "classes": list(parent.classes),
        "input_spec": parent.input_spec.to_json(),
        "head": {"node": model.head.node, "features": int(model.head.weight.shape[1])},
        "sites": {kind: [{"name": s.name, "shape": list(s.shape)} for s in sites]
                  for kind, sites in model.sites.items()},
    }
    text = [f"{source}: {parent.arch}, {len(parent.classes)} classes, head {model.head.node} "
            f"({model.head.weight.shape[1]} features)", f"input: {describe_spec(parent.input_spec)}"]
    for kind, sites in model.sites.items():
        text.append(f"{len(sites)} {kind} sites, {sum(s.numel for s in sites)} nodes per sample")
    emit(as_json, payload, "\n".join(text))
