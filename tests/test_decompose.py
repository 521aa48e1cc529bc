"""Decomposition on hand-weighted nets: CI, TI, rho, granularity, output channeling, MC-BLN and MC-BI
backtracking (dense, conv, pooling, Add, option-A shortcut), one pass and determinism.

Expected masks are worked out by hand in the comments; grids are written row by row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnmod.engine.decompose import DecomposeConfig, channel_heads, decompose, derive_modules, keep_masks, observe
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.errors import CnnmodError
from fixtures.nets import (
    ChannelNet,
    ConvDense,
    DeepDense,
    DenseNet,
    GapNet,
    OptionANet,
    PoolNet,
    RandomConvNet,
    ReceptiveNet,
    ResidualNet,
    activity_from_masks,
    all_kept,
    parent_of,
)


def grid(*rows: str) -> torch.Tensor:
    """A bool tensor from rows of 0/1 characters, e.g. grid("110", "011")."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


def bools(*values: int) -> torch.Tensor:
    return torch.tensor([bool(v) for v in values])


def mask_of(modules, site_index: int, module: int = 0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return modules.masks[modules.sites[site_index].name][module]


# ---------------------------------------------------------------------------------------------------------
# Concern identification (CI) and rho
# ---------------------------------------------------------------------------------------------------------

def dense_data() -> tuple[np.ndarray, np.ndarray]:
    """4 samples per class for DenseNet (5 features, 4 classes).

    A class-k sample is +1 on feature k and -1 elsewhere, so only hidden unit k is active; unit 4 is never
    active. One of class 0's four samples is also +1 on feature 1 (unit 1 active for 1 of 4 class-0 samples).
    """
    xs, ys = [], []
    for k in range(4):
        for i in range(4):
            x = -np.ones(5, dtype=np.float32)
            x[k] = 1.0
            if k == 0 and i == 0:
                x[1] = 1.0
            xs.append(x)
            ys.append(k)
    return np.stack(xs).reshape(-1, 1, 1, 5), np.array(ys)


@pytest.mark.parametrize(
    ("rho", "class0"),
    [
        (0.0, bools(1, 1, 0, 0, 0)),  # unit 1: rate 1/4 > 0
        (0.2, bools(1, 1, 0, 0, 0)),  # 0.25 > 0.2: kept
        (0.3, bools(1, 0, 0, 0, 0)),  # 0.25 <= 0.3: dropped
    ],
)
def test_ci_masks_and_rho(rho: float, class0: torch.Tensor) -> None:
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = dense_data()
    config = DecomposeConfig(samples_per_class=4, tangling_ratio=0, rho=rho, variant="ci")
    modules, activity = decompose(parent, images, labels, config, progress=False)
    masks = modules.masks["relu"]
    expected = torch.stack([class0, bools(0, 1, 0, 0, 0), bools(0, 0, 1, 0, 0), bools(0, 0, 0, 1, 0)])
    assert torch.equal(masks, expected)
    assert masks.dtype == torch.bool
    assert modules.class_indices == (0, 1, 2, 3)
    # the counts behind it: class 0 (groups 0 and 1) saw unit 0 four times and unit 1 once
    counts = activity.counts["relu"]
    assert not counts.is_floating_point()
    assert (counts[0] + counts[1]).tolist() == [4, 1, 0, 0, 0]


def test_conv_sites_give_the_same_masks_on_a_dense_net() -> None:
    # DenseNet's conv site is fc, whose output is > 0 exactly where its ReLU output is.
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = dense_data()
    config = DecomposeConfig(samples_per_class=4, tangling_ratio=0, variant="ci")
    relu_modules, _ = decompose(parent, images, labels, config, progress=False)
    conv_modules, _ = decompose(parent, images, labels, config.replace(sites="conv"), progress=False)
    assert [s.name for s in conv_modules.sites] == ["fc"]
    assert torch.equal(conv_modules.masks["fc"], relu_modules.masks["relu"])


def test_one_pass_serves_every_rho() -> None:
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = dense_data()
    config = DecomposeConfig(samples_per_class=4, tangling_ratio=1, variant="ci")
    activity = observe(parent, images, labels, config, progress=False)
    for rho in (0.0, 0.2, 0.3, 0.5):
        derived = derive_modules(parent, activity, config.replace(rho=rho))
        direct, _ = decompose(parent, images, labels, config.replace(rho=rho), progress=False)
        assert torch.equal(derived.masks["relu"], direct.masks["relu"])


def channel_data() -> tuple[np.ndarray, np.ndarray]:
    """ChannelNet (channel 0 = relu(x), channel 1 = relu(-x)), 2 identical samples per class.

    class 0: x = [[1, 0], [0, 0]] -> channel 0 active at (0, 0) only (1 of 4 positions), channel 1 never.
    class 1: x = -1 everywhere -> channel 1 active at all 4 positions, channel 0 never.
    """
    c0 = np.array([[1, 0], [0, 0]], dtype=np.float32)
    c1 = -np.ones((2, 2), dtype=np.float32)
    return np.stack([c0, c0, c1, c1])[:, None], np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("granularity", "rho", "class0_ch0", "class1_ch1"),
    [
        ("node", 0.0, grid("10", "00"), grid("11", "11")),
        ("channel", 0.0, grid("11", "11"), grid("11", "11")),  # a channel is kept as a whole
        ("channel", 0.2, grid("11", "11"), grid("11", "11")),  # class 0 channel 0 rate 1/4 = 0.25 > 0.2
        ("channel", 0.3, grid("00", "00"), grid("11", "11")),  # 0.25 <= 0.3: the whole channel goes
    ],
)
def test_channel_granularity(granularity: str, rho: float, class0_ch0: torch.Tensor,
                             class1_ch1: torch.Tensor) -> None:
    parent = parent_of(ChannelNet(), (2, 2))
    images, labels = channel_data()
    config = DecomposeConfig(samples_per_class=2, tangling_ratio=0, rho=rho, granularity=granularity,
                             variant="ci")
    modules, _ = decompose(parent, images, labels, config, progress=False)
    masks = modules.masks["relu"]
    assert masks.shape == (2, 2, 2, 2)
    assert torch.equal(masks[0, 0], class0_ch0)
    assert not masks[0, 1].any()
    assert not masks[1, 0].any()
    assert torch.equal(masks[1, 1], class1_ch1)


def test_channel_masks_are_constant_per_channel_and_dense_sites_stay_per_node() -> None:
    parent = Parent.from_model(RandomConvNet(), InputSpec.default((6, 6), 1), ["a", "b", "c", "d"])
    images, labels = random_uint8_data()
    config = DecomposeConfig(samples_per_class=5, rho=0.3, variant="ci")
    activity = observe(parent, images, labels, config, progress=False)
    node = keep_masks(activity, 0.3, "node", True)
    channel = keep_masks(activity, 0.3, "channel", True)
    for site in activity.sites:
        m = channel[site.name]
        if len(site.shape) == 3:
            assert torch.equal(m, m[:, :, :1, :1].expand_as(m))
        else:
            assert torch.equal(m, node[site.name])


# ---------------------------------------------------------------------------------------------------------
# Tangling identification (TI)
# ---------------------------------------------------------------------------------------------------------

def one_hot_data() -> tuple[np.ndarray, np.ndarray]:
    """2 identical samples per class for DenseNet: class k activates hidden unit k only; unit 4 never."""
    x = -np.ones((4, 5), dtype=np.float32)
    x[np.arange(4), np.arange(4)] = 1.0
    return np.repeat(x, 2, axis=0).reshape(8, 1, 1, 5), np.repeat(np.arange(4), 2)


@pytest.mark.parametrize(
    ("ratio", "rho", "expected"),
    [
        # no TI: each class keeps only its own unit
        (0.0, 0.0, torch.eye(4, 5, dtype=torch.bool)),
        # TI share per other class = max(1, round(2 * 1 / 3)) = 1 sample, so each other unit has TI rate 1/3:
        # every unit active for some class is kept; unit 4 (never active) is not.
        (1.0, 0.0, torch.tensor([[1, 1, 1, 1, 0]] * 4, dtype=torch.bool)),
        (1.0, 0.3, torch.tensor([[1, 1, 1, 1, 0]] * 4, dtype=torch.bool)),  # 1/3 > 0.3
        (1.0, 0.4, torch.eye(4, 5, dtype=torch.bool)),  # 1/3 <= 0.4: TI keeps nothing, CI rate 1 stays
    ],
)
def test_tangling_identification(ratio: float, rho: float, expected: torch.Tensor) -> None:
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = one_hot_data()
    config = DecomposeConfig(samples_per_class=2, tangling_ratio=ratio, rho=rho, variant="ci")
    modules, activity = decompose(parent, images, labels, config, progress=False)
    assert torch.equal(modules.masks["relu"], expected)
    # one pass: the TI samples are the other classes' CI samples, not extra ones
    assert activity.num_samples == 8


def test_ti_share_rounds_and_is_drawn_within_the_ci_samples() -> None:
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = dense_data()
    # n = 4, K = 4: share = max(1, round(4 * 1.5 / 3)) = 2 of each class's 4 samples
    activity = observe(parent, images, labels, DecomposeConfig(samples_per_class=4, tangling_ratio=1.5),
                       progress=False)
    # every class chosen: the last group (TI shares of the classes not chosen) is empty
    assert activity.group_sizes.tolist() == [2, 2] * 4 + [0]
    assert activity.num_samples == 16


# ---------------------------------------------------------------------------------------------------------
# Output channeling (MC)
# ---------------------------------------------------------------------------------------------------------

def test_output_channeling_heads() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0],
                      [0.0, 1.0, -1.0, 2.0, 0.5],
                      [2.0, 0.0, 1.0, -1.0, -0.5],
                      [-1.0, 4.0, 0.5, 1.0, 0.0]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.4])
    parent = parent_of(DenseNet(head=w, head_bias=b), (1, 5))
    images, labels = one_hot_data()
    modules, _ = decompose(parent, images, labels, DecomposeConfig(samples_per_class=2, variant="ci"),
                           progress=False)
    assert modules.head_weight.shape == (4, 2, 5)
    assert modules.head_bias.shape == (4, 2)
    for c in range(4):
        others = [j for j in range(4) if j != c]
        assert torch.equal(modules.head_weight[c, 0], w[c])
        assert torch.allclose(modules.head_weight[c, 1], w[others].mean(0), atol=1e-6)
        assert modules.head_bias[c, 0] == b[c]
        assert torch.allclose(modules.head_bias[c, 1], b[others].mean(), atol=1e-6)
    # e.g. class 1's unconcerned row by hand: ([1,-2,.5,0,3] + [2,0,1,-1,-.5] + [-1,4,.5,1,0]) / 3
    assert torch.allclose(modules.head_weight[1, 1], torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0, 2.5 / 3]))


def test_channel_heads_for_a_subset_in_the_given_order() -> None:
    w = torch.arange(12.0).view(3, 4)
    b = torch.tensor([1.0, 2.0, 6.0])
    hw, hb = channel_heads(w, b, [2, 0])
    assert torch.equal(hw[0], torch.stack([w[2], (w[0] + w[1]) / 2]))
    assert torch.equal(hw[1], torch.stack([w[0], (w[1] + w[2]) / 2]))
    assert torch.equal(hb, torch.tensor([[6.0, 1.5], [1.0, 4.0]]))


# ---------------------------------------------------------------------------------------------------------
# MC-BLN: backtracking through dense layers (masks given directly as recorded activity)
# ---------------------------------------------------------------------------------------------------------

def derive(parent: Parent, masks, variant: str, kind: str = "relu", delta: float = 0.5):  # type: ignore[no-untyped-def]
    activity = activity_from_masks(parent, masks, kind)
    config = DecomposeConfig(tangling_ratio=0, variant=variant, sites=kind, delta=delta)
    return derive_modules(parent, activity, config)


def test_bln_removes_head_inputs_that_speak_only_for_the_others() -> None:
    # DeepDense head [[-1,-1,1],[1,1,0],[1,1,0]]: for class 0, r2 units 0, 1 have W_c = -1 <= -0.5 and
    # W_uc = 1 >= 0.5 -> removed. r2 unit 2 is still needed, and fc2 is dense, so every r1 unit feeds a
    # needed unit: r1 keeps everything. Classes 1 and 2 remove nothing.
    parent = parent_of(DeepDense(), (1, 2))
    modules = derive(parent, all_kept(parent), "bln")
    r1, r2 = (modules.masks[s.name] for s in modules.sites)
    assert torch.equal(r2, torch.stack([bools(0, 0, 1), bools(1, 1, 1), bools(1, 1, 1)]))
    assert r1.all()
    # the removed head inputs are zeroed in both head rows of module 0 only
    assert torch.equal(modules.head_weight[0], torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(modules.head_weight[1], torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.5]]))


def test_bln_removal_propagates_back_only_when_every_outgoing_unit_is_removed() -> None:
    # As above, but class 0's r2 unit 2 was never active (CI removed it): now all of r2 is removed for
    # class 0, so every r1 unit has only removed successors and is removed too.
    parent = parent_of(DeepDense(), (1, 2))
    r1, r2 = all_kept(parent)
    r2[0] = bools(1, 1, 0)
    modules = derive(parent, [r1, r2], "bln")
    got_r1, got_r2 = (modules.masks[s.name] for s in modules.sites)
    assert not got_r2[0].any()
    assert not got_r1[0].any()
    assert got_r1[1:].all() and got_r2[1:].all()
    # without backtracking the CI masks are kept as recorded and the head is untouched
    ci = derive(parent, [r1, r2], "ci")
    assert torch.equal(ci.masks[ci.sites[1].name], r2)
    assert ci.masks[ci.sites[0].name].all()
    assert torch.equal(ci.head_weight[0, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_delta_sets_the_bln_threshold() -> None:
    # with delta = 1.5 no |W| reaches the threshold: nothing is removed
    parent = parent_of(DeepDense(), (1, 2))
    modules = derive(parent, all_kept(parent), "bi", delta=1.5)
    assert all(m.all() for m in modules.masks.values())
    assert torch.equal(modules.head_weight[0, 0], torch.tensor([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize("kind", ["relu", "conv"])
def test_bln_stops_at_conv_and_bi_continues(kind: str) -> None:
    # ConvDense: r0 (1,1,3) -conv 1x2-> r1 (1,1,2) -flatten, fc-> r2 (3) -> head that removes r2 0, 1 for
    # class 0. Class 0's r1[1] was never active. Both variants: r2 = [0, 0, 1]; r1 = [1, 0] (fc is dense,
    # r2[2] needs every kept r1 unit).
    # bln does not cross conv2: r0 stays [1, 1, 1].
    # bi crosses it: r0[2] feeds only r1[1] (removed) -> removed; r0[0] feeds r1[0], r0[1] feeds both -> kept.
    # With conv sites the same masks sit on conv1, conv2, fc outputs and give the same answer.
    parent = parent_of(ConvDense(), (1, 3))
    r0, r1, r2 = all_kept(parent, kind)
    r1[0] = torch.tensor([True, False]).view(1, 1, 2)
    bln = derive(parent, [r0, r1, r2], "bln", kind)
    bi = derive(parent, [r0, r1, r2], "bi", kind)
    for modules, r0_class0 in ((bln, bools(1, 1, 1)), (bi, bools(1, 1, 0))):
        got = [modules.masks[s.name] for s in modules.sites]
        assert torch.equal(got[2][0], bools(0, 0, 1))
        assert torch.equal(got[1][0].flatten(), bools(1, 0))
        assert torch.equal(got[0][0].flatten(), r0_class0)
        assert all(g[1:].all() for g in got), "classes 1 and 2 remove nothing"


# ---------------------------------------------------------------------------------------------------------
# MC-BI through conv, pooling, Add and the option-A shortcut
# ---------------------------------------------------------------------------------------------------------

def with_class0(parent: Parent, site_index: int, class0: torch.Tensor) -> list[torch.Tensor]:
    """All-kept masks except class 0's at one site."""
    masks = all_kept(parent)
    masks[site_index][0] = class0.view(masks[site_index].shape[1:])
    return masks


def _b_mask(ch0: torch.Tensor, ch1: torch.Tensor) -> torch.Tensor:
    return torch.stack([ch0, ch1])


RECEPTIVE_CASES = [
    # b channel 0 keeps only window (0,0), channel 1 only (2,2): a keeps the union of the two 3x3 fields
    pytest.param(_b_mask(grid("100", "000", "000"), grid("000", "000", "001")),
                 grid("11100", "11100", "11111", "00111", "00111"), id="two-corners"),
    # both channels lose window (0,0): a[0,0] lies only in that window; a[0,1] is also in window (0,1)
    pytest.param(_b_mask(grid("011", "111", "111"), grid("011", "111", "111")),
                 grid("01111", "11111", "11111", "11111", "11111"), id="corner-removed"),
    # only channel 0 loses window (0,0): channel 1 still reads a[0,0], so nothing is removed
    pytest.param(_b_mask(grid("011", "111", "111"), grid("111", "111", "111")),
                 grid("11111", "11111", "11111", "11111", "11111"), id="one-channel-only"),
    # the centre window removed: every a node is in some other window
    pytest.param(_b_mask(grid("111", "101", "111"), grid("111", "101", "111")),
                 grid("11111", "11111", "11111", "11111", "11111"), id="centre-removed"),
    pytest.param(_b_mask(grid("000", "000", "000"), grid("000", "000", "000")),
                 grid("00000", "00000", "00000", "00000", "00000"), id="all-removed"),
]


@pytest.mark.parametrize(("b_class0", "a_class0"), RECEPTIVE_CASES)
def test_bi_through_conv_keeps_exactly_the_receptive_fields(b_class0: torch.Tensor,
                                                            a_class0: torch.Tensor) -> None:
    # ReceptiveNet: a (1,5,5) -conv 3x3, 2 output channels, no padding-> b (2,3,3) -> flatten -> head.
    parent = parent_of(ReceptiveNet(), (5, 5))
    modules = derive(parent, with_class0(parent, 1, b_class0), "bi")
    assert torch.equal(mask_of(modules, 1), b_class0)
    assert torch.equal(mask_of(modules, 0)[0], a_class0)
    assert modules.masks[modules.sites[0].name][1:].all()


def test_bln_leaves_masks_before_the_last_conv_alone() -> None:
    parent = parent_of(ReceptiveNet(), (5, 5))
    b_class0 = _b_mask(grid("100", "000", "000"), grid("000", "000", "001"))
    modules = derive(parent, with_class0(parent, 1, b_class0), "bln")
    assert mask_of(modules, 0).all()
    assert torch.equal(mask_of(modules, 1), b_class0)


@pytest.mark.parametrize("variant", ["bln", "bi"])
@pytest.mark.parametrize(
    ("kernel", "stride", "p_class0", "a_class0"),
    [
        # MaxPool2d(2): p (2x2) keeps windows (0,1) and (1,0) -> a keeps exactly those two 2x2 blocks
        (2, 2, grid("01", "10"), grid("0011", "0011", "1100", "1100")),
        # MaxPool2d(3, stride 1), overlapping windows: p(1,1) removed -> only a[3,3] (in no other window) goes
        (3, 1, grid("11", "10"), grid("1111", "1111", "1111", "1110")),
        # only window (0,0) kept -> a[0:3, 0:3]
        (3, 1, grid("10", "00"), grid("1110", "1110", "1110", "0000")),
    ],
)
def test_backtracking_through_max_pooling_windows(variant: str, kernel: int, stride: int,
                                                  p_class0: torch.Tensor, a_class0: torch.Tensor) -> None:
    # PoolNet: a (1,4,4) -> MaxPool2d -> ReLU p -> flatten -> head; no conv between a and p, so bln = bi.
    parent = parent_of(PoolNet(kernel, stride), (4, 4))
    modules = derive(parent, with_class0(parent, 1, p_class0), variant)
    assert torch.equal(mask_of(modules, 0)[0], a_class0)


@pytest.mark.parametrize("variant", ["bln", "bi"])
@pytest.mark.parametrize("form", ["module", "mean"])
def test_global_average_pooling_removes_whole_channels(form: str, variant: str) -> None:
    # GapNet head [[1,-1],[0,1],[0,1]]: class 0 removes pooled feature 1, so channel 1 of a (2,3,3) goes
    # as a whole; channel 0 and the other classes keep everything.
    parent = parent_of(GapNet(form), (3, 3))
    modules = derive(parent, all_kept(parent), variant)
    a = modules.masks[modules.sites[0].name]
    assert a[0, 0].all() and not a[0, 1].any()
    assert a[1:].all()
    assert torch.equal(modules.head_weight[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_bi_through_residual_add() -> None:
    # ResidualNet: a -> t = relu(conv_t 1x1 (a)); s = relu(t + a); all (1,1,3). Class 0 recorded
    # t = [1, 0, 1] and s = [1, 1, 0].
    # s[2] removed -> the Add needs t and a at positions 0, 1 only; t & [1,0,1] = [1,0,0];
    # a needs [1,1,0] via the identity operand and [1,0,0] via conv_t: a = [1,1,0].
    parent = parent_of(ResidualNet(), (1, 3))
    a, t, s = all_kept(parent)
    t[0] = bools(1, 0, 1).view(1, 1, 3)
    s[0] = bools(1, 1, 0).view(1, 1, 3)
    modules = derive(parent, [a, t, s], "bi")
    got = [mask_of(modules, i).flatten() for i in range(3)]
    assert torch.equal(got[0], bools(1, 1, 0))
    assert torch.equal(got[1], bools(1, 0, 0))
    assert torch.equal(got[2], bools(1, 1, 0))
    # bln: the conv in the residual branch is not crossed, so a keeps everything
    bln = derive(parent, [a, t, s], "bln")
    assert mask_of(bln, 0).all()


def test_bi_through_option_a_shortcut() -> None:
    # OptionANet: s (3,2,2) = relu(F.pad(a[:, :, ::2, ::2], (0,0,0,0,1,1)) + conv_z(a[:, :, 1::2, 1::2])).
    # Class 0 keeps s[1,0,0] and s[0,1,1] only:
    #   s[1,0,0] reads a[0,0] (shortcut, channel 1) and a[1,1] (conv path);
    #   s[0,1,1] reads a[3,3] (conv path); its shortcut operand is padding (channel 0), reading nothing.
    parent = parent_of(OptionANet(), (4, 4))
    s_class0 = torch.zeros(3, 2, 2, dtype=torch.bool)
    s_class0[1, 0, 0] = s_class0[0, 1, 1] = True
    modules = derive(parent, with_class0(parent, 1, s_class0), "bi")
    assert torch.equal(mask_of(modules, 0)[0], grid("1000", "0100", "0000", "0001"))
    assert torch.equal(mask_of(modules, 1), s_class0)
    # keeping only s[1,1,0] (shortcut a[2,0], conv a[3,1])
    s_class0 = torch.zeros(3, 2, 2, dtype=torch.bool)
    s_class0[1, 1, 0] = True
    modules = derive(parent, with_class0(parent, 1, s_class0), "bi")
    assert torch.equal(mask_of(modules, 0)[0], grid("0000", "0000", "1000", "0100"))


# ---------------------------------------------------------------------------------------------------------
# One pass, determinism, class subsets, no mutation
# ---------------------------------------------------------------------------------------------------------

def random_uint8_data(per_class: int = 12, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(per_class * classes, 6, 6, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    return images, labels


def random_parent() -> Parent:
    return Parent.from_model(RandomConvNet(), InputSpec.default((6, 6), 1), ["c0", "c1", "c2", "c3"])


def test_same_seed_gives_bit_identical_masks_and_another_seed_can_differ() -> None:
    parent = random_parent()
    images, labels = random_uint8_data()
    config = DecomposeConfig(samples_per_class=3, rho=0.0)
    first, _ = decompose(parent, images, labels, config, progress=False)
    again, _ = decompose(parent, images, labels, config, batch_size=5, progress=False)
    other, _ = decompose(parent, images, labels, config.replace(seed=1), progress=False)
    assert all(torch.equal(first.masks[k], again.masks[k]) for k in first.masks)
    assert torch.equal(first.head_weight, again.head_weight)
    assert any(not torch.equal(first.masks[k], other.masks[k]) for k in first.masks)


@pytest.mark.parametrize("variant", ["ci", "bi"])
def test_decomposing_a_subset_gives_the_same_modules(variant: str) -> None:
    parent = random_parent()
    images, labels = random_uint8_data()
    config = DecomposeConfig(samples_per_class=3, rho=0.1, variant=variant)
    full, _ = decompose(parent, images, labels, config, progress=False)
    part, activity = decompose(parent, images, labels, config, classes=["c3", "c1"], progress=False)
    assert part.class_indices == (3, 1)
    assert part.class_names == ("c3", "c1")
    for k in full.masks:
        assert torch.equal(part.masks[k], full.masks[k][[3, 1]])
    assert torch.equal(part.head_weight, full.head_weight[[3, 1]])
    assert torch.equal(part.head_bias, full.head_bias[[3, 1]])
    # only what the subset needs was observed: 3 CI samples each for c3 and c1, TI shares of 1 for c0, c2
    assert activity.num_samples == 8


def test_decompose_leaves_parent_and_inputs_unchanged() -> None:
    parent = parent_of(DeepDense(), (1, 2))
    before = {k: v.clone() for k, v in parent.model.graph.state_dict().items()}
    head = parent.model.head.weight.clone()
    images = np.array([[1.0, 0.5], [0.5, 1.0], [1.0, 1.0]], dtype=np.float32).reshape(3, 1, 1, 2)
    copy = images.copy()
    decompose(parent, images, np.array([0, 1, 2]), DecomposeConfig(samples_per_class=1), progress=False)
    assert np.array_equal(images, copy)
    assert torch.equal(parent.model.head.weight, head)
    assert all(torch.equal(before[k], v) for k, v in parent.model.graph.state_dict().items())


def test_bad_requests_are_refused() -> None:
    parent = parent_of(DenseNet(), (1, 5))
    images, labels = dense_data()
    with pytest.raises(CnnmodError, match="unknown class 'nope'"):
        decompose(parent, images, labels, classes=["nope"], progress=False)
    with pytest.raises(CnnmodError, match="named twice"):
        decompose(parent, images, labels, classes=["c1", "c1"], progress=False)
    with pytest.raises(CnnmodError, match="labels must lie in"):
        decompose(parent, images, labels + 1, progress=False)
    with pytest.raises(CnnmodError, match="unknown variant"):
        DecomposeConfig(variant="bx")
    with pytest.raises(CnnmodError, match="rho"):
        DecomposeConfig(rho=1.0)
    activity = observe(parent, images, labels, DecomposeConfig(), progress=False)
    with pytest.raises(CnnmodError, match="recorded at relu sites"):
        derive_modules(parent, activity, DecomposeConfig(sites="conv"))


class _Squeezed(torch.nn.Module):
    """Input (1, 4, 4) -> conv 3x3 pad 1 (1->3) -> ReLU -> global average pool -> `.squeeze()` -> head (3->4)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
            self.head = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(a, 1).squeeze())  # type: ignore[no-any-return]


@pytest.mark.parametrize("variant", ["bln", "bi"])
def test_one_class_alone_survives_squeeze_before_the_head(variant: str) -> None:
    """Backtracking runs a chunk of classes as a batch; a chunk of one class used to lose its batch dimension
    at `.squeeze()`, and every mask of that class came back empty."""
    parent = Parent.from_model(_Squeezed().eval(), InputSpec((4, 4), 1, (0.0,), (1.0,)), ["a", "b", "c", "d"])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 1, 4, 4)).astype(np.float32)
    labels = np.repeat(np.arange(4), 10)
    config = DecomposeConfig(samples_per_class=10, variant=variant)
    every, _ = decompose(parent, images, labels, config, progress=False)
    alone, _ = decompose(parent, images, labels, config, classes=["d"], progress=False)
    site = every.sites[0].name
    assert bool(alone.masks[site].any())
    assert torch.equal(alone.masks[site][0], every.masks[site][3])


def test_conservative_backtracking_is_recorded_in_the_config() -> None:
    """A dilated max-pool has no exact pattern: every window input of a needed output is kept, and the node is
    named in the config; MC-BLN stopping at a convolution is the variant's rule, not recorded."""

    class Dilated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.pool = torch.nn.MaxPool2d(2, stride=1, dilation=2)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.pool(torch.relu(self.conv(x)))).flatten(1))  # type: ignore[no-any-return]

    parent = parent_of(Dilated().eval(), (4, 4), classes=["a", "b"])
    activity = activity_from_masks(parent, all_kept(parent))
    assert "conservative_ops" not in derive_modules(parent, activity, DecomposeConfig(variant="ci")).config
    for variant in ("bln", "bi"):
        modules = derive_modules(parent, activity, DecomposeConfig(variant=variant, tangling_ratio=0))
        assert modules.config["conservative_ops"] == ["pool"]
        assert bool(mask_of(modules, 0).all())
