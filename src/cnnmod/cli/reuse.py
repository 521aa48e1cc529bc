"""`cnnmod reuse`: compose modules from different datasets with continuous learning (paper 3.5)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..engine.compose import compose
from ..engine.inputs import as_format
from ..engine.modules import ModuleSet
from ..errors import CnnmodError
from ..storage.outputs import check_output
from ..storage.store import load_store, require_activity, save_composition
from ..workflows.calibrate import labelled_sample
from ..workflows.energy import EnergyMeter
from ..workflows.reuse import activity_on, forget, own_activity, recalibrate
from .app import cli, device_option, emit, json_option, reports_errors
from .common import open_dataset
from .params import COUNT, SEED


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--data", "data_paths", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="One per SOURCE, in order: the dataset its classes come from (training split is used).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Composition folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing composition at --out (nothing else).")
@click.option("--recalibrate", "refit", is_flag=True, help="Also refit each module's 2-output head.")
@click.option("--samples", type=COUNT, default=300, show_default=True,
              help="Images per class for learning and recalibration.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@device_option
@json_option
@reports_errors
def reuse(sources: tuple[str, ...], data_paths: tuple[Path, ...], out: Path, overwrite: bool, refit: bool,
          samples: int, seed: int, device: str | None, as_json: bool) -> None:
    """Compose SOURCES (`STORE:class,...`, one per dataset) so that each module forgets what only the other
    datasets' classes activate; labels are the class names and must be unique."""
    if len(sources) != len(data_paths):
        raise CnnmodError(f"{len(sources)} sources need {len(sources)} --data, got {len(data_paths)}")
    check_output(out, "composition", overwrite)
    groups: list[ModuleSet] = []
    images: list[list[np.ndarray]] = []
    activities = []
    for source, data_path in zip(sources, data_paths, strict=True):
        store_path, _, spec = source.partition(":")
        require_activity(store_path, "cnnmod reuse")
        store = load_store(store_path)
        if store.activity is None:
            raise CnnmodError(f"{store_path} holds no activity counts; decompose it with --keep-activity")
        modules = store.modules.select(spec.split(",")) if spec else store.modules
        train = open_dataset(data_path, None, None, as_json).train
        groups.append(modules)
        images.append(labelled_sample(modules.class_names, [train], samples, seed)[0])
        activities.append(store.activity)
    with EnergyMeter() as meter:
        with meter.step("continuous learning"):
            others = [np.concatenate([as_format(x, modules.parent.input_spec)
                                      for j, sets in enumerate(images) if j != i for x in sets])
                      for i, modules in enumerate(groups)]
            learned = [forget(modules, own_activity(modules, activities[i]),
                              activity_on(modules, others[i], device=device), len(others[i]))
                       for i, modules in enumerate(groups)]
        if refit:
            with meter.step("recalibration"):
                learned = [recalibrate(modules, images[i], others[i], device=device).modules
                           for i, modules in enumerate(learned)]
        composed = compose(learned)
    save_composition(out, composed, overwrite)
    emit(as_json, {"composition": str(out), "labels": list(composed.labels), "recalibrated": refit,
                   "jaccard": {n: float(j) for g in learned for n, j in zip(g.class_names, g.jaccard().tolist(),
                                                                             strict=True)},
                   "energy_steps": {k: v.to_json() for k, v in meter.steps.items()}},
         f"wrote {out}: {', '.join(composed.labels)} with continuous learning"
         f"{' and recalibrated heads' if refit else ''}", meter.report)
