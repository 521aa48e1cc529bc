"""`cnnmod tradeoff`: module size against composed accuracy as rho rises, from a store's recorded activity; and,
with --compact-keeps, compact modules of the same parent at several keep fractions beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..engine.decompose import GRANULARITIES
from ..errors import CnnmodError
from ..paper.tradeoff import COMPACT_TRAIN_IMAGES, CompactPoints, sweep
from ..storage.outputs import check_output, write_report_folder
from ..storage.store import require_activity
from ..tables import markdown_table
from .app import cli, device_option, emit, json_option, reports_errors
from .common import data_options, open_dataset
from .params import COUNT, FiniteFloat, FloatList


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@data_options
@click.option("--rho", "rhos", type=FloatList(FiniteFloat(0.0, 1.0, open_high=True)),
              default="0,0.01,0.02,0.05,0.1,0.2,0.3,0.5", show_default=True,
              help="Comma-separated activity thresholds.")
@click.option("--granularity", "granularities", default="node,channel", show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Evaluate on N test images spread evenly over the classes.")
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--compact-keeps", type=FloatList(FiniteFloat(0.0, 1.0, open_low=True)), default=None,
              help="Also decompose compact modules of the store's parent (`decompose --method compact`) once per "
                   "comma-separated keep fraction in (0, 1], used as both --stream-keep and --inner-keep (the "
                   "channel spaces after the shared prefix), fine-tuned on the train split of --data "
                   "[default: none]. With them the plot's x axis is the "
                   "mean kept-parameter fraction instead of the mean Jaccard index.")
@click.option("--compact-train-images", type=click.IntRange(min=0), default=COMPACT_TRAIN_IMAGES,
              show_default=True,
              help="Fine-tune images of each compact point (0: none); `decompose --method compact` uses 300000, "
                   "so fewer give a lower bound on its accuracy.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) and plot to this report folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@device_option
@json_option
@reports_errors
def tradeoff(store: Path, data_path: Path, data_format: str | None, classes: str | None, rhos: tuple[float, ...],
             granularities: str, limit: int | None, batch_size: int, compact_keeps: tuple[float, ...] | None,
             compact_train_images: int, out_dir: Path | None, overwrite: bool, device: str | None,
             as_json: bool) -> None:
    """Composed top-1 and mean Jaccard index for each rho and granularity, without a new pass over data; with
    --compact-keeps, compact modules of the same parent decomposed and evaluated on the same images beside them."""
    from ..paper.report import plot_tradeoff, require_matplotlib, write_report

    require_activity(store, "cnnmod tradeoff")
    if out_dir is not None:
        check_output(out_dir, "report", overwrite)
        require_matplotlib("cnnmod tradeoff --out (its plot)")
    grans = [g.strip() for g in granularities.split(",") if g.strip()]
    unknown = [g for g in grans if g not in GRANULARITIES]
    if not grans or unknown:
        raise CnnmodError(f"--granularity takes {' and/or '.join(GRANULARITIES)}, comma-separated; "
                          f"got {granularities!r}")
    dataset = open_dataset(data_path, data_format, None, as_json)
    compact = CompactPoints(compact_keeps, dataset.train, compact_train_images) if compact_keeps else None
    result = sweep(store, dataset.test.spread(limit), list(rhos), grans, batch_size=batch_size, device=device,
                   progress=not as_json, compact=compact)
    table = tradeoff_table(result.rows, with_compact=compact is not None)
    payload: dict[str, Any] = {"rows": result.rows}
    text = table
    if out_dir is not None:
        with write_report_folder(out_dir, overwrite, "tradeoff") as tmp:
            plot = plot_tradeoff(tmp / "tradeoff.png", result.rows,
                                 f"{result.arch}: module size vs composed accuracy",
                                 "kept_parameters" if compact is not None else "jaccard")
            write_report(tmp / "tradeoff.md", f"Size/accuracy trade-off: {store}", [("Table", table)],
                         [("trade-off", plot)])
        payload.update(plot=str(out_dir / "tradeoff.png"), report=str(out_dir / "tradeoff.md"))
        text += f"\nplot: {out_dir / 'tradeoff.png'}\nreport: {out_dir / 'tradeoff.md'}"
    emit(as_json, payload, text)


def tradeoff_table(rows: list[dict[str, Any]], with_compact: bool) -> str:
    """The rows as Markdown; compact points add the method, keep fraction and top-5 columns."""
    if not with_compact:
        return markdown_table(["granularity", "rho", "mean Jaccard", "kept params", "composed top-1",
                               "parent top-1"],
                              [[r["granularity"], r["rho"], r["jaccard"], r["kept_parameters"], r["top1"],
                                r["parent_top1"]] for r in rows])
    return markdown_table(["method", "granularity", "rho", "keep", "mean Jaccard", "kept params", "composed top-1",
                           "composed top-5", "parent top-1"],
                          [[r["method"], r.get("granularity", ""), r.get("rho", ""), r.get("keep", ""), r["jaccard"],
                            r["kept_parameters"], r["top1"], r["top5"], r["parent_top1"]] for r in rows])
