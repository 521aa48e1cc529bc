"""Evaluate a parent and the classifier composed from its modules on the same images."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .compose import SCORINGS, ComposedClassifier
from .distributed import SINGLE, Shard
from .errors import CnnmodError
from .metrics import ParameterCount, parameter_counts, precision_recall, topk_accuracy
from .modules import ModuleSet, score_from_logits


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
    """Compact modules: the engine whose vote `composed` reports (cnnmod.engines); None for masking modules."""
    engines: dict | None = None
    """Compact modules: top-1, top-5 and seconds of every engine that ran, side by side."""

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
) -> Evaluation:
    """`labels[i]` is the position of image i's class among `modules.class_names` (-1: not evaluated).

    Under torchrun (`shard`), each process runs the parent and the modules on its share of the images and the
    outputs are gathered, so every rank returns the evaluation of all of them."""
    if scoring not in SCORINGS:
        raise CnnmodError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    keep = labels >= 0
    images, targets = images[keep], torch.as_tensor(labels[keep])
    if len(targets) == 0:
        raise CnnmodError("no evaluation samples belong to the modules' classes")
    seconds: dict[str, float] = {}
    mine = images[shard.part(len(images))]
    start = time.perf_counter()
    columns = torch.tensor(modules.class_indices)
    parent_part = modules.parent.logits(mine, batch_size, device, progress)[:, columns] if len(mine) else \
        torch.zeros((0, len(columns)))  # a process with no images of its own (fewer images than processes)
    parent_logits = shard.gather_rows(parent_part.to(shard.device))
    seconds["parent"] = time.perf_counter() - start
    start = time.perf_counter()
    module_part = modules.logits(mine, batch_size, device, progress) if len(mine) else \
        torch.zeros((0, len(modules), 2))
    module_logits = shard.gather_rows(module_part.to(shard.device))
    seconds["composed"] = time.perf_counter() - start
    parent_logits, module_logits = parent_logits.cpu(), module_logits.cpu()
    engine, engines = None, None
    if modules.compact is not None:  # compact modules: every engine, side by side; the default is chosen
        from .engines import ENGINES, EngineResult, choose_engine

        runs = {modules.compact.engine: (module_logits, seconds["composed"])}
        for name in ENGINES:
            if name not in runs and (name != "shared" or modules.compact.shared is not None):
                other = replace(modules, compact=modules.compact.with_engine(name))
                start = time.perf_counter()
                logits = shard.gather_rows(other.logits(mine, batch_size, device, progress).to(shard.device)).cpu()
                runs[name] = (logits, time.perf_counter() - start)
        found = {}
        for name, (logits, secs) in runs.items():
            scores = score_from_logits(logits, scoring)
            found[name] = EngineResult(topk_accuracy(scores, targets, 1), topk_accuracy(scores, targets, 5), secs)
        engine = choose_engine(found)
        engines = {name: asdict(r) for name, r in found.items()}
        module_logits, seconds["composed"] = runs[engine]
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
        from .engines import compact_parameters

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
        engine=engine,
        engines=engines,
    )


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
