"""`cnnmod replace`, `cnnmod remove`, `cnnmod calibrate` and `cnnmod repair ...`: new classifiers from a
composition's modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..engine.compose import ComposedClassifier, removed, reverified
from ..engine.compose import replace as replace_module
from ..errors import CnnmodError
from ..storage.outputs import check_output
from ..storage.store import load_composition, load_store, save_composition
from ..workflows.calibrate import Calibration, calibrate, labelled_sample
from ..workflows.energy import EnergyMeter, EnergyReport
from ..workflows.evaluate import evaluate_composed
from .app import cli, device_option, emit, json_option, reports_errors, split_classes
from .common import open_dataset
from .params import COUNT, SEED

composition_argument = click.argument("composition", type=click.Path(exists=True, file_okay=False, path_type=Path))


def out_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--overwrite", is_flag=True, help="Replace an existing composition at --out (nothing else).")(f)
    return click.option("--out", required=True, type=click.Path(path_type=Path), help="Composition folder to write.")(f)
data_option = click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), default=None,
                           help="Report accuracy before and after on this dataset's test split.")


samples_option = click.option("--samples", type=COUNT, default=100, show_default=True,
                              help="Calibration images per label, drawn from the training split.")
seed_option = click.option("--seed", type=SEED, default=0, show_default=True,
                           help="Seed for drawing calibration images.")


def _calibrated(composed: ComposedClassifier, data_paths: tuple[Path, ...], labels: list[str] | None, samples: int,
                seed: int, device: str | None, quiet: bool) -> Calibration:
    """`composed` calibrated on training images of the datasets that hold its modules' classes (a renamed label
    draws images of its module's class)."""
    sources = [open_dataset(path, None, None, quiet).train for path in data_paths]
    classes = [name for group in composed.groups for name in group.class_names]
    images, targets = labelled_sample(classes, sources, samples, seed)
    return calibrate(composed, images, targets, labels, device=device)


def _calibration_json(result: Calibration) -> dict[str, Any]:
    return {"labels": list(result.fitted), "samples": result.samples, "loss_before": result.loss_before,
            "loss_after": result.loss_after, "accuracy_before": result.accuracy_before,
            "accuracy_after": result.accuracy_after}


def _calibration_text(result: Calibration) -> str:
    return (f"calibrated {', '.join(result.fitted)} on {result.samples} training images: vote accuracy there "
            f"{result.accuracy_before:.4f} -> {result.accuracy_after:.4f}, loss {result.loss_before:.4f} -> "
            f"{result.loss_after:.4f}")


def _finish(before: ComposedClassifier, after: ComposedClassifier, out: Path, overwrite: bool,
            data_path: Path | None,
            pair: list[str], energy: EnergyReport, device: str | None, as_json: bool, what: str,
            calibration: Calibration | None = None) -> None:
    save_composition(out, after, overwrite)
    payload: dict[str, Any] = {"composition": str(out), "labels": list(after.labels)}
    text = [f"wrote {out}: {what}; labels {', '.join(after.labels)}"]
    if calibration is not None:
        payload["calibration"] = _calibration_json(calibration)
        text.append(_calibration_text(calibration))
    if data_path is not None:
        test = open_dataset(data_path, None, None, True).test
        for name, classifier in (("before", before), ("after", after)):
            result = evaluate_composed(classifier, test.images, test.labels, test.classes, device=device)
            payload[name] = result
            line = f"{name}: top-1 {result['top1']:.4f} on {result['samples']} images"
            known = [c for c in pair if c in test.classes and c in classifier.labels]
            if known:
                on_pair = test.subset(known)
                pair_result = evaluate_composed(classifier, on_pair.images, on_pair.labels, on_pair.classes,
                                                device=device)
                payload[name]["pair_top1"] = pair_result["top1"]
                line += f", {pair_result['top1']:.4f} on the pair's {pair_result['samples']} images"
            text.append(line)
    emit(as_json, payload, "\n".join(text), energy)


@cli.command()
@composition_argument
@click.argument("label")
@click.argument("source")
@click.option("--as", "new_label", default=None, help="Label of the new module (default: LABEL).")
@click.option("--calibrate", "calibrated", is_flag=True,
              help="Calibrate the new module's score against the others (see `cnnmod calibrate`).")
@click.option("--train-data", "calibration_data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="With --calibrate: dataset whose training split holds the labels (repeat for several).")
@samples_option
@seed_option
@out_option
@data_option
@device_option
@json_option
@reports_errors
def replace(composition: Path, label: str, source: str, new_label: str | None, calibrated: bool,
            calibration_data: tuple[Path, ...], samples: int, seed: int, out: Path, overwrite: bool,
            data_path: Path | None, device: str | None, as_json: bool) -> None:
    """Swap the module voting for LABEL for SOURCE (`STORE:class`), from any parent or dataset."""
    check_output(out, "composition", overwrite)
    store, sep, cls = source.partition(":")
    if not sep:
        raise CnnmodError(f"SOURCE is STORE:class, got {source!r}")
    if calibrated != bool(calibration_data):
        raise CnnmodError("--calibrate and --train-data go together")
    calibration = None
    with EnergyMeter() as meter:
        before = load_composition(composition)
        after = replace_module(before, label, load_store(store, with_activity=False).modules.select([cls]), new_label)
        if calibrated:
            calibration = _calibrated(after, calibration_data, [new_label or label], samples, seed, device, as_json)
            after = calibration.composed
    _finish(before, after, out, overwrite, data_path, [], meter.report, device, as_json,
            f"{label} replaced by {source}", calibration)


@cli.command("calibrate")
@composition_argument
@click.option("--train-data", "calibration_data", multiple=True, required=True,
              type=click.Path(exists=True, path_type=Path),
              help="Dataset whose training split holds the labels (repeat for labels from several datasets).")
@click.option("--labels", default=None, help="Labels whose modules are calibrated, a,b (default: all).")
@samples_option
@seed_option
@out_option
@data_option
@device_option
@json_option
@reports_errors
def calibrate_command(composition: Path, calibration_data: tuple[Path, ...], labels: str | None, samples: int,
                      seed: int, out: Path, overwrite: bool, data_path: Path | None, device: str | None,
                      as_json: bool) -> None:
    """Put modules from different parents on one score scale: fit a scale and an offset of each chosen module's
    margin so the vote is right on a few labelled images (heads change; masks and bodies do not)."""
    check_output(out, "composition", overwrite)
    with EnergyMeter() as meter:
        before = load_composition(composition)
        calibration = _calibrated(before, calibration_data, split_classes(labels), samples, seed, device, as_json)
    _finish(before, calibration.composed, out, overwrite, data_path, [], meter.report, device, as_json,
            f"{', '.join(calibration.fitted)} calibrated", calibration)


@cli.command()
@composition_argument
@click.argument("label")
@out_option
@data_option
@device_option
@json_option
@reports_errors
def remove(composition: Path, label: str, out: Path, overwrite: bool, data_path: Path | None, device: str | None,
           as_json: bool) -> None:
    """Drop the module voting for LABEL."""
    check_output(out, "composition", overwrite)
    with EnergyMeter() as meter:
        before = load_composition(composition)
        after = removed(before, label)
    _finish(before, after, out, overwrite, data_path, [], meter.report, device, as_json, f"{label} removed")


@cli.group()
def repair() -> None:
    """Repair a faulty class pair of a composed classifier (paper Figure 1): four options."""


def _pair(value: str) -> list[str]:
    pair = split_classes(value) or []
    if len(pair) != 2:
        raise CnnmodError(f"--pair takes two labels, a,b; got {value!r}")
    return pair


pair_option = click.option("--pair", required=True, help="The two labels the classifier confuses, a,b.")


@repair.command("replace")
@composition_argument
@pair_option
@click.option("--better", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Store of a better parent with modules for both classes.")
@out_option
@data_option
@device_option
@json_option
@reports_errors
def repair_replace(composition: Path, pair: str, better: Path, out: Path, overwrite: bool, data_path: Path | None,
                   device: str | None, as_json: bool) -> None:
    """Option 1: replace both modules with a better parent's."""
    check_output(out, "composition", overwrite)
    from ..workflows.repair import replace_from

    labels = _pair(pair)
    with EnergyMeter() as meter:
        before = load_composition(composition)
        after = replace_from(before, labels, load_store(better, with_activity=False).modules)
    _finish(before, after, out, overwrite, data_path, labels, meter.report, device, as_json, f"{pair} from {better}")


@repair.command("retrain")
@composition_argument
@pair_option
@click.option("--train-data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Dataset whose training split holds both classes.")
@click.option("--arch", default="resnet20", show_default=True)
@click.option("--epochs", type=COUNT, default=10, show_default=True)
@click.option("--samples-per-class", type=COUNT, default=1000, show_default=True)
@click.option("--pair-store", type=click.Path(path_type=Path), default=None,
              help="Also keep the pair model's store here (for `repair reverify`).")
@out_option
@data_option
@device_option
@json_option
@reports_errors
def repair_retrain(composition: Path, pair: str, train_data: Path, arch: str, epochs: int, samples_per_class: int,
                   pair_store: Path | None, out: Path, overwrite: bool, data_path: Path | None, device: str | None,
                   as_json: bool) -> None:
    """Option 2: train a small model on the pair, decompose it, replace both modules with its modules."""
    check_output(out, "composition", overwrite)
    from ..engine.decompose import DecomposeConfig
    from ..storage.store import save_store
    from ..workflows.repair import pair_modules, replace_from, train_pair_model

    if pair_store is not None:
        check_output(pair_store, "store", overwrite)
    labels = _pair(pair)
    before = load_composition(composition)
    spec = next(g.parent.input_spec for g in before.groups if set(labels) & set(g.class_names))
    data = open_dataset(train_data, None, None, as_json).train
    with EnergyMeter() as meter:
        parent = train_pair_model(arch, data, labels, spec, epochs, device=device, progress=not as_json)
        modules = pair_modules(parent, data, DecomposeConfig(samples_per_class=samples_per_class), device,
                               not as_json)
        after = replace_from(before, labels, modules)
    if pair_store is not None:
        save_store(pair_store, modules, overwrite=overwrite)
    _finish(before, after, out, overwrite, data_path, labels, meter.report, device, as_json,
            f"{pair} from a {arch} trained on the pair")


@repair.command("remove")
@composition_argument
@click.option("--label", required=True, help="The label the fault predicts wrongly (e.g. gorilla).")
@out_option
@data_option
@device_option
@json_option
@reports_errors
def repair_remove(composition: Path, label: str, out: Path, overwrite: bool, data_path: Path | None, device: str | None,
                  as_json: bool) -> None:
    """Option 3: remove the faulty module."""
    check_output(out, "composition", overwrite)
    with EnergyMeter() as meter:
        before = load_composition(composition)
        after = removed(before, label)
    _finish(before, after, out, overwrite, data_path, [label], meter.report, device, as_json, f"{label} removed")


@repair.command("reverify")
@composition_argument
@pair_option
@click.option("--pair-store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Store of a model trained on the pair (see `repair retrain --pair-store`).")
@out_option
@data_option
@device_option
@json_option
@reports_errors
def repair_reverify(composition: Path, pair: str, pair_store: Path, out: Path, overwrite: bool, data_path: Path | None,
                    device: str | None, as_json: bool) -> None:
    """Option 4: keep the classifier, re-decide its predictions of the pair with the pair model's modules."""
    check_output(out, "composition", overwrite)
    labels = _pair(pair)
    with EnergyMeter() as meter:
        before = load_composition(composition)
        after = reverified(before, labels, load_store(pair_store, with_activity=False).modules.select(labels))
    _finish(before, after, out, overwrite, data_path, labels, meter.report, device, as_json, f"{pair} re-verified")
