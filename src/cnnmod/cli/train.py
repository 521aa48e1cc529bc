"""`cnnmod train`: train a zoo architecture on a dataset, keeping the best held-out checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import CnnmodError
from ..progress import is_quiet
from ..storage.outputs import check_output
from ..workflows.energy import EnergyMeter
from ..workflows.train import train_model
from ..zoo import create_model, model_info, save_model_file
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import check_input, data_options, input_options, input_spec, open_dataset
from .params import COUNT, NON_NEGATIVE, POSITIVE, SEED, FiniteFloat


@cli.command()
@click.argument("arch")
@data_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model file to write (.safetensors).")
@click.option("--epochs", type=COUNT, default=10, show_default=True)
@click.option("--batch-size", type=COUNT, default=128, show_default=True)
@click.option("--lr", type=POSITIVE, default=0.05, show_default=True)
@click.option("--weight-decay", type=NON_NEGATIVE, default=5e-4, show_default=True)
@click.option("--val-fraction", type=FiniteFloat(0.0, 1.0, open_low=True, open_high=True), default=0.1,
              show_default=True,
              help="Held-out share that picks the best epoch.")
@input_options
@click.option("--limit-per-class", type=COUNT, default=None, help="Train on at most this many images per class.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing cnnmod model file at --out (nothing else).")
@device_option
@json_option
@reports_errors
def train(arch: str, data_path: Path, data_format: str | None, classes: str | None, out: Path, epochs: int,
          batch_size: int, lr: float, weight_decay: float, val_fraction: float,
          input_size: tuple[int, int] | None, channels: int | None, mean: tuple[float, ...] | None,
          std: tuple[float, ...] | None, limit_per_class: int | None, seed: int, overwrite: bool, device: str | None,
          as_json: bool) -> None:
    """Train ARCH (see `cnnmod inspect --models`) on a dataset's training split."""
    import numpy as np

    check_output(out, "model", overwrite)
    info = model_info(arch)
    data = open_dataset(data_path, data_format, split_classes(classes), as_json).train
    if limit_per_class:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:limit_per_class]
                               for c in range(len(data.classes))])
        data = data.take(np.sort(keep))
    channels = channels or info.in_channels
    spec = input_spec(input_size or info.input_size, channels, mean, std)
    model = create_model(arch, num_classes=len(data.classes), in_channels=channels, seed=seed)
    check_input(model, spec, arch)

    def report(row: dict) -> None:
        if not as_json and not is_quiet():
            click.echo(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, train {row['train_accuracy']:.4f}, "
                       f"held-out {row['val_accuracy']:.4f} ({row['seconds']:.0f}s)", err=True)

    with EnergyMeter() as meter:
        result = train_model(model, data, spec, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, val_fraction=val_fraction, seed=seed, device=device,
                             progress=not as_json, on_epoch=report)
    extra = {"dataset": str(data_path), "epochs": epochs, "best_epoch": result.best_epoch,
             "best_val_accuracy": result.best_val_accuracy, "train_images": len(data), "seed": seed,
             "seconds": result.seconds}
    if not all(bool(torch.isfinite(p).all()) for p in result.model.parameters()):
        raise CnnmodError(f"training diverged: {arch} has NaN or infinite weights after {epochs} epochs; "
                          f"nothing was written; try a lower --lr than {lr:g}")
    save_model_file(out, result.model.cpu(), arch, data.classes, spec, extra, overwrite=overwrite)
    emit(as_json, {"model": str(out), "arch": arch, "classes": list(data.classes), **extra,
                   "history": result.history},
         f"wrote {out}: {arch}, best held-out accuracy {result.best_val_accuracy:.4f} at epoch "
         f"{result.best_epoch} of {epochs} ({result.seconds:.0f}s)", meter.report)
