"""Reuse across parents and datasets: composing modules of parents with different input specs, continuous
learning (`forget`, `activity_on`, `recalibrate`), replacement, removal, re-verification, and compositions on
disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnmod.engine.compose import ComposedClassifier, compose, removed, replace, reverified
from cnnmod.engine.decompose import channel_heads, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import ModuleSet, Parent
from cnnmod.errors import CnnmodError
from cnnmod.storage.store import load_composition, save_composition, save_store
from cnnmod.workflows.reuse import activity_on, forget, own_activity, recalibrate
from fixtures.nets import DenseNet, RandomConvNet, grey_parent, parent_of, random_modules, set_weights


class RgbNet(nn.Module):
    """Input (3, 8, 8) -> conv 3x3 pad 1 (3->4) -> ReLU -> GAP -> head (4->3); seeded random weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        for layer in (self.conv, self.head):
            set_weights(layer, torch.randn(layer.weight.shape, generator=g) * 0.5,
                        torch.randn(layer.weight.shape[0], generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))



def rgb_parent() -> Parent:
    """8x8 RGB parent with ImageNet normalisation; classes cat, dog, car."""
    return Parent.from_model(RgbNet().eval(), InputSpec.default((8, 8), 3), ["cat", "dog", "car"], "rgbnet")


def uint8_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def normalised(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# Composition across parents with different input specs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels"), [(8, 3), (6, 1), (10, 3), (6, 3), (8, 1)])
def test_composed_modules_of_two_input_specs_score_raw_images_of_either(size: int, channels: int) -> None:
    rgb, grey = rgb_parent(), grey_parent()
    a = random_modules(rgb, keep=0.8).select(["dog", "car"])
    b = random_modules(grey, keep=0.8, seed=1).select(["shoe", "bag", "shirt"])
    composed = compose([a, b])
    assert composed.labels == ("dog", "car", "shoe", "bag", "shirt")
    images = uint8_images(7, size, channels)
    scores = composed.scores(images, batch_size=3)
    assert scores.shape == (7, 5)

    # each parent sees the images adapted by hand: channels converted, resized, normalised
    x = as_float(images)
    x_rgb = x if channels == 3 else x.expand(-1, 3, -1, -1)
    x_rgb = normalised(resized(x_rgb, (8, 8)), rgb.input_spec)
    x_grey = resized(to_grey(x) if channels == 3 else x, (6, 6))  # identity normalisation
    # ModuleSet.scores takes float NCHW as the parent's input already converted (only normalised again);
    # an identity spec makes that a no-op, so give the RGB modules their already normalised input through a
    # copy of the parent with an identity spec
    plain_rgb = Parent(rgb.model, rgb.classes, InputSpec((8, 8), 3, (0.0,) * 3, (1.0,) * 3), rgb.arch)
    a_plain = ModuleSet(plain_rgb, a.class_indices, a.sites, a.masks, a.head_weight, a.head_bias)
    expected = torch.cat([a_plain.scores(x_rgb.numpy()), b.scores(x_grey.numpy())], 1)
    assert torch.allclose(scores, expected, atol=1e-5)
    # and the composed prediction is the argmax over both parents' modules
    assert torch.equal(composed.predict(images), expected.argmax(1))


def test_images_of_the_parents_own_format_reach_it_unchanged() -> None:
    grey = grey_parent()
    modules = random_modules(grey, keep=0.8)
    images = uint8_images(5, 6, 1)
    assert torch.allclose(compose([modules]).scores(images), modules.scores(as_float(images).numpy()), atol=1e-6)


def test_same_class_name_from_two_parents_is_a_clash_until_labels_are_given() -> None:
    a = random_modules(rgb_parent(), keep=0.8).select(["cat", "dog"])
    b = random_modules(grey_parent(), keep=0.8).select(["cat"])
    with pytest.raises(CnnmodError, match="'cat'.*map labels explicitly"):
        compose([a, b])
    composed = compose([a, b], ["cat", "dog", "sketched cat"])
    assert composed.labels == ("cat", "dog", "sketched cat")
    assert composed.scores(uint8_images(2, 8, 3)).shape == (2, 3)
    with pytest.raises(CnnmodError, match="2 labels given for 3 modules"):
        compose([a, b], ["cat", "dog"])


# ---------------------------------------------------------------------------------------------------------
# Continuous learning: forget, activity_on, own_activity
# ---------------------------------------------------------------------------------------------------------


def dense_modules(features: int = 5, classes: int = 4, rows: tuple[int, ...] = (0, 1)) -> ModuleSet:
    """Modules of a DenseNet parent (one site of `features` units), all nodes kept."""
    parent = parent_of(DenseNet(features, classes), (1, features))
    site = parent.model.sites["relu"][0]
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, rows)
    return ModuleSet(parent, rows, (site,), {site.name: torch.ones(len(rows), features, dtype=torch.bool)}, w, b)


def test_forget_removes_the_nodes_only_the_competing_class_activates() -> None:
    modules = dense_modules()
    site = modules.sites[0].name
    # module 0's own class activated units 0 and 3; module 1's own class activated units 1 and 3
    own = {site: torch.tensor([[3.0, 0.0, 0.0, 2.0, 0.0], [0.0, 5.0, 0.0, 1.0, 0.0]])}
    # 4 competing samples activated units 0, 1, 3 and 4 (rates 0.25, 1, 0.25, 0.5); unit 2 never
    competing = {site: torch.tensor([1.0, 4.0, 0.0, 1.0, 2.0])}
    learned = forget(modules, own, competing, competing_samples=4)
    assert learned.masks[site].tolist() == [
        [True, False, True, True, False],  # 1 and 4: competing only; 0 and 3: both; 2: neither
        [False, True, True, True, False],  # 0 and 4: competing only
    ]
    assert learned.config["continuous_learning"] is True
    assert torch.equal(learned.head_weight, modules.head_weight)
    assert torch.equal(learned.head_bias, modules.head_bias)
    assert learned.parent is modules.parent and learned.class_indices == modules.class_indices
    # the input is not changed
    assert bool(modules.masks[site].all()) and "continuous_learning" not in modules.config


def test_forget_with_rho_removes_only_nodes_the_competing_class_activates_often() -> None:
    modules = dense_modules()
    site = modules.sites[0].name
    own = {site: torch.tensor([[3.0, 0.0, 0.0, 2.0, 0.0], [0.0, 5.0, 0.0, 1.0, 0.0]])}
    competing = {site: torch.tensor([1.0, 4.0, 0.0, 1.0, 2.0])}
    learned = forget(modules, own, competing, competing_samples=4, rho=0.4)  # rates > 0.4: units 1 and 4
    assert learned.masks[site].tolist() == [[True, False, True, True, False], [True, True, True, True, False]]
    learned = forget(modules, own, competing, competing_samples=4, rho=0.75)  # rate > 0.75: unit 1 only
    assert learned.masks[site].tolist() == [[True, False, True, True, True], [True] * 5]


def test_forget_never_brings_back_a_removed_node() -> None:
    modules = dense_modules()
    site = modules.sites[0].name
    masks = modules.masks[site].clone()
    masks[:, 2] = False
    modules = ModuleSet(modules.parent, modules.class_indices, modules.sites, {site: masks}, modules.head_weight,
                        modules.head_bias)
    learned = forget(modules, {site: torch.ones(2, 5)}, {site: torch.zeros(5)}, competing_samples=3)
    assert torch.equal(learned.masks[site], masks)


def manual_activity(net: RandomConvNet, x: torch.Tensor) -> list[torch.Tensor]:
    """How many of the images make each ReLU output of RandomConvNet positive, site by site."""
    with torch.no_grad():
        a = F.relu(net.conv1(x))
        b = F.relu(net.conv2(net.pool(a)))
        c = F.relu(net.fc(b.flatten(1)))
    return [(t > 0).sum(0).float() for t in (a, b, c)]


def test_activity_on_counts_active_nodes_of_the_unmasked_parent() -> None:
    net = RandomConvNet(seed=3).eval()
    parent = parent_of(net, (6, 6))
    modules = random_modules(parent, keep=0.0)  # nothing kept: the counts are the parent's, not the modules'
    images = uint8_images(11, 6, 1, seed=4)
    counts = activity_on(modules, images, batch_size=4)
    sites = parent.model.sites["relu"]
    assert list(counts) == [s.name for s in sites]
    expected = manual_activity(net, as_float(images))
    for site, want in zip(sites, expected, strict=True):
        assert counts[site.name].shape == site.shape
        assert torch.equal(counts[site.name], want)
    assert 0 < sum(float(c.sum()) for c in counts.values()) < 11 * sum(s.numel for s in sites)


def test_own_activity_is_the_class_rows_of_the_recorded_activity() -> None:
    parent = parent_of(RandomConvNet(seed=1).eval(), (6, 6))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 6, 6, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)
    modules, activity = decompose(parent, images, labels, classes=["c2", "c0"], progress=False)
    own = own_activity(modules, activity)
    for site in modules.sites:
        assert own[site.name].shape == (2, *site.shape)
        # each class's samples: all 10, and the counts are those of activity_on over exactly those images
        for row, c in enumerate((2, 0)):
            assert torch.equal(own[site.name][row], activity_on(modules, images[labels == c])[site.name])
    other, _ = decompose(parent, images, labels, classes=["c1"], progress=False)
    with pytest.raises(CnnmodError, match="'c1'"):
        own_activity(other, activity)


def test_forget_after_activity_on_leaves_nodes_the_own_class_uses() -> None:
    """End to end on a real net: no node the own class ever activated is removed."""
    parent = parent_of(RandomConvNet(seed=1).eval(), (6, 6))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(40, 6, 6, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)
    modules, activity = decompose(parent, images, labels, classes=["c0"], progress=False)
    competing = rng.integers(0, 256, size=(15, 6, 6, 1), dtype=np.uint8)
    own = own_activity(modules, activity)
    learned = forget(modules, own, activity_on(modules, competing), len(competing))
    for site in modules.sites:
        lost = modules.masks[site.name] & ~learned.masks[site.name]
        assert not bool((lost & (own[site.name] > 0)).any())
    assert float(learned.jaccard()[0]) <= float(modules.jaccard()[0])


# ---------------------------------------------------------------------------------------------------------
# recalibrate
# ---------------------------------------------------------------------------------------------------------


def feature_images(n: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 1, 4, 1) rows of 4 features: feature `high` in [150, 250], the others in [0, 30]."""
    x = rng.integers(0, 31, size=(n, 1, 4, 1), dtype=np.uint8)
    x[:, 0, high, 0] = rng.integers(150, 251, size=n, dtype=np.uint8)
    return x


def test_recalibrate_fits_the_heads_and_keeps_masks_and_removed_inputs() -> None:
    parent = parent_of(DenseNet(4, 3), (1, 4))
    site = parent.model.sites["relu"][0]
    masks = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # deliberately wrong heads: each module scores the wrong feature as its own class
    weight = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]],   # inputs 1 and 3 unused
                           [[0.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 0.0]]])  # input 0 unused
    bias = torch.zeros(2, 2)
    modules = ModuleSet(parent, (0, 1), (site,), {site.name: masks}, weight, bias)
    rng = np.random.default_rng(0)
    own = [feature_images(60, 0, rng), feature_images(60, 1, rng)]
    other = np.concatenate([feature_images(30, 2, rng), feature_images(30, 3, rng)])
    before = modules.scores(np.concatenate([own[0], other]))

    result = recalibrate(modules, own, other)
    after = result.modules
    assert result.samples == 2 * (60 + 60)
    assert result.loss_after < result.loss_before
    assert result.loss_after < 0.3
    assert torch.equal(after.masks[site.name], masks)
    assert after.class_indices == modules.class_indices and after.config["recalibrated"] is True
    assert torch.equal(after.head_weight[0][:, [1, 3]], torch.zeros(2, 2))
    assert torch.equal(after.head_weight[1][:, 0], torch.zeros(2))
    # the modules now tell their own class from the others
    for m in range(2):
        assert (after.scores(own[m])[:, m] > 0.5).float().mean() > 0.9
        assert (after.scores(other)[:, m] < 0.5).float().mean() > 0.9
    assert (before[:60, 0] > 0.5).float().mean() < 0.5  # and they could not before
    assert torch.equal(modules.head_weight, weight)  # the input is not changed


def test_recalibrate_needs_one_image_set_per_module() -> None:
    modules = dense_modules(4, 3)
    with pytest.raises(CnnmodError, match="1 image sets given for 2 modules"):
        recalibrate(modules, [np.zeros((2, 1, 4, 1), np.uint8)], np.zeros((2, 1, 4, 1), np.uint8))


# ---------------------------------------------------------------------------------------------------------
# replace, removed, reverified
# ---------------------------------------------------------------------------------------------------------


def known_modules(heads: list[list[float]], classes: tuple[int, ...] = (0, 1, 2)) -> ModuleSet:
    """Modules of a 3-feature, 3-class DenseNet (features = the inputs' positive parts) whose module i has
    z_c = heads[i] . x and z_uc = 0, so its softmax score is sigmoid(heads[i] . x)."""
    parent = parent_of(DenseNet(3, 3), (1, 3), 1, ["a", "b", "c"])
    site = parent.model.sites["relu"][0]
    k = len(classes)
    w = torch.zeros(k, 2, 3)
    w[:, 0] = torch.tensor(heads)
    return ModuleSet(parent, classes, (site,), {site.name: torch.ones(k, 3, dtype=torch.bool)}, w, torch.zeros(k, 2))


def rows(*xs: list[float]) -> np.ndarray:
    """Float NCHW inputs (N, 1, 1, 3) for the DenseNet parents."""
    return np.array(xs, dtype=np.float32).reshape(len(xs), 1, 1, 3)


A_IMG, B_IMG, C_IMG = [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]


def faulty() -> ComposedClassifier:
    """a's module also fires for b's images (the paper's person -> gorilla): b images are predicted a."""
    return compose([known_modules([[1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])])


def correct_pair() -> ModuleSet:
    return known_modules([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], (0, 1))


def test_the_faulty_fixture_predicts_b_as_a() -> None:
    assert faulty().predict(rows(A_IMG, B_IMG, C_IMG)).tolist() == [0, 0, 2]


def test_replace_swaps_one_module_and_appends_its_label() -> None:
    base = faulty()
    better = known_modules([[0.0, 2.0, 0.0]], (1,))  # outscores the faulty a-module on b's images
    new = replace(base, "b", better)
    assert new.labels == ("a", "c", "b")
    assert [g.class_names for g in new.groups] == [("a", "c"), ("b",)]
    assert new.predict(rows(A_IMG, B_IMG, C_IMG)).tolist() == [0, 2, 1]
    assert torch.allclose(new.scores(rows(B_IMG))[:, 2], better.scores(rows(B_IMG))[:, 0])
    assert base.labels == ("a", "b", "c") and len(base.groups) == 1  # the input is not changed
    # from another class (or dataset): the new module votes for a new label
    renamed = replace(base, "b", better, new_label="bee")
    assert renamed.labels == ("a", "c", "bee")
    assert renamed.scoring == base.scoring


def test_replace_and_remove_errors() -> None:
    base = faulty()
    with pytest.raises(CnnmodError, match="no module votes for 'zebra'; labels are a, b, c"):
        replace(base, "zebra", correct_pair().select(["a"]))
    with pytest.raises(CnnmodError, match="exactly one module, got 2"):
        replace(base, "a", correct_pair())
    with pytest.raises(CnnmodError, match="no module votes for 'zebra'"):
        removed(base, "zebra")
    single = removed(removed(base, "a"), "b")
    assert single.labels == ("c",)
    with pytest.raises(CnnmodError, match="removing 'c' would leave no modules"):
        removed(single, "c")
    with pytest.raises(CnnmodError, match="2 modules given to re-verify 3 labels"):
        reverified(base, ["a", "b", "c"], correct_pair())
    with pytest.raises(CnnmodError, match="no module votes for 'zebra'"):
        reverified(base, ["a", "zebra"], correct_pair())


def test_removed_drops_a_label_from_its_group() -> None:
    base = compose([known_modules([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                    known_modules([[0.0, 0.0, 1.0]], (2,))], ["a", "b", "c", "c2"])
    new = removed(base, "b")
    assert new.labels == ("a", "c", "c2")
    assert [g.class_names for g in new.groups] == [("a", "c"), ("c",)]
    assert new.predict(rows(A_IMG, B_IMG)).tolist()[0] == 0
    new = removed(base, "c2")
    assert [g.class_names for g in new.groups] == [("a", "b", "c")]
    assert new.labels == ("a", "b", "c")


def test_reverifier_redecides_predictions_of_the_pair_only() -> None:
    base = faulty()
    fixed = reverified(base, ["a", "b"], correct_pair())
    assert fixed.labels == base.labels
    assert [rv.labels for rv in fixed.reverifiers] == [("a", "b")]
    x = rows(A_IMG, B_IMG, C_IMG, [0.5, 3.0, 0.0], [0.0, 0.0, 0.0])
    assert base.predict(x).tolist() == [0, 0, 2, 0, 0]
    assert fixed.predict(x).tolist() == [0, 1, 2, 1, 0]
    assert torch.equal(fixed.scores(x), base.scores(x))  # scores are the composed modules'; only predict changes
    # a reverifier whose labels are in the other order maps its modules to those labels
    swapped = reverified(base, ["b", "a"], known_modules([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], (1, 0)))
    assert swapped.predict(x[:4]).tolist() == [0, 1, 2, 1]  # (the all-zero image is a tie: first label wins)
    assert base.reverifiers == ()


def test_removing_a_reverified_label_drops_its_reverifier_and_replacing_keeps_it() -> None:
    fixed = reverified(faulty(), ["a", "b"], correct_pair())
    assert removed(fixed, "c").reverifiers == fixed.reverifiers
    assert removed(fixed, "a").reverifiers == ()
    assert removed(fixed, "a").predict(rows(B_IMG)).tolist() == [0]  # "b" is position 0 now
    kept = replace(fixed, "c", known_modules([[0.0, 0.0, 2.0]], (2,)))
    assert kept.reverifiers == fixed.reverifiers
    assert kept.predict(rows(A_IMG, B_IMG, C_IMG)).tolist() == [0, 1, 2]


def test_replacing_a_reverified_label_under_a_new_name_still_predicts() -> None:
    fixed = reverified(faulty(), ["a", "b"], correct_pair())
    new = replace(fixed, "b", known_modules([[0.0, 1.0, 0.0]], (1,)), new_label="bee")
    assert new.labels == ("a", "c", "bee")
    new.predict(rows(A_IMG, B_IMG, C_IMG))


# ---------------------------------------------------------------------------------------------------------
# Compositions on disk
# ---------------------------------------------------------------------------------------------------------


def test_composition_round_trip_with_reverifier_and_two_parents(tmp_path: Path) -> None:
    rgb, grey = rgb_parent(), grey_parent()
    a = random_modules(rgb, keep=0.8).select(["cat", "dog"])
    b = random_modules(grey, keep=0.8, seed=1).select(["cat", "shoe"])
    pair = random_modules(rgb, keep=0.5, seed=7).select(["cat", "dog"])
    composed = reverified(compose([a, b], ["cat", "dog", "grey cat", "shoe"], "logit"), ["cat", "dog"], pair)
    path = save_composition(tmp_path / "comp", composed)
    loaded = load_composition(path)
    assert loaded.labels == composed.labels and loaded.scoring == "logit"
    assert [g.class_names for g in loaded.groups] == [("cat", "dog"), ("cat", "shoe")]
    assert [g.parent.input_spec for g in loaded.groups] == [rgb.input_spec, grey.input_spec]
    assert [rv.labels for rv in loaded.reverifiers] == [("cat", "dog")]
    for size, channels in ((8, 3), (6, 1), (12, 3)):
        images = uint8_images(9, size, channels, seed=size)
        assert torch.allclose(loaded.scores(images), composed.scores(images), atol=1e-6)
        assert torch.equal(loaded.predict(images), composed.predict(images))
    with pytest.raises(CnnmodError, match="exists"):
        save_composition(path, composed)
    save_composition(path, removed(composed, "shoe"), overwrite=True)
    assert load_composition(path).labels == ("cat", "dog", "grey cat")


def test_a_plain_store_loads_as_a_composition_of_all_its_modules(tmp_path: Path) -> None:
    modules = random_modules(grey_parent(), keep=0.8)
    path = save_store(tmp_path / "store", modules)
    loaded = load_composition(path)
    assert loaded.labels == ("cat", "shoe", "bag", "shirt")
    assert loaded.reverifiers == () and loaded.scoring == "softmax"
    images = uint8_images(6, 6, 1)
    assert torch.allclose(loaded.scores(images), compose([modules]).scores(images), atol=1e-6)
