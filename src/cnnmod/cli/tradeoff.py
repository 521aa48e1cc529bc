"""`cnnmod tradeoff`: module size against composed accuracy as rho rises, from a store's recorded activity."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CnnmodError
from ..tradeoff import sweep
from .app import cli, device_option, emit, json_option, reports_errors
from .common import data_options, open_dataset


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@data_options
@click.option("--rho", "rhos", default="0,0.01,0.02,0.05,0.1,0.2,0.3,0.5", show_default=True,
              help="Comma-separated activity thresholds.")
@click.option("--granularity", "granularities", default="node,channel", show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate on N test images spread evenly over the classes.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the table (Markdown) and plot (default: STORE/tradeoff).")
@device_option
@json_option
@reports_errors
def tradeoff(store: Path, data_path: Path, data_format: str | None, classes: str | None, rhos: str,
             granularities: str, limit: int | None, batch_size: int, out_dir: Path | None, device: str | None,
             as_json: bool) -> None:
    """Composed top-1 and mean Jaccard index for each rho and granularity, without a new pass over data."""
    from ..report import markdown_table, plot_tradeoff, write_report

    data = open_dataset(data_path, data_format, None, as_json).test.spread(limit)
    try:
        rho_values = [float(r) for r in rhos.split(",") if r.strip()]
    except ValueError:
        raise CnnmodError(f"--rho takes comma-separated numbers, got {rhos!r}") from None
    grans = [g.strip() for g in granularities.split(",") if g.strip()]
    result = sweep(store, data, rho_values, grans, batch_size=batch_size, device=device, progress=not as_json)
    out_dir = out_dir or store / "tradeoff"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_tradeoff(out_dir / "tradeoff.png", result.rows, f"{result.arch}: module size vs composed accuracy")
    table = markdown_table(["granularity", "rho", "mean Jaccard", "kept params", "composed top-1", "parent top-1"],
                           [[r["granularity"], r["rho"], r["jaccard"], r["kept_parameters"], r["top1"],
                             r["parent_top1"]] for r in result.rows])
    report = write_report(out_dir / "tradeoff.md", f"Size/accuracy trade-off: {store}", [("Table", table)],
                          [("trade-off", plot)])
    emit(as_json, {"rows": result.rows, "plot": str(plot), "report": str(report)},
         f"{table}\nplot: {plot}\nreport: {report}")
