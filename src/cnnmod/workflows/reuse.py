"""Continuous learning for modules reused beside modules of another dataset (paper 3.5, DESIGN.md).

Training-free: a module forgets the nodes that the competing class's samples activate but its own class's
samples never did. Optionally, its 2-output head is refitted on a few hundred samples (features computed
once under no_grad; no backpropagation through the body).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.activity import Activity, SamplePlan, record_activity
from ..engine.modules import ModuleSet, resolve_device
from ..errors import CnnmodError


def activity_on(modules: ModuleSet, images: np.ndarray, batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """How many of `images` activate each node of the parent at the modules' sites (parent unmasked)."""
    plan = SamplePlan(np.arange(len(images)), np.zeros(len(images), dtype=np.int64), 1, ())
    recorded = record_activity(modules.parent.model, modules.sites[0].kind, images, plan,
                               modules.parent.input_spec, batch_size, device, progress)
    return recorded.others


def own_activity(modules: ModuleSet, activity: Activity) -> dict[str, torch.Tensor]:
    """(M, *shape) counts of each module's own class samples, from the decomposition's recorded activity."""
    missing = [c for c in modules.class_indices if c not in activity.chosen]
    if missing:
        raise CnnmodError(f"the recorded activity holds no samples of class {modules.parent.classes[missing[0]]!r}")
    if activity.granularity != "node":
        raise CnnmodError("continuous learning needs node counts: decompose with --granularity node")
    return {s.name: activity.class_counts(s.name, modules.class_indices) for s in modules.sites}


def forget(modules: ModuleSet, own: dict[str, torch.Tensor], competing: dict[str, torch.Tensor],
           competing_samples: int, rho: float = 0.0) -> ModuleSet:
    """Remove from every module the nodes active for the competing samples (rate > rho) that the module's own
    class never activated. `own` is (M, *shape) counts, `competing` is (*shape) counts over `competing_samples`."""
    modules.require_masked("continuous learning")
    masks = {}
    for site in modules.sites:
        other = (competing[site.name] / max(competing_samples, 1) > rho).unsqueeze(0)
        never = own[site.name] == 0
        masks[site.name] = modules.masks[site.name] & ~(other & never)
    return ModuleSet(modules.parent, modules.class_indices, modules.sites, masks, modules.head_weight,
                     modules.head_bias, {**modules.config, "continuous_learning": True})


@dataclass(frozen=True)
class Recalibration:
    modules: ModuleSet
    samples: int
    loss_before: float
    loss_after: float


def recalibrate(modules: ModuleSet, own_images: list[np.ndarray], other_images: np.ndarray, steps: int = 200,
                batch_size: int = 256, device: torch.device | str | None = None) -> Recalibration:
    """Refit each module's 2-output head: its own class's images are 'concerned', `other_images` are not.

    `own_images[i]` are module i's class images (raw, uint8 NHWC). Only the head changes; features come from
    one no_grad pass of the masked module per image set.
    """
    if len(own_images) != len(modules):
        raise CnnmodError(f"{len(own_images)} image sets given for {len(modules)} modules")
    device = resolve_device(device)
    weights, biases, before, after, total = [], [], [], [], 0
    for i, name in enumerate(modules.class_names):
        single = modules.select([name])
        pos = single.features(own_images[i], batch_size, device)[:, 0]
        neg = single.features(other_images, batch_size, device)[:, 0]
        x = torch.cat([pos, neg])
        y = torch.cat([torch.zeros(len(pos), dtype=torch.long), torch.ones(len(neg), dtype=torch.long)])
        total += len(x)
        w, b, loss0, loss1 = _fit_head(x, y, single.head_weight[0], single.head_bias[0], steps)
        weights.append(w)
        biases.append(b)
        before.append(loss0)
        after.append(loss1)
    result = ModuleSet(modules.parent, modules.class_indices, modules.sites, modules.masks, torch.stack(weights),
                       torch.stack(biases), {**modules.config, "recalibrated": True})
    return Recalibration(result, total, float(np.mean(before)), float(np.mean(after)))


def _fit_head(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              steps: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Class-balanced cross-entropy on (concerned, unconcerned) logits, L-BFGS from the current head.
    Inputs the head ignored (removed by backtracking) stay ignored."""
    used = (weight.abs().sum(0) > 0).float()
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    counts = torch.bincount(y, minlength=2).clamp(min=1).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(x @ (w * used).T + b, y) + 1e-4 * (w * used).pow(2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss_before = float(loss_fn(x @ weight.T + bias, y))
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        loss_after = float(loss_fn(x @ (w * used).T + b, y))
    return (w * used).detach(), b.detach(), loss_before, loss_after
