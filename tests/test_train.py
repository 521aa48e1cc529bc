"""Training: reaches high accuracy on a separable toy set, is deterministic, returns the best epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cnnmod.engine.inputs import InputSpec
from cnnmod.errors import DataError, ModelError
from cnnmod.workflows.train import augment_batch, crop_padding, stratified_split, train_model
from cnnmod.zoo import create_model
from fixtures.images import COLOUR_NAMES
from fixtures.images import coloured_squares as square_images


@dataclass(frozen=True)
class Images:
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def coloured_squares(n_per_class: int = 100, size: int = 16, seed: int = 0) -> Images:
    """A red, a green or a blue square of random side and place on a noisy grey background."""
    images, labels = square_images(n_per_class, size, (size // 4, size // 2 + 1), np.random.default_rng(seed))
    return Images(images, labels, COLOUR_NAMES)


SPEC = InputSpec.default((16, 16), 3)


def _train(data: Images, **kw: object) -> object:
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=3)
    options: dict = {"epochs": 4, "batch_size": 32, "lr": 0.05, "progress": False, "seed": 1, **kw}
    return model, train_model(model, data, SPEC, **options)


def test_stratified_split_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 3])
    train, val = stratified_split(labels, 0.1, seed=3)
    assert np.bincount(labels[val]).tolist() == [1, 2, 3, 1]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    again, val_again = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(val, val_again) and np.array_equal(train, again)
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])


def test_augment_batch_crops_and_flips_without_changing_content() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment_batch(x, 0, torch.Generator().manual_seed(0))  # no padding: identity or mirror image
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    padded = augment_batch(x, 2, torch.Generator().manual_seed(1))
    assert padded.shape == x.shape
    assert torch.equal(padded, augment_batch(x, 2, torch.Generator().manual_seed(1)))
    assert crop_padding(32, 32, 3) == 4 and crop_padding(28, 28, 1) == 2 and crop_padding(64, 64, 3) == 8


def test_learns_separable_toy_data_and_returns_best_epoch() -> None:
    data = coloured_squares()
    seen: list[dict] = []
    model, result = _train(data, on_epoch=seen.append)
    assert result.best_val_accuracy >= 0.9
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and seen == result.history
    assert set(result.history[0]) == {"epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds"}
    val_accs = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == max(i + 1 for i, a in enumerate(val_accs) if a == max(val_accs))
    assert result.best_val_accuracy == max(val_accs)
    # the returned weights are the best epoch's: they reproduce its accuracy on the held-out split
    _, val = stratified_split(data.labels, 0.1, seed=1)
    with torch.no_grad():
        pred = result.model(SPEC.prepare(data.images[val])).argmax(1).numpy()
    assert np.mean(pred == data.labels[val]) == result.best_val_accuracy
    assert not result.model.training
    # the caller's model is left as it was
    assert torch.count_nonzero(model.layer1[0].bn1.running_mean) == 0


def test_deterministic_for_a_seed() -> None:
    data = coloured_squares(40)
    _, a = _train(data, epochs=2)
    _, b = _train(data, epochs=2)
    drop = "seconds"
    assert [{k: v for k, v in h.items() if k != drop} for h in a.history] == \
           [{k: v for k, v in h.items() if k != drop} for h in b.history]
    b_state = b.model.state_dict()
    assert all(torch.equal(v, b_state[k]) for k, v in a.model.state_dict().items())
    _, c = _train(data, epochs=2, seed=2)
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]


def test_without_validation_returns_last_epoch() -> None:
    _, result = _train(coloured_squares(20), epochs=2, val_fraction=0.0, augment=False)
    assert result.best_epoch == 2 and np.isnan(result.best_val_accuracy)


def test_rejects_mismatched_data() -> None:
    data = coloured_squares(10)
    with pytest.raises(ModelError, match="num_classes=3"):
        train_model(create_model("resnet_tiny", num_classes=5), data, SPEC, epochs=1, progress=False)
    bad = Images(data.images, data.labels + 1, data.classes)
    with pytest.raises(DataError, match="labels"):
        train_model(create_model("resnet_tiny", num_classes=3), bad, SPEC, epochs=1, progress=False)
    floats = Images(data.images.astype(np.float32), data.labels, data.classes)
    with pytest.raises(DataError, match="uint8"):
        train_model(create_model("resnet_tiny", num_classes=3), floats, SPEC, epochs=1, progress=False)


@pytest.mark.slow
def test_resnet20_without_batchnorm_trains_at_lr_0_1() -> None:
    data = coloured_squares(100, size=32)
    model = create_model("resnet20_nobn", num_classes=3)
    result = train_model(model, data, InputSpec.default((32, 32), 3), epochs=3, batch_size=64, lr=0.1,
                         progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert result.best_val_accuracy >= 0.8
