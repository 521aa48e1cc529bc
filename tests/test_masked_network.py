"""The modules' one masked network takes exact shortcuts: what runs before the first site whose masks drop
anything runs once per batch, masks that keep everything are not applied, ReLUs run in place. Its outputs are
those of the plain construction (every copy of the batch masked at every site)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from cnnmod.engine.decompose import channel_heads
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import ModuleSet, Parent, _MaskTap, _Repeat
from cnnmod.engine.trace import with_taps
from cnnmod.zoo import create_model
from fixtures.nets import RandomConvNet, parent_of


def plain_logits(modules: ModuleSet, x: torch.Tensor) -> torch.Tensor:
    """The construction before the shortcuts: repeat the input, mask every site, then the heads."""
    traced = modules.parent.model
    placeholder = next(n for n in traced.graph.graph.nodes if n.op == "placeholder")
    taps: dict[str, nn.Module] = {placeholder.name: _Repeat(len(modules))}
    taps.update({s.name: _MaskTap(modules.masks[s.name]) for s in modules.sites})
    net = with_taps(traced.graph, taps).eval()
    out: dict[str, torch.Tensor] = {}
    feature = next(n for n in net.graph.nodes if n.name == traced.head.feature)

    class Grab(nn.Module):
        def forward(self, f: torch.Tensor) -> torch.Tensor:
            out["f"] = f
            return f

    net.add_submodule("grab", Grab())
    with net.graph.inserting_after(feature):
        grabbed = net.graph.call_module("grab", (feature,))
    feature.replace_all_uses_with(grabbed, delete_user_cb=lambda u: u is not grabbed)
    net.recompile()
    with torch.no_grad():
        net(x)
    f = out["f"].flatten(1).unflatten(0, (len(modules), -1))
    return torch.baddbmm(modules.head_bias.unsqueeze(1), f, modules.head_weight.transpose(1, 2)).transpose(0, 1)


def modules_with(parent: Parent, keep_first: int, keep: float, seed: int = 0) -> ModuleSet:
    """Random masks, all-kept at the first `keep_first` sites."""
    g = torch.Generator().manual_seed(seed)
    sites = parent.model.site_list("relu")
    k = parent.num_classes
    masks = {s.name: (torch.rand(k, *s.shape, generator=g) < keep) | (i < keep_first) for i, s in enumerate(sites)}
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, range(k))
    return ModuleSet(parent, tuple(range(k)), sites, masks, w, b)


def resnet8() -> Parent:
    return Parent.from_model(create_model("resnet8", num_classes=5, seed=1), InputSpec.default((8, 8), 3),
                             [f"c{i}" for i in range(5)], "resnet8")


def repeats(net: fx.GraphModule) -> list[str]:
    """The nodes whose values are repeated for the copies."""
    return [str(n.args[0]) for n in net.graph.nodes
            if n.op == "call_module" and isinstance(net.get_submodule(str(n.target)), _Repeat)]


@pytest.mark.parametrize("keep_first", [0, 1, 3, 100], ids=["none-kept", "first-kept", "three-kept", "all-kept"])
@pytest.mark.parametrize("keep", [0.8, 1.0])
def test_the_masked_network_computes_the_plain_construction(keep_first: int, keep: float) -> None:
    parent = resnet8()
    modules = modules_with(parent, keep_first, keep)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = plain_logits(modules, x.clone())
    with torch.no_grad():
        got = modules.network()(x.clone())
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    net = modules.network()
    placeholder = next(n.name for n in net.graph.nodes if n.op == "placeholder")
    # the stem convolution (at least) runs once per batch: only what is alive before the first dropping mask
    # is repeated
    assert placeholder not in repeats(net) and repeats(net)


def test_the_logits_of_many_modules_equal_one_at_a_time() -> None:
    parent = resnet8()
    modules = modules_with(parent, 2, 0.85, seed=3)
    images = np.random.default_rng(0).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    together = modules.logits(images, batch_size=8, chunk=3)
    alone = torch.cat([modules.select([c]).logits(images) for c in modules.class_names], 1)
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5)


class _SizeView(nn.Module):
    """`x.view(x.size(0), -1)` after the first site: a size computed before the copies are made must not be
    used after them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = RandomConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = F.relu(self.net.conv1(x))
        h = self.net.pool(h)
        h = F.relu(self.net.conv2(h))
        h = F.relu(self.net.fc(h.view(n, -1)))
        return self.net.head(h)


def test_a_size_taken_before_the_first_masked_site_falls_back_to_repeating_the_input() -> None:
    parent = parent_of(_SizeView(), (6, 6))
    modules = modules_with(parent, 1, 0.7)  # conv1's ReLU keeps everything: the cut would be after it
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    net = modules.network()
    placeholder = next(n.name for n in net.graph.nodes if n.op == "placeholder")
    assert repeats(net) == [placeholder]
    with torch.no_grad():
        assert torch.allclose(net(x.clone()), plain_logits(modules, x.clone()), atol=1e-5)


def test_the_masked_network_leaves_the_parent_unchanged() -> None:
    parent = resnet8()
    before = copy.deepcopy(parent.model.graph.state_dict())
    code = parent.model.graph.code
    modules_with(parent, 1, 0.8).network()
    assert parent.model.graph.code == code
    assert all(torch.equal(v, before[k]) for k, v in parent.model.graph.state_dict().items())


@pytest.mark.parametrize("make", [resnet8, lambda: parent_of(RandomConvNet(), (6, 6))], ids=["resnet8", "convnet"])
def test_the_parents_inference_network_runs_relus_in_place_with_the_same_outputs(make) -> None:  # type: ignore[no-untyped-def]
    from cnnmod.engine.modules import inference_network

    parent = make()
    code = parent.model.graph.code
    net = inference_network(parent.model)
    assert "relu_" in net.code and parent.model.graph.code == code  # the parent's own graph is left as it was
    images = np.random.default_rng(0).integers(0, 256, (9, *parent.input_spec.size, parent.input_spec.channels),
                                               dtype=np.uint8)
    with torch.inference_mode():
        plain = parent.model.graph.eval()(parent.input_spec.prepare(images))
    assert torch.equal(parent.logits(images, batch_size=4), plain)


def test_relus_run_in_place_only_on_fresh_values_nothing_else_reads() -> None:
    from cnnmod.engine.modules import relus_in_place

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.other = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            kept = F.relu(y) + y  # y is read twice: its ReLU must not overwrite it
            return F.relu(self.other(kept) + kept) + F.relu(x)  # a fresh sum: in place; the input: not

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 1, 5, 5)
    expected = net(x)
    traced = relus_in_place(fx.symbolic_trace(net))
    assert traced.code.count("relu_(") == 1
    with torch.inference_mode():
        assert torch.equal(traced(x.clone()), expected.detach())
