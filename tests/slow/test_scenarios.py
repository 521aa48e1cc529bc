"""The paper's reuse, replacement and repair scenarios (cnnmod.paper.experiments) on small subsets of real data.

Each scenario runs on a few hundred images per class, 50 decomposition samples per class and scratch models
trained for an epoch or two, so each test takes about a minute on a 2-core CPU. They check what a user would
notice: every row present, accuracies in [0, 1], energy measured and positive, and the effects the paper
reports where a strong parent makes them certain. Skipped when the shared data or Fashion-MNIST is absent.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from cnnmod.data import Dataset, ImageSet, load_dataset
from cnnmod.engine.decompose import DecomposeConfig
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.paper import experiments
from cnnmod.paper.experiments import (
    Experiment,
    inter_replace,
    inter_reuse,
    intra_replace,
    intra_reuse,
    parent_accuracy,
    repair_scenario,
    train_scratch,
)
from cnnmod.zoo import create_model, load_model_file, load_weights

SHARED = Path(__file__).resolve().parents[3] / "shared"
CIFAR10 = SHARED / "data" / "cifar10-jpg.tar.gz"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
TINY_IMAGENET = SHARED / "data" / "tiny-imagenet-202-sub.tar.gz"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
GORILLA, GROOM = "n02480855", "n10148035"
CONFIG = DecomposeConfig(samples_per_class=50)
METHOD = re.compile(r"kWh, .* lbs CO2e \((estimate|rapl)")  # an EnergyReport.describe(), naming its method

pytestmark = pytest.mark.slow


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"not available here: {', '.join(missing)}")


def first_per_class(data: ImageSet, n: int) -> ImageSet:
    """The first `n` images of every class, in the set's order."""
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:n] for c in range(len(data.classes))])
    return data.take(np.sort(keep))


def shrunk(data: Dataset, train: int, test: int) -> Dataset:
    return Dataset(data.name, first_per_class(data.train, train), first_per_class(data.test, test))


@pytest.fixture(scope="module")
def cifar() -> Dataset:
    need(CIFAR10, RESNET20)
    # decomposition observes 50 images per class; the scratch models train on all 1000 per class, which is what
    # makes training dearer than decomposing (at full size the paper's ratio is far larger)
    return shrunk(load_dataset(CIFAR10, progress=False), 1000, 100)


@pytest.fixture(scope="module")
def resnet20(cifar: Dataset) -> Parent:
    model = load_weights(create_model("resnet20", num_classes=10), RESNET20).eval()
    return Parent.from_model(model, InputSpec.default((32, 32), 3), cifar.classes, "resnet20")


def energy_ok(row: dict, *names: str) -> None:
    for name in names:
        assert row[f"{name}_kwh"] > 0 and row[f"{name}_seconds"] > 0 and row[f"{name}_co2e_lbs"] > 0, (name, row)


def accuracies_ok(result: Experiment, *columns: str) -> None:
    for row in result.rows:
        for column in columns:
            assert 0.0 <= row[column] <= 1.0, (column, row)


def test_intra_reuse_composes_a_pair_well_and_from_a_store_without_decomposing(
        cifar: Dataset, resnet20: Parent, monkeypatch: pytest.MonkeyPatch) -> None:
    decomposed: list[object] = []
    real = experiments.decompose

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        decomposed.append(args[4] if len(args) > 4 else kwargs.get("classes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments, "decompose", counted)
    result = intra_reuse(resnet20, cifar, [("cat", "dog"), ("automobile", "truck")], "resnet20", 1, CONFIG,
                         progress=False)
    # the store once with every class, then each pair fresh; composing from the store decomposes nothing
    assert decomposed == [None, ["cat", "dog"], ["automobile", "truck"]]
    assert [r["pair"] for r in result.rows] == ["cat/dog", "automobile/truck", "mean"]
    accuracies_ok(result, "composed", "scratch")
    for row in result.rows[:2]:
        assert row["composed"] > 0.6, row  # the shared parent is strong; its modules are too
        assert row["delta"] == pytest.approx(row["composed"] - row["scratch"])
        energy_ok(row, "reuse", "store", "train")
        assert row["energy_ratio"] == pytest.approx(row["train_kwh"] / row["reuse_kwh"])
        assert row["store_composed"] == row["composed"]  # the same modules, decomposed alone or with all classes
    mean = result.rows[2]
    assert mean["composed"] == pytest.approx(np.mean([r["composed"] for r in result.rows[:2]]))
    assert mean["energy_ratio"] == pytest.approx(mean["train_kwh"] / mean["reuse_kwh"])
    assert any("decomposing all 10 classes into that store, once" in n and METHOD.search(n) for n in result.notes)
    assert "| cat/dog |" in result.table()


@pytest.fixture(scope="module")
def fashion() -> tuple[Parent, Dataset]:
    need(FASHION_MNIST)
    with resources.as_file(resources.files("cnnmod") / "assets" / "smallcnn-fmnist.safetensors") as path:
        model, info = load_model_file(path)
    data = shrunk(load_dataset(FASHION_MNIST, progress=False), 200, 100)
    assert data.classes == info.classes
    return Parent.from_model(model, info.input_spec, info.classes, info.arch), data


def test_inter_reuse_reports_composed_learned_and_recalibrated(cifar: Dataset, resnet20: Parent,
                                                               fashion: tuple[Parent, Dataset]) -> None:
    parent_b, data_b = fashion
    result = inter_reuse(resnet20, cifar, parent_b, data_b, [("cat", "Bag")], "resnet_tiny", 1, CONFIG,
                         calibration_samples=100, progress=False)
    assert len(result.rows) == 1
    row = result.rows[0]
    assert row["pair"] == "cat/Bag"
    accuracies_ok(result, "composed", "cl", "cl_calibrated", "cl_recalibrated", "scratch")
    assert row["cl_delta"] == pytest.approx(row["cl"] - row["scratch"])
    assert row["cl_calibrated_delta"] == pytest.approx(row["cl_calibrated"] - row["scratch"])
    energy_ok(row, "reuse", "calibrated", "recalibrated", "train")
    # calibration and recalibration each come on top of learning
    assert row["reuse_kwh"] <= row["calibrated_kwh"] and row["reuse_kwh"] <= row["recalibrated_kwh"]
    assert row["energy_ratio"] == pytest.approx(row["train_kwh"] / row["reuse_kwh"])
    # colour photos and grey product shots are easy to tell apart once the heads are refitted
    assert row["cl_recalibrated"] > 0.8, row
    assert set(result.columns) <= set(row)


def test_inter_replace_swaps_a_class_for_another_datasets_class(cifar: Dataset, resnet20: Parent,
                                                                fashion: tuple[Parent, Dataset]) -> None:
    parent_b, data_b = fashion
    small = Dataset(cifar.name, first_per_class(cifar.train, 60), first_per_class(cifar.test, 20))
    result = inter_replace(resnet20, small, parent_b, data_b, [("truck", "Sneaker")], CONFIG,
                           calibration_samples=50, limit=200, progress=False, arch="resnet_tiny", epochs=1)
    assert [r["replacement"] for r in result.rows] == ["truck -> Sneaker"]
    accuracies_ok(result, "before_on_a", "replaced", "replaced_cl", "replaced_calibrated", "scratch",
                  "replaced_top5", "scratch_top5")
    row = result.rows[0]
    assert row["before_on_a"] > 0.7  # the strong parent's composed modules on 10 CIFAR classes
    assert row["replaced_top5"] >= row["replaced"] and row["scratch_top5"] >= row["scratch"]
    energy_ok(row, "replace", "calibrate", "train")
    assert row["energy_ratio"] == pytest.approx(row["train_kwh"] / row["replace_kwh"])


def test_intra_replace_with_a_strong_parents_modules_improves_a_weak_one(cifar: Dataset, resnet20: Parent) -> None:
    data = Dataset(cifar.name, cifar.train, first_per_class(cifar.test, 30))
    weak, energy = train_scratch("resnet_tiny", data.train, resnet20.input_spec, 1, 0, None, False)
    assert energy.kwh > 0
    assert parent_accuracy(weak, data.test) < parent_accuracy(resnet20, data.test)
    result = intra_replace(weak, resnet20, data, CONFIG, progress=False)
    assert [r["class"] for r in result.rows] == [*cifar.classes, "all replaced"]
    accuracies_ok(result, "before", "after")
    for row in result.rows[:-1]:
        for column in ("after_calibrated", "class_recall_before", "class_recall_after",
                       "class_recall_after_calibrated"):
            assert 0.0 <= row[column] <= 1.0, (column, row)
        assert row["delta"] == pytest.approx(row["after"] - row["before"])
        assert row["delta_calibrated"] == pytest.approx(row["after_calibrated"] - row["before"])
        assert row["after_top5"] >= row["after"] and row["before_top5"] >= row["before"]
    everything = result.rows[-1]
    assert everything["after"] > everything["before"] + 0.2, everything
    assert any("kWh per replaced class" in note and METHOD.search(note) for note in result.notes)
    assert result.summary["strong_top1"] > result.summary["weak_top1"]
    some = intra_replace(weak, resnet20, data, CONFIG, progress=False, classes=["cat", "ship"])
    assert [r["class"] for r in some.rows] == ["cat", "ship"]  # no "all replaced" row: not all were
    for row in some.rows:  # the same modules (decomposed alone or with all classes); float rounding aside
        full = next(r for r in result.rows if r["class"] == row["class"])
        assert row.keys() == full.keys()
        for key in ("before", "after", "after_calibrated", "class_recall_after"):
            assert row[key] == pytest.approx(full[key], abs=0.02), key


@pytest.fixture(scope="module")
def tiny_imagenet() -> Dataset:
    need(TINY_IMAGENET)
    full = load_dataset(TINY_IMAGENET, progress=False)
    others = [c for c in full.classes if c not in (GORILLA, GROOM)][:2]
    return shrunk(full.subset([GORILLA, GROOM, *others]), 250, 50)


def test_repair_scenario_has_every_option(tiny_imagenet: Dataset) -> None:
    result = repair_scenario(tiny_imagenet, (GORILLA, GROOM), "resnet_tiny", 2, InputSpec.default((32, 32), 3),
                             CONFIG, noise=0.5, progress=False)
    confused = f"{GROOM}_as_{GORILLA}"
    assert result.columns[:5] == ("option", "top1", "top5", "pair_accuracy", confused)
    assert [r["option"] for r in result.rows[:2]] == ["faulty parent (model)", "faulty (composed)"]
    assert [r["option"][:1] for r in result.rows[2:]] == ["1", "2", "3", "4"]
    accuracies_ok(result, "top1", "top5", "pair_accuracy", confused)
    for row in result.rows:
        energy_ok(row, "repair")
        assert row["top5"] >= row["top1"]
    removed = result.rows[4]
    assert removed["option"] == "3 remove faulty module"
    # without the gorilla module no gorilla image is named right, and no groom is called a gorilla
    pair_test = tiny_imagenet.test.subset([GORILLA, GROOM])
    share_of_grooms = float(np.mean(pair_test.labels == 1))
    assert removed["pair_accuracy"] <= share_of_grooms + 1e-9
    assert removed[confused] == 0.0
    assert result.rows[1]["repair_kwh"] > result.rows[4]["repair_kwh"]  # decomposing costs more than removing
    assert "trained 2 epochs with 50%" in result.notes[0] and METHOD.search(result.notes[0])
