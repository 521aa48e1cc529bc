"""`cnnmod demo`: the whole job on the embedded Fashion-MNIST model and images, in under a minute."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import click

from ..data import load_dataset
from ..engine.decompose import DecomposeConfig
from ..engine.decompose import decompose as run_decompose
from ..engine.modules import Parent
from ..paper.report import REPORT_EXTRA, has_matplotlib, write_report
from ..storage.outputs import check_output, write_report_folder
from ..storage.store import save_store
from ..workflows.energy import EnergyMeter
from ..workflows.evaluate import evaluate as run_evaluate
from ..workflows.evaluate import overlap_matrix
from ..zoo import load_model_file
from .app import cli, device_option, emit, json_option, reports_errors
from .evaluate import format_evaluation, write_evaluation_report
from .params import COUNT

MODEL = "smallcnn-fmnist.safetensors"
SAMPLE = "fmnist-sample.npz"


@cli.command()
@click.option("--out", "out_dir", default="cnnmod-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the store and the report.")
@click.option("--samples-per-class", type=COUNT, default=200, show_default=True)
@device_option
@json_option
@reports_errors
def demo(out_dir: Path, samples_per_class: int, device: str | None, as_json: bool) -> None:
    """Decompose the embedded Fashion-MNIST CNN, compose its modules, and compare them with it.

    Writes OUT/store and OUT/report; a previous demo's store and report there are replaced, anything else is
    left alone (and refused). The report's plots need matplotlib (pip install 'cnnmod[report]'); without it
    the report holds the tables only."""
    check_output(out_dir / "store", "store", overwrite=True)
    check_output(out_dir / "report", "report", overwrite=True)
    assets = resources.files("cnnmod") / "assets"
    with resources.as_file(assets / MODEL) as model_path, resources.as_file(assets / SAMPLE) as sample_path:
        model, info = load_model_file(model_path)
        data = load_dataset(sample_path, format="npz", progress=False)
    parent = Parent.from_model(model, info.input_spec, info.classes, info.arch)
    with EnergyMeter() as meter:
        with meter.step("decompose"):
            start = time.perf_counter()
            modules, activity = run_decompose(parent, data.train.images, data.train.labels,
                                              DecomposeConfig(samples_per_class=samples_per_class), device=device,
                                              progress=not as_json)
            seconds = time.perf_counter() - start
        with meter.step("evaluate"):
            store = save_store(out_dir / "store", modules, activity, {"model": f"cnnmod/assets/{MODEL}",
                                                               "data": f"cnnmod/assets/{SAMPLE}",
                                                               "seconds": seconds}, overwrite=True)
    result = run_evaluate(modules, data.test.images, data.test.labels, device=device, progress=not as_json)
    plots = has_matplotlib()
    with write_report_folder(out_dir / "report", True, "demo") as tmp:
        if plots:
            write_evaluation_report(tmp, "embedded Fashion-MNIST CNN", result, overlap_matrix(modules).numpy())
        else:
            write_report(tmp / "report.md", "cnnmod evaluation: embedded Fashion-MNIST CNN",
                         [("Results", format_evaluation(result))])
    if not plots:
        click.echo(f"note: the report has no plots: they need matplotlib ({REPORT_EXTRA})", err=True)
    report = out_dir / "report" / "report.md"
    payload = {**result.to_json(), "store": str(store), "report": str(report), "decompose_seconds": seconds,
               "energy_steps": {k: v.to_json() for k, v in meter.steps.items()}}
    emit(as_json, payload,
         f"decomposed {info.arch} into {len(modules)} modules in {seconds:.1f}s "
         f"({activity.num_samples} training images observed)\n\n{format_evaluation(result)}\n"
         f"store: {store}\nreport: {report}", meter.report)
