"""A shared prefix narrowed for the decomposed classes (`--prefix-keep`): chosen for them, trained, shared.

On a real (tiny, trained) model: how the narrowed prefix is chosen and stored, what the fine-tune reads, and
what the feature hint does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.data import load_dataset
from cnnmod.engine import compact as compact_module
from cnnmod.engine.channels import split_at
from cnnmod.engine.compact import CompactConfig, choose_cut, compact_decompose, prefix_spaces
from cnnmod.engine.engines import common_prefix
from cnnmod.errors import CnnmodError
from cnnmod.storage.models_in import ModelSource, open_model
from cnnmod.storage.store import load_store
from fixtures.cli import ok_json


@pytest.fixture(scope="module")
def parent_and_data(tiny_model: Path, tiny_data: Path):  # type: ignore[no-untyped-def]
    data = load_dataset(tiny_data, progress=False)
    return open_model(ModelSource(str(tiny_model))), data


def test_the_narrowed_prefix_defaults_are_those_measured() -> None:
    narrowed = CompactConfig(seed=3).with_prefix_keep(0.3)
    assert (narrowed.prefix_keep, narrowed.freeze_prefix, narrowed.lr, narrowed.train_images, narrowed.seed) == \
        (0.3, False, 0.004, 100_000, 3)
    assert narrowed.hint_weight == 5.0
    whole = narrowed.with_prefix_keep(1.0)
    assert (whole.prefix_keep, whole.freeze_prefix) == (1.0, True)


@pytest.mark.parametrize(("arch", "size", "channels", "by_macs", "by_either"), [
    ("smallcnn", 28, 1, "features_2", "features_6"),  # convolutions: 91% of the MACs, 4.5% of the parameters
    ("resnet20", 32, 3, "relu_12", "relu_12"),  # two stages: 68% of the MACs, 24% of the parameters
    ("vgg", 32, 3, "features_17", "features_17"),
])
def test_the_shared_prefix_ends_after_two_thirds_of_the_macs_or_a_quarter_of_the_parameters(
        arch: str, size: int, channels: int, by_macs: str, by_either: str) -> None:
    from cnnmod.engine.inputs import InputSpec
    from cnnmod.engine.modules import Parent
    from cnnmod.zoo import create_model

    model = create_model(arch, num_classes=10, in_channels=channels, seed=0).eval()
    parent = Parent.from_model(model, InputSpec.default((size, size), channels), [str(i) for i in range(10)], arch)
    assert choose_cut(parent, CompactConfig()) == by_either
    assert choose_cut(parent, CompactConfig(shared_prefix_parameters=0.0)) == by_macs
    assert choose_cut(parent, CompactConfig(shared_prefix=0.0)) is None  # nothing shared
    assert CompactConfig.from_json({"shared_prefix": 0.68}).shared_prefix_parameters == 0.0  # a record from before
    with pytest.raises(CnnmodError, match="fractions must be in"):
        CompactConfig(shared_prefix_parameters=1.5)


def test_a_pair_with_a_narrowed_prefix_is_smaller_and_its_prefix_runs_once(cnnmod_cli, tiny_model: Path,  # type: ignore[no-untyped-def]
                                                                         tiny_data: Path, tmp_path: Path) -> None:
    kept = {}
    for keep in (1.0, 0.5):
        store = tmp_path / f"pair{keep}"
        made = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", store, "--method",
                                  "compact", "--classes", "red,green", "--prefix-keep", keep, "--train-images", 60,
                                  "--json"))
        assert made["config"]["prefix_keep"] == keep and made["config"]["freeze_prefix"] == (keep == 1.0)
        kept[keep] = made["kept_parameters_mean"]
        modules = load_store(store).modules
        compact = modules.compact
        assert compact is not None and compact.shared is None
        parent = modules.parent
        plan = compact.plan
        common = [sp for sp in prefix_spaces(parent, plan, choose_cut(parent, CompactConfig()))
                  if plan.spaces[sp].prunable]
        assert common, "the tiny model has a shared prefix"
        for space in common:
            first = compact.keeps[0][space]
            assert len(first) == max(1, round(keep * plan.spaces[space].size))
            assert all(torch.equal(k[space], first) for k in compact.keeps)
        assert common_prefix(list(compact.nets), tuple(parent.model.input_shape)) is not None
        result = ok_json(cnnmod_cli("evaluate", store, "--data", tiny_data, "--json"))
        assert result["composed"]["top1"] > 0.5  # two classes, trained on 60 images: better than a coin
    assert kept[0.5] < kept[1.0]


def test_the_fine_tune_reads_only_the_decomposed_classes(parent_and_data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    seen_labels = []
    real = compact_module.fine_tune

    def spy(parent, nets, images, labels, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen_labels.append(np.unique(labels).tolist())
        return real(parent, nets, images, labels, *args, **kwargs)

    monkeypatch.setattr(compact_module, "fine_tune", spy)
    config = CompactConfig(train_images=16, importance_per_class=4, recalibrate_images=0)
    compact_decompose(parent, data.train.images, data.train.labels, config, [0, 2])
    compact_decompose(parent, data.train.images, data.train.labels, config)
    assert seen_labels == [[0, 2], [0, 1, 2]]


def _hint_distance(parent, data, hint_weight: float) -> float:  # type: ignore[no-untyped-def]
    config = replace(CompactConfig(importance_per_class=8, recalibrate_images=0, augment=False).with_prefix_keep(0.5),
                     train_images=600, hint_weight=hint_weight)
    result = compact_decompose(parent, data.train.images, data.train.labels, config, [0, 1])
    cut = choose_cut(parent, config)
    assert cut is not None
    kept = result.keeps[0][result.plan.space_of[cut]]
    x = parent.input_spec.prepare(data.test.images)
    with torch.no_grad():
        ours = split_at(result.nets[0], cut)[0](x)
        theirs = split_at(parent.model.graph, cut)[0](x)[:, kept]
    return float(torch.nn.functional.mse_loss(ours, theirs))


def test_the_feature_hint_pulls_the_narrowed_prefix_towards_the_parents_channels(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    assert _hint_distance(parent, data, 10.0) < 0.5 * _hint_distance(parent, data, 0.0)


def test_the_prefix_all_modules_share_is_stored_once_and_each_module_file_names_it(cnnmod_cli, tiny_model: Path,  # type: ignore[no-untyped-def]
                                                                               tiny_data: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from safetensors import safe_open

    from cnnmod.errors import StoreError
    from cnnmod.storage.compactstore import load_module_network, save_network

    store = tmp_path / "s"
    ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", store, "--method", "compact",
                       "--train-images", 60, "--json"))
    manifest = json.loads((store / "manifest.json").read_text())
    prefix = manifest["compact"]["prefix"]
    assert prefix is not None and (store / prefix["file"]).stat().st_size == prefix["bytes"]
    with safe_open(str(store / prefix["file"]), "pt") as f:
        prefix_keys = set(f.keys())
    modules = load_store(store).modules
    x = modules.parent.input_spec.prepare(load_dataset(tiny_data, progress=False).test.images[:8])
    for i, entry in enumerate(manifest["modules"]):
        module_file = store / entry["network"]["file"]
        with safe_open(str(module_file), "pt") as f:
            assert prefix_keys.isdisjoint(f.keys()) and f.keys()  # the module's own layers only
        net, _, _ = load_module_network(module_file)  # its file and the prefix file: no parent
        with torch.no_grad():
            assert torch.equal(net(x), modules.compact.nets[i](x))
    # the prefix once: every module file is smaller than the same network written whole
    whole = tmp_path / "whole.safetensors"
    save_network(whole, modules.compact.nets[0], modules.compact.keeps[0], "f", tuple(x.shape[1:]))
    assert (store / manifest["modules"][0]["network"]["file"]).stat().st_size < whole.stat().st_size
    shown = ok_json(cnnmod_cli("inspect", store, "--json"))["modules"][0]
    assert shown["file_bytes_with_prefix"] == shown["file_bytes"] + prefix["bytes"]
    assert shown["file_bytes_fraction"] < shown["file_bytes_with_prefix_fraction"] < 1

    # a module file copied without its prefix file, or a prefix file that changed: one line naming the file
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(store / manifest["modules"][0]["network"]["file"], alone / "m.safetensors")
    with pytest.raises(StoreError, match="prefix.net.safetensors, which is missing"):
        load_module_network(alone / "m.safetensors")
    data = bytearray((store / prefix["file"]).read_bytes())
    data[-1] ^= 1
    (store / prefix["file"]).write_bytes(bytes(data))
    result = cnnmod_cli("evaluate", store, "--data", tiny_data)
    assert result.exit_code != 0 and "prefix.net.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("prefix_keep", [1.0, 0.5])
def test_the_grouped_fine_tune_trains_the_same_modules_as_one_network_after_another(parent_and_data,  # type: ignore[no-untyped-def]
                                                                                    prefix_keep: float) -> None:
    parent, data = parent_and_data
    before = {k: v.clone() for k, v in parent.model.graph.state_dict().items()}
    config = replace(CompactConfig(importance_per_class=8, recalibrate_images=32).with_prefix_keep(prefix_keep),
                     train_images=96, batch_size=32)
    x = parent.input_spec.prepare(data.test.images)
    outputs = {}
    for batching in ("grouped", "each"):
        result = compact_decompose(parent, data.train.images, data.train.labels, replace(config, batching=batching))
        assert all(p.is_contiguous() for net in result.nets for p in net.parameters())
        with torch.no_grad():
            outputs[batching] = torch.stack([net(x) for net in result.nets], 1)
    assert outputs["grouped"].abs().max() > 0.1
    torch.testing.assert_close(outputs["grouped"], outputs["each"], atol=1e-4, rtol=1e-4)
    after = parent.model.graph.state_dict()
    assert all(torch.equal(v, after[k]) and after[k].is_contiguous() for k, v in before.items())


def test_the_training_epoch_estimate_is_the_median_step_so_one_slow_step_does_not_move_it(parent_and_data,  # type: ignore[no-untyped-def]
                                                                                            monkeypatch) -> None:
    import time

    from cnnmod.workflows import train

    parent, data = parent_and_data
    quiet = compact_module.training_epoch_cost(parent, data.train.images, data.train.labels, "steps", steps=5,
                                               batch_size=8)
    assert quiet["epoch_images"] == len(data.train.images) and quiet["measured_images"] == 40
    assert quiet["measure"] == "median of 5 steps"
    calls = []
    real = train.augment_batch

    def one_slow_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 4:  # a measured step (after two warm-up steps) stalls for a second
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                pass
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "augment_batch", one_slow_step)
    slowed = compact_module.training_epoch_cost(parent, data.train.images, data.train.labels, "steps", steps=5,
                                                batch_size=8)
    steps_per_epoch = len(data.train.images) / 8
    assert slowed["epoch_seconds"] < quiet["epoch_seconds"] + 0.1 * steps_per_epoch  # the mean would add 0.2


def test_a_whole_training_epoch_is_measured_image_by_image_and_leaves_the_parent_as_it_was(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    before = {k: v.clone() for k, v in parent.model.graph.state_dict().items()}
    n = len(data.train.images)
    batch = 7 if n % 7 != 1 else 6  # a last, shorter batch
    seen: list[tuple[int, int]] = []
    epoch = compact_module.training_epoch_cost(parent, data.train.images, data.train.labels, batch_size=batch,
                                               progress=lambda done, total: seen.append((done, total)))
    assert epoch["measure"] == "one whole epoch"
    assert epoch["measured_images"] == epoch["epoch_images"] == n
    assert len(seen) == -(-n // batch) and seen[-1] == (n, n)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert epoch["epoch_seconds"] > 0 and epoch["epoch_kwh"] > 0
    after = parent.model.graph.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_a_last_batch_of_one_image_is_left_out_of_the_measured_epoch(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    images, labels = data.train.images[:17], data.train.labels[:17]
    epoch = compact_module.training_epoch_cost(parent, images, labels, batch_size=8)
    assert epoch["measured_images"] == 16 and epoch["epoch_images"] == 17


def test_an_unknown_training_epoch_measure_or_too_few_images_is_refused(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    with pytest.raises(CnnmodError, match="unknown training-epoch measure 'minutes'"):
        compact_module.training_epoch_cost(parent, data.train.images, data.train.labels, "minutes")
    with pytest.raises(CnnmodError, match="at least 2 training images"):
        compact_module.training_epoch_cost(parent, data.train.images[:1], data.train.labels[:1])
    with pytest.raises(CnnmodError, match="got 0 steps of 128"):
        compact_module.training_epoch_cost(parent, data.train.images, data.train.labels, "steps", steps=0)
