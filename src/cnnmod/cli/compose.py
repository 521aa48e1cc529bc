"""`cnnmod compose`: a classifier from modules of one or more stores, saved as a composition folder."""

from __future__ import annotations

from pathlib import Path

import click

from ..engine.compose import SCORINGS
from ..engine.compose import compose as run_compose
from ..engine.modules import ModuleSet
from ..errors import CnnmodError
from ..storage.outputs import check_output
from ..storage.store import load_store, save_composition
from ..workflows.energy import EnergyMeter
from .app import cli, emit, json_option, reports_errors


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Composition folder to write.")
@click.option("--scoring", type=click.Choice(SCORINGS), default="softmax", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing composition (nothing else).")
@json_option
@reports_errors
def compose(sources: tuple[str, ...], out: Path, scoring: str, overwrite: bool, as_json: bool) -> None:
    """Compose modules from SOURCES, each `STORE` (all its modules) or `STORE:class,class=label,...`.

    Labels default to class names and must be unique: rename with `class=label`.
    """
    check_output(out, "composition", overwrite)
    groups: list[ModuleSet] = []
    labels: list[str] = []
    with EnergyMeter() as meter:
        for source in sources:
            modules, names = _parse_source(source)
            groups.append(modules)
            labels.extend(names)
        composed = run_compose(groups, labels, scoring)
        save_composition(out, composed, overwrite)
    emit(as_json, {"composition": str(out), "labels": list(composed.labels), "scoring": scoring,
                   "groups": [{"arch": g.parent.arch, "classes": list(g.class_names)} for g in composed.groups]},
         f"wrote {out}: {len(composed)} modules from {len(groups)} parent(s), labels {', '.join(composed.labels)}",
         meter.report)


def _parse_source(source: str) -> tuple[ModuleSet, list[str]]:
    path, _, spec = source.partition(":")
    if not Path(path).is_dir():
        raise CnnmodError(f"{path} is not a store folder")
    modules = load_store(path, with_activity=False).modules
    if not spec:
        return modules, list(modules.class_names)
    classes, labels = [], []
    for item in spec.split(","):
        cls, _, label = item.strip().partition("=")
        classes.append(cls)
        labels.append(label or cls)
    return modules.select(classes), labels
