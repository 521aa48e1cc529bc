"""The four repair options for a faulty class pair (paper Figure 1, Table 6), each a new classifier.

1. `replace_from`: swap the faulty modules for modules of the same classes from a better parent.
2. `train_pair_model`, `pair_modules`: train a small model on the pair, decompose it, and swap its modules in.
3. `removed` (from `compose`): drop the faulty module.
4. `reverified` (from `compose`): whenever the classifier predicts one of the pair, re-decide with the pair
   model's modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data import ImageSet
from ..engine.compose import ComposedClassifier, replace
from ..engine.decompose import DecomposeConfig, decompose
from ..engine.inputs import InputSpec
from ..engine.modules import ModuleSet, Parent
from ..errors import CnnmodError
from .train import train_parent


def replace_from(composed: ComposedClassifier, labels: Sequence[str], better: ModuleSet) -> ComposedClassifier:
    """Replace the module of each label with `better`'s module of the class of the same name."""
    missing = [lab for lab in labels if lab not in better.class_names]
    if missing:
        raise CnnmodError(f"the better modules have no class {missing[0]!r}")
    for label in labels:
        composed = replace(composed, label, better.select([label]))
    return composed


def train_pair_model(arch: str, data: ImageSet, labels: Sequence[str], spec: InputSpec, epochs: int,
                     seed: int = 0, device: torch.device | str | None = None, progress: bool = True) -> Parent:
    """A model of `arch` trained from scratch on the images of `labels` only."""
    return train_parent(arch, data.subset(list(labels)), spec, epochs, seed, device, progress)


def pair_modules(pair_parent: Parent, data: ImageSet, config: DecomposeConfig,
                 device: torch.device | str | None = None, progress: bool = True) -> ModuleSet:
    """All modules of a pair model, decomposed on the pair's training images."""
    sub = data.subset(list(pair_parent.classes))
    modules, _ = decompose(pair_parent, sub.images, np.asarray(sub.labels), config, device=device,
                           progress=progress)
    return modules
