"""Composed classifiers: modules from one or many parents vote; the highest score names the class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CnnmodError
from .modules import ModuleSet

SCORINGS = ("softmax", "logit")


@dataclass(frozen=True)
class ComposedClassifier:
    """Groups of modules (one ModuleSet per parent) and the label each module votes for, in order."""

    groups: tuple[ModuleSet, ...]
    labels: tuple[str, ...]
    scoring: str = "softmax"

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
               progress: bool = False) -> torch.Tensor:
        """(N, len(labels)) scores; raw uint8 NHWC images are adapted to each parent's input spec."""
        return torch.cat([g.scores(images, self.scoring, batch_size, device, progress) for g in self.groups], 1)

    def predict(self, images: np.ndarray, batch_size: int = 256, device: torch.device | str | None = None,
                progress: bool = False) -> torch.Tensor:
        """Index into `labels` of the winning module for each image."""
        return self.scores(images, batch_size, device, progress).argmax(1)


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
