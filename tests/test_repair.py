"""Repairing a faulty class pair: the faulty-label injection of the repair scenario, replacing modules from a
better parent, and converting images between dataset formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnmod.data import ImageSet
from cnnmod.engine.compose import compose
from cnnmod.engine.inputs import InputSpec, as_format
from cnnmod.engine.modules import ModuleSet
from cnnmod.errors import CnnmodError
from cnnmod.paper.experiments import faulty_labels
from cnnmod.workflows.repair import replace_from
from fixtures.nets import DenseNet, parent_of


def labelled(counts: list[int], seed: int = 0) -> ImageSet:
    """An ImageSet of classes a, b, c with `counts` images each, shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(3), counts))
    images = rng.integers(0, 256, size=(len(labels), 4, 4, 3), dtype=np.uint8)
    return ImageSet(images, labels, ("a", "b", "c"))


@pytest.mark.parametrize(("fraction", "flipped"), [(0.0, 0), (0.3, 6), (0.5, 10), (0.52, 10), (1.0, 20)])
def test_faulty_labels_turns_exactly_a_fraction_of_the_source_class_into_the_target(fraction: float,
                                                                                    flipped: int) -> None:
    data = labelled([7, 20, 9])
    faulty = faulty_labels(data, "b", "a", fraction, seed=3)
    changed = faulty.labels != data.labels
    assert int(changed.sum()) == flipped == int(round(fraction * 20))
    assert set(data.labels[changed].tolist()) <= {1} and set(faulty.labels[changed].tolist()) <= {0}
    assert np.bincount(faulty.labels, minlength=3).tolist() == [7 + flipped, 20 - flipped, 9]
    assert faulty.images is data.images or np.array_equal(faulty.images, data.images)
    assert faulty.classes == data.classes
    assert np.bincount(data.labels, minlength=3).tolist() == [7, 20, 9]  # the input is not changed


def test_faulty_labels_are_the_same_for_a_seed_and_differ_between_seeds() -> None:
    data = labelled([5, 40, 5])
    first = faulty_labels(data, "b", "c", 0.5, seed=1).labels
    assert np.array_equal(first, faulty_labels(data, "b", "c", 0.5, seed=1).labels)
    assert not np.array_equal(first, faulty_labels(data, "b", "c", 0.5, seed=2).labels)


def head_modules(heads: list[list[float]], classes: tuple[int, ...], names: tuple[str, ...] = ("a", "b", "c")
                 ) -> ModuleSet:
    """Modules of a 3-feature DenseNet parent (classes `names`): module i scores sigmoid(heads[i] . x)."""
    parent = parent_of(DenseNet(3, 3), (1, 3), 1, names)
    site = parent.model.sites["relu"][0]
    w = torch.zeros(len(classes), 2, 3)
    w[:, 0] = torch.tensor(heads)
    return ModuleSet(parent, classes, (site,), {site.name: torch.ones(len(classes), 3, dtype=torch.bool)}, w,
                     torch.zeros(len(classes), 2))


def test_replace_from_swaps_both_modules_of_the_pair() -> None:
    # the faulty a-module fires for b's images too
    base = compose([head_modules([[1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]], (0, 1, 2))])
    better = head_modules([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], (0, 1))
    x = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]], dtype=np.float32).reshape(3, 1, 1, 3)
    assert np.array(base.labels)[base.predict(x).numpy()].tolist() == ["a", "a", "c"]
    repaired = replace_from(base, ["a", "b"], better)
    assert repaired.labels == ("c", "a", "b")
    assert [g.class_names for g in repaired.groups] == [("c",), ("a",), ("b",)]
    assert np.array(repaired.labels)[repaired.predict(x).numpy()].tolist() == ["a", "b", "c"]
    assert torch.allclose(repaired.scores(x)[:, 1:], better.scores(x))
    assert base.labels == ("a", "b", "c")


def test_replace_from_needs_a_module_for_every_label() -> None:
    base = compose([head_modules([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], (0, 1, 2))])
    with pytest.raises(CnnmodError, match="the better modules have no class 'c'"):
        replace_from(base, ["a", "c"], head_modules([[1.0, 0, 0], [0, 1.0, 0]], (0, 1)))
    with pytest.raises(CnnmodError, match="no module votes for 'zebra'"):
        replace_from(base, ["zebra"], head_modules([[1.0, 0, 0]], (0,), ("zebra", "b", "c")))


def test_as_format_turns_grey_28_into_rgb_32() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    images[0] = 200  # a flat image stays flat
    out = as_format(images, InputSpec.default((32, 32), 3))
    assert out.dtype == np.uint8 and out.shape == (4, 32, 32, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert (out[0] == 200).all()
    # resizing keeps the picture: mean brightness within a grey level or two
    assert np.allclose(out[..., 0].mean((1, 2)), images[..., 0].mean((1, 2)), atol=2.0)


def test_as_format_turns_rgb_into_grey_of_another_size() -> None:
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, ..., 0] = 255  # pure red: grey level 0.299 * 255
    images[1] = 255
    out = as_format(images, InputSpec.default((28, 28), 1))
    assert out.shape == (2, 28, 28, 1) and out.dtype == np.uint8
    assert (out[0] == round(0.299 * 255)).all() and (out[1] == 255).all()
    same = as_format(images, InputSpec.default((32, 32), 3))
    assert np.array_equal(same, images)
