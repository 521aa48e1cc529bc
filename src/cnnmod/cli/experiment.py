"""`cnnmod experiment ...`: the paper's reuse, replacement and repair scenarios on real data.

Defaults are sized for a 2-core CPU (minutes per scenario); flags set the full sizes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from ..data import Dataset
from ..engine.decompose import DecomposeConfig
from ..engine.inputs import InputSpec
from ..errors import CnnmodError
from ..paper.experiments import Experiment
from ..paper.report import require_matplotlib
from ..storage.outputs import check_output, write_report_folder
from .app import cli, device_option, emit, json_option, reports_errors
from .common import MODEL, ModelSource, open_dataset, open_parent
from .params import COUNT, RATE, SEED, FiniteFloat

SHARED = Path("../shared")
COMPACT_TRAIN_IMAGES = 5_000
"""The compact fine-tune budget of `intra-reuse --method compact`, sized like the other defaults for a CPU."""


@cli.group()
def experiment() -> None:
    """Run one of the paper's scenarios and print its table (and write it with an energy plot to --out)."""


def _pairs(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.split(","):
        a, sep, b = item.partition(":")
        if not sep or not a or not b:
            raise CnnmodError(f"pairs are written a:b,c:d; got {item!r}")
        pairs.append((a.strip(), b.strip()))
    return pairs


@dataclass(frozen=True)
class ReportTarget:
    """Where an experiment writes its report (checked before the experiment runs)."""

    path: Path
    overwrite: bool


def _finish(result: Experiment, out: ReportTarget | None, energy_keys: dict[str, str], label_key: str,
            as_json: bool) -> None:
    from ..paper.report import plot_energy
    from ..storage.fileio import atomic_write_text

    payload: dict[str, Any] = result.to_json()
    if out is not None:
        with write_report_folder(out.path, out.overwrite, f"experiment {result.name}") as tmp:
            atomic_write_text(tmp / "result.json", json.dumps(payload, indent=2, allow_nan=False))
            atomic_write_text(tmp / "table.md", f"# {result.name}\n\n{result.table()}\n" +
                              "".join(f"\n- {n}" for n in result.notes) + "\n")
            rows = [r for r in result.rows if all(k in r for k in energy_keys.values())]
            if rows:
                plot_energy(tmp / "energy.png", [str(r[label_key]) for r in rows],
                            {name: [max(r[k], 1e-12) for r in rows] for name, k in energy_keys.items()},
                            f"{result.name}: energy")
                payload["energy_plot"] = str(out.path / "energy.png")
    emit(as_json, payload, f"{result.name}\n\n{result.table()}\n" + "\n".join(f"- {n}" for n in result.notes))


def _config(samples_per_class: int, seed: int) -> DecomposeConfig:
    return DecomposeConfig(samples_per_class=samples_per_class, seed=seed)


common = [
    click.option("--epochs", type=COUNT, default=5, show_default=True,
                 help="Epochs for each model trained from scratch."),
    click.option("--samples-per-class", type=COUNT, default=1000, show_default=True),
    click.option("--seed", type=SEED, default=0, show_default=True),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder for table.md, result.json and energy.png."),
    click.option("--overwrite", is_flag=True, help="Replace an existing report folder at --out (nothing else)."),
    device_option, json_option, reports_errors,
]


def two_parents(f):  # type: ignore[no-untyped-def]
    """Options naming parent A (default: the shared ResNet-20 on CIFAR-10) and parent B (default: the embedded
    Fashion-MNIST CNN)."""
    options = [
        click.option("--model-a", type=MODEL,
                     default=SHARED / "models/resnet20-12fca82f.th", show_default=True),
        click.option("--arch-a", default="resnet20", show_default=True),
        click.option("--data-a", type=click.Path(exists=True, path_type=Path),
                     default=SHARED / "data/cifar10-jpg.tar.gz", show_default=True),
        click.option("--model-b", type=MODEL, default=None,
                     help="Default: the embedded Fashion-MNIST CNN."),
        click.option("--arch-b", default=None),
        click.option("--data-b", type=click.Path(exists=True, path_type=Path),
                     default=Path("/usr/share/datasets/fashion-mnist"), show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def with_common(f):  # type: ignore[no-untyped-def]
    @functools.wraps(f)
    def checked_out(*args: Any, out: Path | None, overwrite: bool, **kwargs: Any) -> Any:
        if out is not None:
            check_output(out, "report", overwrite)
            require_matplotlib("cnnmod experiment --out (its energy plot)")
        return f(*args, out=ReportTarget(out, overwrite) if out is not None else None, **kwargs)

    wrapped = checked_out
    for option in reversed(common):
        wrapped = option(wrapped)
    return wrapped


@experiment.command("intra-reuse")
@click.option("--model", type=MODEL,
              default=SHARED / "models/resnet20-12fca82f.th", show_default=True)
@click.option("--arch", default="resnet20", show_default=True)
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path),
              default=SHARED / "data/cifar10-jpg.tar.gz", show_default=True)
@click.option("--pairs", default="cat:dog,automobile:truck,deer:horse", show_default=True)
@click.option("--method", type=click.Choice(["paper", "compact"]), default="paper", show_default=True,
              help="paper: masked modules (Pan & Rajan); compact: small modules, each its own network of the kept "
                   "channels, fine-tuned from the parent (`decompose --method compact`, its default keep "
                   "fractions).")
@click.option("--train-images", type=click.IntRange(min=0), default=COMPACT_TRAIN_IMAGES, show_default=True,
              help="compact: training images of each fine-tune (the store's and each pair's; 0: none). "
                   "`decompose --method compact` uses 300000, or 100000 with --prefix-keep below 1.")
@click.option("--prefix-keep", type=FiniteFloat(0.0, 1.0, open_low=True), default=1.0, show_default=True,
              help="compact: the pairs' own decompositions keep this fraction of the shared prefix's channels, "
                   "chosen for the pair and fine-tuned (`decompose --prefix-keep`: lr 0.004 and a "
                   "feature hint); 1: the parent's own prefix, as in the store.")
@with_common
def intra_reuse(model: Path, arch: str, data_path: Path, pairs: str, method: str, train_images: int,
                prefix_keep: float, epochs: int, samples_per_class: int, seed: int, out: ReportTarget | None,
                device: str | None, as_json: bool) -> None:
    """Table 2: a parent's modules for a class pair, composed, vs the same architecture trained on the pair, in
    accuracy, energy, parameters and inference time."""
    from ..engine.compact import CompactConfig
    from ..paper.experiments import intra_reuse as run

    data = open_dataset(data_path, None, None, as_json)
    parent = open_parent(_source(model, arch), data.classes)
    compact = CompactConfig(train_images=train_images, seed=seed) if method == "compact" else None
    pair_compact = replace(compact.with_prefix_keep(prefix_keep), train_images=train_images) \
        if compact is not None and prefix_keep < 1 else None
    result = run(parent, data, _pairs(pairs), parent.arch, epochs, _config(samples_per_class, seed), seed, device,
                 not as_json, compact, pair_compact=pair_compact)
    _finish(result, out, {"train from scratch": "train_kwh", "decompose + compose": "reuse_kwh",
                          "compose from a store": "store_kwh"}, "pair", as_json)


@experiment.command("inter-reuse")
@two_parents
@click.option("--pairs", default="cat:Bag,automobile:Sneaker,dog:Shirt", show_default=True,
              help="class of A:class of B, ...")
@click.option("--calibration-samples", type=COUNT, default=300, show_default=True)
@with_common
def inter_reuse(model_a: Path, arch_a: str, data_a: Path, model_b: Path | None, arch_b: str | None, data_b: Path,
                pairs: str, calibration_samples: int, epochs: int, samples_per_class: int, seed: int,
                out: ReportTarget | None, device: str | None, as_json: bool) -> None:
    """Table 3: modules from two datasets composed, with and without continuous learning, vs training."""
    from ..paper.experiments import inter_reuse as run

    da, db = open_dataset(data_a, None, None, as_json), open_dataset(data_b, None, None, as_json)
    pa = open_parent(_source(model_a, arch_a), da.classes)
    pb = open_parent(_source(model_b or _embedded_model(), arch_b), db.classes)
    result = run(pa, da, pb, db, _pairs(pairs), pa.arch, epochs, _config(samples_per_class, seed),
                 calibration_samples, seed, device, not as_json)
    _finish(result, out, {"train from scratch": "train_kwh", "reuse + continuous learning": "reuse_kwh",
                          "+ score calibration": "calibrated_kwh", "+ head recalibration": "recalibrated_kwh"},
            "pair", as_json)


def _source(model: str | Path, arch: str | None) -> ModelSource:
    """MODEL (see `cnnmod decompose --help`); --arch applies to a checkpoint file, not to code or a zoo name."""
    return ModelSource(str(model), arch if Path(str(model)).is_file() else None)


def _embedded_model() -> Path:
    from importlib import resources

    with resources.as_file(resources.files("cnnmod") / "assets" / "smallcnn-fmnist.safetensors") as path:
        return Path(path)


@experiment.command("intra-replace")
@click.option("--weak", type=MODEL, required=True,
              help="The weaker parent (e.g. a ResNet-20 without BatchNorm trained by `cnnmod train`).")
@click.option("--weak-arch", default=None)
@click.option("--strong", type=MODEL,
              default=SHARED / "models/resnet20-12fca82f.th", show_default=True)
@click.option("--strong-arch", default="resnet20", show_default=True)
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path),
              default=SHARED / "data/cifar10-jpg.tar.gz", show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Evaluate on N test images (spread over all classes).")
@with_common
def intra_replace(weak: Path, weak_arch: str | None, strong: Path, strong_arch: str, data_path: Path,
                  limit: int | None, epochs: int, samples_per_class: int, seed: int, out: ReportTarget | None,
                  device: str | None, as_json: bool) -> None:
    """Table 4: a weaker parent's composed modules, each replaced by a stronger parent's module."""
    from ..paper.experiments import intra_replace as run

    data = open_dataset(data_path, None, None, as_json)
    if limit:
        data = _spread(data, limit)
    pw = open_parent(_source(weak, weak_arch), data.classes)
    ps = open_parent(_source(strong, strong_arch), data.classes)
    result = run(pw, ps, data, _config(samples_per_class, seed), device, not as_json)
    _finish(result, out, {}, "class", as_json)


def _spread(data: Dataset, limit: int) -> Dataset:
    return Dataset(data.name, data.train, data.test.spread(limit))


@experiment.command("inter-replace")
@two_parents
@click.option("--replacements", default="truck:Sneaker,frog:Bag", show_default=True,
              help="class of A:class of B that takes its place, ...")
@click.option("--limit", type=COUNT, default=2000, show_default=True)
@with_common
def inter_replace(model_a: Path, arch_a: str, data_a: Path, model_b: Path | None, arch_b: str | None, data_b: Path,
                  replacements: str, limit: int, epochs: int, samples_per_class: int, seed: int,
                  out: ReportTarget | None, device: str | None, as_json: bool) -> None:
    """Table 5: a module replaced by another dataset's module for another class."""
    from ..paper.experiments import inter_replace as run

    da, db = open_dataset(data_a, None, None, as_json), open_dataset(data_b, None, None, as_json)
    da = _spread(da, limit)
    pa = open_parent(_source(model_a, arch_a), da.classes)
    pb = open_parent(_source(model_b or _embedded_model(), arch_b), db.classes)
    result = run(pa, da, pb, db, _pairs(replacements), _config(samples_per_class, seed), seed=seed, device=device,
                 progress=not as_json)
    _finish(result, out, {}, "replacement", as_json)


GORILLA, GROOM = "n02480855", "n10148035"


@experiment.command("repair")
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path),
              default=SHARED / "data/tiny-imagenet-202-sub.tar.gz", show_default=True)
@click.option("--pair", default=f"{GORILLA}:{GROOM}", show_default=True,
              help="wrongly predicted class:class it is predicted for (gorilla:groom as 'person').")
@click.option("--classes", "class_count", type=click.IntRange(min=2), default=10, show_default=True,
              help="Classes in the faulty parent: the pair plus the first others of the dataset.")
@click.option("--arch", default="resnet20", show_default=True)
@click.option("--input-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="64 for Tiny-ImageNet's full resolution.")
@click.option("--noise", type=RATE, default=0.5, show_default=True,
              help="Share of the second class's labels set to the first.")
@with_common
def repair(data_path: Path, pair: str, class_count: int, arch: str, input_size: int, noise: float, epochs: int,
           samples_per_class: int, seed: int, out: ReportTarget | None, device: str | None, as_json: bool) -> None:
    """Table 6: a parent that confuses a class pair, and the four ways to repair its composed classifier."""
    from ..paper.experiments import repair_scenario

    (wrong, right), = _pairs(pair)
    full = open_dataset(data_path, None, None, as_json)
    others = [c for c in full.classes if c not in (wrong, right)][: max(class_count - 2, 0)]
    data = full.subset([wrong, right, *others])
    spec = InputSpec.default((input_size, input_size), data.train.images.shape[-1])
    result = repair_scenario(data, (wrong, right), arch, epochs, spec, _config(samples_per_class, seed), noise, seed,
                             device, not as_json)
    _finish(result, out, {"repair": "repair_kwh"}, "option", as_json)
