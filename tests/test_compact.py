"""Compact modules: channel spaces, materialised small networks, engines, and their store files.

The fixture net has integer weights and inputs, so every sum is exact in float32 and "equal" means bit for bit.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnmod.data import load_dataset
from cnnmod.engine import channels as ch
from cnnmod.engine.compact import clip_gradients, insert_batchnorm, module_groups, module_set
from cnnmod.engine.engines import CompactNets, EngineResult, choose_engine, union_keeps
from cnnmod.engine.modules import ModuleSet
from cnnmod.errors import CnnmodError, StoreError
from cnnmod.storage.compactstore import build_shared, load_module_network, trunk_network
from cnnmod.storage.fileio import load_safetensors, sha256_file
from cnnmod.storage.store import load_store, save_store
from fixtures.nets import parent_of


class TinyResidual(nn.Module):
    """stem 1->4; block 4->3->4 added to the stem (a residual tie); stride-2 stage 4->6 whose shortcut pads the
    4 channels into 6 (option A, one on each side); global average pool; head 6->3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv_d = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.stem, self.conv_a, self.conv_b, self.conv_c, self.conv_d, self.head):
                layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape, generator=g).float())
                layer.bias.copy_(torch.randint(-2, 3, layer.bias.shape, generator=g).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r0 = F.relu(self.stem(x))
        r1 = F.relu(self.conv_b(F.relu(self.conv_a(r0))) + r0)
        short = F.pad(r1[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))
        r2 = F.relu(self.conv_d(F.relu(self.conv_c(r1))) + short)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(r2, 1), 1))


@pytest.fixture(scope="module")
def parent():  # type: ignore[no-untyped-def]
    return parent_of(TinyResidual(), (4, 4))


def images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 3, (n, 1, 4, 4), generator=torch.Generator().manual_seed(1)).float()


def spaces(parent, plan):  # type: ignore[no-untyped-def]
    """The spaces by the layer whose output starts them: stem (tied with conv_b), a, c, d (tied with the pad)."""
    of = plan.space_of
    return of["stem"], of["conv_a"], of["conv_c"], of["conv_d"]


def hand_keeps(parent, plan):  # type: ignore[no-untyped-def]
    stem, a, c, d = spaces(parent, plan)
    return [
        {stem: torch.tensor([0, 3]), a: torch.tensor([1]), c: torch.tensor([0, 2, 5]), d: torch.tensor([1, 2, 4])},
        {stem: torch.tensor([1, 2, 3]), a: torch.tensor([0, 2]), c: torch.tensor([1]), d: torch.tensor([0, 5])},
        {stem: torch.tensor([2]), a: torch.tensor([0, 1, 2]), c: torch.tensor([3, 4]), d: torch.tensor([2, 3, 4])},
    ]


def heads(k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(-2, 3, (k, 2, 6), generator=g).float(), torch.randint(-2, 3, (k, 2), generator=g).float()


def masked(parent, plan, keeps, head_weight, head_bias) -> ModuleSet:  # type: ignore[no-untyped-def]
    """The paper's kind of module: the parent with every removed channel zeroed at each ReLU site."""
    sites = parent.model.site_list("relu")
    per = [ch.site_masks(parent.model, plan, k) for k in keeps]
    masks = {s.name: torch.stack([m[s.name] for m in per]) for s in sites}
    return ModuleSet(parent, tuple(range(len(keeps))), sites, masks, head_weight, head_bias)


def test_a_residual_add_ties_its_operands_and_the_option_a_pad_maps_channels(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    stem, a, c, d = spaces(parent, plan)
    assert len({stem, a, c, d}) == 4
    assert plan.space_of["conv_b"] == stem and plan.space_of["add"] == stem  # one keep set per residual stage
    assert plan.space_of["pad"] == d and plan.space_of["add_1"] == d
    (mapping,) = plan.maps
    assert (mapping.in_space, mapping.out_space, mapping.offset) == (stem, d, 1)
    assert not plan.spaces[plan.input_space].prunable
    assert plan.head.in_space == d


def test_hand_masked_modules_materialise_into_smaller_networks_with_identical_outputs(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)
    hw, hb = heads()
    reference = masked(parent, plan, keeps, hw, hb).network()
    x = images()
    with torch.no_grad():
        expected = reference(x)
        for i, keep in enumerate(keeps):
            net = ch.materialize(parent.model.graph, plan, keep, hw[i], hb[i])
            assert torch.equal(net(x), expected[:, i])
            stem, a, c, d = spaces(parent, plan)
            assert net.get_submodule("stem").weight.shape == (len(keep[stem]), 1, 3, 3)
            assert net.get_submodule("conv_b").weight.shape == (len(keep[stem]), len(keep[a]), 3, 3)
            assert net.get_submodule("conv_d").weight.shape == (len(keep[d]), len(keep[c]), 3, 3)
            assert net.get_submodule("head").weight.shape == (2, len(keep[d]))
            assert ch.network_cost(net, (1, 4, 4))[0] < ch.parent_cost(parent.model)[0]


def test_the_pad_shortcut_reads_only_kept_sources(parent) -> None:  # type: ignore[no-untyped-def]
    """Module 0 keeps stage-2 channels 1, 2, 4: their sources are stage-1 channels 0 (kept), 1 (removed: zero),
    3 (kept); the gather reads kept positions 0 and 1 and the appended zero channel (position 2)."""
    plan = ch.channel_plan(parent.model)
    keep = hand_keeps(parent, plan)[0]
    net = ch.materialize(parent.model.graph, plan, keep, *[h[0] for h in heads()])
    gathers = [n for n in net.graph.nodes if n.target is __import__("operator").getitem and
               isinstance(n.args[1], tuple) and len(n.args[1]) == 2 and isinstance(n.args[1][1], list)]
    assert [g.args[1][1] for g in gathers] == [[0, 2, 1]]


def test_stacked_execution_equals_each_module_alone_exactly(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)  # different widths: padded to the widest
    hw, hb = heads()
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    x = images()
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        stacked = ch.stack(parent.model.graph, plan, keeps, nets)
        assert torch.equal(stacked(x), alone)
        same = [keeps[0]] * 3  # same widths: no padding
        twins = [ch.materialize(parent.model.graph, plan, keeps[0], hw[i], hb[i]) for i in range(3)]
        assert torch.equal(ch.stack(parent.model.graph, plan, same, twins)(x),
                           torch.stack([n(x) for n in twins], 1))
        back = ch.unstack(ch.stack(parent.model.graph, plan, same, twins), plan, same, parent.model.graph)
        assert all(torch.equal(b(x), t(x)) for b, t in zip(back, twins, strict=True))
        compact = CompactNets(plan, tuple(keeps), tuple(nets))
        for device_runner in (compact.runner(hw, hb, torch.device("cpu")),):
            assert torch.equal(device_runner(x), alone)


def test_the_fine_tunes_batchnorm_starts_as_the_identity_after_every_convolution_but_the_skipped(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)
    hw, hb = heads()
    x = images(16)
    for skip in (frozenset(), frozenset({"stem", "conv_a"})):
        net = ch.materialize(parent.model.graph, plan, keeps[0], hw[0], hb[0])
        with torch.no_grad():
            before = net(x)
        insert_batchnorm(net, plan, x, skip=skip)
        inserted = {name for name, _ in net.named_children() if name.startswith("cnnmod_bn_")}
        assert inserted == {f"cnnmod_bn_{c}" for c in ("stem", "conv_a", "conv_b", "conv_c", "conv_d")} - \
            {f"cnnmod_bn_{c}" for c in skip}
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), before)


def test_convolution_statistics_over_slices_are_those_of_the_whole_batch(parent, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import cnnmod.engine.compact as compact

    plan = ch.channel_plan(parent.model)
    hw, hb = heads()
    net = ch.materialize(parent.model.graph, plan, hand_keeps(parent, plan)[1], hw[1], hb[1])
    targets = ["stem", "conv_a", "conv_b", "conv_c", "conv_d"]
    x = images(37) + torch.randn(37, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    whole = compact.conv_output_stats(net, targets, x)
    monkeypatch.setattr(compact, "STATS_SLICE_BYTES", 3 * (3 * 4 * 4 * 4))  # 3 images of the widest output
    batches: list[int] = []
    counter = net.register_forward_pre_hook(lambda mod, args: batches.append(len(args[0])))
    sliced = compact.conv_output_stats(net, targets, x)
    counter.remove()
    assert batches == [2] + [3] * 11 + [2, 2]  # the probe, then slices of three (no slice of one image)
    for t in targets:
        assert whole[t][2] == sliced[t][2] == 4
        torch.testing.assert_close(sliced[t][0], whole[t][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sliced[t][1], whole[t][1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = net.get_submodule("conv_b")(F.relu(net.get_submodule("conv_a")(F.relu(net.get_submodule("stem")(x)))))
    assert torch.equal(whole["conv_b"][0], out.transpose(0, 1).flatten(1).mean(1))  # whole: as computed before


def test_the_shared_engine_equals_the_masked_union_network(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)
    hw, hb = heads()
    union = union_keeps(plan, keeps)
    trunk = trunk_network(parent.model.graph, plan, union)
    shared = build_shared(plan, keeps, trunk)
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    compact = CompactNets(plan, tuple(keeps), tuple(nets), shared, "shared")
    # each module's head, restricted to its own kept head inputs, over the union-masked parent
    restricted = torch.zeros_like(hw)
    for i in range(3):
        cols = compact.head_columns(i)
        restricted[i][:, cols] = hw[i][:, cols]
    reference = masked(parent, plan, [union] * 3, restricted, hb).network()
    x = images()
    with torch.no_grad():
        assert torch.equal(compact.runner(hw, hb, torch.device("cpu"))(x), reference(x))


def test_the_default_engine_is_the_faster_one_within_a_tenth_of_a_point_of_exact() -> None:
    exact = EngineResult(0.80, 0.98, 3.0)
    assert choose_engine({"exact": exact, "shared": EngineResult(0.7995, 0.98, 1.0)}) == "shared"
    assert choose_engine({"exact": exact, "shared": EngineResult(0.798, 0.98, 1.0)}) == "exact"
    assert choose_engine({"exact": exact, "shared": EngineResult(0.80, 0.98, 4.0)}) == "exact"


def compact_store(parent, tmp_path: Path, shared: bool = False) -> tuple[Path, ModuleSet]:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)
    hw, hb = heads()
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    net_shared = build_shared(plan, keeps, trunk_network(parent.model.graph, plan, union_keeps(plan, keeps))) \
        if shared else None
    modules = module_set(parent, plan, keeps, nets, range(3), {"note": "hand"}, net_shared)
    return save_store(tmp_path / "store", modules), modules


def test_a_store_of_materialised_modules_round_trips(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, modules = compact_store(parent, tmp_path, shared=True)
    loaded = load_store(path).modules
    x = images()
    assert loaded.compact is not None and loaded.compact.shared is not None
    for engine in ("exact", "shared"):
        a = ModuleSet.logits(_with_engine(modules, engine), x.numpy())
        b = ModuleSet.logits(_with_engine(loaded, engine), x.numpy())
        assert torch.equal(a, b)
    assert torch.equal(loaded.select(["c2", "c0"]).logits(x.numpy()), modules.logits(x.numpy())[:, [2, 0]])
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["modules"][0]["network"]
    assert entry["parameters"] == ch.network_cost(modules.compact.nets[0], (1, 4, 4))[0]
    assert entry["bytes"] == (path / entry["file"]).stat().st_size
    # standalone: the file alone (no parent weights) gives the module's outputs
    net, keep, fingerprint = load_module_network(path / entry["file"])
    assert fingerprint == parent.fingerprint()
    with torch.no_grad():
        assert torch.equal(net(x), modules.logits(x.numpy())[:, 0])


def _with_engine(modules: ModuleSet, engine: str) -> ModuleSet:
    import dataclasses

    return dataclasses.replace(modules, compact=modules.compact.with_engine(engine))


def test_a_module_network_of_another_keep_set_or_parent_is_refused(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = compact_store(parent, tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    first, second = (m["network"] for m in manifest["modules"][:2])
    shutil.copy(bad / second["file"], bad / first["file"])  # module 1's network under module 0's name
    first["sha256"] = sha256_file(bad / first["file"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    load_store(bad)  # module 1's network with its own keep set is a valid network of this parent ...
    other = parent_of(TinyResidual().double().float(), (4, 4))
    with torch.no_grad():
        other.model.graph.get_submodule("stem").bias.add_(1)
    other_path, _ = compact_store(other, tmp_path / "o")
    manifest = json.loads((bad / "manifest.json").read_text())
    stranger = json.loads((other_path / "manifest.json").read_text())["modules"][0]["network"]
    shutil.copy(other_path / stranger["file"], bad / manifest["modules"][0]["network"]["file"])
    manifest["modules"][0]["network"]["sha256"] = stranger["sha256"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="another parent"):
        load_store(bad)
    del manifest["compact"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="compact block"):
        load_store(bad)


def test_masking_operations_refuse_compact_modules(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, modules = compact_store(parent, tmp_path)
    with pytest.raises(CnnmodError, match="compact modules"):
        modules.network()
    with pytest.raises(CnnmodError, match="compact modules"):
        modules.features(images().numpy())


def test_a_layer_whose_channels_cannot_be_followed_is_named() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 2, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            return self.head(torch.flatten(F.adaptive_avg_pool2d(torch.cat([y, y], 1), 1), 1))

    with pytest.raises(ch.ChannelError, match="cat"):
        ch.channel_plan(parent_of(Cat(), (4, 4)).model)


def test_decompose_compact_evaluate_and_inspect_through_the_cli(cnnmod_cli, tiny_model: Path, tiny_data: Path,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    from fixtures.cli import ok_json

    store = tmp_path / "compact"
    made = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", store, "--method", "compact",
                              "--train-images", 64, "--json"))
    assert 0 < made["kept_parameters_mean"] < 0.5
    assert made["weights_dtype"] == "float16"  # the default
    tiny = load_dataset(tiny_data, progress=False)
    checked = made["held_out"]  # the whole test split: it is smaller than the check's limit
    assert checked["images"] == len(tiny.test.labels) and checked["engine"] == "exact"
    assert checked["below_parent"] == (checked["composed"]["top1"] < checked["parent"]["top1"] - 0.01)
    cost = made["cost"]
    assert cost["fine_tune_images"] == 64 and cost["energy"]["kwh"] > 0
    assert cost["parent_training"]["epochs"] == 200 and cost["fraction_of_parent_training_energy"] > 0
    epoch = cost["parent_training"]
    assert epoch["measure"] == "one whole epoch" and epoch["measured_images"] == epoch["epoch_images"] > 0
    assert cost["parent_training"]["kwh"] == pytest.approx(200 * epoch["epoch_kwh"])
    result = ok_json(cnnmod_cli("evaluate", store, "--data", tiny_data, "--json"))
    assert result["engine"] == "exact" and set(result["engines"]) == {"exact"}
    assert result["kept_parameters_mean"] == pytest.approx(made["kept_parameters_mean"])
    assert set(result["seconds"]) >= {"parent", "composed"}
    assert result["composed"]["top1"] == result["engines"]["exact"]["top1"]
    shown = ok_json(cnnmod_cli("inspect", store, "--json"))
    assert shown["provenance"]["cost"] == cost and shown["provenance"]["held_out"] == checked
    text = cnnmod_cli("inspect", store).stdout
    assert f"check on {checked['images']} test images: composed top-1 " \
           f"{checked['composed']['top1']:.4f}, parent {checked['parent']['top1']:.4f}" in text
    assert f"cost: {cost['images_seen']} images seen" in text
    assert f"= {cost['fraction_of_parent_training_energy']:.2%} of training the parent for 200 epochs" in text
    assert "training epoch measured as one whole epoch" in text
    manifest = json.loads((store / "manifest.json").read_text())
    for held_out in ({"images": 3}, [1], {"images": "3", "composed": {"top1": 1}, "parent": {"top1": 1}}):
        (store / "manifest.json").write_text(json.dumps({**manifest, "provenance": {**manifest["provenance"],
                                                                                     "held_out": held_out}}))
        shown_edited = cnnmod_cli("inspect", store)
        assert shown_edited.exit_code == 0 and "check on test images: not shown (provenance.held_out is" \
            in shown_edited.stdout
    for field, edit in (("seconds", "soon"), ("energy", {"kwh": [1]}), ("parent_training", 3), ("energy", "x")):
        edited = copy.deepcopy(manifest)
        edited["provenance"]["cost"][field] = edit
        (store / "manifest.json").write_text(json.dumps(edited))
        shown_edited = cnnmod_cli("inspect", store)  # a hand-edited record is named, not a traceback
        named = f"{field}.kwh" if isinstance(edit, dict) else field
        assert shown_edited.exit_code == 0 and f"cost: not shown (provenance.cost.{named} is" in shown_edited.stdout
    (store / "manifest.json").write_text(json.dumps(manifest))
    module = shown["modules"][0]
    assert module["standalone"] and 0 < module["parameters_fraction"] < 0.5 and 0 < module["macs_fraction"] < 1
    assert 0 < module["file_bytes_fraction"] < 1
    assert module["file_bytes"] == (store / "modules" / "0000.net.safetensors").stat().st_size
    paper = ok_json(cnnmod_cli("evaluate", tmp_path / "compact", "--data", tiny_data, "--json", "--classes",
                               ",".join(made["classes"][:2])))
    assert paper["engine"] == "exact" and len(paper["modules"]) == 2


@pytest.mark.parametrize("tolerance", [-1.0, 1.0])
def test_decompose_warns_when_the_composed_modules_fall_below_the_parent_on_test_images(  # type: ignore[no-untyped-def]
        cnnmod_cli, tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch, tolerance: float) -> None:
    """The check's verdict (with a tolerance that always or never warns) reaches stderr as one warning line, and
    the text output names the check either way."""
    from cnnmod.workflows import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "HELD_OUT_TOLERANCE", tolerance)
    result = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "s", "--train-images", 32)
    assert result.exit_code == 0, result.stderr
    assert "check on " in result.stdout and " test images: composed top-1 " in result.stdout
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: the composed modules'")]
    assert len(warned) == (1 if tolerance < 0 else 0)
    if warned:
        assert "points below the parent's on" in warned[0] and "--method paper" in warned[0]


def test_a_prefix_all_modules_share_runs_once_with_identical_outputs(parent) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from cnnmod.engine.engines import common_prefix

    plan = ch.channel_plan(parent.model)
    stem, a, c, d = spaces(parent, plan)
    keeps = [{**k, stem: torch.tensor([0, 3]), a: torch.tensor([1])} for k in hand_keeps(parent, plan)]
    hw, hb = heads()
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    assert common_prefix(nets, (1, 4, 4)) == "relu_2"  # the stage-1 output: stem, conv_a, conv_b are shared
    compact = CompactNets(plan, tuple(keeps), tuple(nets), input_shape=(1, 4, 4), base=parent.model.graph)
    x = images()
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets], 1)
        for batching in ("grouped", "each"):
            runner = dataclasses.replace(compact, batching=batching).runner(hw, hb, torch.device("cpu"))
            assert torch.equal(runner(x), alone)
        with torch.no_grad():
            nets[1].get_submodule("conv_a").weight.add_(1)  # no longer shared: stem only
        assert common_prefix(nets, (1, 4, 4)) == "relu"
        alone = torch.stack([net(x) for net in nets], 1)
        for batching in ("grouped", "each"):
            runner = dataclasses.replace(compact, batching=batching).runner(hw, hb, torch.device("cpu"))
            assert torch.equal(runner(x), alone)


def test_a_runner_is_built_once_and_rebuilt_when_its_weights_or_heads_change(parent) -> None:  # type: ignore[no-untyped-def]
    plan = ch.channel_plan(parent.model)
    stem, a, c, d = spaces(parent, plan)
    keeps = [{**k, stem: torch.tensor([0, 3]), a: torch.tensor([1])} for k in hand_keeps(parent, plan)]
    hw, hb = heads()
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    compact = CompactNets(plan, tuple(keeps), tuple(nets), input_shape=(1, 4, 4), base=parent.model.graph)
    cpu, x = torch.device("cpu"), images()

    def alone() -> torch.Tensor:
        return torch.stack([net(x) for net in nets], 1)

    with torch.no_grad():
        first = compact.runner(hw, hb, cpu)
        assert compact.runner(hw.clone(), hb.clone(), cpu) is first  # equal heads, same weights: kept
        nets[2].get_submodule("conv_d").weight.add_(1)  # changed in place: rebuilt, with the new weights
        changed = compact.runner(hw, hb, cpu)
        assert changed is not first and torch.equal(changed(x), alone())
        other = hw.clone()
        other[0, 0, 1] += 1  # another head for module 0: rebuilt, and module 0 reads it
        with_head = compact.runner(other, hb, cpu)
        assert with_head is not changed and not torch.equal(with_head(x)[:, 0], changed(x)[:, 0])
        assert torch.equal(with_head(x)[:, 1:], changed(x)[:, 1:])
        logits = parent.logits(x.numpy())
        parent.model.graph.get_submodule("head").bias.add_(1)
        assert torch.equal(parent.logits(x.numpy()), logits + 1)  # the parent's too
        parent.model.graph.get_submodule("head").bias.sub_(1)


def test_modules_kept_as_float16_take_half_the_bytes_and_load_as_they_ran(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    plan = ch.channel_plan(parent.model)
    keeps = hand_keeps(parent, plan)
    hw, hb = heads()
    nets = [ch.materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    with torch.no_grad():  # a trained model's weights are not integers: thirds are not float16 values
        for net in nets:
            for p in net.parameters():
                p.mul_(1 / 3)
    full = module_set(parent, plan, keeps, nets, range(3))
    half = module_set(parent, plan, keeps, nets, range(3), weights_dtype="float16")
    assert half.compact is not None and half.compact.weights_dtype == "float16"
    for a, b in zip(full.compact.nets, half.compact.nets, strict=True):  # type: ignore[union-attr]
        for (name, wa), (_, wb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert wb.dtype == torch.float32 and torch.equal(wb.half().float(), wb), name
            assert torch.allclose(wa, wb, rtol=1e-3, atol=0)
    x = images().numpy()
    assert not torch.equal(full.logits(x), half.logits(x))  # rounding changed the weights ...
    assert torch.allclose(full.logits(x), half.logits(x), rtol=1e-2, atol=1e-2)  # ... by float16's precision

    p32, p16 = save_store(tmp_path / "f32", full), save_store(tmp_path / "f16", half)
    loaded = load_store(p16).modules
    assert loaded.compact is not None and loaded.compact.weights_dtype == "float16"
    assert torch.equal(loaded.logits(x), half.logits(x))  # the store runs what was made
    manifest = json.loads((p16 / "manifest.json").read_text())
    assert manifest["compact"]["weights_dtype"] == "float16"
    for m32, m16 in zip(json.loads((p32 / "manifest.json").read_text())["modules"], manifest["modules"], strict=True):
        with safe_open(str(p32 / m32["network"]["file"]), "pt") as f32, \
                safe_open(str(p16 / m16["network"]["file"]), "pt") as f16:
            assert set(f32.keys()) == set(f16.keys())
            for key in f32.keys():
                assert f16.get_tensor(key).dtype == torch.float16
                assert f16.get_tensor(key).nbytes * 2 == f32.get_tensor(key).nbytes
    entry = manifest["modules"][0]["network"]
    net, _, _ = load_module_network(p16 / entry["file"])  # standalone, back in float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(net(torch.from_numpy(x)), half.logits(x)[:, 0])
    again = save_store(tmp_path / "again", loaded)  # a loaded store saves as it was: the same files
    for m in manifest["modules"]:
        assert sha256_file(again / m["network"]["file"]) == m["network"]["sha256"]


def test_weights_beyond_float16s_range_are_refused_naming_the_tensor(parent) -> None:  # type: ignore[no-untyped-def]
    from cnnmod.engine.engines import rounded_weights

    plan = ch.channel_plan(parent.model)
    net = ch.materialize(parent.model.graph, plan, hand_keeps(parent, plan)[0], *[h[0] for h in heads()])
    with torch.no_grad():
        net.get_submodule("conv_a").weight.mul_(1e5)
    with pytest.raises(CnnmodError, match=r"conv_a\.weight of module 2 .*float32"):
        rounded_weights(net, "float16", "module 2")
    with pytest.raises(CnnmodError, match="unknown weights dtype 'int8'"):
        rounded_weights(net, "int8")


def test_a_store_naming_an_unknown_weights_dtype_is_refused(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = compact_store(parent, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["compact"]["weights_dtype"] = "int4"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="weights dtype 'int4'"):
        load_store(path)


def test_decompose_keeps_compact_weights_as_float16_when_asked(cnnmod_cli, tiny_model: Path, tiny_data: Path,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    from fixtures.cli import ok_json

    made = {}
    for dtype in ("float32", "float16"):
        made[dtype] = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / dtype,
                                         "--method", "compact", "--train-images", 32, "--weights-dtype", dtype,
                                         "--training-epoch", "steps", "--json"))
        assert made[dtype]["weights_dtype"] == dtype
        assert made[dtype]["cost"]["parent_training"]["measure"] == "median of 10 steps"
    shown = {d: ok_json(cnnmod_cli("inspect", tmp_path / d, "--json"))["modules"] for d in made}
    for full, half in zip(shown["float32"], shown["float16"], strict=True):
        assert half["weights_dtype"] == "float16" and half["parameters"] == full["parameters"]
        assert half["file_bytes_with_prefix"] < full["file_bytes_with_prefix"]
    for name in ("0000.net.safetensors", "prefix.net.safetensors"):  # the weights take half the bytes
        full_bytes, half_bytes = (sum(t.nbytes for t in load_safetensors(tmp_path / d / "modules" / name)[0].values())
                                  for d in made)
        assert half_bytes * 2 == full_bytes
    scores = {d: ok_json(cnnmod_cli("evaluate", tmp_path / d, "--data", tiny_data, "--json"))["composed"]["top1"]
              for d in made}
    assert abs(scores["float16"] - scores["float32"]) <= 0.05


@pytest.mark.parametrize("method, option, value", [("paper", "--train-images", "10"),
                                                    ("paper", "--weights-dtype", "float16"),
                                                    ("paper", "--training-epoch", "steps"),
                                                    ("compact", "--rho", "0.1"),
                                                    ("compact", "--samples-per-class", "5")])
def test_an_option_of_the_other_method_is_refused_not_ignored(cnnmod_cli, tiny_model: Path, tiny_data: Path,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path, method: str, option: str,
                                                              value: str) -> None:
    from fixtures.cli import assert_usage_error

    other = "compact" if method == "paper" else "paper"
    assert_usage_error(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "s",
                                  "--method", method, option, value),
                       f"{option} applies to --method {other} only")
    assert not (tmp_path / "s").exists()


def test_auto_takes_the_method_whose_options_are_given_else_compact_up_to_its_class_limit() -> None:
    from cnnmod.cli.decompose import COMPACT_MOST_CLASSES, auto_method

    none: dict[str, list[str]] = {"paper": [], "compact": []}
    assert auto_method(none, 10)[0] == "compact"
    assert auto_method(none, COMPACT_MOST_CLASSES)[0] == "compact"
    assert auto_method(none, COMPACT_MOST_CLASSES + 1)[0] == "paper"
    assert auto_method({"paper": ["--rho"], "compact": []}, 10) == ("paper", "paper, for --rho")
    assert auto_method({"paper": [], "compact": ["--train-images"]}, 500)[0] == "compact"


def test_decompose_without_a_method_says_which_it_took_and_why(cnnmod_cli, tiny_model: Path, tiny_data: Path,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    from cnnmod.storage.store import load_store
    from fixtures.cli import assert_usage_error, ok_json

    paper = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "p",
                               "--samples-per-class", 5, "--json"))
    assert paper["method"] == "paper" and paper["chosen_by"] == "paper, for --samples-per-class"
    assert load_store(tmp_path / "p").modules.compact is None
    compact = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "c",
                                 "--train-images", 0, "--training-epoch", "steps", "--json"))
    assert compact["method"] == "compact" and compact["chosen_by"] == "compact, for --train-images"
    assert load_store(tmp_path / "c").modules.compact is not None
    assert load_store(tmp_path / "c").provenance["chosen_by"] == "compact, for --train-images"
    shown = cnnmod_cli("inspect", tmp_path / "c")
    assert "method: --method auto took compact, for --train-images" in shown.stdout
    text = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "t", "--train-images", 0,
                      "--training-epoch", "steps")
    assert text.exit_code == 0 and "(--method auto: compact, for --train-images)" in text.stdout
    assert_usage_error(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "both",
                                  "--rho", "0.1", "--train-images", 0),
                       "--rho is an option of --method paper and --train-images of --method compact")
    assert not (tmp_path / "both").exists()


def test_a_store_of_float32_modules_converts_to_float16_and_runs_what_it_stored(parent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from cnnmod.engine.compact import stored_as

    _, modules = compact_store(parent, tmp_path)
    with torch.no_grad():  # weights and heads that float16 does not hold
        for n in modules.compact.nets:  # type: ignore[union-attr]
            for p in n.parameters():
                p.mul_(1 / 3)
        hw, hb = modules.head_weight / 3, modules.head_bias / 3
    modules = dataclasses.replace(modules, head_weight=hw, head_bias=hb)
    half = stored_as(modules, "float16")
    assert torch.equal(half.head_weight, hw.half().float()) and not torch.equal(half.head_weight, hw)
    loaded = load_store(save_store(tmp_path / "half", half)).modules
    x = images().numpy()
    assert torch.equal(loaded.logits(x), half.logits(x))
    with pytest.raises(CnnmodError, match="only compact modules"):
        stored_as(masked(parent, ch.channel_plan(parent.model), hand_keeps(parent, ch.channel_plan(parent.model)),
                         *heads()), "float16")


@pytest.mark.parametrize(("modules", "groups"), [(10, 2), (3, 2), (1, 2), (7, 4), (2, 5)])
def test_module_groups_are_contiguous_runs_of_near_equal_size(modules: int, groups: int) -> None:
    runs = module_groups(modules, groups)
    assert [i for run in runs for i in run] == list(range(modules))
    assert len(runs) == min(modules, groups) and all(runs)
    assert max(map(len, runs)) - min(map(len, runs)) <= 1


@pytest.mark.parametrize("most", [0.5, 1e6])
def test_clip_gradients_is_torchs_norm_clipping(most: float) -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in ((4, 3), (7,), (2, 2, 3))]
    for p in params:
        p.grad = torch.randn_like(p)
    unused = nn.Parameter(torch.randn(3))  # no gradient: left out, as torch leaves it out
    expected = [copy.deepcopy(p.grad) for p in params]
    reference = [nn.Parameter(torch.zeros_like(g)) for g in expected]
    for r, g in zip(reference, expected, strict=True):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, most)
    clip_gradients([*params, unused], most)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, r.grad)
    assert unused.grad is None
    if most < 1:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        assert total.item() == pytest.approx(most, rel=1e-5)


def test_keep_fractions_shrink_past_ten_classes_so_that_all_modules_cost_what_ten_do() -> None:
    from cnnmod.engine.compact import REFERENCE_CLASSES, CompactConfig

    base = CompactConfig()
    for k in (1, 2, REFERENCE_CLASSES):
        assert base.for_classes(k) == base
    for k in (11, 202, 1000):
        shrunk = base.for_classes(k)
        assert shrunk.stream_keep < base.stream_keep and shrunk.inner_keep < base.inner_keep
        assert k * shrunk.stream_keep * shrunk.inner_keep == pytest.approx(
            REFERENCE_CLASSES * base.stream_keep * base.inner_keep)
