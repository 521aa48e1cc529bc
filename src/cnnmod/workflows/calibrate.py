"""Score calibration across the modules of a composed classifier.

Modules of different parents score on different scales: a strong parent's module may say 0.99 where a weak
parent's says 0.7, and then takes images that belong to the others. Calibration fits, for each chosen module,
a scale `a > 0` and an offset `b` of its margin `z_c - z_uc` so that the composed vote is right on a few labelled
images, and folds them into the module's head: `(z_c, z_uc) -> (a*z_c + b/2, a*z_uc - b/2)`. Masks and bodies are
untouched; the module outputs are computed once under no_grad and only the 2 numbers per module are fitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..engine.compose import ComposedClassifier
from ..engine.modules import ModuleSet
from ..errors import CnnmodError

PENALTY = 1e-3


@dataclass(frozen=True)
class Calibration:
    composed: ComposedClassifier
    samples: int
    fitted: tuple[str, ...]
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float


def calibrate(composed: ComposedClassifier, images: np.ndarray | Sequence[np.ndarray], targets: np.ndarray,
              labels: Sequence[str] | None = None, steps: int = 100, batch_size: int = 256,
              device: torch.device | str | None = None) -> Calibration:
    """Fit the scores of the modules voting for `labels` (default: all) against the others.

    `images` are raw uint8 NHWC: one array, or several (of different sizes, e.g. one per dataset) whose
    concatenation `targets` describes; targets index `composed.labels`. Returns a new classifier; the accuracies
    are of the composed vote on these images, before and after (reverifiers aside)."""
    parts = _same_size_runs([images] if isinstance(images, np.ndarray) else list(images))
    targets = np.asarray(targets)
    count = sum(len(x) for x in parts)
    if count != len(targets) or count == 0:
        raise CnnmodError(f"calibration needs images and as many targets, got {count} and {len(targets)}")
    if targets.min() < 0 or targets.max() >= len(composed):
        raise CnnmodError(f"calibration targets index the {len(composed)} labels; got {targets.min()}..{targets.max()}")
    chosen = tuple(composed.labels) if labels is None else tuple(labels)
    for label in chosen:
        if label not in composed.labels:
            raise CnnmodError(f"no module votes for {label!r}; labels are {', '.join(composed.labels)}")
    fit = torch.tensor([label in chosen for label in composed.labels])
    with torch.no_grad():
        logits = torch.cat([torch.cat([g.logits(x, batch_size, device).cpu() for g in composed.groups], 1)
                            for x in parts if len(x)])
    y = torch.as_tensor(targets, dtype=torch.long)
    log_scale = torch.zeros(len(composed), requires_grad=True)
    offset = torch.zeros(len(composed), requires_grad=True)

    def fitted() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.where(fit, log_scale.exp(), 1.0), torch.where(fit, offset, 0.0)

    def vote() -> torch.Tensor:
        return _vote(logits, *fitted(), composed.scoring)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(vote(), y) + PENALTY * (log_scale.pow(2) + offset.pow(2))[fit].sum()
        loss.backward()
        return loss

    with torch.no_grad():
        before = vote()
    opt = torch.optim.LBFGS([log_scale, offset], max_iter=steps, line_search_fn="strong_wolfe")
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        after = vote()
        folded = _folded(composed, *fitted())
    return Calibration(folded, len(y), chosen, float(F.cross_entropy(before, y)), float(F.cross_entropy(after, y)),
                       float((before.argmax(1) == y).float().mean()), float((after.argmax(1) == y).float().mean()))


def labelled_sample(labels: Sequence[str], sources: Sequence[ImageSet], per_label: int,
                    seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Up to `per_label` images of each label, drawn at random (seeded) from the first source holding a class of
    that name: one array per label (sources may differ in image size), and targets indexing `labels`."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i, label in enumerate(labels):
        source = next((s for s in sources if label in s.classes), None)
        if source is None:
            raise CnnmodError(f"none of the datasets given holds class {label!r}")
        members = np.flatnonzero(source.labels == source.classes.index(label))
        images.append(source.images[np.sort(rng.permutation(members)[:per_label])])
        targets.append(np.full(len(images[-1]), i, dtype=np.int64))
    return images, np.concatenate(targets)


def _same_size_runs(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Consecutive arrays of one image size joined, so each parent runs over few large batches."""
    runs: list[list[np.ndarray]] = []
    for x in parts:
        if runs and runs[-1][0].shape[1:] == x.shape[1:]:
            runs[-1].append(x)
        else:
            runs.append([x])
    return [np.concatenate(run) for run in runs]


def _vote(logits: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, scoring: str) -> torch.Tensor:
    """(N, M) what the composed classifier ranks after calibration: margins `z_c - z_uc` (softmax scores are
    their sigmoid, so the vote is the same; unlike log-scores they do not saturate at 0), or `z_c`."""
    z_c = scale * logits[..., 0] + shift / 2
    if scoring == "logit":
        return z_c
    return z_c - (scale * logits[..., 1] - shift / 2)


def _folded(composed: ComposedClassifier, scale: torch.Tensor, shift: torch.Tensor) -> ComposedClassifier:
    groups: list[ModuleSet] = []
    offset = 0
    for group in composed.groups:
        a = scale[offset:offset + len(group)].to(group.head_weight)
        b = shift[offset:offset + len(group)].to(group.head_bias)
        offset += len(group)
        if torch.all(a == 1) and torch.all(b == 0):
            groups.append(group)
            continue
        weight = group.head_weight * a[:, None, None]
        bias = group.head_bias * a[:, None] + torch.stack([b / 2, -b / 2], 1)
        groups.append(dataclasses.replace(group, head_weight=weight, head_bias=bias,
                                          config={**group.config, "calibrated": True}))
    return dataclasses.replace(composed, groups=tuple(groups))
