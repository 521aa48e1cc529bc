"""The folded form of a stacked network (cnnmod.engine.folding): the module axis in the batch, the same outputs.

The nets have integer weights and inputs, so every sum is exact in float32 and "equal" means bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnmod.engine import channels as ch
from cnnmod.engine.engines import CompactNets, _folded_or_stacked
from cnnmod.engine.folding import FoldedGather, FoldedLayers, fold, folded_blocks
from cnnmod.errors import CnnmodError
from fixtures.nets import parent_of
from test_compact import TinyResidual, hand_keeps, heads, images, spaces


@pytest.fixture(scope="module")
def parent():  # type: ignore[no-untyped-def]
    return parent_of(TinyResidual(), (4, 4))


def module_nets(parent, keeps, hw, hb):  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    return plan, [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]


def unfolded_blocks(x: torch.Tensor, m: int) -> torch.Tensor:
    """(M * B, C, ...) -> (B, M * C, ...): what `folded_blocks` undoes."""
    mb, c = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(m, mb // m, c, *rest).transpose(0, 1).reshape(mb // m, m * c, *rest)


def kinds(gm) -> set[str]:  # type: ignore[no-untyped-def]
    return {n.meta[ch.STACKED].kind for n in gm.graph.nodes if ch.STACKED in n.meta}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_blocks_fold_into_the_batch_and_back(layout) -> None:  # type: ignore[no-untyped-def]
    x = torch.arange(2 * 3 * 4 * 5 * 2, dtype=torch.float32).reshape(2, 3 * 4, 5, 2).contiguous(memory_format=layout)
    folded = folded_blocks(x, 3)
    assert folded.shape == (6, 4, 5, 2)
    for i in range(3):  # module i's rows are its channel block of every sample
        assert torch.equal(folded[i * 2:(i + 1) * 2], x[:, i * 4:(i + 1) * 4])
    assert torch.equal(unfolded_blocks(folded, 3), x)
    if layout is torch.channels_last:
        assert folded.is_contiguous(memory_format=torch.channels_last)
    flat = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(folded_blocks(flat, 3)[2:4], flat[:, 2:4])


def test_the_folded_network_equals_each_module_alone_exactly(parent) -> None:  # type: ignore[no-untyped-def]
    keeps = hand_keeps(parent, ch.channel_plan(parent.model))  # different widths: padded to the widest
    hw, hb = heads()
    plan, nets = module_nets(parent, keeps, hw, hb)
    x = images()
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        stacked = ch.stack(parent.model.graph, plan, keeps, nets)
        assert {"grouped_layer", "shared_input_layer", "grouped_map", "grouped_head"} <= kinds(stacked)
        folded = fold(stacked, len(nets))
        assert any(isinstance(m, FoldedLayers) for m in folded.modules())
        assert any(isinstance(m, FoldedGather) for m in folded.modules())
        assert torch.equal(folded(x), alone)
        assert torch.equal(folded.to(memory_format=torch.channels_last)(x), alone)  # type: ignore[call-overload]


@pytest.mark.parametrize("cut", ["relu", "relu_2"])
def test_a_folded_network_after_a_shared_prefix_equals_each_module_alone(parent, cut) -> None:  # type: ignore[no-untyped-def]
    """Cut after the stem, the block's Add reads the shared stem output (tiled M times); cut after stage 1,
    stage 2's convolution and channel pad read the shared value (one convolution, one gather, then folded)."""
    plan = ch.channel_plan(parent.model)
    stem, a, _, d = spaces(parent, plan)
    shared = {stem: torch.tensor([0, 3])} if cut == "relu" else {stem: torch.tensor([0, 3]), a: torch.tensor([1])}
    keeps = [{**k, **shared} for k in hand_keeps(parent, plan)]
    hw, hb = heads()
    _, nets = module_nets(parent, keeps, hw, hb)
    x = images()
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        stacked = ch.stack(parent.model.graph, plan, keeps, nets, cut=cut, input_shape=(1, 4, 4))
        assert ("tile" in kinds(stacked)) == (cut == "relu")
        assert ("shared_input_map" in kinds(stacked)) == (cut == "relu_2")
        assert torch.equal(fold(stacked, len(nets))(x), alone)
        # aligned to 2 channels: the widest module keeps 5 of space d (padded to 6: a fifth more at most), 3 of
        # space c (not padded to 4: a third more), and the prefix's spaces keep their widths (the stem's is 2 wide)
        wide = [{**k, d: torch.arange(5)} if i == 0 else k for i, k in enumerate(keeps)]
        _, wide_nets = module_nets(parent, wide, hw, hb)
        wide_alone = torch.stack([net(x) for net in wide_nets], 1)
        aligned = ch.stack(parent.model.graph, plan, wide, wide_nets, cut=cut, input_shape=(1, 4, 4), align=2)
        outputs = {name: aligned.get_submodule(name).weight.shape[0] for name in ("stem", "conv_a", "conv_b", "conv_c",
                                                                                 "conv_d")}
        own = {"stem": 2, "conv_a": 3 * 3, "conv_b": 2 * 3} if cut == "relu" else {"stem": 2, "conv_a": 1, "conv_b": 2}
        assert outputs == {**own, "conv_c": 3 * 3, "conv_d": 6 * 3}
        assert torch.equal(aligned(x), wide_alone) and torch.equal(fold(aligned, len(nets))(x), wide_alone)
        compact = CompactNets(plan, tuple(keeps), tuple(nets), input_shape=(1, 4, 4), base=parent.model.graph)
        for batching in ("folded", "auto"):  # auto folds on a CPU where a prefix is shared
            runner = dataclasses.replace(compact, batching=batching).runner(hw, hb, torch.device("cpu"))
            assert any(isinstance(m, FoldedLayers) for m in runner.modules())
            assert torch.equal(runner(x), alone)


class HiddenLinear(nn.Module):
    """stem 1->4, flattened (4 x 2 x 2), a hidden linear layer 16->5, head 5->3: block-diagonal linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.hidden = nn.Linear(16, 5)
        self.head = nn.Linear(5, 3)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in (self.stem, self.hidden, self.head):
                layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape, generator=g).float())
                layer.bias.copy_(torch.randint(-2, 3, layer.bias.shape, generator=g).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(torch.flatten(F.relu(self.stem(x)), 1))))


def test_hidden_linear_layers_fold_too() -> None:
    parent = parent_of(HiddenLinear(), (4, 4))
    plan = ch.channel_plan(parent.model)
    stem, hidden = plan.space_of["stem"], plan.space_of["hidden"]
    keeps = [{stem: torch.tensor([0, 2]), hidden: torch.tensor([1, 3, 4])},
             {stem: torch.tensor([1, 2, 3]), hidden: torch.tensor([0])}]
    hw = torch.randint(-2, 3, (2, 2, 5), generator=torch.Generator().manual_seed(4)).float()
    hb = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    _, nets = module_nets(parent, keeps, hw, hb)
    x = images()
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        folded = fold(ch.stack(parent.model.graph, plan, keeps, nets), 2)
        assert any(isinstance(m, FoldedLayers) and isinstance(m.layers[0], nn.Linear) for m in folded.modules())
        assert torch.equal(folded(x), alone)


class BatchFromInput(nn.Module):
    """Flattens with the input's batch size (`view(x.size(0), -1)` on a later value): a stacked value reshaped
    by a shared one's size, which the fold cannot keep."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).view(x.size(0), -1))


def test_a_network_the_fold_cannot_keep_runs_stacked() -> None:
    torch.manual_seed(0)
    parent = parent_of(BatchFromInput(), (4, 4))
    plan = ch.channel_plan(parent.model)
    keeps = [{plan.space_of["stem"]: torch.tensor([0, 1]), plan.space_of["conv"]: torch.tensor([k])}
             for k in range(3)]
    hw, hb = torch.randn(3, 2, 4), torch.randn(3, 2)
    _, nets = module_nets(parent, keeps, hw, hb)
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        stacked = ch.stack(parent.model.graph, plan, keeps, nets)
        chosen = _folded_or_stacked(stacked, 3, (1, 4, 4))
        assert chosen is stacked and torch.allclose(chosen(x), alone, atol=1e-5)
        broken = ch.stack(parent.model.graph, plan, keeps, nets)
        next(n for n in broken.graph.nodes if ch.STACKED in n.meta).meta[ch.STACKED] = ch.StackedNode("unknown")
        with pytest.raises(CnnmodError, match="cannot fold"):
            fold(broken, 3)
        assert _folded_or_stacked(broken, 3, (1, 4, 4)) is broken


def test_an_unknown_batching_is_refused(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    with pytest.raises(CnnmodError, match="unknown batching 'diagonal'"):
        CompactNets(plan, (), (), batching="diagonal")


@pytest.mark.parametrize(("arch", "size", "channels"), [("vgg", 32, 3), ("resnet20_b", 32, 3), ("smallcnn", 28, 1)])
def test_the_folded_engine_runs_the_zoo_architectures_as_each_module_alone(arch, size, channels) -> None:  # type: ignore[no-untyped-def]
    """Plain convolution stacks with hidden linear layers (VGG), 1x1-convolution shortcuts, a small CNN: compact
    modules of random weights give each module's own outputs when folded."""
    import numpy as np

    from cnnmod.engine.compact import CompactConfig, compact_decompose, module_set
    from cnnmod.engine.inputs import InputSpec
    from cnnmod.engine.modules import Parent
    from cnnmod.zoo import create_model

    model = create_model(arch, num_classes=10, in_channels=channels, seed=0).eval()
    parent = Parent.from_model(model, InputSpec.default((size, size), channels), [str(i) for i in range(10)], arch)
    images = np.random.default_rng(0).integers(0, 255, (40, size, size, channels), dtype=np.uint8)
    result = compact_decompose(parent, images, np.repeat(np.arange(10), 4),
                               CompactConfig(train_images=0, importance_per_class=2, recalibrate_images=0,
                                             shared_prefix_parameters=0.0))  # the smallcnn's convolutions too
    modules = module_set(parent, result.plan, list(result.keeps), list(result.nets), range(10))
    outputs = {}
    for batching in ("each", "folded"):
        run = dataclasses.replace(modules, compact=dataclasses.replace(modules.compact, batching=batching))
        outputs[batching] = run.logits(images[:8])
    runner = modules.compact.runner(modules.head_weight, modules.head_bias, torch.device("cpu"))
    assert any(isinstance(m, FoldedLayers) for m in runner.modules())  # auto folds these on a CPU
    scale = float(outputs["each"].abs().max())
    torch.testing.assert_close(outputs["folded"], outputs["each"], rtol=1e-4, atol=1e-5 * scale)
