"""`cnnmod decompose --method compact`: small modules, each its own network (cnnmod.engine.compact)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageSet
from ..engine.channels import parent_cost
from ..engine.compact import (
    IMPORTANCES,
    CompactConfig,
    compact_decompose,
    cost_record,
    module_set,
    training_epoch_cost,
)
from ..engine.distributed import Shard
from ..engine.modules import Parent
from ..progress import show_progress
from ..storage.store import save_store
from ..workflows.energy import EnergyMeter
from ..workflows.evaluate import describe_held_out, held_out_check
from .app import emit
from .common import ModelSource, describe_spec
from .shards import total_energy


def compact_config(stream_keep: float | None, inner_keep: float | None, train_images: int | None,
                   seed: int, prefix_keep: float = 1.0, importance: str = IMPORTANCES[0]) -> CompactConfig:
    """The compact method's configuration: the defaults (those of a narrowed prefix below 1), with what the
    command line set."""
    defaults = CompactConfig(seed=seed).with_prefix_keep(prefix_keep)
    return replace(defaults, stream_keep=defaults.stream_keep if stream_keep is None else stream_keep,
                   inner_keep=defaults.inner_keep if inner_keep is None else inner_keep,
                   train_images=defaults.train_images if train_images is None else train_images,
                   importance=importance)


def decompose_compact(shard: Shard, where: torch.device, model: ModelSource, data_path: Path, parent: Parent,
                      images: np.ndarray, labels: np.ndarray, test: ImageSet, chosen: list[str] | None, out: Path,
                      config: CompactConfig, weights_dtype: str, training_epoch: str, overwrite: bool,
                      as_json: bool, keeps_given: bool = False, chosen_by: str | None = None) -> None:
    """Compact modules of `parent` (opened from MODEL, with the training images of its classes) into the store
    `out`, inside `cnnmod decompose`'s process group; unless `keeps_given`, the keep fractions shrink past 10
    classes (`CompactConfig.for_classes`). `chosen_by`: why `--method auto` chose compact, for the output. The
    modules are checked against the parent on up to HELD_OUT_IMAGES images of the `test` split, and a composed
    top-1 more than a point below the parent's is a warning: the fine-tune can fall short on a model unlike those
    its defaults were measured on, and a user should not learn that from a later evaluation."""
    classes = [parent.class_index(c) for c in chosen] if chosen else list(range(parent.num_classes))
    if not keeps_given:
        config = config.for_classes(len(classes))
    bar = tqdm(total=config.train_images, desc="fine-tuning", unit="img",
               disable=not shard.main or not show_progress(not as_json), leave=False)
    descriptions = {"prefix cache": "computing the frozen prefix", "fine-tune": "fine-tuning"}
    shown = ["fine-tune"]

    def progress(stage: str, seen: int, total: int, loss: float) -> None:
        if shown[-1] != stage:
            shown.append(stage)
            bar.reset(total=total)
            bar.set_description_str(descriptions[stage])
        bar.update(seen - bar.n)
        if loss == loss:  # NaN while no loss is computed
            bar.set_postfix(loss=f"{loss:.3f}")

    start = time.perf_counter()
    with EnergyMeter() as meter:
        result = compact_decompose(parent, images, labels, config, classes, progress, where, shard)
    bar.close()
    seconds = time.perf_counter() - start
    energy = total_energy(shard, meter.report)
    epoch = _training_epoch(parent, images, labels, training_epoch, config.seed, where, shard, as_json)
    if not shard.main:
        return
    cost = cost_record(result.cost, energy.to_json(), epoch)
    modules = module_set(parent, result.plan, list(result.keeps), list(result.nets), classes,
                         config.to_json(), None, "exact", weights_dtype)
    held_out = held_out_check(modules, test.images, test.labels, test.classes, device=where)
    provenance = {"model": str(model), "data": str(data_path), "method": "compact", "chosen_by": chosen_by,
                  "samples_observed": cost["images_seen"], "seconds": seconds, "energy": energy.to_json(),
                  "processes": shard.world, "cost": cost, "held_out": held_out}
    save_store(out, modules, None, provenance, overwrite=overwrite)
    params = [p for p, _ in modules.compact.parameters_per_module(tuple(parent.model.input_shape))]
    parent_params = parent_cost(parent.model)[0]
    kept = sum(params) / len(params) / parent_params
    share = cost["fraction_of_parent_training_energy"]
    processes = f" ({shard.world} processes)" if shard.world > 1 else ""
    emit(as_json,
         {"store": str(out), "arch": parent.arch, "input_spec": parent.input_spec.to_json(), "method": "compact",
          "chosen_by": chosen_by, "classes": list(modules.class_names), "config": config.to_json(), "seconds": seconds,
          "processes": shard.world, "kept_parameters_mean": kept, "weights_dtype": weights_dtype,
          "jaccard_mean": float(modules.jaccard().mean()), "cost": cost, "held_out": held_out},
         f"wrote {out}: {len(modules)} compact modules of {parent.arch} in {seconds:.1f}s{processes}"
         f"{f' (--method auto: {chosen_by})' if chosen_by else ''}; each keeps "
         f"{kept:.1%} of the parent's parameters on average\ncost: {cost['images_seen']} images seen, "
         f"{cost['energy']['kwh']:.6f} kWh = {share:.2%} of training the parent for 200 epochs "
         f"({cost['parent_training']['kwh']:.4f} kWh: {epoch['measure']} measured, {epoch['measured_images']} "
         f"training images)\n{held_out_line(held_out)}"
         f"input: {describe_spec(parent.input_spec)}",
         energy)
    if held_out is not None and held_out["below_parent"]:
        gap = 100 * (held_out["parent"]["top1"] - held_out["composed"]["top1"])
        click.echo(f"warning: the composed modules' top-1 is {gap:.2f} points below the parent's on "
                   f"{held_out['images']} test images; more fine-tuning (--train-images) or wider modules "
                   "(--stream-keep, --inner-keep) may close the gap, and --method paper keeps the parent's accuracy",
                   err=True)


def held_out_line(held_out: dict | None) -> str:
    """One line for the text output, or nothing where there were no test images of the modules' classes."""
    if held_out is None:
        return ""
    return describe_held_out(held_out["images"], held_out["composed"]["top1"], held_out["parent"]["top1"]) + "\n"


def _training_epoch(parent: Parent, images: np.ndarray, labels: np.ndarray, measure: str, seed: int,
                    device: torch.device, shard: Shard, as_json: bool) -> dict:
    """What one training epoch of the parent costs, with a progress bar over a whole measured epoch. Under
    torchrun each process measures its share of the epoch's images, at the same time, and the energy is their
    sum."""
    part = shard.part(len(images))
    bar = tqdm(total=part.stop - part.start, desc="measuring a training epoch", unit="img",
               disable=not shard.main or not show_progress(not as_json) or measure != "epoch", leave=False)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        epoch = training_epoch_cost(parent, images[part], labels[part], measure, seed=seed, progress=progress,
                                    device=device)
    finally:
        bar.close()
    if shard.world == 1:
        return epoch
    return {**epoch, "measure": f"{epoch['measure']} of each of {shard.world} processes' shares",
            "measured_images": int(shard.total(epoch["measured_images"])),
            "epoch_images": int(shard.total(epoch["epoch_images"])),
            "epoch_kwh": shard.total(epoch["epoch_kwh"])}
