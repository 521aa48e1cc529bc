"""`cnnmod evaluate`: parent vs composed classifier on the same test images."""

from __future__ import annotations

from pathlib import Path

import click

from ..compose import SCORINGS
from ..energy import EnergyMeter
from ..evaluate import Evaluation, overlap_matrix, relabel
from ..evaluate import evaluate as run_evaluate
from ..store import load_store
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import data_options, open_dataset


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@data_options
@click.option("--scoring", type=click.Choice(SCORINGS), default="softmax", show_default=True)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate on N images spread evenly over the classes.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Markdown report with plots to this folder.")
@device_option
@json_option
@reports_errors
def evaluate(store: Path, data_path: Path, data_format: str | None, classes: str | None, scoring: str,
             split: str, limit: int | None, batch_size: int, report_dir: Path | None, device: str | None,
             as_json: bool) -> None:
    """Compare the parent with the classifier composed from STORE's modules (or --classes of them)."""
    modules = load_store(store, with_activity=False).modules
    chosen = split_classes(classes)
    if chosen:
        modules = modules.select(chosen)
    data = getattr(open_dataset(data_path, data_format, None, as_json), split).spread(limit)
    labels = relabel(data.labels, data.classes, modules.class_names)
    images = data.images
    with EnergyMeter() as meter:
        result = run_evaluate(modules, images, labels, scoring, batch_size, device, progress=not as_json)
    if report_dir is not None:
        write_evaluation_report(report_dir, str(store), result, overlap_matrix(modules).numpy())
    emit(as_json, result.to_json(), format_evaluation(result), meter.report)


def format_evaluation(result: Evaluation) -> str:
    from ..report import markdown_table

    rows = [["parent", result.parent.top1, result.parent.top5, "", ""]]
    for name, acc in result.composed.items():
        rows.append([f"composed ({name})", acc.top1, acc.top5, result.jaccard_mean,
                     f"{result.seconds['composed'] / max(result.seconds['parent'], 1e-9):.1f}x"])
    table = markdown_table(["classifier", "top-1", "top-5", "mean Jaccard", "time vs parent"], rows)
    per_class = markdown_table(
        ["class", "Jaccard", "kept params", "recall (parent)", "recall (composed)", "precision (composed)"],
        [[m.cls, m.jaccard, m.kept_parameters, m.parent_recall, m.recall, m.precision] for m in result.modules],
    )
    return f"{result.samples} images\n\n{table}\n{per_class}"


def write_evaluation_report(folder: Path, title: str, result: Evaluation, overlap) -> Path:  # type: ignore[no-untyped-def]
    from ..report import plot_overlap_heatmap, plot_per_class_accuracy, write_report

    folder.mkdir(parents=True, exist_ok=True)
    classes = [m.cls for m in result.modules]
    accuracy = plot_per_class_accuracy(folder / "per_class_accuracy.png", classes,
                                       [m.parent_recall for m in result.modules],
                                       [m.recall for m in result.modules], "Per-class accuracy (recall)")
    heatmap = plot_overlap_heatmap(folder / "module_overlap.png", classes, overlap,
                                   "Overlap between modules (Jaccard of kept nodes)")
    return write_report(folder / "report.md", f"cnnmod evaluation: {title}",
                        [("Results", format_evaluation(result))],
                        [("per-class accuracy", accuracy), ("module overlap", heatmap)])
