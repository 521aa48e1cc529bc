"""`cnnmod export`: a store or composition as one ONNX file or torch.export program that other runtimes run."""

from __future__ import annotations

from pathlib import Path

import click

from ..storage.export import EXPORT_FORMATS, export_classifier, require_onnx, select_labels
from ..storage.outputs import check_output
from ..storage.store import load_composition
from ..workflows.energy import EnergyMeter
from .app import cli, emit, json_option, reports_errors, split_classes


@cli.command("export")
@click.argument("source", metavar="STORE|COMPOSITION", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", default=None, help="Comma-separated labels to export, in this order (default: all).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=None,
              help="onnx (any ONNX runtime) or pt2 (torch.export.save); default: from --out's suffix, else onnx.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file that cnnmod exported (nothing else).")
@json_option
@reports_errors
def export(source: Path, labels: str | None, fmt: str | None, out: Path, overwrite: bool, as_json: bool) -> None:
    """Export the classifier composed from STORE's modules (or a COMPOSITION) to one file.

    The graph takes `images`, float32 N x C x H x W in [0, 1] at the size and channels of the first parent
    (resizing, grey/RGB conversion and normalisation for every parent happen inside), and returns `scores`,
    N x labels, highest for the predicted label. The label names are recorded in the file (ONNX metadata
    `labels`, a JSON list; the .pt2 extra file `labels`). The file is checked against cnnmod before it is
    written.
    """
    fmt = fmt or ("pt2" if out.suffix.lower() == ".pt2" else "onnx")
    if fmt == "onnx":
        require_onnx()
    check_output(out, fmt, overwrite)
    chosen = split_classes(labels)
    with EnergyMeter() as meter:
        composed = load_composition(source)
        if chosen:
            composed = select_labels(composed, chosen)
        result = export_classifier(composed, out, fmt, overwrite)
    emit(as_json, result.to_json(), result.describe(), meter.report)
