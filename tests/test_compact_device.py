"""Compact decomposition on a device: the fine-tune runs there, the modules come back to the CPU, and a fine-tune
that fails midway leaves no network behind on the device or in training mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.data import load_dataset
from cnnmod.engine import compact as compact_module
from cnnmod.engine.compact import CompactConfig, compact_decompose, module_set, training_epoch_cost
from cnnmod.storage.models_in import ModelSource, open_model
from cnnmod.workflows.evaluate import evaluate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def parent_and_data(tiny_model: Path, tiny_data: Path):  # type: ignore[no-untyped-def]
    return open_model(ModelSource(str(tiny_model))), load_dataset(tiny_data, progress=False)


def _on_cpu(nets) -> bool:  # type: ignore[no-untyped-def]
    tensors = [t for net in nets for t in (*net.parameters(), *net.buffers())]
    return all(t.device.type == "cpu" for t in tensors) and not any(net.training for net in nets)


def test_a_fine_tune_that_fails_midway_hands_back_every_network_on_the_cpu_for_inference(  # type: ignore[no-untyped-def]
        parent_and_data, monkeypatch) -> None:
    parent, data = parent_and_data
    trained: list = []
    real_fine_tune, real_loss = compact_module._fine_tune, compact_module.vote_loss
    steps = []

    def keep_networks(parent, trunk, nets, *args, **kwargs):  # type: ignore[no-untyped-def]
        trained.extend([trunk, *nets])
        return real_fine_tune(parent, trunk, nets, *args, **kwargs)

    def fails_at_the_third_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("out of memory")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(compact_module, "_fine_tune", keep_networks)
    monkeypatch.setattr(compact_module, "vote_loss", fails_at_the_third_step)
    config = CompactConfig(train_images=64, batch_size=8, importance_per_class=4, recalibrate_images=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        compact_decompose(parent, data.train.images, data.train.labels, config)
    assert len(steps) == 3 and trained and _on_cpu(trained)
    assert all(p.is_contiguous() for net in trained for p in net.parameters())


@needs_cuda
@pytest.mark.parametrize("cache_prefix", [True, False])
def test_compact_modules_fine_tuned_on_cuda_match_those_of_the_cpu(parent_and_data, cache_prefix: bool) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    config = CompactConfig(train_images=2 * 2 * len(data.train.images), batch_size=16, importance_per_class=8,
                           cache_prefix=cache_prefix)
    results = {}
    for device in ("cpu", "cuda"):
        made = compact_decompose(parent, data.train.images, data.train.labels, config, device=device)
        assert _on_cpu(made.nets)
        modules = module_set(parent, made.plan, list(made.keeps), list(made.nets), list(range(parent.num_classes)))
        results[device] = evaluate(modules, data.test.images, data.test.labels, progress=False, device="cpu")
    cpu, cuda = (results[d].composed[results[d].scoring].top1 for d in ("cpu", "cuda"))
    # the same seeded batches and augmentations; only the kernels' float rounding differs
    assert abs(cpu - cuda) <= 0.1, (cpu, cuda)


@needs_cuda
def test_the_parent_training_epoch_is_measured_on_cuda(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    before = {k: v.clone() for k, v in parent.model.graph.state_dict().items()}
    epoch = training_epoch_cost(parent, data.train.images, data.train.labels, "steps", steps=3, batch_size=8,
                                device="cuda")
    assert epoch["epoch_seconds"] > 0 and epoch["epoch_kwh"] > 0
    after = parent.model.graph.state_dict()
    assert all(torch.equal(v, after[k]) and after[k].device.type == "cpu" for k, v in before.items())
    assert np.isfinite(epoch["epoch_kwh"])
