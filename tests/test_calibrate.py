"""Score calibration across modules: the fitted scale and offset are folded into the heads exactly, only the
chosen modules change, an over-confident module stops taking the others' images, and bad input is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cnnmod.data import ImageSet
from cnnmod.engine.compose import ComposedClassifier, compose, reverified
from cnnmod.errors import CnnmodError
from cnnmod.workflows.calibrate import calibrate, labelled_sample
from fixtures.nets import RandomConvNet, grey_parent, parent_of, random_modules


def images_and_truth(composed: ComposedClassifier, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Random images labelled by the classifier's own vote: a perfectly calibrated classifier gets them all."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, 6, 6, 1), dtype=np.uint8)
    return images, composed.predict(images).numpy()


def overconfident(composed: ComposedClassifier, label: str, factor: float = 8.0, shift: float = 6.0
                  ) -> ComposedClassifier:
    """`composed` with `label`'s margin scaled by `factor` and raised by `shift`: it wins images of the others."""
    group = composed.groups[0]
    i = group.class_names.index(label)
    w, b = group.head_weight.clone(), group.head_bias.clone()
    w[i] *= factor
    b[i] = b[i] * factor + torch.tensor([shift / 2, -shift / 2])
    return dataclasses.replace(composed, groups=(dataclasses.replace(group, head_weight=w, head_bias=b),))


@pytest.mark.parametrize("scoring", ["softmax", "logit"])
def test_calibration_undoes_an_overconfident_module_and_changes_only_it(scoring: str) -> None:
    truth_classifier = compose([random_modules(grey_parent(), keep=0.9)], scoring=scoring)
    images, truth = images_and_truth(truth_classifier)
    spoiled = overconfident(truth_classifier, "shoe")
    spoiled_accuracy = float((spoiled.predict(images).numpy() == truth).mean())
    assert spoiled_accuracy < 0.6  # shoe takes most images

    result = calibrate(spoiled, images, truth, ["shoe"])
    assert result.fitted == ("shoe",) and result.samples == len(images)
    assert result.accuracy_before == pytest.approx(spoiled_accuracy)
    assert result.loss_after < result.loss_before
    assert result.accuracy_after > 0.75  # the vote is argmax of margins; the fit minimises their cross-entropy
    after = result.composed.predict(images).numpy()
    assert float((after == truth).mean()) == pytest.approx(result.accuracy_after)

    old, new = spoiled.groups[0], result.composed.groups[0]
    i = old.class_names.index("shoe")
    others = [j for j in range(len(old)) if j != i]
    assert torch.equal(new.head_weight[others], old.head_weight[others])
    assert torch.equal(new.head_bias[others], old.head_bias[others])
    assert all(torch.equal(new.masks[k], old.masks[k]) for k in old.masks)
    assert new.config["calibrated"] is True and result.composed.labels == spoiled.labels


def test_the_folded_head_scores_the_calibrated_margin_exactly() -> None:
    composed = compose([random_modules(grey_parent(), keep=0.9)])
    images, truth = images_and_truth(composed, 100)
    truth[:30] = 1  # something to fit
    result = calibrate(composed, images, truth, ["shoe", "bag"])
    before, after = composed.groups[0].logits(images), result.composed.groups[0].logits(images)
    d_before, d_after = before[..., 0] - before[..., 1], after[..., 0] - after[..., 1]
    for j in range(4):
        # d_after = a * d_before + b for one (a > 0, b) per module: fit it from two images and check all
        a = (d_after[1, j] - d_after[0, j]) / (d_before[1, j] - d_before[0, j])
        b = d_after[0, j] - a * d_before[0, j]
        assert a > 0
        assert torch.allclose(d_after[:, j], a * d_before[:, j] + b, atol=1e-4)
        if j in (0, 3):
            assert a == pytest.approx(1.0) and b == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(result.composed.scores(images), torch.sigmoid(after[..., 0] - after[..., 1]), atol=1e-6)


def test_calibration_spans_parents_of_different_input_sizes_and_keeps_reverifiers() -> None:
    small = random_modules(grey_parent(), keep=0.9).select(["cat", "shoe"])
    big = random_modules(parent_of(RandomConvNet(seed=5).eval(), (6, 6), 1, ["a", "b", "bag", "d"]), keep=0.9)
    composed = reverified(compose([small, big.select(["bag"])]), ["cat", "shoe"], small)
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, size=(20, 6, 6, 1), dtype=np.uint8),
             rng.integers(0, 256, size=(10, 12, 12, 1), dtype=np.uint8)]
    targets = np.concatenate([np.zeros(10, np.int64), np.ones(10, np.int64), np.full(10, 2)])
    result = calibrate(composed, parts, targets)
    assert result.samples == 30 and result.fitted == ("cat", "shoe", "bag")
    assert result.composed.reverifiers == composed.reverifiers
    assert result.loss_after <= result.loss_before


def test_bad_calibration_input_is_refused() -> None:
    composed = compose([random_modules(grey_parent(), keep=0.9)])
    images = np.zeros((4, 6, 6, 1), np.uint8)
    with pytest.raises(CnnmodError, match="no module votes for 'dog'"):
        calibrate(composed, images, np.zeros(4, np.int64), ["dog"])
    with pytest.raises(CnnmodError, match="as many targets"):
        calibrate(composed, images, np.zeros(3, np.int64))
    with pytest.raises(CnnmodError, match="index the 4 labels"):
        calibrate(composed, images, np.array([0, 1, 2, 4]))


def test_labelled_sample_draws_each_label_from_the_dataset_that_has_it() -> None:
    a = ImageSet(np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2, 1), np.array([0, 1, 0, 1, 0, 1]), ("x", "y"))
    b = ImageSet(np.full((3, 3, 3, 3), 7, np.uint8), np.array([0, 0, 0]), ("z",))
    images, targets = labelled_sample(["z", "x"], [a, b], per_label=2, seed=0)
    assert [x.shape for x in images] == [(2, 3, 3, 3), (2, 2, 2, 1)]
    assert targets.tolist() == [0, 0, 1, 1]
    assert set(images[1][:, 0, 0, 0].tolist()) <= {0, 8, 16}  # images of class x
    again, _ = labelled_sample(["z", "x"], [a, b], per_label=2, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(images, again, strict=True))
    with pytest.raises(CnnmodError, match="none of the datasets given holds class 'w'"):
        labelled_sample(["w"], [a, b], per_label=2)
