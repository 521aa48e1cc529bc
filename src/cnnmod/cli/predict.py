"""`cnnmod predict`: classify image files with a store's or a composition's composed classifier."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..storage.export import image_files, input_format, predict_files
from ..storage.store import load_composition
from ..workflows.energy import EnergyMeter
from .app import cli, device_option, reports_errors
from .params import COUNT


@cli.command()
@click.argument("source", metavar="STORE|COMPOSITION", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("paths", metavar="IMAGE_OR_FOLDER...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=COUNT, default=5, show_default=True, help="Labels listed per image, best first.")
@click.option("--batch-size", type=COUNT, default=64, show_default=True, help="Images decoded and classified at once.")
@device_option
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"image", "label", "score", "top": [[label, score], ...]} on stdout.')
@reports_errors
def predict(source: Path, paths: tuple[Path, ...], top_k: int, batch_size: int, device: str | None,
            as_json: bool) -> None:
    """Classify image files (PNG, JPEG) and folders of them (recursively, in sorted order).

    Each image is read as grey or RGB (as PIL converts) to match the first parent of the classifier, resized to
    its input size when it differs, and scored by every module; `cnnmod export` writes the same classifier for
    other runtimes, which take the images in that form.
    """
    files = image_files(paths)
    with EnergyMeter() as meter:
        composed = load_composition(source)
        results = predict_files(composed, files, top_k, batch_size, device)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    from ..tables import markdown_table

    channels, size = input_format(composed)
    rows = [[r["image"], r["label"], r["score"], ", ".join(f"{lab} {score:.4f}" for lab, score in r["top"])]
            for r in results]
    click.echo(markdown_table(["image", "label", "score", f"top {min(top_k, len(composed.labels))}"], rows)
               + f"\n{len(results)} images, read as {'grey' if channels == 1 else 'RGB'} {size[0]}x{size[1]}"
               + f"\nenergy: {meter.report.describe()}")
