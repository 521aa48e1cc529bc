"""The one pass's counting: equal to the reference scatter on hand-made plans (groups straddling batches, empty
groups, one sample), integer counts of the smallest dtype, per-channel counts, the ReLU fused in place without
changing what the network computes, shards that add up to the whole, and passes of a few classes that give the
masks of one pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnmod.engine.activity import (
    SamplePlan,
    _Batch,
    activity_counts,
    count_dtype,
    counting_network,
    plan_samples,
    record_activity,
)
from cnnmod.engine.decompose import DecomposeConfig, decompose, decompose_in_passes, observe
from cnnmod.engine.distributed import Shard
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.engine.trace import with_taps
from cnnmod.zoo import create_model
from fixtures.nets import ResidualNet, parent_of


class _Record(nn.Module):
    def __init__(self, into: list[torch.Tensor]) -> None:
        super().__init__()
        self.into = into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.into.append(x.detach().clone())
        return x


def reference_counts(parent: Parent, images: np.ndarray, plan: SamplePlan, kind: str = "relu"
                     ) -> dict[str, torch.Tensor]:
    """The scatter the counting replaced: every sample's site outputs, one at a time, `(x > 0)` index-added into
    float counts of every group (the plan's last group included), as int64."""
    sites = parent.model.site_list(kind)
    seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    net = with_taps(parent.model.graph, {s.name: _Record(seen[s.name]) for s in sites}).eval()
    groups = torch.as_tensor(plan.groups, dtype=torch.long)
    with torch.no_grad():
        for i in plan.indices:  # one at a time, twice (a batch of one is avoided), first row kept
            net(parent.input_spec.prepare(images[[i, i]]))
    out = {}
    for s in sites:
        active = torch.stack([x[0] for x in seen[s.name]]) > 0
        counts = torch.zeros((plan.num_groups, *s.shape))
        counts.index_add_(0, groups, active.float())
        out[s.name] = counts.to(torch.int64)
    return out


def hand_plan(groups: Sequence[int], chosen: Sequence[int], num_classes: int, seed: int = 0) -> SamplePlan:
    """A plan whose samples are images 0..n-1 in a shuffled order, with these groups."""
    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(groups))
    return SamplePlan(indices, np.asarray(groups, dtype=np.int64), num_classes, tuple(chosen))


def resnet_parent(classes: int = 4, size: int = 8) -> Parent:
    model = create_model("resnet8", num_classes=classes, seed=0)
    return Parent.from_model(model, InputSpec.default((size, size), 3), [f"c{i}" for i in range(classes)], "resnet8")


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def recorded(activity_counts_: dict[str, torch.Tensor], others: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counts and others as one (groups, ...) int64 tensor per site, the layout of `reference_counts`."""
    return {k: torch.cat([v.to(torch.int64), others[k].to(torch.int64).unsqueeze(0)]) for k, v in
            activity_counts_.items()}


# 3 chosen classes (groups 0-5) and the others' group 6: group 2 and 5 are empty, group 1 has one sample, and
# runs of 5 and 4 straddle batches of 2, 3 and 4.
GROUPS = [0] * 5 + [1] + [3] * 4 + [4] * 2 + [6] * 3


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7, 256])
def test_counts_equal_the_reference_scatter(batch_size: int) -> None:
    parent = resnet_parent()
    images = random_images(len(GROUPS))
    plan = hand_plan(GROUPS, (2, 0, 3), 4)
    activity = record_activity(parent.model, "relu", images, plan, parent.input_spec, batch_size, "cpu", False)
    assert activity.group_sizes.tolist() == [5, 1, 0, 4, 2, 0, 3]
    assert recorded(activity.counts, activity.others).keys() == reference_counts(parent, images, plan).keys()
    reference = reference_counts(parent, images, plan)
    for name, counts in recorded(activity.counts, activity.others).items():
        assert torch.equal(counts, reference[name]), name
        assert counts[2].sum() == 0 and counts[5].sum() == 0  # empty groups count nothing


def test_conv_site_counts_equal_the_reference_scatter() -> None:
    parent = resnet_parent()
    images = random_images(len(GROUPS), seed=1)
    plan = hand_plan(GROUPS, (0, 1, 2), 4, seed=1)
    activity = record_activity(parent.model, "conv", images, plan, parent.input_spec, 3, "cpu", False)
    reference = reference_counts(parent, images, plan, "conv")
    for name, counts in recorded(activity.counts, activity.others).items():
        assert torch.equal(counts, reference[name]), name


def test_one_sample_is_counted_once() -> None:
    parent = resnet_parent()
    images = random_images(1)
    plan = hand_plan([1], (0,), 4)
    activity = record_activity(parent.model, "relu", images, plan, parent.input_spec, 256, "cpu", False)
    reference = reference_counts(parent, images, plan)
    for name, counts in recorded(activity.counts, activity.others).items():
        assert torch.equal(counts, reference[name]), name
        assert int(counts.max()) <= 1


def test_a_shuffled_plan_and_batches_of_one_left_over_count_the_same() -> None:
    # 7 samples in batches of 3: batch_slices never leaves a batch of one; each group is one run after sorting
    parent = resnet_parent()
    images = random_images(7, seed=2)
    plan = hand_plan([2, 0, 2, 1, 0, 1, 0], (3,), 4, seed=2)
    activity = record_activity(parent.model, "relu", images, plan, parent.input_spec, 3, "cpu", False)
    reference = reference_counts(parent, images, plan)
    for name, counts in recorded(activity.counts, activity.others).items():
        assert torch.equal(counts, reference[name]), name


def test_channel_counts_are_node_counts_summed_over_positions() -> None:
    parent = resnet_parent()
    images = random_images(len(GROUPS), seed=3)
    plan = hand_plan(GROUPS, (2, 0, 3), 4, seed=3)
    node = record_activity(parent.model, "relu", images, plan, parent.input_spec, 4, "cpu", False)
    channel = record_activity(parent.model, "relu", images, plan, parent.input_spec, 4, "cpu", False, "channel")
    assert channel.granularity == "channel"
    for s in node.sites:
        assert channel.counts[s.name].shape == (6, s.shape[0])
        summed = node.counts[s.name].to(torch.int64).flatten(2).sum(2)
        assert torch.equal(channel.counts[s.name].to(torch.int64), summed)
        others = node.others[s.name].to(torch.int64).flatten(1).sum(1)
        assert torch.equal(channel.others[s.name].to(torch.int64), others)


def test_counts_are_integers_of_the_smallest_dtype_that_holds_them() -> None:
    assert [count_dtype(n) for n in (0, 255, 256, 32767, 32768, 2**31 - 1, 2**31)] == \
        [torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32, torch.int32, torch.int64]
    parent = resnet_parent()
    sites = parent.model.site_list("relu")
    small = hand_plan([0] * 255 + [1] * 3, (0,), 4)
    counts, others = activity_counts(sites, small, "node")
    assert {c.dtype for c in counts.values()} == {torch.uint8} and {o.dtype for o in others.values()} == {torch.uint8}
    big = hand_plan([0] * 256 + [2] * 40000, (0,), 4)
    counts, others = activity_counts(sites, big, "node")
    assert {c.dtype for c in counts.values()} == {torch.int16}  # the others' group is held apart, in its own dtype
    assert {o.dtype for o in others.values()} == {torch.int32}
    channel, _ = activity_counts(sites, small, "channel")
    positions = {s.name: int(np.prod(s.shape[1:])) for s in sites}
    for s in sites:  # 255 samples x H x W positions
        assert channel[s.name].dtype == count_dtype(255 * positions[s.name])


class _ReadTwice(nn.Module):
    """A ReLU whose input is read again afterwards (so it must not run in place), and one after a view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = F.relu(y)
        b = F.relu(y[:, :, ::1] - 0.1)
        return self.head((a + y + b).flatten(1))


@pytest.mark.parametrize(("make", "in_place"), [
    (lambda: resnet_parent(), 7),  # every ReLU follows a conv or an add
    (lambda: parent_of(ResidualNet(), (1, 3)), 3),
    (lambda: parent_of(_ReadTwice(), (4, 4)), 1),  # relu(y) with y read again stays out of place
], ids=["resnet8", "residual", "read-twice"])
def test_the_counting_network_computes_what_the_parent_computes(make, in_place: int) -> None:  # type: ignore[no-untyped-def]
    parent = make()
    x = torch.randn(5, *parent.model.input_shape, generator=torch.Generator().manual_seed(0))
    plan = hand_plan([0] * 5, (0,), parent.num_classes)
    counts, others = activity_counts(parent.model.site_list("relu"), plan, "node")
    batch = _Batch()
    batch.runs = [(0, 0, 5)]
    net = counting_network(parent.model, parent.model.site_list("relu"), counts, others, batch, "node").eval()
    with torch.no_grad():
        expected = parent.model.graph(x.clone())
        got = net(x.clone())
    assert torch.equal(got, expected)
    fused = [n for n in net.graph.nodes
             if n.op == "call_module" and type(net.get_submodule(str(n.target))).__name__ == "_CountingReLU"]
    assert len(fused) == in_place


def test_counts_with_a_relu_whose_input_is_read_again_equal_the_reference() -> None:
    parent = parent_of(_ReadTwice(), (4, 4))
    images = np.random.default_rng(0).random((9, 1, 4, 4), dtype=np.float32)
    plan = hand_plan([0] * 4 + [1] * 2 + [2] * 3, (1,), 3)
    activity = record_activity(parent.model, "relu", images, plan, parent.input_spec, 4, "cpu", False)
    reference = reference_counts(parent, images, plan)
    for name, counts in recorded(activity.counts, activity.others).items():
        assert torch.equal(counts, reference[name]), name


@pytest.fixture
def one_process_group():  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("world", [2, 3, 40])
def test_shards_add_up_to_the_whole(world: int) -> None:
    # each "rank" observes its share (in a one-process group the sum over ranks is the rank's own counts);
    # with 40 shares of 15 samples most ranks get no sample of most groups, some none at all
    parent = resnet_parent()
    images = random_images(len(GROUPS), seed=4)
    plan = hand_plan(GROUPS, (2, 0, 3), 4, seed=4)
    whole = record_activity(parent.model, "relu", images, plan, parent.input_spec, 4, "cpu", False)
    parts = [record_activity(parent.model, "relu", images, plan, parent.input_spec, 4, "cpu", False,
                             shard=Shard(rank, world, "gloo")) for rank in range(world)]
    for s in whole.sites:
        total = sum(p.counts[s.name].to(torch.int64) for p in parts)
        assert torch.equal(total, whole.counts[s.name].to(torch.int64))
        assert torch.equal(sum(p.others[s.name].to(torch.int64) for p in parts),
                           whole.others[s.name].to(torch.int64))


def class_data(classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return random_images(len(labels), seed=seed), labels


@pytest.mark.parametrize("per_pass", [1, 2, 3])
def test_passes_of_a_few_classes_give_the_masks_and_counts_of_one_pass(per_pass: int) -> None:
    parent = resnet_parent(5)
    images, labels = class_data(5, 6)
    config = DecomposeConfig(samples_per_class=4, tangling_ratio=1.0, rho=0.2)
    one, activity = decompose(parent, images, labels, config, classes=["c4", "c1", "c2", "c0"], progress=False)
    split = decompose_in_passes(parent, images, labels, config, ["c4", "c1", "c2", "c0"], progress=False,
                                classes_per_pass=per_pass, keep_activity=True)
    assert split.passes == -(-4 // per_pass)
    assert split.modules.class_indices == one.class_indices
    for k in one.masks:
        assert torch.equal(split.modules.masks[k], one.masks[k]), k
    assert torch.equal(split.modules.head_weight, one.head_weight)
    merged = split.activity
    assert merged is not None and merged.chosen == activity.chosen
    assert torch.equal(merged.group_sizes, activity.group_sizes)
    for s in activity.sites:
        assert torch.equal(merged.counts[s.name].to(torch.int64), activity.counts[s.name].to(torch.int64))
        assert torch.equal(merged.others[s.name].to(torch.int64), activity.others[s.name].to(torch.int64))


def test_without_keep_activity_no_counts_come_back() -> None:
    parent = resnet_parent(3)
    images, labels = class_data(3, 4)
    result = decompose_in_passes(parent, images, labels, DecomposeConfig(samples_per_class=2), progress=False)
    assert result.activity is None and result.passes == 1
    assert result.samples_observed == 6


def test_channel_granularity_from_channel_counts_equals_it_from_node_counts() -> None:
    parent = resnet_parent(4)
    images, labels = class_data(4, 5)
    config = DecomposeConfig(samples_per_class=5, rho=0.3, granularity="channel")
    from_channels = decompose_in_passes(parent, images, labels, config, progress=False, keep_activity=True)
    assert from_channels.activity is not None and from_channels.activity.granularity == "channel"
    node_activity = observe(parent, images, labels, config.replace(granularity="node"), progress=False)
    from cnnmod.engine.decompose import derive_modules

    from_nodes = derive_modules(parent, node_activity, config)
    for k in from_nodes.masks:
        assert torch.equal(from_channels.modules.masks[k], from_nodes.masks[k]), k
    with pytest.raises(Exception, match="channel counts only"):
        derive_modules(parent, from_channels.activity, config.replace(granularity="node"))


def test_plan_groups_put_the_classes_not_chosen_in_the_last_group() -> None:
    labels = np.repeat(np.arange(4), 5)
    plan = plan_samples(labels, 4, [2, 0], samples_per_class=3, tangling_ratio=1.0, seed=0)
    # TI share = round(3 * 1 / 3) = 1; chosen 2 -> groups 0/1, chosen 0 -> groups 2/3, classes 1 and 3 -> group 4
    assert plan.group_sizes().tolist() == [2, 1, 2, 1, 2]
    assert set(labels[plan.indices[plan.groups == 4]]) == {1, 3}
