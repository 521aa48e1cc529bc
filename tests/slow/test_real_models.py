"""Real models on real data: decomposing them loses (next to) no accuracy.

These need the shared folder beside the checkout (../shared: CIFAR-10 as JPEG, pretrained ResNets) and the
Fashion-MNIST Debian package; each test is skipped when its files are absent. Decoded datasets are cached
($CNNMOD_CACHE or ~/.cache/cnnmod), so only the first run pays for decoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from cnnmod.data import Dataset, load_dataset
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.workflows.evaluate import Evaluation, evaluate
from cnnmod.zoo import create_model, load_model_file, load_weights

SHARED = Path(__file__).resolve().parents[3] / "shared"
CIFAR10 = SHARED / "data" / "cifar10-jpg.tar.gz"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "resnet56-4bfd9763.th"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.slow


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"not available here: {', '.join(missing)}")


def decompose_and_evaluate(parent: Parent, data: Dataset, test_rows: np.ndarray) -> Evaluation:
    """Decompose with 100 samples per class from the training split; evaluate on the chosen test rows."""
    modules, activity = decompose(parent, data.train.images, data.train.labels,
                                  DecomposeConfig(samples_per_class=100), progress=False)
    assert len(modules) == parent.num_classes
    assert activity.num_samples == 100 * parent.num_classes
    return evaluate(modules, data.test.images[test_rows], data.test.labels[test_rows], progress=False)


def test_resnet20_on_cifar10_keeps_its_accuracy() -> None:
    need(CIFAR10, RESNET20)
    data = load_dataset(CIFAR10, progress=False)
    assert data.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck")
    model = load_weights(create_model("resnet20", num_classes=10), RESNET20).eval()
    parent = Parent.from_model(model, InputSpec.default((32, 32), 3), data.classes, "resnet20")
    # The test images are stored class by class: the first 1000 are all airplanes. Every 10th image gives
    # 1000 images, 100 of each class.
    rows = np.arange(0, len(data.test.labels), 10)
    assert np.bincount(data.test.labels[rows], minlength=10).tolist() == [100] * 10
    result = decompose_and_evaluate(parent, data, rows)
    assert result.samples == 1000
    # ResNet-20 gets 81.0% on all 10,000 of these lossy JPEG test images (shared/README.md)
    assert result.parent.top1 > 0.75
    assert abs(result.composed["softmax"].top1 - result.parent.top1) <= 0.01
    assert result.jaccard_mean < 1.0
    assert all(m.kept_parameters < result.parent_parameters for m in result.modules)


def test_embedded_smallcnn_on_fashion_mnist_keeps_its_accuracy() -> None:
    need(FASHION_MNIST)
    data = load_dataset(FASHION_MNIST, progress=False)
    with resources.as_file(resources.files("cnnmod") / "assets" / "smallcnn-fmnist.safetensors") as path:
        model, info = load_model_file(path)
    assert info.classes == data.classes
    parent = Parent.from_model(model, info.input_spec, info.classes, info.arch)
    result = decompose_and_evaluate(parent, data, np.arange(1000))
    assert result.samples == 1000
    assert result.parent.top1 > 0.85
    assert abs(result.composed["softmax"].top1 - result.parent.top1) <= 0.01
    assert result.jaccard_mean < 1.0


def test_default_decomposition_of_a_trained_cnn_gives_small_modules_as_accurate_as_it(
        cnnmod_cli: Callable[..., Result], tmp_path: Path) -> None:
    """`cnnmod decompose` with its defaults (compact, for 10 classes) on the embedded SmallCNN trained on
    Fashion-MNIST, evaluated on the whole test split: the issue's targets (each module at most 30% of the parent's
    parameters and file; composed top-1 at least the parent's minus 1 point, top-5 minus 0.5). Measured: 26.8% of
    the parameters, 12% of the file, top-1 0.9073 against 0.9080, top-5 0.9992 against 0.9989, 1.7% of the energy
    of 200 training epochs; about a minute on 2 CPU cores."""
    need(FASHION_MNIST)
    from fixtures.cli import ok_json

    store = tmp_path / "store"
    with resources.as_file(resources.files("cnnmod") / "assets" / "smallcnn-fmnist.safetensors") as path:
        made = ok_json(cnnmod_cli("decompose", path, "--data", FASHION_MNIST, "--out", store, "--json"))
    assert made["method"] == "compact" and made["chosen_by"].startswith("compact, for 10 classes")
    assert made["kept_parameters_mean"] <= 0.30
    assert 0 < made["cost"]["fraction_of_parent_training_energy"] < 0.05  # the meter's estimate: 0.017 measured
    assert made["held_out"]["images"] == 2000 and not made["held_out"]["below_parent"]
    result = ok_json(cnnmod_cli("evaluate", store, "--data", FASHION_MNIST, "--json"))
    assert result["samples"] == 10_000 and result["parent"]["top1"] > 0.9
    assert result["composed"]["top1"] >= result["parent"]["top1"] - 0.010
    assert result["composed"]["top5"] >= result["parent"]["top5"] - 0.005
    shown = ok_json(cnnmod_cli("inspect", store, "--json"))
    assert all(m["standalone"] and m["file_bytes_fraction"] <= 0.30 for m in shown["modules"])


def test_published_resnet_checkpoints_through_the_cli(cnnmod_cli: Callable[..., Result]) -> None:
    """`inspect --arch` reads the pytorch_resnet_cifar10 files as they are, and refuses the wrong depth."""
    need(RESNET20, RESNET56)
    result = cnnmod_cli("inspect", RESNET20, "--arch", "resnet20", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["arch"] == "resnet20"
    assert payload["head"]["features"] == 64
    assert len(payload["sites"]["relu"]) == 19  # the stem and two per block, 9 blocks
    wrong = cnnmod_cli("inspect", RESNET56, "--arch", "resnet20")
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("error: ") and "does not fit architecture resnet20" in wrong.stderr
    assert "Traceback" not in wrong.output
