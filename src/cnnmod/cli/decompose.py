"""`cnnmod decompose`: one module per class, all classes in one pass over sample data (also under torchrun)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from ..engine.compact import IMPORTANCES, TRAINING_EPOCH_MEASURES
from ..engine.decompose import (
    GRANULARITIES,
    VARIANTS,
    DecomposeConfig,
    chosen_classes,
    decompose_in_passes,
    pass_classes,
    plan_for,
)
from ..engine.distributed import Shard, joined
from ..engine.engines import WEIGHT_DTYPES
from ..engine.memory import MemoryEstimate, estimate_decomposition, refusal, room
from ..engine.modules import Parent, resolve_device
from ..errors import CnnmodError
from ..progress import is_quiet
from ..storage.outputs import check_output
from ..storage.store import save_store
from ..workflows.energy import EnergyMeter
from ..workflows.evaluate import relabel
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import ModelSource, data_options, describe_spec, model_options, open_parent, warn_resized
from .params import COUNT, NON_NEGATIVE, SEED, FiniteFloat
from .shards import open_dataset_once, total_energy

COMPACT_MOST_CLASSES = 20
"""`--method auto` decomposes at most this many classes with the compact method, and more with the paper's: the
most classes at which composed compact modules ran in at most the parent's time (`python
benchmarks/compact_scale.py`, ResNet-20 at 64x64: 0.75-0.90x at 10 and 20 classes, 1.13-1.18x at 32 and 40, 2.58x
at 100, 4.32x at 202, where the paper's modules compose in about 1.1x through the shared engine)."""


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
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="node", show_default=True,
              help="node masks, or whole channels (then only per-channel counts are kept: far less memory).")
@click.option("--variant", type=click.Choice(VARIANTS), default="bi", show_default=True,
              help="ci = CI+TI+MC; bln adds backtracking to the last conv; bi backtracks to the input.")
@click.option("--sites", type=click.Choice(["relu", "conv"]), default="relu", show_default=True)
@click.option("--delta", type=NON_NEGATIVE, default=0.5, show_default=True, help="Head-weight threshold of MC-BLN.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--classes-per-pass", type=COUNT, default=None,
              help="Count at most this many classes at a time (each pass also observes every class's TI share): "
                   "less memory, a little more time. Default: all in one pass.")
@click.option("--keep-activity", is_flag=True,
              help="Also save the activity counts in the store, which `cnnmod tradeoff` and `cnnmod reuse` need "
                   "(integers: one to eight bytes per node, class and group).")
@click.option("--method", type=click.Choice(["auto", "compact", "paper"]), default="auto", show_default=True,
              help="compact: small modules, each its own network of the kept channels, fine-tuned from the parent "
                   "(see docs/RESULTS.md); paper: the parent masked per class (Pan & Rajan). auto: the method whose "
                   f"own options are given, else compact for at most {COMPACT_MOST_CLASSES} classes and paper for "
                   "more.")
@click.option("--stream-keep", type=FiniteFloat(0.0, 1.0, open_low=True), default=None,
              help="compact: fraction of the channels of each residual stream after the shared prefix that a "
                   "module keeps [default: 0.25; past 10 classes, times sqrt(10 / classes), as --inner-keep].")
@click.option("--inner-keep", type=FiniteFloat(0.0, 1.0, open_low=True), default=None,
              help="compact: fraction of every other channel space after the shared prefix [default: 0.24; past "
                   "10 classes, times sqrt(10 / classes)].")
@click.option("--prefix-keep", type=FiniteFloat(0.0, 1.0, open_low=True), default=1.0, show_default=True,
              help="compact: fraction of the shared prefix's channels the modules keep. 1: the parent's own first "
                   "layers, frozen (right for many classes); below 1 the prefix is narrowed to the chosen classes' "
                   "channels and fine-tuned (for a few classes, e.g. a pair: 0.35), which changes the fine-tune's "
                   "defaults to lr 0.004, 100000 images and a feature hint (weight 5).")
@click.option("--train-images", type=click.IntRange(min=0), default=None,
              help="compact: training images of the joint fine-tune (0: none) [default: 300000, or 100000 with "
                   "--prefix-keep below 1].")
@click.option("--importance", type=click.Choice(list(IMPORTANCES)), default=IMPORTANCES[0], show_default=True,
              help="compact: which images rank a class's channels. own_and_rival: the class's own images and those "
                   "it is the runner-up on (two backward passes a batch, whatever the classes); every_image: every "
                   "sampled image for every class (one pass per class: as stores made before 2026-12-03).")
@click.option("--weights-dtype", type=click.Choice(list(WEIGHT_DTYPES)), default="float16", show_default=True,
              help="compact: how the store keeps the modules' weights. float16 takes half the bytes of float32 at "
                   "the same accuracy (docs/RESULTS.md); the modules are rounded to it when made, so the store runs "
                   "exactly what was measured, in float32. float32 keeps the fine-tuned weights unrounded.")
@click.option("--training-epoch", type=click.Choice(TRAINING_EPOCH_MEASURES), default="epoch", show_default=True,
              help="compact: how the store's cost record finds the energy of one training epoch of the parent, "
                   "which times 200 is what the modules' energy is compared with. epoch: one whole epoch on the "
                   "training images, measured (ResNet-20 on CIFAR-10: about 2 minutes on 2 cores); steps: the "
                   "median of ten steps times the steps of an epoch, a quick estimate.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@device_option
@json_option
@reports_errors
def decompose(model: ModelSource, data_path: Path, data_format: str | None, classes: str | None,
              out: Path, samples_per_class: int, tangling_ratio: float, rho: float, granularity: str,
              variant: str, sites: str, delta: float, seed: int, batch_size: int, classes_per_pass: int | None,
              keep_activity: bool, method: str, stream_keep: float | None, inner_keep: float | None,
              prefix_keep: float, train_images: int | None, importance: str, weights_dtype: str,
              training_epoch: str, overwrite: bool, device: str | None, as_json: bool) -> None:
    """Decompose MODEL into one module per class using the training split of --data.

    Under `torchrun --nproc-per-node N -m cnnmod decompose ...` the N processes share the samples and sum their
    counts (--method compact: each fine-tunes its share of the module groups); rank 0 writes the store, which equals
    the one a single process writes."""
    given = _given_options()
    _refuse_other_methods_options(method, given)
    config = DecomposeConfig(samples_per_class, tangling_ratio, rho, granularity, variant, sites, delta, seed)
    with joined(device) as (shard, device):
        def check() -> None:
            if shard.world > 1 and prefix_keep < 1:
                raise CnnmodError("--prefix-keep below 1 fine-tunes the shared prefix, which runs in one process: "
                                  "start it without torchrun")
            check_output(out, "store", overwrite)

        shard.first(check)
        chosen = split_classes(classes)
        data = open_dataset_once(shard, data_path, data_format, as_json)
        parent = open_parent(model, data.classes, images=data.train.images)
        labels = relabel(data.train.labels, data.train.classes, parent.classes)
        images = data.train.images
        if (labels < 0).any():  # a copy only when some images belong to classes the parent does not have
            images, labels = images[labels >= 0], labels[labels >= 0]
        if shard.main:
            warn_resized(images, parent.input_spec, as_json)
        chosen_by = None
        if method == "auto":
            method, chosen_by = auto_method(given, len(chosen) if chosen else parent.num_classes)
        if method == "compact":
            from .decompose_compact import compact_config, decompose_compact

            return decompose_compact(
                shard, resolve_device(device), model, data_path, parent, images, labels, data.test, chosen, out,
                compact_config(stream_keep, inner_keep, train_images, seed, prefix_keep, importance),
                weights_dtype, training_epoch, overwrite, as_json,
                keeps_given=stream_keep is not None or inner_keep is not None, chosen_by=chosen_by)
        estimate = _estimate(parent, labels, config, chosen, classes_per_pass, batch_size, keep_activity,
                             shard, as_json)
        start = time.perf_counter()
        with EnergyMeter() as meter:
            result = decompose_in_passes(parent, images, labels, config, chosen, batch_size, device,
                                         progress=not as_json and shard.main, classes_per_pass=classes_per_pass,
                                         keep_activity=keep_activity, shard=shard)
        seconds = time.perf_counter() - start
        energy = total_energy(shard, meter.report)
        if not shard.main:
            return
        modules = result.modules
        provenance = {"model": str(model), "data": str(data_path), "method": "paper", "chosen_by": chosen_by,
                      "samples_observed": result.samples_observed,
                      "seconds": seconds, "energy": energy.to_json(), "processes": shard.world,
                      "passes": result.passes}
        save_store(out, modules, result.activity, provenance, overwrite=overwrite)
        jaccard = modules.jaccard()
        emit(as_json,
             {"store": str(out), "arch": parent.arch, "input_spec": parent.input_spec.to_json(), "method": "paper",
              "chosen_by": chosen_by, "classes": list(modules.class_names), "config": config.to_json(),
              "samples_observed": result.samples_observed, "seconds": seconds,
              "seconds_by_step": result.seconds, "processes": shard.world,
              "passes": result.passes, "memory_estimate": estimate.to_json(), "activity_kept": keep_activity,
              "jaccard_mean": float(jaccard.mean()),
              "jaccard": dict(zip(modules.class_names, jaccard.tolist(), strict=True))},
             f"wrote {out}: {len(modules)} modules of {parent.arch} from {result.samples_observed} samples in "
             f"{seconds:.1f}s{_how(shard, result.passes)}{f' (--method auto: {chosen_by})' if chosen_by else ''}; "
             f"mean Jaccard index {float(jaccard.mean()):.4f}\n"
             f"input: {describe_spec(parent.input_spec)}",
             energy)


_METHOD_OPTIONS = {
    "paper": ("samples_per_class", "tangling_ratio", "rho", "granularity", "variant", "sites", "delta",
              "batch_size", "classes_per_pass", "keep_activity"),
    "compact": ("stream_keep", "inner_keep", "prefix_keep", "train_images", "importance", "weights_dtype",
                "training_epoch"),
}


def _given_options() -> dict[str, list[str]]:
    """Per method, the flags of its own options given on the command line."""
    ctx = click.get_current_context()
    return {method: ["--" + name.replace("_", "-") for name in names
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
            for method, names in _METHOD_OPTIONS.items()}


def _refuse_other_methods_options(method: str, given: dict[str, list[str]]) -> None:
    """An option of another method than the one chosen (or, for auto, options of both) is an error rather than
    silently unused."""
    ctx = click.get_current_context()
    if method == "auto" and given["paper"] and given["compact"]:
        raise click.UsageError(f"{given['paper'][0]} is an option of --method paper and {given['compact'][0]} "
                               "of --method compact: give the options of one method", ctx)
    for other, flags in given.items():
        if other != method and method != "auto" and flags:
            raise click.UsageError(f"{flags[0]} applies to --method {other} only, not --method {method}", ctx)


def auto_method(given: dict[str, list[str]], classes: int) -> tuple[str, str]:
    """The method `--method auto` takes for `classes` modules, and why: the one whose own options were given,
    else compact up to COMPACT_MOST_CLASSES classes and paper past it."""
    for method, flags in given.items():
        if flags:
            return method, f"{method}, for {flags[0]}"
    if classes <= COMPACT_MOST_CLASSES:
        return "compact", f"compact, for {classes} classes (at most {COMPACT_MOST_CLASSES})"
    return "paper", f"paper, for {classes} classes (compact up to {COMPACT_MOST_CLASSES})"


def _how(shard: Shard, passes: int) -> str:
    parts = [f"{shard.world} processes"] if shard.world > 1 else []
    if passes > 1:
        parts.append(f"{passes} passes")
    return f" ({', '.join(parts)})" if parts else ""


def _estimate(parent: Parent, labels: np.ndarray, config: DecomposeConfig, classes: list[str] | None,
              classes_per_pass: int | None, batch_size: int, keep_activity: bool, shard: Shard,
              as_json: bool) -> MemoryEstimate:
    """Say how much memory the decomposition will need (stderr, rank 0), and refuse it when it will not fit, naming
    the options that would make it fit."""
    from ..engine.decompose import CLASSES_PER_BACKTRACK

    chosen = chosen_classes(parent, labels, classes)

    def estimate(cfg: DecomposeConfig, per_pass: int | None, batch: int) -> MemoryEstimate:
        plans = [plan_for(parent, labels, cfg, subset) for subset in pass_classes(chosen, per_pass)]
        return estimate_decomposition(parent.model, cfg.sites, plans, cfg.granularity, batch, keep_activity,
                                      CLASSES_PER_BACKTRACK)

    found = estimate(config, classes_per_pass, batch_size)
    if shard.main and not is_quiet():
        click.echo(found.describe(), err=True)
    share = room(shard.local_world)
    if share is None or found.extra <= share:
        return found
    options: dict[str, MemoryEstimate] = {}
    per_pass = classes_per_pass or len(chosen)
    while per_pass > 1:  # the most classes per pass that fits, halving
        per_pass = max(1, per_pass // 2)
        smaller = estimate(config, per_pass, batch_size)
        if smaller.extra <= share:
            options[f"--classes-per-pass {per_pass}"] = smaller
            break
    if config.granularity == "node":
        options["--granularity channel"] = estimate(config.replace(granularity="channel"), classes_per_pass,
                                                    batch_size)
    if batch_size > 32:
        options["--batch-size 32"] = estimate(config, classes_per_pass, 32)
    raise refusal(found, share, options, shard.local_world)
