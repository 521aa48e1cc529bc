"""Evaluate a parent and the classifier composed from its modules on the same images."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..engine.compose import SCORINGS, ComposedClassifier
from ..engine.distributed import SINGLE, Shard
from ..engine.engines import ENGINES, EngineResult, choose_engine
from ..engine.modules import ModuleSet, score_from_logits
from ..errors import CnnmodError
from .metrics import ParameterCount, parameter_counts, precision_recall, topk_accuracy

EXACT_UP_TO = 32
"""`auto` runs the exact engine of masked modules on every image up to this many modules (it costs one pass of
the parent per module); above it, on AGREEMENT_SAMPLE images."""
AGREEMENT_SAMPLE = 64


@dataclass(frozen=True)
class Accuracy:
    top1: float
    top5: float


@dataclass(frozen=True)
class ModuleReport:
    cls: str
    jaccard: float
    kept_parameters: int
    precision: float
    recall: float | None  # None: no test images of this class
    parent_precision: float
    parent_recall: float | None


@dataclass(frozen=True)
class Evaluation:
    """Parent and composed accuracy on the same samples, restricted to the modules' classes."""

    samples: int
    parent: Accuracy
    composed: dict[str, Accuracy]
    scoring: str
    jaccard_mean: float
    parent_parameters: int
    modules: tuple[ModuleReport, ...]
    seconds: dict[str, float]
    kept_parameters_mean: float | None = None
    """Mean over modules of kept parameters as a fraction of the parent's (0 to 1)."""
    engine: str | None = None
    """The engine whose vote `composed` reports (engine/engines.py)."""
    engines: dict | None = None
    """Top-1, top-5 and seconds of every engine that ran on all the images, side by side."""
    exact_agreement: dict | None = None
    """Where `exact` did not run on all the images (many masked modules): how often its vote equals the chosen
    engine's on a sample (`images`, `same_vote` 0 to 1, `seconds`)."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["composed_by_scoring"] = d.pop("composed")
        d["composed"] = d["composed_by_scoring"][self.scoring]
        d["modules"] = [{("class" if k == "cls" else k): v for k, v in m.items()} for m in d["modules"]]
        return d


def relabel(labels: np.ndarray, data_classes: Sequence[str], module_classes: Sequence[str]) -> np.ndarray:
    """Map dataset labels to module positions by class name; samples of other classes get -1."""
    missing = [c for c in module_classes if c not in data_classes]
    if missing:
        shown = ", ".join(list(data_classes)[:8])
        raise CnnmodError(f"the data has no class {missing[0]!r}; its classes are {shown}...")
    lookup = np.full(len(data_classes), -1, dtype=np.int64)
    for i, c in enumerate(module_classes):
        lookup[list(data_classes).index(c)] = i
    return lookup[labels]


def evaluate(
    modules: ModuleSet,
    images: np.ndarray,
    labels: np.ndarray,
    scoring: str = "softmax",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    with_parameters: bool = True,
    shard: Shard = SINGLE,
    engine: str = "auto",
) -> Evaluation:
    """`labels[i]` is the position of image i's class among `modules.class_names` (-1: not evaluated).

    `engine` runs the composed classifier (engine/engines.py); `auto` runs every engine that is affordable and reports
    the fastest whose top-1 is within 0.1 point of `exact`. For more than EXACT_UP_TO masked modules `exact` costs
    that many passes of the parent, so `auto` runs `shared` and checks its vote against `exact` on a sample.

    Under torchrun (`shard`), each process runs the parent and the modules on its share of the images and the
    outputs are gathered, so every rank returns the evaluation of all of them."""
    if scoring not in SCORINGS:
        raise CnnmodError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    if engine not in ("auto", *ENGINES):
        raise CnnmodError(f"unknown engine {engine!r}; choose from auto, {', '.join(ENGINES)}")
    if engine == "shared" and modules.compact is not None and modules.compact.shared is None:
        raise CnnmodError("these compact modules have no shared network (their decomposition shared no layers); "
                          "use --engine exact")
    keep = labels >= 0
    images, targets = images[keep], torch.as_tensor(labels[keep])
    if len(targets) == 0:
        raise CnnmodError("no evaluation samples belong to the modules' classes")
    seconds: dict[str, float] = {}
    mine = images[shard.part(len(images))]

    def timed_logits(fn: Callable[[np.ndarray], torch.Tensor], part: np.ndarray,
                     width: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        local = fn(part) if len(part) else torch.zeros((0, *([width, 2] if width else [len(columns)])))
        gathered = shard.gather_rows(local.to(shard.device)).cpu()  # a process with no images: nothing to run
        return gathered, time.perf_counter() - start

    columns = torch.tensor(modules.class_indices)
    parent_logits, seconds["parent"] = timed_logits(
        lambda x: modules.parent.logits(x, batch_size, device, progress)[:, columns], mine, 0)
    runs: dict[str, tuple[torch.Tensor, float]] = {}
    for name in engines_to_run(modules, engine):
        runs[name] = timed_logits(modules.with_engine(name).logits_of(batch_size, device, progress), mine,
                                  len(modules))
    found = {name: EngineResult(*_top1_top5(logits, targets, scoring), secs) for name, (logits, secs) in runs.items()}
    chosen = engine if engine != "auto" else choose_engine(found) if "exact" in found else "shared"
    agreement = None
    if "exact" not in runs:  # the exact engine on a sample only: how often its vote is the chosen engine's
        per_rank = -(-AGREEMENT_SAMPLE // shard.world)
        exact, secs = timed_logits(modules.with_engine("exact").logits_of(batch_size, device, progress),
                                   mine[:per_rank], len(modules))
        ours = runs[chosen][0][_sample_rows(len(images), shard, per_rank)]
        agreement = {"images": len(exact), "seconds": secs,
                     "same_vote": float((score_from_logits(exact, scoring).argmax(1) ==
                                         score_from_logits(ours, scoring).argmax(1)).float().mean())}
    module_logits, seconds["composed"] = runs[chosen]
    engines = {name: asdict(r) for name, r in found.items()}
    k = len(modules)
    parent_pred = parent_logits.argmax(1)
    composed = {}
    for name in SCORINGS:
        scores = score_from_logits(module_logits, name)
        composed[name] = Accuracy(topk_accuracy(scores, targets, 1), topk_accuracy(scores, targets, 5))
    pred = score_from_logits(module_logits, scoring).argmax(1)
    precision, recall = precision_recall(pred, targets, k)
    parent_precision, parent_recall = precision_recall(parent_pred, targets, k)
    jaccard = modules.jaccard().tolist()
    kept = _parameter_counts(modules, shard) if with_parameters and modules.compact is None else None
    if with_parameters and modules.compact is not None:
        from ..engine.engines import compact_parameters

        kept = ParameterCount(*compact_parameters(modules))
    reports = tuple(
        ModuleReport(modules.class_names[i], jaccard[i], kept.kept[i] if kept else -1, precision[i], recall[i],
                     parent_precision[i], parent_recall[i])
        for i in range(k)
    )
    return Evaluation(
        samples=len(targets),
        parent=Accuracy(topk_accuracy(parent_logits, targets, 1), topk_accuracy(parent_logits, targets, 5)),
        composed=composed,
        scoring=scoring,
        jaccard_mean=float(np.mean(jaccard)),
        parent_parameters=kept.parent if kept else -1,
        modules=reports,
        seconds=seconds,
        kept_parameters_mean=float(np.mean(kept.kept)) / kept.parent if kept and kept.parent else None,
        engine=chosen,
        engines=engines,
        exact_agreement=agreement,
    )


HELD_OUT_IMAGES = 2000
"""Test images a decomposition checks its modules on (spread evenly over the test split, which some datasets
store class by class)."""
HELD_OUT_TOLERANCE = 0.01
"""How far below the parent's top-1 the composed top-1 on those images may be before a decomposition warns."""


def held_out_check(modules: ModuleSet, images: np.ndarray, labels: np.ndarray, data_classes: Sequence[str],
                   limit: int = HELD_OUT_IMAGES, device: torch.device | str | None = None) -> dict | None:
    """The parent's and the composed classifier's top-1 and top-5 on up to `limit` labelled images of the modules'
    classes (`labels` index `data_classes`), spread evenly over them; None where none of them is of those classes."""
    targets = relabel(labels, data_classes, modules.class_names)
    rows = np.flatnonzero(targets >= 0)
    if len(rows) == 0:
        return None
    rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(np.int64))]
    result = evaluate(modules, images[rows], targets[rows], device=device, progress=False, with_parameters=False)
    return {"images": result.samples, "parent": asdict(result.parent),
            "composed": asdict(result.composed[result.scoring]), "engine": result.engine,
            "below_parent": result.composed[result.scoring].top1 < result.parent.top1 - HELD_OUT_TOLERANCE}


def describe_held_out(images: int, composed_top1: float, parent_top1: float) -> str:
    """The check's figures in words, as `decompose` prints them and `inspect` shows them."""
    return (f"check on {images} test images: composed top-1 {composed_top1:.4f}, parent {parent_top1:.4f} "
            f"({100 * (composed_top1 - parent_top1):+.2f} points)")


def engines_to_run(modules: ModuleSet, engine: str) -> list[str]:
    """The engines that run on every image: the one asked for, or with `auto` each affordable one."""
    if engine != "auto":
        return [engine]
    if modules.compact is not None:
        return ["exact"] + (["shared"] if modules.compact.shared is not None else [])
    return ["exact", "shared"] if len(modules) <= EXACT_UP_TO else ["shared"]


def _top1_top5(logits: torch.Tensor, targets: torch.Tensor, scoring: str) -> tuple[float, float]:
    scores = score_from_logits(logits, scoring)
    return topk_accuracy(scores, targets, 1), topk_accuracy(scores, targets, 5)


def _sample_rows(n: int, shard: Shard, per_rank: int) -> torch.Tensor:
    """Positions, among all gathered rows, of the first `per_rank` images of every rank's share."""
    rows: list[int] = []
    for rank in range(shard.world):
        share = range(rank * n // shard.world, (rank + 1) * n // shard.world)
        rows.extend(share[:per_rank])
    return torch.tensor(rows, dtype=torch.long)


def _parameter_counts(modules: ModuleSet, shard: Shard) -> ParameterCount:
    """Kept parameters of every module; under torchrun each process counts its share of the modules."""
    if shard.world == 1:
        return parameter_counts(modules)
    mine = list(modules.class_names[shard.part(len(modules))])
    part = parameter_counts(modules.select(mine))
    kept = torch.tensor(part.kept, dtype=torch.int64, device=shard.device)
    return ParameterCount([int(v) for v in shard.gather_rows(kept).tolist()], part.parent)


def overlap_matrix(modules: ModuleSet, cells: int = 1 << 24) -> torch.Tensor:
    """Jaccard similarity between the kept-node sets of every pair of modules, (M, M).

    Intersections are summed over blocks of nodes (about `cells` mask cells at a time, as float32, exact below
    2^24 per block), so no (M, nodes) float matrix is ever made."""
    m = len(modules)
    inter = torch.zeros((m, m), dtype=torch.float64)
    sizes = torch.zeros(m, dtype=torch.float64)
    step = max(1, cells // max(m, 1))
    for site in modules.sites:
        flat = modules.masks[site.name].flatten(1)
        for start in range(0, flat.shape[1], step):
            block = flat[:, start:start + step].to(torch.float32)
            inter += (block @ block.T).to(torch.float64)
            sizes += block.sum(1, dtype=torch.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    return (inter / union.clamp(min=1)).float()


def evaluate_composed(composed: ComposedClassifier, images: np.ndarray, labels: np.ndarray,
                      data_classes: Sequence[str], batch_size: int = 256,
                      device: torch.device | str | None = None, progress: bool = False) -> dict:
    """Top-1/top-5 of a composed classifier on the images of `data_classes` that it has a label for, and recall
    per label; `labels` index `data_classes` (labels are matched to class names)."""
    targets = relabel(labels, data_classes, [c for c in composed.labels if c in data_classes]) if any(
        c in data_classes for c in composed.labels) else np.full(len(labels), -1)
    positions = np.array([composed.labels.index(c) for c in composed.labels if c in data_classes])
    keep = targets >= 0
    if not keep.any():
        raise CnnmodError("none of the data's classes is a label of the composed classifier")
    images, truth = images[keep], torch.as_tensor(positions[targets[keep]])
    scores = composed.scores(images, batch_size, device, progress)
    pred = composed.predict(images, batch_size, device, progress) if composed.reverifiers else scores.argmax(1)
    recall = {composed.labels[p]: float((pred[truth == p] == p).float().mean()) for p in positions}
    return {"samples": int(keep.sum()), "top1": float((pred == truth).float().mean()),
            "top5": topk_accuracy(scores, truth, 5), "recall": recall}
