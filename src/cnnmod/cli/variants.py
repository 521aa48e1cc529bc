"""`cnnmod variants`: the paper's Table 1 for one model (ci, bln, bi x relu, conv sites x both scorings)."""

from __future__ import annotations

from pathlib import Path

import click

from ..engine.decompose import DecomposeConfig
from ..paper.variants import compare_variants
from ..workflows.evaluate import relabel
from .app import cli, device_option, emit, json_option, reports_errors
from .common import ModelSource, data_options, model_options, open_dataset, open_parent
from .params import COUNT, NON_NEGATIVE, SEED


@cli.command()
@model_options
@data_options
@click.option("--samples-per-class", type=COUNT, default=1000, show_default=True)
@click.option("--tangling-ratio", type=NON_NEGATIVE, default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Evaluate on N test images spread evenly over the classes.")
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@device_option
@json_option
@reports_errors
def variants(model: ModelSource, data_path: Path, data_format: str | None, classes: str | None,
             samples_per_class: int, tangling_ratio: float, seed: int, limit: int | None, batch_size: int,
             device: str | None, as_json: bool) -> None:
    """Decompose MODEL with every variant and site kind and compare each composition with the parent."""
    from ..tables import markdown_table

    data = open_dataset(data_path, data_format, None, as_json)
    parent = open_parent(model, data.classes, images=data.train.images)
    train_labels = relabel(data.train.labels, data.train.classes, parent.classes)
    test = data.test.spread(limit)
    test_labels = relabel(test.labels, test.classes, parent.classes)
    keep = test_labels >= 0
    test_images, test_labels = test.images[keep], test_labels[keep]
    config = DecomposeConfig(samples_per_class=samples_per_class, tangling_ratio=tangling_ratio, seed=seed)
    rows = compare_variants(parent, (data.train.images[train_labels >= 0], train_labels[train_labels >= 0]),
                            (test_images, test_labels), config, batch_size=batch_size, device=device,
                            progress=not as_json)
    table = markdown_table(
        ["sites", "variant", "parent top-1", "parent top-5", "softmax top-1", "softmax top-5", "logit top-1",
         "logit top-5", "mean Jaccard"],
        [[r["sites"], r["variant"], r["parent_top1"], r["parent_top5"], r["softmax_top1"], r["softmax_top5"],
          r["logit_top1"], r["logit_top5"], r["jaccard"]] for r in rows],
    )
    emit(as_json, {"model": str(model), "arch": parent.arch, "test_images": len(test_labels), "rows": rows},
         f"{parent.arch} on {len(test_labels)} test images\n\n{table}")
