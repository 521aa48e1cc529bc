"""The compact method's channel importance: which images count for a class, and what it costs per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.data import load_dataset
from cnnmod.engine import compact as compact_module
from cnnmod.engine.channels import channel_plan
from cnnmod.engine.compact import CompactConfig, class_importance
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.errors import CnnmodError
from cnnmod.storage.models_in import ModelSource, open_model
from cnnmod.storage.store import load_store
from cnnmod.zoo import create_model
from fixtures.cli import ok_json


@pytest.fixture(scope="module")
def parent_and_data(tiny_model: Path, tiny_data: Path):  # type: ignore[no-untyped-def]
    return open_model(ModelSource(str(tiny_model))), load_dataset(tiny_data, progress=False)


def _one_image_at_a_time(parent: Parent, plan, images: np.ndarray, labels: np.ndarray,  # type: ignore[no-untyped-def]
                         classes: list[int]) -> dict[int, torch.Tensor]:
    """The own-and-rival importance, image by image with a backward pass each (the reference)."""
    sites = [s for s in parent.model.site_list("relu") if plan.space_of.get(s.name) in set(plan.prunable)]
    store: dict[str, torch.Tensor] = {}
    net = compact_module.with_taps(parent.model.graph,
                                   {s.name: compact_module._Keep(store, s.name) for s in sites}).eval()
    totals = [{s: torch.zeros(len(classes), plan.spaces[s].size, dtype=torch.float64) for s in plan.prunable}
              for _ in range(2)]
    counts = [np.zeros(len(classes)) for _ in range(2)]
    for image, label in zip(images, labels, strict=True):
        logits = net(parent.input_spec.prepare(image[None]).requires_grad_(True))[0]
        rival = max((c for c in range(len(logits)) if c != label), key=lambda c: float(logits[c].detach()))
        for which, c in enumerate((int(label), rival)):
            if c not in classes:
                continue
            others = torch.cat([logits[:c], logits[c + 1:]])
            margin = logits[c] - torch.logsumexp(others, 0)
            grads = torch.autograd.grad(margin, [store[s.name] for s in sites], retain_graph=True)
            for site, g in zip(sites, grads, strict=True):
                a = store[site.name].detach()
                score = (a * g).flatten(2).sum(2).abs()[0] if a.dim() > 2 else (a * g).abs()[0]
                totals[which][plan.space_of[site.name]][classes.index(c)] += score.double()
            counts[which][classes.index(c)] += 1
    return {s: sum((totals[w][s] / torch.tensor(np.maximum(counts[w], 1))[:, None] for w in range(2)),
                   torch.zeros(())).float() for s in plan.prunable}


@pytest.mark.parametrize("classes", [[0, 1, 2], [2, 0]])
def test_own_and_rival_importance_equals_the_image_by_image_reference(parent_and_data, classes: list[int]) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    plan = channel_plan(parent.model)
    pick = np.random.default_rng(0).choice(len(data.train.images), 24, replace=False)
    images, labels = data.train.images[pick], data.train.labels[pick]
    batched = class_importance(parent, plan, images, classes, batch_size=7, labels=labels)
    reference = _one_image_at_a_time(parent, plan, images, labels, classes)
    assert set(batched) == set(reference) == set(plan.prunable)
    for space in plan.prunable:
        assert batched[space].shape == (len(classes), plan.spaces[space].size)
        assert torch.allclose(batched[space], reference[space], rtol=1e-4, atol=1e-7), space


def test_own_and_rival_takes_two_backward_passes_a_batch_whatever_the_classes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = create_model("resnet20", num_classes=20, seed=0).eval()
    parent = Parent.from_model(model, InputSpec.default((16, 16), 3), [f"c{i}" for i in range(20)], "resnet20")
    plan = channel_plan(parent.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(20), 2)
    passes = []
    real = torch.autograd.grad

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    class_importance(parent, plan, images, list(range(20)), batch_size=16, labels=labels)
    assert len(passes) == 2 * 3  # three batches
    passes.clear()
    class_importance(parent, plan, images, list(range(20)), batch_size=16)
    assert len(passes) == 20 * 3


def test_the_importance_choice_is_checked_and_old_records_read_as_what_made_them() -> None:
    assert CompactConfig().importance == "own_and_rival"
    with pytest.raises(CnnmodError, match="importance must be one of"):
        CompactConfig(importance="some")
    recorded = CompactConfig().to_json()
    assert CompactConfig.from_json(recorded).importance == "own_and_rival"
    del recorded["importance"]  # a store written before the choice existed
    assert CompactConfig.from_json(recorded).importance == "every_image"


def test_decompose_records_the_importance_it_used_and_refuses_it_for_the_paper_method(  # type: ignore[no-untyped-def]
        cnnmod_cli, tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    made = {}
    for importance in ("own_and_rival", "every_image"):
        made[importance] = ok_json(cnnmod_cli(
            "decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / importance, "--method", "compact",
            "--importance", importance, "--train-images", 0, "--training-epoch", "steps", "--json"))
        assert made[importance]["config"]["importance"] == importance
        assert load_store(tmp_path / importance).modules.config["importance"] == importance
    refused = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", tmp_path / "paper",
                         "--method", "paper", "--importance", "every_image")
    assert refused.exit_code == 2 and "--importance applies to --method compact only" in refused.stderr
    assert not (tmp_path / "paper").exists()


def _recalibrated(parent: Parent, run_prefix_once: bool | None, skip: frozenset[str], images: np.ndarray):  # type: ignore[no-untyped-def]
    """Modules of every class, sharing the first layers up to the default cut, recalibrated on `images` (not with
    `run_prefix_once` None)."""
    from cnnmod.engine.channels import materialize
    from cnnmod.engine.decompose import channel_heads

    plan = channel_plan(parent.model)
    cut = compact_module.choose_cut(parent, CompactConfig())
    classes = list(range(parent.num_classes))
    importance = class_importance(parent, plan, images, classes)
    keeps = compact_module.choose_keeps(importance, plan, CompactConfig(),
                                        compact_module.prefix_spaces(parent, plan, cut))
    hw, hb = channel_heads(parent.model.head.weight, parent.model.head.bias, classes)
    nets = [materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
    x = parent.input_spec.prepare(images)
    with torch.no_grad():
        teacher = parent.model.graph(x)
    if run_prefix_once is not None:
        compact_module.recalibrate(parent, plan, keeps, nets, x, teacher, skip=skip,
                                   cut=cut if run_prefix_once else None)
    return [net.state_dict() for net in nets]


def test_recalibrating_after_a_frozen_prefix_run_once_changes_no_weight(parent_and_data) -> None:  # type: ignore[no-untyped-def]
    parent, data = parent_and_data
    plan = channel_plan(parent.model)
    cut = compact_module.choose_cut(parent, CompactConfig())
    assert cut is not None
    frozen = frozenset(compact_module.prefix_layers(parent, plan, cut))
    images = data.train.images[:48]
    once = _recalibrated(parent, True, frozen, images)
    each = _recalibrated(parent, False, frozen, images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(once, each, strict=True) for k in a)
    as_made = _recalibrated(parent, None, frozen, images)
    moved = {k for a, b in zip(once, as_made, strict=True) for k in a if not torch.equal(a[k], b[k])}
    prefix = {layer.target for layer in plan.layers if layer.node in frozen}
    assert moved and not any(k.rsplit(".", 1)[0] in prefix for k in moved), moved  # the tails moved, not the prefix
    with pytest.raises(CnnmodError, match="cannot run once"):
        _recalibrated(parent, True, frozenset(), images)
