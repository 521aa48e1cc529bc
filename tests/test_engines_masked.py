"""The shared engine of modules that mask their parent: one pass of the parent under the union of the masks, every
head reading those features; and how `evaluate` chooses between it and the exact engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cnnmod.errors import CnnmodError
from cnnmod.workflows import evaluate as evaluation
from cnnmod.workflows.evaluate import evaluate
from fixtures.nets import grey_parent, random_modules


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 1, 6, 6)).astype(np.float32)


def test_the_shared_engine_is_every_module_reading_the_union_masked_network() -> None:
    modules = random_modules(grey_parent(), keep=0.6)
    union = {name: m.any(0, keepdim=True).expand_as(m).clone() for name, m in modules.masks.items()}
    every_module_on_the_union = dataclasses.replace(modules, masks=union)  # exact engine, each mask the union
    x = images(20)
    shared = modules.with_engine("shared").logits(x)
    assert shared.shape == (20, len(modules), 2)
    assert torch.allclose(shared, every_module_on_the_union.logits(x), atol=1e-5)
    assert not torch.allclose(shared, modules.logits(x), atol=1e-3)  # the masks differ: so do the votes' inputs


def test_one_module_alone_is_the_same_under_both_engines() -> None:
    modules = random_modules(grey_parent(), keep=0.6)
    one = modules.select([modules.class_names[2]])
    x = images(16)
    assert torch.allclose(one.with_engine("shared").logits(x), one.logits(x), atol=1e-5)


def test_select_keeps_the_engine_and_an_unknown_engine_is_refused() -> None:
    modules = random_modules(grey_parent()).with_engine("shared")
    assert modules.select(list(modules.class_names[:2])).engine == "shared"
    with pytest.raises(CnnmodError, match="unknown engine 'fast'"):
        modules.with_engine("fast")


def test_auto_runs_both_engines_on_few_modules_and_reports_them_side_by_side() -> None:
    modules = random_modules(grey_parent(), keep=0.6)
    x, labels = images(40), np.arange(40) % len(modules)
    result = evaluate(modules, x, labels, progress=False, with_parameters=False)
    assert set(result.engines) == {"exact", "shared"} and result.exact_agreement is None
    exact = result.engines["exact"]["top1"]
    if result.engine == "shared":
        assert abs(result.engines["shared"]["top1"] - exact) <= 0.001
    assert result.composed[result.scoring].top1 == result.engines[result.engine]["top1"]
    forced = evaluate(modules, x, labels, progress=False, with_parameters=False, engine="exact")
    assert forced.engine == "exact" and set(forced.engines) == {"exact"}
    assert forced.composed[forced.scoring].top1 == exact


def test_auto_on_many_modules_runs_shared_and_checks_it_against_exact_on_a_sample(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "EXACT_UP_TO", 2)
    monkeypatch.setattr(evaluation, "AGREEMENT_SAMPLE", 10)
    modules = random_modules(grey_parent(), keep=0.6)
    x, labels = images(30), np.arange(30) % len(modules)
    result = evaluate(modules, x, labels, progress=False, with_parameters=False)
    assert result.engine == "shared" and set(result.engines) == {"shared"}
    agreement = result.exact_agreement
    assert agreement is not None and agreement["images"] == 10
    exact = modules.logits(x[:10]).softmax(-1)[..., 0].argmax(1)
    shared = modules.with_engine("shared").logits(x[:10]).softmax(-1)[..., 0].argmax(1)
    assert agreement["same_vote"] == pytest.approx(float((exact == shared).float().mean()))
