"""The prefix cache of a compact fine-tune: the frozen prefix's output computed once per training image and its
mirror image, then translated at each step instead of recomputed (CompactConfig.cache_prefix)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cnnmod.data import load_dataset
from cnnmod.engine import compact as compact_module
from cnnmod.engine.channels import split_at
from cnnmod.engine.compact import CompactConfig, choose_cut, compact_decompose, prefix_cache, teacher_graph
from cnnmod.storage.models_in import ModelSource, open_model
from cnnmod.workflows.evaluate import evaluate
from cnnmod.workflows.train import augment_batch


@pytest.fixture(scope="module")
def parent_and_data(tiny_model: Path, tiny_data: Path):  # type: ignore[no-untyped-def]
    data = load_dataset(tiny_data, progress=False)
    return open_model(ModelSource(str(tiny_model))), data


def _prefix(parent):  # type: ignore[no-untyped-def]
    cut = choose_cut(parent, CompactConfig())
    assert cut is not None, "the tiny model has a shared prefix"
    return split_at(teacher_graph(parent), cut)[0].eval()


def test_the_cache_holds_the_prefix_of_each_image_and_of_its_mirror_image(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    images = data.train.images[:40]
    prefix = _prefix(parent)
    cache = prefix_cache(parent, prefix, images, CompactConfig(train_images=4 * len(images)))
    assert cache is not None and cache.dtype == torch.float16 and cache.shape[:2] == (40, 2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        plain, mirrored = (prefix(parent.input_spec.prepare(v)) for v in (x, x.flip(3)))
    assert not torch.allclose(plain, mirrored)  # the mirror image is a different input to the prefix
    torch.testing.assert_close(cache[:, 0].float(), plain, rtol=1e-3, atol=1e-3)  # float16 rounding only
    torch.testing.assert_close(cache[:, 1].float(), mirrored, rtol=1e-3, atol=1e-3)
    unaugmented = prefix_cache(parent, prefix, images, CompactConfig(train_images=2 * len(images), augment=False))
    assert unaugmented is not None and unaugmented.shape[1] == 1
    torch.testing.assert_close(unaugmented[:, 0], cache[:, 0])


def test_no_cache_where_it_would_not_pay_or_not_fit(parent_and_data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    images = data.train.images[:40]
    prefix = _prefix(parent)
    assert prefix_cache(parent, prefix, images, CompactConfig(train_images=4 * 40 - 1)) is None  # seen < twice each
    assert prefix_cache(parent, prefix, images, CompactConfig(train_images=2 * 40, augment=False)) is not None
    monkeypatch.setattr(compact_module, "CACHE_MAX_BYTES", 1000)
    assert prefix_cache(parent, prefix, images, CompactConfig(train_images=10_000)) is None


def test_a_crop_without_flips_only_translates_with_zero_fill() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) + 1
    out = augment_batch(x, 1, torch.Generator().manual_seed(0), flips=False)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        crops = [padded[i, :, r:r + 5, c:c + 5] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], crop) for crop in crops)
    assert torch.equal(augment_batch(x, 0, torch.Generator(), flips=False), x)


def test_a_cached_fine_tune_counts_the_cache_is_seeded_and_learns_as_the_uncached_one(parent_and_data, monkeypatch  # type: ignore[no-untyped-def]
                                                                                      ) -> None:
    parent, data = parent_and_data
    n = len(data.train.images)
    config = CompactConfig(train_images=4 * n, importance_per_class=8, recalibrate_images=64)
    calls = []
    real = compact_module.prefix_cache
    monkeypatch.setattr(compact_module, "prefix_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = compact_decompose(parent, data.train.images, data.train.labels, config)
    again = compact_decompose(parent, data.train.images, data.train.labels, config)
    uncached = compact_decompose(parent, data.train.images, data.train.labels, replace(config, cache_prefix=False))
    assert len(calls) == 2, "the cache is not even tried when it is switched off"
    assert cached.cost.prefix_cache_images == 2 * n and uncached.cost.prefix_cache_images == 0
    assert cached.cost.train_images == uncached.cost.train_images == 4 * n
    record = compact_module.cost_record(cached.cost, {"kwh": 1e-6}, {"epoch_kwh": 1e-6, "epoch_images": n})
    assert record["images_seen"] == cached.cost.importance_images + 2 * n + 4 * n
    for a, b in zip(cached.nets, again.nets, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    accuracy = {}
    for name, result in (("cached", cached), ("uncached", uncached)):
        modules = compact_module.module_set(parent, result.plan, list(result.keeps), list(result.nets),
                                            list(range(parent.num_classes)), config.to_json(), None, "exact")
        scores = evaluate(modules, data.test.images, data.test.labels, progress=False, with_parameters=False)
        accuracy[name], accuracy["parent"] = scores.composed["softmax"].top1, scores.parent.top1
    assert accuracy["cached"] >= min(accuracy["uncached"], accuracy["parent"]) - 0.05, accuracy


def test_the_cli_caches_the_prefix_of_a_long_fine_tune_and_records_it(cnnmod_cli, tiny_model: Path, tiny_data: Path,  # type: ignore[no-untyped-def]
                                                                      tmp_path: Path, monkeypatch) -> None:
    from cnnmod.cli import decompose_compact
    from fixtures.cli import ok_json

    n = len(load_dataset(tiny_data, progress=False).train.images)
    args = ("decompose", tiny_model, "--data", tiny_data, "--method", "compact", "--train-images", 4 * n,
            "--training-epoch", "steps")
    cost = ok_json(cnnmod_cli(*args, "--out", tmp_path / "quiet", "--json"))["cost"]
    assert cost["prefix_cache_images"] == 2 * n and cost["fine_tune_images"] == 4 * n
    assert cost["images_seen"] == cost["importance_images"] + 2 * n + 4 * n
    monkeypatch.setattr(decompose_compact, "show_progress", lambda progress=True: True)  # as on a terminal
    shown = cnnmod_cli(*args, "--out", tmp_path / "shown")
    assert shown.exit_code == 0, shown.stderr
    assert "computing the frozen prefix" in shown.stderr and "fine-tuning" in shown.stderr
