"""`cnnmod evaluate`: parent vs composed classifier on the same test images."""

from __future__ import annotations

from pathlib import Path

import click

from ..engine.compose import SCORINGS
from ..engine.distributed import joined
from ..errors import CnnmodError
from ..storage.outputs import check_output, write_report_folder
from ..storage.store import load_store
from ..workflows.energy import EnergyMeter
from ..workflows.evaluate import Evaluation, overlap_matrix, relabel
from ..workflows.evaluate import evaluate as run_evaluate
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import data_options, warn_resized
from .params import COUNT
from .shards import open_dataset_once, total_energy


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@data_options
@click.option("--scoring", type=click.Choice(SCORINGS), default="softmax", show_default=True)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Evaluate on N images spread evenly over the classes.")
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--engine", type=click.Choice(["auto", "exact", "shared"]), default="auto", show_default=True,
              help="How the composed classifier runs: exact (each module its own network), shared (one network "
                   "per parent, every head reading shared features), or auto: the faster whose top-1 is within "
                   "0.1 point of exact; above 32 masked modules, shared, checked against exact on 64 images.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Markdown report with plots to this folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@device_option
@json_option
@reports_errors
def evaluate(store: Path, data_path: Path, data_format: str | None, classes: str | None, scoring: str,
             split: str, limit: int | None, batch_size: int, engine: str, report_dir: Path | None, overwrite: bool,
             device: str | None, as_json: bool) -> None:
    """Compare the parent with the classifier composed from STORE's modules (or --classes of them).

    Under `torchrun --nproc-per-node N -m cnnmod evaluate ...` the N processes share the images; rank 0 prints
    and writes the report."""
    with joined(device) as (shard, device):
        if report_dir is not None:
            from ..paper.report import require_matplotlib

            require_matplotlib("cnnmod evaluate --report (its plots)")
            shard.first(lambda: check_output(report_dir, "report", overwrite))
        modules = load_store(store, with_activity=False).modules
        chosen = split_classes(classes)
        if chosen:
            modules = modules.select(chosen)
        data = getattr(open_dataset_once(shard, data_path, data_format, as_json), split).spread(limit)
        if shard.main:
            warn_resized(data.images, modules.parent.input_spec, as_json)
        labels = relabel(data.labels, data.classes, modules.class_names)
        if not (labels >= 0).any():
            raise CnnmodError(f"the {split} split of {data_path} has no images of the modules' classes "
                              f"({', '.join(modules.class_names[:5])}{', ...' if len(modules) > 5 else ''})")
        images = data.images
        with EnergyMeter() as meter:
            result = run_evaluate(modules, images, labels, scoring, batch_size, device,
                                  progress=not as_json and shard.main, shard=shard, engine=engine)
        energy = total_energy(shard, meter.report)
        if not shard.main:
            return
        if report_dir is not None:
            with write_report_folder(report_dir, overwrite, "evaluation") as tmp:
                write_evaluation_report(tmp, str(store), result, overlap_matrix(modules).numpy())
        emit(as_json, result.to_json(), format_evaluation(result), energy)


def format_evaluation(result: Evaluation) -> str:
    from ..tables import markdown_table

    rows = [["parent", result.parent.top1, result.parent.top5, "", ""]]
    for name, acc in result.composed.items():
        rows.append([f"composed ({name})", acc.top1, acc.top5, result.jaccard_mean,
                     f"{result.seconds['composed'] / max(result.seconds['parent'], 1e-9):.1f}x"])
    table = markdown_table(["classifier", "top-1", "top-5", "mean Jaccard", "time vs parent"], rows)
    per_class = markdown_table(
        ["class", "Jaccard", "kept params", "recall (parent)", "recall (composed)", "precision (composed)"],
        [[m.cls, m.jaccard, m.kept_parameters, _or_none(m.parent_recall), _or_none(m.recall), m.precision]
         for m in result.modules],
    )
    engines = ""
    if result.engines:
        ran = "; ".join(f"{name}: top-1 {r['top1']:.4f}, {r['seconds']:.2f} s" for name, r in result.engines.items())
        engines = f"engine: {result.engine} ({ran})\n"
    if result.exact_agreement:
        a = result.exact_agreement
        engines += (f"exact engine on {a['images']} images ({a['seconds']:.1f} s): same vote as {result.engine} on "
                    f"{a['same_vote']:.1%}\n")
    return f"{result.samples} images\n{engines}\n{table}\n{per_class}"


def write_evaluation_report(folder: Path, title: str, result: Evaluation, overlap) -> Path:  # type: ignore[no-untyped-def]
    from ..paper.report import plot_overlap_heatmap, plot_per_class_accuracy, write_report

    classes = [m.cls for m in result.modules]
    accuracy = plot_per_class_accuracy(folder / "per_class_accuracy.png", classes,
                                       [_or_nan(m.parent_recall) for m in result.modules],
                                       [_or_nan(m.recall) for m in result.modules], "Per-class accuracy (recall)")
    heatmap = plot_overlap_heatmap(folder / "module_overlap.png", classes, overlap,
                                   "Overlap between modules (Jaccard of kept nodes)")
    return write_report(folder / "report.md", f"cnnmod evaluation: {title}",
                        [("Results", format_evaluation(result))],
                        [("per-class accuracy", accuracy), ("module overlap", heatmap)])


def _or_none(value: float | None) -> float | str:
    return "no images" if value is None else value


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
