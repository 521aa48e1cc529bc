"""`cnnmod decompose`: one module per class, all classes in one pass over sample data."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..decompose import GRANULARITIES, VARIANTS, DecomposeConfig
from ..decompose import decompose as run_decompose
from ..energy import EnergyMeter
from ..evaluate import relabel
from ..outputs import check_output
from ..store import save_store
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import ModelSource, data_options, describe_spec, model_options, open_dataset, open_parent, warn_resized
from .params import COUNT, NON_NEGATIVE, SEED, FiniteFloat


@cli.command()
@model_options
@data_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Store folder to write.")
@click.option("--samples-per-class", type=COUNT, default=1000, show_default=True,
              help="Training inputs observed per class (CI).")
@click.option("--tangling-ratio", type=NON_NEGATIVE, default=1.0, show_default=True,
              help="Other-class inputs per CI input (TI); 0 disables.")
@click.option("--rho", type=FiniteFloat(0.0, 1.0, open_high=True), default=0.0, show_default=True,
              help="Keep a node if its activity rate exceeds this.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="node", show_default=True)
@click.option("--variant", type=click.Choice(VARIANTS), default="bi", show_default=True,
              help="ci = CI+TI+MC; bln adds backtracking to the last conv; bi backtracks to the input.")
@click.option("--sites", type=click.Choice(["relu", "conv"]), default="relu", show_default=True)
@click.option("--delta", type=NON_NEGATIVE, default=0.5, show_default=True, help="Head-weight threshold of MC-BLN.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@device_option
@json_option
@reports_errors
def decompose(model: ModelSource, data_path: Path, data_format: str | None, classes: str | None,
              out: Path, samples_per_class: int, tangling_ratio: float, rho: float, granularity: str,
              variant: str, sites: str, delta: float, seed: int, batch_size: int, overwrite: bool,
              device: str | None, as_json: bool) -> None:
    """Decompose MODEL into one module per class using the training split of --data."""
    config = DecomposeConfig(samples_per_class, tangling_ratio, rho, granularity, variant, sites, delta, seed)
    check_output(out, "store", overwrite)
    chosen = split_classes(classes)
    data = open_dataset(data_path, data_format, None, as_json)
    parent = open_parent(model, data.classes, images=data.train.images)
    labels = relabel(data.train.labels, data.train.classes, parent.classes)
    images, labels = data.train.images[labels >= 0], labels[labels >= 0]
    warn_resized(images, parent.input_spec, as_json)
    start = time.perf_counter()
    with EnergyMeter() as meter:
        modules, activity = run_decompose(parent, images, labels, config, chosen,
                                          batch_size, device, progress=not as_json)
    seconds = time.perf_counter() - start
    provenance = {"model": str(model), "data": str(data_path), "samples_observed": activity.num_samples,
                  "seconds": seconds, "energy": meter.report.to_json()}
    save_store(out, modules, activity, provenance, overwrite=overwrite)
    jaccard = modules.jaccard()
    emit(as_json,
         {"store": str(out), "arch": parent.arch, "input_spec": parent.input_spec.to_json(),
          "classes": list(modules.class_names), "config": config.to_json(),
          "samples_observed": activity.num_samples, "seconds": seconds,
          "jaccard_mean": float(jaccard.mean()),
          "jaccard": dict(zip(modules.class_names, jaccard.tolist(), strict=True))},
         f"wrote {out}: {len(modules)} modules of {parent.arch} from {activity.num_samples} samples in "
         f"{seconds:.1f}s; mean Jaccard index {float(jaccard.mean()):.4f}\ninput: {describe_spec(parent.input_spec)}",
         meter.report)

