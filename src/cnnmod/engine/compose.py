"""Composed classifiers: modules from one or many parents vote; the highest score names the class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CnnmodError
from .modules import ModuleSet

SCORINGS = ("softmax", "logit")


@dataclass(frozen=True)
class Reverifier:
    """Re-decides among `labels` with its own modules (one per label, in order) whenever the composed
    classifier predicts one of them (repair option 4)."""

    labels: tuple[str, ...]
    modules: ModuleSet


@dataclass(frozen=True)
class ComposedClassifier:
    """Groups of modules (one ModuleSet per parent) and the label each module votes for, in order."""

    groups: tuple[ModuleSet, ...]
    labels: tuple[str, ...]
    scoring: str = "softmax"
    reverifiers: tuple[Reverifier, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
               progress: bool = False) -> torch.Tensor:
        """(N, len(labels)) scores; raw uint8 NHWC images are adapted to each parent's input spec."""
        return torch.cat([g.scores(images, self.scoring, batch_size, device, progress) for g in self.groups], 1)

    def predict(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
                progress: bool = False) -> torch.Tensor:
        """Index into `labels` of the winning module for each image, re-decided by any reverifiers."""
        pred = self.scores(images, batch_size, device, progress).argmax(1)
        for rv in self.reverifiers:
            targets = torch.tensor([self.labels.index(lab) for lab in rv.labels])
            rows = torch.isin(pred, targets).nonzero().flatten()
            if len(rows):
                scores = rv.modules.scores(images[rows.numpy()], self.scoring, batch_size, device)
                pred[rows] = targets[scores.argmax(1)]
        return pred


def compose(groups: Sequence[ModuleSet], labels: Sequence[str] | None = None,
            scoring: str = "softmax") -> ComposedClassifier:
    """Compose module sets into one classifier; labels default to the modules' class names and must be unique."""
    if scoring not in SCORINGS:
        raise CnnmodError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    groups = tuple(g for g in groups if len(g))
    if not groups:
        raise CnnmodError("nothing to compose: no modules given")
    names = tuple(n for g in groups for n in g.class_names)
    chosen = tuple(labels) if labels is not None else names
    if len(chosen) != len(names):
        raise CnnmodError(f"{len(chosen)} labels given for {len(names)} modules")
    clashes = sorted({n for n in chosen if chosen.count(n) > 1})
    if clashes:
        raise CnnmodError(f"label {clashes[0]!r} is used by more than one module; map labels explicitly")
    return ComposedClassifier(groups, chosen, scoring)



def replace(composed: ComposedClassifier, label: str, modules: ModuleSet,
            new_label: str | None = None) -> ComposedClassifier:
    """A new classifier where the module voting for `label` is swapped for `modules` (exactly one module, from
    any parent or dataset), which votes for `new_label` (default: `label`). The new module's label comes last."""
    if len(modules) != 1:
        raise CnnmodError(f"replace takes exactly one module, got {len(modules)}")
    groups, labels = _without(composed, label)
    renamed = new_label not in (None, label)
    kept = [rv for rv in composed.reverifiers if not (renamed and label in rv.labels)]
    return with_reverifiers(compose([*groups, modules], [*labels, new_label or label], composed.scoring), kept)


def removed(composed: ComposedClassifier, label: str) -> ComposedClassifier:
    """A new classifier without the module voting for `label`."""
    groups, labels = _without(composed, label)
    if not groups:
        raise CnnmodError(f"removing {label!r} would leave no modules")
    kept = tuple(rv for rv in composed.reverifiers if label not in rv.labels)
    return ComposedClassifier(tuple(groups), tuple(labels), composed.scoring, kept)


def reverified(composed: ComposedClassifier, labels: Sequence[str], modules: ModuleSet) -> ComposedClassifier:
    """A new classifier whose predictions among `labels` are re-decided by `modules` (one per label)."""
    if len(modules) != len(labels):
        raise CnnmodError(f"{len(modules)} modules given to re-verify {len(labels)} labels")
    for label in labels:
        _position(composed, label)
    return with_reverifiers(composed, (*composed.reverifiers, Reverifier(tuple(labels), modules)))


def with_reverifiers(composed: ComposedClassifier, reverifiers: Sequence[Reverifier]) -> ComposedClassifier:
    return ComposedClassifier(composed.groups, composed.labels, composed.scoring, tuple(reverifiers))


def _position(composed: ComposedClassifier, label: str) -> int:
    if label not in composed.labels:
        raise CnnmodError(f"no module votes for {label!r}; labels are {', '.join(composed.labels)}")
    return composed.labels.index(label)


def _without(composed: ComposedClassifier, label: str) -> tuple[list[ModuleSet], list[str]]:
    _position(composed, label)
    groups: list[ModuleSet] = []
    labels: list[str] = []
    offset = 0
    for group in composed.groups:
        own = composed.labels[offset:offset + len(group)]
        offset += len(group)
        keep = [(name, lab) for name, lab in zip(group.class_names, own, strict=True) if lab != label]
        if keep:
            groups.append(group.select([name for name, _ in keep]))
            labels.extend(lab for _, lab in keep)
    return groups, labels
