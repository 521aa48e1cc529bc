"""`cnnmod import`: any MODEL written once as a parent file, which every command then reads as data."""

from __future__ import annotations

from pathlib import Path

import click

from ..storage.outputs import check_output
from .app import cli, emit, json_option, reports_errors, split_classes
from .common import ModelSource, describe_spec, model_options, open_dataset, open_parent


@cli.command("import")
@model_options
@click.option("--classes", default=None,
              help="Comma-separated names of the model's outputs, in order (a,b,...).")
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Dataset whose classes the model's outputs are (in its order); its image size is the default "
                   "input size of a model from code.")
@click.option("--format", "data_format", default=None,
              help="Dataset format (npz, folder, cifar, tiny-imagenet, idx); detected from the path.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Parent file to write (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cnnmod parent file at --out (nothing else).")
@json_option
@reports_errors
def import_model(model: ModelSource, classes: str | None, data_path: Path | None, data_format: str | None,
                 out: Path, overwrite: bool, as_json: bool) -> None:
    """Write MODEL as a parent file: its traced, BatchNorm-folded graph as data, its weights, class names and
    input spec. Every command that takes MODEL reads the file without the model's code and without unpickling.
    Without --classes or --data, outputs a file does not name are numbered 0, 1, ..."""
    from ..storage.parentfile import save_parent_file

    check_output(out, "parent", overwrite)
    if classes and data_path is not None:
        raise click.UsageError("give the class names with --classes or with --data, not both")
    names = split_classes(classes)
    images = None
    if data_path is not None:
        data = open_dataset(data_path, data_format, None, as_json)
        names, images = list(data.classes), data.train.images
    parent = open_parent(model, names, images=images)
    save_parent_file(out, parent, overwrite, source={"model": str(model), "data": str(data_path or "")})
    sites = {kind: len(found) for kind, found in parent.model.sites.items()}
    shown = ", ".join(parent.classes[:10]) + (", ..." if parent.num_classes > 10 else "")
    emit(as_json,
         {"parent": str(out), "model": str(model), "arch": parent.arch, "classes": list(parent.classes),
          "input_spec": parent.input_spec.to_json(), "sites": sites, "fingerprint": parent.fingerprint()},
         f"wrote {out}: {parent.arch}, {parent.num_classes} classes ({shown}), {sites.get('relu', 0)} relu sites\n"
         f"input: {describe_spec(parent.input_spec)}")
