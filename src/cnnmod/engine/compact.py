"""Compact decomposition: per-class modules that keep a small part of the parent's channels (`--method compact`).

For every class c:

1. **Importance** (one pass over a few images per class): the Taylor importance of each channel for module c is
   `|sum over positions of a * d(margin_c)/da|`, where `margin_c = z_c - logsumexp` of the other logits, summed
   over the nodes of the channel's space (engine/channels.py: a residual stage is one space), averaged over the
   images of class c plus averaged over the images whose runner-up class is c (where c must not win). Two backward
   passes a batch give that for every class at once (`CompactConfig.importance`).
2. **Keep sets**: in every space, module c keeps the channels most important to it; the count per space is the
   same for every module (a per-space fraction), so all modules of a parent have the same shapes.
3. **Materialise** each module (sliced convolutions and biases, the channeled head) and **fine-tune all modules
   together** (300,000 augmented training images by default), by distillation from the parent and the labels,
   with the composed vote in the loss: the ten margins `z_c - z_uc` are the logits of one softmax, pulled
   towards the parent's softmax (temperature T) and the label; each module's own sigmoid is pulled towards the
   parent's probability of its class, so that a module means something alone and in any subset. Modules of equal
   widths train as one stacked network of grouped convolutions (`cnnmod.engine.channels.stack`), channels-last, and
   their weights are copied back into each module's own network (`load_stacked`). The first layers, up to a cut
   after about two thirds of the parent's multiply-accumulates (or later, while they hold at most a quarter of its
   parameters), are the parent's own, frozen and shared by every module; their output for each training image and
   its mirror image is computed once (`prefix_cache`) and each step translates it at random, so a step runs only
   the layers after the cut.

Everything is seeded: the same parent, data and seed give the same modules. The parent is never changed.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CnnmodError
from .channels import (
    ChannelPlan,
    WeightLayer,
    channel_plan,
    head_parameters,
    layer_at,
    layer_bias,
    load_stacked,
    materialize,
    same_widths,
    stack,
)
from .decompose import channel_heads
from .distributed import SINGLE, Shard
from .inputs import batch_slices
from .modules import ModuleSet, Parent, resolve_device
from .trace import with_taps


@dataclass(frozen=True)
class CompactConfig:
    """Every parameter of a compact decomposition."""

    stream_keep: float = 0.25
    """Fraction of the channels of each residual stream (spaces that an Add ties) that a module keeps."""
    inner_keep: float = 0.24
    """Fraction of the channels of every other space (inside residual blocks, hidden dense layers)."""
    importance_per_class: int = 32
    """Images per class for the importance pass."""
    importance: str = "own_and_rival"
    """Which images count for a class's importance: "own_and_rival" (its own images and those whose runner-up it
    is: two backward passes a batch) or "every_image" (every sampled image: one backward pass per class and
    batch, so the pass grows with the square of the classes)."""
    train_images: int = 300_000
    """Training images seen by the fine-tune (all modules see the same images)."""
    batch_size: int = 64
    lr: float = 0.05
    temperature: float = 4.0
    label_weight: float = 0.5
    """Weight of the label cross-entropy in the vote loss (the rest is distillation from the parent). On the shared
    ResNet-20, 0.5 gave composed top-1 0.8189 and 0.8137 (seeds 0 and 1) where 0.25 gave 0.8075-0.8114 (parent
    0.8103): the labels let the modules correct some of the parent's errors (docs/RESULTS.md)."""
    binary_weight: float = 0.05
    """Weight of each module's own binary loss (its sigmoid against the parent's probability of its class)."""
    weight_decay: float = 5e-4
    clip: float = 5.0
    """Gradient-norm clipping of the fine-tune."""
    recalibrate_images: int = 256
    """Images (spread over the classes) for re-estimating statistics and refitting heads; 0 skips it."""
    augment: bool = True
    prefix_keep: float = 1.0
    """Fraction of the channels of every shared-prefix space a module keeps (0: the stream/inner fractions)."""
    freeze_prefix: bool = True
    """Keep the shared prefix's weights as they are (the parent's, sliced) instead of fine-tuning them. With
    `prefix_keep` 1 the prefix is the parent's own first layers, and the parent's pass that gives the teacher's
    logits gives the modules' prefix output too."""
    shared_prefix: float = 0.68
    """Share the first layers among all modules, up to the cut point after at most this fraction of the parent's
    multiply-accumulates (or later, see `shared_prefix_parameters`): the same kept channels (chosen for all classes)
    and the same fine-tuned weights, so an engine runs them once. 0: every layer is the module's own."""
    shared_prefix_parameters: float = 0.25
    """...or up to the last cut point before which the parent holds at most this fraction of its parameters, where
    that is later. Every module counts the shared prefix among its parameters, so it may hold at most about the
    modules' size target (30%) of them. On the CIFAR ResNets and VGG both rules choose the same cut (after two
    thirds of the MACs and a quarter of the parameters); on a plain CNN whose parameters are in its dense layers
    (the embedded SmallCNN: its convolutions hold 4.5% of the parameters and 91% of the MACs) the MACs rule left
    the modules 8 of the 32 channels of the last convolution and gave composed top-1 0.72-0.78 against the
    parent's 0.908 on Fashion-MNIST; sharing the convolutions gives 0.90-0.91 (docs/RESULTS.md)."""
    batching: str = "grouped"
    """How the fine-tune runs the modules' own layers: "grouped" (all modules as one stacked network of grouped
    convolutions, channels-last) or "each" (one network after another). Both train the same weights up to float
    rounding; modules of unequal widths always run "each"."""
    hint_weight: float = 0.0
    """Weight of the feature hint: the mean squared distance between a trained prefix's output and the parent's
    kept channels at the cut (with a frozen full-width prefix the two are equal and the hint is not computed)."""
    cache_prefix: bool = True
    """With the parent's own prefix frozen: compute its output once for every training image and its mirror image
    (kept as float16) instead of at every step. A step then draws one of the two and translates it at random by the
    crop padding scaled to the cut's size (the crop augmentation, on features), and the teacher runs only its layers
    after the cut. Used when the fine-tune sees each image at least CACHE_MIN_REPEATS times and the cache takes at
    most CACHE_MAX_BYTES. On the shared ResNet-20 (300,000 images) the decomposition took 529 s instead of 652 s and
    the composed classifier's top-1 moved by one image in 10,000; the cache took 1.6 GiB."""
    fine_tune_groups: int = 2
    """The fine-tune trains the modules as this many stacked networks (contiguous runs of modules, as equal as can
    be), one after the other in one process. Under torchrun each process trains a contiguous share of the groups,
    which gives bit-identical modules on any number of processes, since every group runs the same arithmetic
    wherever it runs. In one process, two groups took 1.004x the time of one on the shared ResNet-20, four 1.21x
    (`python benchmarks/compact_groups.py --groups 2`, `--groups 4`)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not all(0 <= v <= 1 for v in (self.prefix_keep, self.shared_prefix, self.shared_prefix_parameters)):
            raise CnnmodError("prefix keep and the shared prefix's fractions must be in [0, 1]")
        for name in ("stream_keep", "inner_keep"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise CnnmodError(f"{name.replace('_', ' ')} must be in (0, 1], got {v}")
        if self.importance not in IMPORTANCES:
            raise CnnmodError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.batching not in ("grouped", "each"):
            raise CnnmodError(f"batching must be grouped or each, got {self.batching!r}")
        if self.fine_tune_groups < 1:
            raise CnnmodError(f"fine-tune groups must be >= 1, got {self.fine_tune_groups}")
        if self.importance_per_class < 1 or self.batch_size < 2 or self.train_images < 0:
            raise CnnmodError("importance images must be >= 1, batch size >= 2 and training images >= 0")
        if not (self.lr >= 0 and self.temperature > 0 and 0 <= self.label_weight <= 1 and self.binary_weight >= 0
                and self.weight_decay >= 0 and self.hint_weight >= 0):
            raise CnnmodError("lr, weight decay, binary weight and hint weight must be >= 0, temperature > 0, "
                              "label weight in [0, 1]")

    def with_prefix_keep(self, keep: float) -> CompactConfig:
        """This configuration with the shared prefix narrowed to `keep` of its channels (1: the parent's own
        layers, frozen). A narrowed prefix is chosen for the decomposed classes alone and fine-tuned with them, at
        the gentler rate and longer budget of NARROW_PREFIX: the parent's features are no longer there to freeze.
        For a few classes (a reused pair) this is what makes the classifier a fraction of the parent."""
        if keep >= 1:
            return replace(self, prefix_keep=1.0, freeze_prefix=True)
        return replace(self, prefix_keep=keep, **NARROW_PREFIX)

    def for_classes(self, classes: int) -> CompactConfig:
        """This configuration with its keep fractions shrunk for `classes` modules: unchanged up to
        REFERENCE_CLASSES, and past it times sqrt(REFERENCE_CLASSES / classes). A module's own layers cost about the
        product of the two fractions of the parent's layers after the cut, so all the modules together then cost
        about what REFERENCE_CLASSES modules of the unshrunk fractions do: at 202 classes the composed classifier
        of a ResNet-20 ran in 2.8-3.5x the parent's time instead of 11.1x (docs/RESULTS.md)."""
        if classes <= REFERENCE_CLASSES:
            return self
        factor = math.sqrt(REFERENCE_CLASSES / classes)
        return replace(self, stream_keep=self.stream_keep * factor, inner_keep=self.inner_keep * factor)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CompactConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{"importance": "every_image", "shared_prefix_parameters": 0.0,  # what records before them used
                      **{k: v for k, v in d.items() if k in names}})


IMPORTANCES = ("own_and_rival", "every_image")
REFERENCE_CLASSES = 10
"""The class count at which the default keep fractions were chosen and measured (CIFAR-10)."""

NARROW_PREFIX: dict[str, Any] = {"freeze_prefix": False, "lr": 0.004, "train_images": 100_000, "hint_weight": 5.0}
"""What a narrowed, trained prefix changes (`CompactConfig.with_prefix_keep`). Measured on the shared ResNet-20
with 30% of the prefix, 50,000 images: cat/dog at lr 0.02 / 0.01 / 0.004 gave pair accuracy 0.776 / 0.772 /
0.788; automobile/truck at lr 0.004 gave 0.881 without the feature hint, 0.896 / 0.901 / 0.896 with hint weight
1 / 5 / 20. At 100,000 images the three pairs of Table 2 gained 2.1 points on average (0.8425 to 0.8635), still
for less energy than training the pair model from scratch. With 35% of the prefix and 100,000 images, label
weight 0.25 / 0.5 / 0.75 gave cat/dog 0.8045 / 0.793 / 0.792, automobile/truck 0.913 / 0.917 / 0.9255 and
deer/horse 0.9055 / 0.910 / 0.899, against 0.781, 0.9165 and 0.8995 for the pair models trained from scratch:
0.5 is the weight at which every pair is at least its scratch model (docs/RESULTS.md), and the default label
weight for every compact decomposition since."""


@dataclass(frozen=True)
class CompactCost:
    """What a compact decomposition cost: images seen (each image counted once per pass that saw it)."""

    importance_images: int
    train_images: int
    seconds: float
    prefix_cache_images: int = 0
    """Images (a mirror image counted apart) whose frozen prefix output was computed once for the fine-tune."""

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# 1. importance


class _Keep(nn.Module):
    """Records its input and keeps its gradient."""

    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        self.store = store
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.retain_grad()
        self.store[self.name] = x
        return x


def _sample(labels: np.ndarray, classes: Sequence[int], per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to `per_class` images of each of `classes` that the labels hold."""
    picks = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        picks.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(picks))


def _margins(logits: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Each row's margin of its `picked` class: that logit less the logsumexp of the others."""
    own = logits.gather(1, picked[:, None]).squeeze(1)
    return own - torch.logsumexp(logits.scatter(1, picked[:, None], float("-inf")), 1)


def class_importance(parent: Parent, plan: ChannelPlan, images: np.ndarray, classes: Sequence[int],
                     batch_size: int = 64, labels: np.ndarray | None = None) -> dict[int, torch.Tensor]:
    """Per prunable space, (len(classes), size) Taylor importance of each channel for each class's margin.

    Without `labels`, every image counts for every class: one backward pass per class and batch. With `labels`
    (the images' classes, as the parent's indices), an image counts for its own class and for its rival, the
    class the parent ranks first after it: two backward passes per batch whatever the number of classes. A class's
    row is then the mean over its own images plus the mean over the images it is the rival of."""
    if labels is not None:
        return _own_and_rival_importance(parent, plan, images, labels, classes, batch_size)
    store: dict[str, torch.Tensor] = {}
    sites, net = _importance_sites(parent, plan, store)
    idx = torch.tensor(list(classes), dtype=torch.long)
    out = {s: torch.zeros(len(classes), plan.spaces[s].size, dtype=torch.float64) for s in plan.prunable}
    for part in batch_slices(len(images), batch_size):
        x = parent.input_spec.prepare(images[part]).requires_grad_(True)
        logits = net(x)
        for row, c in enumerate(idx.tolist()):
            others = torch.cat([logits[:, :c], logits[:, c + 1:]], 1)
            margin = logits[:, c] - torch.logsumexp(others, 1)
            acts = [store[s.name] for s in sites]
            grads = torch.autograd.grad(margin.sum(), acts, retain_graph=row < len(idx) - 1)
            for site, a, g in zip(sites, acts, grads, strict=True):
                out[plan.space_of[site.name]][row] += _taylor_scores(a, g).sum(0).double()
    return {s: (v / max(len(images), 1)).float() for s, v in out.items()}


def _taylor_scores(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, C): each image's |sum over positions of activation x gradient| per channel."""
    product = a.detach() * g
    return product.flatten(2).sum(2).abs() if a.dim() > 2 else product.abs()


def _importance_sites(parent: Parent, plan: ChannelPlan, store: dict[str, torch.Tensor]
                      ) -> tuple[list, fx.GraphModule]:
    sites = [s for s in parent.model.site_list("relu") if plan.space_of.get(s.name) in set(plan.prunable)]
    if not sites:
        raise CnnmodError("the parent has no ReLU inside a prunable channel space")
    net = with_taps(parent.model.graph, {s.name: _Keep(store, s.name) for s in sites}).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return sites, net


def _own_and_rival_importance(parent: Parent, plan: ChannelPlan, images: np.ndarray, labels: np.ndarray,
                              classes: Sequence[int], batch_size: int) -> dict[int, torch.Tensor]:
    store: dict[str, torch.Tensor] = {}
    sites, net = _importance_sites(parent, plan, store)
    row_of = torch.full((parent.num_classes,), -1, dtype=torch.long)
    row_of[torch.tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    sums = [{s: torch.zeros(len(classes), plan.spaces[s].size, dtype=torch.float64) for s in plan.prunable}
            for _ in range(2)]
    counts = [torch.zeros(len(classes), dtype=torch.float64) for _ in range(2)]
    for part in batch_slices(len(images), batch_size):
        x = parent.input_spec.prepare(images[part]).requires_grad_(True)
        logits = net(x)
        own = torch.as_tensor(labels[part], dtype=torch.long)
        rival = logits.detach().scatter(1, own[:, None], float("-inf")).argmax(1)
        acts = [store[s.name] for s in sites]
        for which, picked in enumerate((own, rival)):
            rows = row_of[picked]
            counted = rows >= 0
            if not counted.any():
                continue
            # an image's activations reach only its own logits (eval mode), so one backward pass of the summed
            # margins gives every image the gradient of its own margin
            grads = torch.autograd.grad(_margins(logits, picked)[counted].sum(), acts, retain_graph=which == 0)
            for site, a, g in zip(sites, acts, grads, strict=True):
                sums[which][plan.space_of[site.name]].index_add_(0, rows[counted],
                                                                 _taylor_scores(a, g)[counted].double())
            counts[which].index_add_(0, rows[counted], torch.ones(int(counted.sum()), dtype=torch.float64))
    means = [{s: v / n.clamp(min=1)[:, None] for s, v in part.items()} for part, n in zip(sums, counts, strict=True)]
    return {s: (means[0][s] + means[1][s]).float() for s in plan.prunable}


def stream_spaces(plan: ChannelPlan) -> set[int]:
    """Spaces that an Add (or another elementwise binary op) ties: the residual streams."""
    counts: dict[int, int] = {}
    for layer in plan.layers:
        if layer.out_space is not None:
            counts[layer.out_space] = counts.get(layer.out_space, 0) + 1
    return {s for s, n in counts.items() if n > 1}


def choose_cut(parent: Parent, config: CompactConfig) -> str | None:
    """The last cut point (a ReLU output everything flows through) after at most `config.shared_prefix` of the MACs
    or at most `config.shared_prefix_parameters` of the parameters; None where `shared_prefix` is 0."""
    fraction, parameters = config.shared_prefix, config.shared_prefix_parameters
    if fraction <= 0:
        return None
    from .channels import cut_points

    relus = {s.name for s in parent.model.site_list("relu")}
    held = _parameters_before(parent.model.graph)
    fits = [name for name, f in cut_points(parent.model.graph, parent.model.input_shape)
            if name in relus and (f <= fraction + 1e-9 or held[name] <= parameters + 1e-9)]
    return fits[-1] if fits else None


def _parameters_before(gm: fx.GraphModule) -> dict[str, float]:
    """Per node, the fraction of the network's parameters held by the layers up to and including it."""
    total = max(1, sum(p.numel() for p in gm.parameters()))
    held, before = 0, {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            held += sum(p.numel() for p in gm.get_submodule(str(node.target)).parameters())
        before[node.name] = held / total
    return before


def prefix_spaces(parent: Parent, plan: ChannelPlan, cut: str | None) -> set[int]:
    """Spaces that hold a node at or before the cut: their channels are the same for every module."""
    if cut is None:
        return set()
    order = [n.name for n in parent.model.graph.graph.nodes]
    before = set(order[:order.index(cut) + 1])
    return {plan.space_of[n] for n in before if n in plan.space_of}


def prefix_layers(parent: Parent, plan: ChannelPlan, cut: str | None) -> list[str]:
    """The layers (graph node names) at or before the cut."""
    if cut is None:
        return []
    order = [n.name for n in parent.model.graph.graph.nodes]
    before = set(order[:order.index(cut) + 1])
    return [layer.node for layer in plan.layers if layer.node in before]


def choose_keeps(importance: dict[int, torch.Tensor], plan: ChannelPlan, config: CompactConfig,
                 common: set[int] | None = None) -> list[dict[int, torch.Tensor]]:
    """Each module's keep set per prunable space: its most important channels, the same count for every module;
    in `common` spaces the channels most important to all classes together, the same for every module."""
    streams = stream_spaces(plan)
    rows = next(iter(importance.values())).shape[0]
    keeps: list[dict[int, torch.Tensor]] = [{} for _ in range(rows)]
    for s, imp in importance.items():
        frac = config.stream_keep if s in streams else config.inner_keep
        if common and s in common and config.prefix_keep > 0:
            frac = config.prefix_keep
        k = max(1, min(plan.spaces[s].size, round(frac * plan.spaces[s].size)))
        if common and s in common:
            imp = imp.mean(0, keepdim=True).expand(rows, -1)
        top = imp.topk(k, dim=1).indices.sort(dim=1).values
        for r in range(rows):
            keeps[r][s] = top[r].clone()
    return keeps


# ----------------------------------------------------------------------------------------------------------
# 2b. re-estimated statistics and refitted heads


class _Record(nn.Module):
    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        self.store, self.name = store, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.store[self.name] = x
        return x


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


@torch.no_grad()
def recalibrate(parent: Parent, plan: ChannelPlan, keeps: Sequence[dict[int, torch.Tensor]],
                nets: Sequence[fx.GraphModule], x: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3,
                skip: frozenset[str] = frozenset(), cut: str | None = None) -> None:
    """Re-estimate statistics and refit heads, in place, on one batch `x` (normalised) with the parent's logits
    `teacher` (B, M) for the modules' classes.

    Every layer's kept output channels get the parent's per-channel mean and spread on `x` (a scale and shift
    folded into the layer's weights and bias, layer by layer in graph order, so each layer sees its corrected
    inputs); then each 2-output head is refitted by ridge regression to the parent's (z_c, mean of the others).
    Layers named in `skip` are left as they are. With a `cut` whose layers up to it are all skipped (the frozen
    shared prefix, the same in every network), that prefix runs once and each network runs only its layers after
    it: the same values, without running the prefix once per module (202 modules: 202 times).
    """
    from .channels import split_at

    if cut is not None and not set(prefix_layers(parent, plan, cut)) <= skip:
        raise CnnmodError(f"the layers up to {cut!r} are recalibrated, so they cannot run once for every module")
    prefix_out = split_at(nets[0], cut)[0](x) if cut is not None else None
    store: dict[str, torch.Tensor] = {}
    names = [layer.node for layer in plan.layers]
    tapped = with_taps(parent.model.graph, {n: _Record(store, n) for n in names})
    tapped(x)
    reference = {n: _channel_stats(store[n]) for n in names}
    targets = torch.stack([teacher, (teacher.sum(1, keepdim=True) - teacher) / max(teacher.shape[1] - 1, 1)], 2)
    for i, (net, keep) in enumerate(zip(nets, keeps, strict=True)):
        handles = []
        for layer in plan.layers:
            if layer.node in skip:
                continue
            module = layer_at(net, layer.target)
            rows = keep[layer.out_space] if layer.out_space in keep else None
            mean_p, std_p = reference[layer.node]
            if rows is not None:
                mean_p, std_p = mean_p[rows], std_p[rows]

            def hook(mod: WeightLayer, args: object, out: torch.Tensor, mean_p: torch.Tensor = mean_p,
                     std_p: torch.Tensor = std_p) -> torch.Tensor:
                mean_m, std_m = _channel_stats(out)
                scale = (std_p / std_m.clamp(min=1e-6)).clamp(0.2, 5.0)
                shift = mean_p - scale * mean_m
                shape = (-1, *([1] * (mod.weight.dim() - 1)))
                mod.weight.mul_(scale.view(shape))
                bias = layer_bias(mod)
                if bias is not None:
                    bias.mul_(scale).add_(shift)
                view = (1, -1, *([1] * (out.dim() - 2)))
                return out * scale.view(view) + shift.view(view)

            handles.append(module.register_forward_hook(hook))
        head = net.get_submodule(plan.head.target)
        feats: dict[str, torch.Tensor] = {}
        handles.append(head.register_forward_pre_hook(lambda mod, args: feats.__setitem__("f", args[0])))  # noqa: B023
        try:
            if prefix_out is None:
                net(x)
            else:
                split_at(net, cut)[1](prefix_out)  # type: ignore[arg-type]
        finally:
            for h in handles:
                h.remove()
        f = feats["f"].flatten(1)
        design = torch.cat([f, torch.ones(len(f), 1)], 1).double()
        gram = design.T @ design + ridge * len(f) * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ targets[:, i].double())  # (F + 1, 2)
        head_weight, head_bias = head_parameters(net, plan)
        head_weight.copy_(solution[:-1].T.float())
        head_bias.copy_(solution[-1].float())


# ----------------------------------------------------------------------------------------------------------
# 3a. BatchNorm for the fine-tune: the parent's BatchNorm is folded, and a folded network fine-tunes poorly with
#     SGD, so every convolution gets a BatchNorm again for the fine-tune (starting as the identity on the
#     calibration batch), folded back at the end: the module stays a plain network of sliced layers.


def insert_batchnorm(net: fx.GraphModule, plan: ChannelPlan, x: torch.Tensor,
                     skip: frozenset[str] = frozenset()) -> None:
    """After every convolution of `net` (but those in `skip`), a BatchNorm whose batch statistics on `x` make it
    the identity."""
    nodes = {n.name: n for n in net.graph.nodes}
    convs = [layer for layer in plan.layers
             if isinstance(net.get_submodule(layer.target), nn.modules.conv._ConvNd) and layer.node not in skip]
    stats = conv_output_stats(net, [layer.target for layer in convs], x)
    for layer in convs:
        mean, std, out_dims = stats[layer.target]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[out_dims - 2](len(mean))
        with torch.no_grad():
            var = std.square()
            # a new BatchNorm tracks running statistics (the default), so it has them
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + bn.eps).sqrt())
            bn.bias.copy_(mean)
        name = f"cnnmod_bn_{layer.node}"
        net.add_submodule(name, bn)
        node = nodes[layer.node]
        with net.graph.inserting_after(node):
            new = net.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    net.graph.lint()
    net.recompile()


STATS_SLICE_BYTES = 256 << 20
"""The most bytes one convolution's output may take while `conv_output_stats` runs a batch; a larger batch runs
in slices (a stacked network of 202 modules on 404 images of 64x64: 5.3 GB per output)."""


@torch.no_grad()
def conv_output_stats(net: nn.Module, targets: Sequence[str], x: torch.Tensor
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per output channel of each layer in `targets`: the mean and standard deviation over `x` (as
    `_channel_stats` gives them) and the output's number of dimensions. Outputs are reduced as they are made, and
    a batch whose outputs would pass STATS_SLICE_BYTES runs in slices whose statistics are merged in float64
    (Chan et al.'s pairwise update); a batch within it runs whole, as before."""
    probe: dict[str, int] = {}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    merged: dict[str, tuple[int, torch.Tensor, torch.Tensor, int]] = {}  # images x positions, mean, M2, dims
    mode = ["probe"]

    def hook(name: str, out: torch.Tensor) -> None:
        if mode[0] == "probe":
            probe[name] = out[0].numel() * out.element_size()
        elif mode[0] == "whole":
            stats[name] = (*_channel_stats(out), out.dim())
        else:
            flat = out.transpose(0, 1).flatten(1).double()
            n_b, mean_b = flat.shape[1], flat.mean(1)
            m2_b = (flat - mean_b[:, None]).square().sum(1)
            n_a, mean_a, m2_a, _ = merged.get(name, (0, mean_b, torch.zeros_like(m2_b), out.dim()))
            n, delta = n_a + n_b, mean_b - mean_a
            merged[name] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta.square() * n_a * n_b / n, out.dim())

    handles = [net.get_submodule(t).register_forward_hook(
        lambda mod, args, out, t=t: hook(t, out)) for t in targets]
    try:
        with torch.random.fork_rng(devices=[]):  # a dropout layer draws as it did before the probe
            net(x[:2])
        rows = max(2, STATS_SLICE_BYTES // max(max(probe.values(), default=1), 1))
        mode[0] = "whole" if rows >= len(x) else "sliced"
        for part in [slice(None)] if mode[0] == "whole" else batch_slices(len(x), rows):
            net(x[part])
    finally:
        for h in handles:
            h.remove()
    for name, (n, mean, m2, dims) in merged.items():
        stats[name] = (mean.float(), (m2 / max(n - 1, 1)).sqrt().float(), dims)
    return stats


def fold_inserted_batchnorm(net: fx.GraphModule) -> None:
    """Fold the BatchNorms of `insert_batchnorm` (eval mode, running statistics) back into their convolutions."""
    from .trace import fold_batchnorm

    net.eval()
    fold_batchnorm(net)
    net.recompile()


# ----------------------------------------------------------------------------------------------------------
# 3. fine-tune


def vote_loss(margins: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: CompactConfig
              ) -> torch.Tensor:
    """The composed vote's loss: margins (B, M) as one softmax against labels and the parent's logits (B, M),
    plus each module's binary loss against the parent's probability of its class."""
    t = config.temperature
    distil = F.kl_div(F.log_softmax(margins / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                      reduction="batchmean") * t * t
    loss = config.label_weight * F.cross_entropy(margins, labels) + (1 - config.label_weight) * distil
    if config.binary_weight > 0:
        target = teacher.softmax(1)
        loss = loss + config.binary_weight * F.binary_cross_entropy_with_logits(margins, target) * margins.shape[1]
    return loss


def fine_tune(parent: Parent, nets: list[fx.GraphModule], images: np.ndarray, labels: np.ndarray,
              classes: Sequence[int], config: CompactConfig,
              progress: Callable[[str, int, int, float], None] | None = None, cut: str | None = None,
              frozen: bool = False, parent_prefix: bool = False, hint: torch.Tensor | None = None,
              device: torch.device | str = "cpu", shard: Shard = SINGLE) -> tuple[int, int]:
    """Fine-tune the module networks together (in place) on `config.train_images` images; returns the images the
    fine-tune saw and those the prefix cache computed (`progress` gets the stage: "prefix cache" or "fine-tune").
    A network may also be M stacked modules, (B, ...) -> (B, M, 2). With a `cut`, the layers before it are one
    copy shared by all modules (the first network's), run once;
    `hint` (the parent's channels that the prefix keeps at the cut) adds the feature hint. The networks train on
    `device` and are back on the CPU when it returns.

    Under torchrun (`shard`), each process trains its contiguous share of `nets` (only those are changed) and the
    processes exchange their modules' margins at every step, so that each computes the whole loss; every network
    gets exactly the gradient it gets in one process. The shared prefix must then be frozen."""
    n = config.train_images
    if n == 0 or config.lr == 0:
        return 0, 0
    if cut is not None:
        from .channels import split_at

        trunk = split_at(nets[0], cut)[0]
        tails = [split_at(net, cut)[1] for net in nets]
        teacher = split_at(teacher_graph(parent), cut) if parent_prefix or hint is not None else None
        try:
            return _fine_tune(parent, trunk, tails, images, labels, classes, config, progress, frozen, teacher,
                              None if parent_prefix else hint, device, shard)
        finally:
            share_prefix(nets, trunk)
    return _fine_tune(parent, nn.Identity(), nets, images, labels, classes, config, progress, device=device,
                      shard=shard)


@torch.no_grad()
def share_prefix(nets: Sequence[fx.GraphModule], trunk: fx.GraphModule) -> None:
    """Copy the trunk's layers (the shared prefix) into every module's network."""
    state = trunk.state_dict()
    for net in nets:
        own = net.state_dict()
        for key, value in state.items():
            own[key].copy_(value)


def _fine_tune(parent: Parent, trunk: nn.Module, nets: Sequence[nn.Module], images: np.ndarray,
               labels: np.ndarray, classes: Sequence[int], config: CompactConfig,
               progress: Callable[[str, int, int, float], None] | None, frozen: bool = False,
               teacher_split: tuple[nn.Module, nn.Module] | None = None, hint: torch.Tensor | None = None,
               device: torch.device | str = "cpu", shard: Shard = SINGLE) -> tuple[int, int]:
    """The fine-tune loop; `frozen`: the trunk is not trained; `teacher_split`: the parent cut where the trunk
    ends, whose first part is the trunk itself (then one pass gives both the teacher and the trunk's output)
    unless `hint` is given: then the trunk is narrower, and its output is pulled towards these channels of the
    parent's. Everything runs on `device` (random numbers come from CPU generators, so a seed gives the same
    batches and augmentations on any device); the networks are back on the CPU, in place, when it returns."""
    device = torch.device(device)
    try:
        return _fine_tune_on(parent, trunk, nets, images, labels, classes, config, progress, frozen, teacher_split,
                             hint, device, shard)
    finally:
        for net in (trunk, *nets):
            net.eval()
            net.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _fine_tune_on(parent: Parent, trunk: nn.Module, nets: Sequence[nn.Module], images: np.ndarray,
                  labels: np.ndarray, classes: Sequence[int], config: CompactConfig,
                  progress: Callable[[str, int, int, float], None] | None, frozen: bool,
                  teacher_split: tuple[nn.Module, nn.Module] | None, hint: torch.Tensor | None,
                  device: torch.device, shard: Shard) -> tuple[int, int]:
    n = config.train_images
    if shard.world > 1 and not frozen and any(True for _ in trunk.parameters()):
        raise CnnmodError("a fine-tuned shared prefix (--prefix-keep below 1) trains in one process; start it "
                          "without torchrun")
    mine = shard.part(len(nets))
    first_group, nets = mine.start, list(nets)[mine]
    rng = np.random.default_rng(config.seed + 1)
    order = np.concatenate([rng.permutation(len(images)) for _ in range(math.ceil(n / len(images)))])[:n]
    generator = torch.Generator().manual_seed(config.seed + 2)
    params = [*([] if frozen else trunk.parameters()), *(p for net in nets for p in net.parameters())]
    first_column: int | None = None
    for net in (trunk, *nets):
        net.train()
        net.to(device, memory_format=_layout(parent))  # type: ignore[call-overload]
    if frozen:
        trunk.eval()
    if teacher_split is not None:
        teacher_split = (teacher_split[0].to(device), teacher_split[1].to(device))
    if hint is not None:
        hint = hint.to(device)
    steps = math.ceil(n / config.batch_size)
    # a process with no modules to train (more processes than groups) still takes part in every exchange
    opt = torch.optim.SGD(params or [nn.Parameter(torch.zeros(0))], lr=config.lr, momentum=0.9, nesterov=True,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    teacher_net = teacher_graph(parent).to(device) if teacher_split is None else None
    columns = torch.tensor(list(classes), dtype=torch.long)
    position = torch.full((parent.num_classes,), -1, dtype=torch.long)  # on the CPU, as the labels are
    position[columns] = torch.arange(len(columns))
    columns = columns.to(device)
    seen = 0
    from ..workflows.train import augment_batch, crop_padding, to_unit_float  # imported here to keep import light

    pad = crop_padding(*parent.input_spec.size, parent.input_spec.channels)
    cache = prefix_cache(parent, teacher_split[0], images, config, progress, device) \
        if teacher_split is not None and hint is None and frozen and config.cache_prefix else None
    shift = max(1, round(pad * cache.shape[-1] / parent.input_spec.size[1])) if cache is not None and config.augment \
        else 0  # the crop padding, in the cut's positions
    for step in range(steps):
        batch = order[step * config.batch_size:(step + 1) * config.batch_size]
        if len(batch) < 2:
            break
        if cache is not None:
            assert teacher_split is not None
            mirrored = (torch.rand(len(batch), generator=generator) < 0.5).long() if cache.shape[1] == 2 \
                else torch.zeros(len(batch), dtype=torch.long)
            h = cache[torch.from_numpy(batch), mirrored].to(device).float()
            if shift:
                h = augment_batch(h, shift, generator, flips=False)
            h = h.contiguous(memory_format=_layout(parent))
            with torch.no_grad():
                teacher = teacher_split[1](h)[:, columns]
        else:
            x = to_unit_float(images[batch], device)
            if config.augment:
                x = augment_batch(x, pad, generator)
            x = parent.input_spec.prepare(x).contiguous(memory_format=_layout(parent))
            with torch.no_grad():
                if teacher_split is not None:
                    h = teacher_split[0](x)
                    teacher = teacher_split[1](h)[:, columns]
                    if hint is not None:
                        target = h[:, hint]
                        if frozen:
                            h = trunk(x)
                else:
                    assert teacher_net is not None
                    teacher = teacher_net(x)[:, columns]
                    if frozen:
                        h = trunk(x)
        y = position[torch.as_tensor(labels[batch], dtype=torch.long)].to(device)
        if not frozen:
            h = trunk(x)
        outs = [_run_group(net, h, config.seed, step, first_group + j).reshape(len(h), -1, 2)
                for j, net in enumerate(nets)]
        own = torch.cat(outs, 1) if outs else h.new_zeros((len(batch), 0, 2))  # (B, M, 2)
        margins = own[..., 0] - own[..., 1]
        if shard.world > 1:
            if first_column is None:
                counts = shard.gather_rows(torch.tensor([margins.shape[1]], device=shard.device))
                first_column = int(counts[:shard.rank].sum())
            every = shard.gather_rows(margins.detach().t().contiguous().to(shard.device)).t().to(device)
            margins = torch.cat([every[:, :first_column], margins, every[:, first_column + margins.shape[1]:]], 1)
        keep = y >= 0
        loss = vote_loss(margins[keep], teacher[keep], y[keep], config) if keep.any() else margins.sum() * 0
        if hint is not None and config.hint_weight > 0:
            loss = loss + config.hint_weight * F.mse_loss(h, target)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        clip_gradients(params, config.clip, shard)
        opt.step()
        sched.step()
        seen += len(batch)
        if progress is not None:
            progress("fine-tune", seen, n, float(loss.detach()))
    return seen, 0 if cache is None else cache.shape[0] * cache.shape[1]


def _run_group(net: nn.Module, h: torch.Tensor, seed: int, step: int, group: int) -> torch.Tensor:
    """`net(h)` with the random numbers (of dropout, say) that this group draws at this step in any process."""
    draw = int(np.random.SeedSequence([seed, step, group]).generate_state(1)[0])
    torch.default_generator.manual_seed(draw)
    if h.is_cuda:
        torch.cuda.manual_seed(draw)  # this device's generator alone, which compact_decompose restores
    return net(h)


def clip_gradients(params: Sequence[nn.Parameter], most: float, shard: Shard = SINGLE) -> None:
    """Scale the gradients of `params` so that their joint norm is at most `most`, as
    `torch.nn.utils.clip_grad_norm_` does; under torchrun the norm is over every process's `params` (taken in
    rank order, so that it is the same number in any number of processes)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads]) if grads else torch.zeros(0)
    if shard.world > 1:
        norms = shard.gather_rows(norms.to(shard.device))
    scale = torch.clamp(most / (torch.linalg.vector_norm(norms) + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.device))


CACHE_MIN_REPEATS = 2
"""The prefix cache computes every training image and its mirror once: it pays when the fine-tune would have
computed each of them at least this many times."""
CACHE_MAX_BYTES = 4 << 30
"""The most memory the prefix cache may take (float16); a larger cache is not made and every step runs the
prefix (ResNet-20 on CIFAR-10: 1.6 GiB for 50,000 images and their mirror images)."""


@torch.no_grad()
def prefix_cache(parent: Parent, prefix: nn.Module, images: np.ndarray, config: CompactConfig,
                 progress: Callable[[str, int, int, float], None] | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The frozen prefix's output for every image (and, with augmentation, its mirror image) as float16 in the
    CPU's memory, (N, 1 or 2, C, H, W); None where it would not pay or would not fit (CACHE_MIN_REPEATS,
    CACHE_MAX_BYTES). The prefix runs on `device`, where it already is."""
    mirrors = 2 if config.augment else 1
    n = len(images)
    if config.train_images < CACHE_MIN_REPEATS * mirrors * n:
        return None
    probe = parent.input_spec.prepare(images[:1], device).contiguous(memory_format=_layout(parent))
    shape = prefix(probe).shape[1:]
    if n * mirrors * math.prod(shape) * 2 > CACHE_MAX_BYTES:
        return None
    cache = torch.empty((n, mirrors, *shape), dtype=torch.float16)
    from ..workflows.train import batches, to_unit_float

    done = 0
    for batch in batches(np.arange(n), 256):
        x = to_unit_float(images[batch], device)
        for m in range(mirrors):
            view = x.flip(3) if m else x
            cache[batch[0]:batch[-1] + 1, m] = prefix(
                parent.input_spec.prepare(view).contiguous(memory_format=_layout(parent))).to("cpu", torch.float16)
        done += len(batch)
        if progress is not None:
            progress("prefix cache", done, n, float("nan"))
    return cache


def _layout(parent: Parent) -> torch.memory_format:
    """The fine-tune's memory layout: channels-last for images (oneDNN's grouped convolutions and their gradients
    are about 1.6x faster so on a CPU, and it is the layout GPUs prefer)."""
    return torch.channels_last if len(parent.model.input_shape) == 3 else torch.contiguous_format


def teacher_graph(parent: Parent) -> fx.GraphModule:
    """A copy of the parent's network in the fine-tune's layout (the parent itself stays as it is)."""
    return copy.deepcopy(parent.model.graph).to(memory_format=_layout(parent))  # type: ignore[call-overload]


@dataclass(frozen=True)
class CompactModules:
    """The outcome of a compact decomposition, before it becomes a ModuleSet."""

    plan: ChannelPlan
    keeps: tuple[dict[int, torch.Tensor], ...]
    nets: tuple[fx.GraphModule, ...]
    cost: CompactCost


def compact_decompose(parent: Parent, images: np.ndarray, labels: np.ndarray, config: CompactConfig,
                      classes: Sequence[int] | None = None,
                      progress: Callable[[str, int, int, float], None] | None = None,
                      device: torch.device | str | None = "cpu", shard: Shard = SINGLE) -> CompactModules:
    """Compact modules for `classes` (default: all) of `parent`, from labelled training images. The fine-tune
    (and the prefix cache) run on `device` (None: CUDA where it is there); the few-image passes before it run on
    the CPU, and the modules are on the CPU.

    Under torchrun (`shard`) every process makes the same keep sets, and each fine-tunes its share of the module
    groups (`CompactConfig.fine_tune_groups`); every process returns all the modules, bit-identical to those of
    one process."""
    device = resolve_device(device)
    start = time.perf_counter()
    chosen = list(classes) if classes is not None else list(range(parent.num_classes))
    missing = sorted(set(chosen) - set(np.unique(labels).tolist()))
    if missing:
        raise CnnmodError(f"the data holds no training images of class {parent.classes[missing[0]]!r}; decompose "
                          "other classes (--classes)")
    plan = channel_plan(parent.model)
    rng = np.random.default_rng(config.seed)
    sample = _sample(labels, range(parent.num_classes), config.importance_per_class, rng)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        importance = class_importance(parent, plan, images[sample], chosen,
                                      labels=labels[sample] if config.importance == "own_and_rival" else None)
        cut = choose_cut(parent, config)
        common = prefix_spaces(parent, plan, cut)
        keeps = choose_keeps(importance, plan, config, common)
        frozen = frozenset(prefix_layers(parent, plan, cut)) if cut is not None and config.freeze_prefix \
            else frozenset()
        whole = bool(frozen) and all(len(keeps[0].get(sp, [])) == plan.spaces[sp].size
                                     for sp in common if plan.spaces[sp].prunable)
        head = parent.model.head
        hw, hb = channel_heads(head.weight, head.bias, chosen)
        nets = [materialize(parent.model.graph, plan, k, hw[i], hb[i]) for i, k in enumerate(keeps)]
        pick = _sample(labels, range(parent.num_classes), math.ceil(max(config.recalibrate_images, 64)
                                                                    / parent.num_classes), rng)
        x = parent.input_spec.prepare(images[pick])
        calibration = 0
        if config.recalibrate_images > 0:
            with torch.no_grad():
                teacher = parent.model.graph(x)[:, torch.tensor(chosen)]
            recalibrate(parent, plan, keeps, nets, x, teacher, skip=frozen, cut=cut if frozen else None)
            calibration = len(pick)
        training = config.train_images > 0 and config.lr > 0
        grouped = training and config.batching == "grouped" and len(nets) > 1 and same_widths(plan, keeps)
        groups = module_groups(len(nets), config.fine_tune_groups if grouped else len(nets))
        owned = shard.part(len(groups))
        trained = [stack(parent.model.graph, plan, [keeps[i] for i in g], [nets[i] for i in g], cut=cut,
                         input_shape=tuple(parent.model.input_shape)) for g in groups] if grouped else nets
        if training:
            for net in trained[owned]:
                insert_batchnorm(net, plan, x, skip=frozen)
            calibration = len(pick)
        mine = np.isin(labels, chosen)  # the loss reads only the chosen classes' images: train on those alone
        train_images, train_labels = (images, labels) if mine.all() else (images[mine], labels[mine])
        hint = keeps[0][plan.space_of[cut]] if cut is not None and config.hint_weight > 0 and not whole \
            and cut in plan.space_of else None
        seen, cached = fine_tune(parent, trained, train_images, train_labels, chosen, config, progress, cut,
                                 bool(frozen), whole, hint, device, shard)
        if training:
            for net in trained[owned]:
                fold_inserted_batchnorm(net)
        if grouped:
            for net, g in zip(trained[owned], groups[owned], strict=True):
                load_stacked(net, plan, [nets[i] for i in g])
        if shard.world > 1 and training:
            _load_from_owners(nets, groups, shard)
        if cut is not None:  # the same prefix: bit-identical weights in every module
            from .channels import split_at

            share_prefix(nets, split_at(nets[0], cut)[0])
    cost = CompactCost(len(sample) + calibration, seen, time.perf_counter() - start, cached)
    return CompactModules(plan, tuple(keeps), tuple(nets), cost)


def module_groups(modules: int, groups: int) -> list[list[int]]:
    """`modules` indices in `groups` contiguous runs (fewer when there are fewer modules) whose sizes differ by at
    most one."""
    count = max(1, min(groups, modules))
    return [list(range(g * modules // count, (g + 1) * modules // count)) for g in range(count)]


def _load_from_owners(nets: Sequence[fx.GraphModule], groups: Sequence[Sequence[int]], shard: Shard) -> None:
    """Copy into `nets`, in place, every module's weights as the process that fine-tuned it has them (group j
    belongs to the rank whose `shard.part` holds j): the same tensors, bit for bit. A bias that the owner's network
    gained when its BatchNorm was folded is added here too."""
    import torch.distributed as dist

    shares = [range(len(groups))[Shard(rank, shard.world).part(len(groups))] for rank in range(shard.world)]
    owners = [rank for rank, share in enumerate(shares) for _ in share]
    for group, owner in zip(groups, owners, strict=True):
        for i in group:
            box: list[Any] = [{k: v.detach().cpu() for k, v in nets[i].state_dict().items()}
                              if shard.rank == owner else None]
            dist.broadcast_object_list(box, src=owner, device=shard.device if shard.backend == "nccl" else None)
            if shard.rank != owner:
                _load_state(nets[i], box[0])


@torch.no_grad()
def _load_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        module = net.get_submodule(path)
        current = getattr(module, name, None)
        if current is None:
            setattr(module, name, nn.Parameter(value.clone()))
        else:
            current.copy_(value)


def module_set(parent: Parent, plan: ChannelPlan, keeps: Sequence[dict[int, torch.Tensor]],
               nets: Sequence[fx.GraphModule], classes: Sequence[int], config: dict | None = None,
               shared: object = None, engine: str = "exact", weights_dtype: str = "float32") -> ModuleSet:
    """Compact modules as a ModuleSet: masks at the parent's ReLU sites (whole kept channels, for the Jaccard
    index and overlaps), heads over the parent's full features (zero for removed channels), and the networks,
    their weights rounded to what `weights_dtype` holds (the heads too, so that a stored module runs as this one)."""
    from .channels import _feature_index, _sorted_keep, site_masks
    from .engines import CompactNets, SharedNet, rounded_weights

    nets = [rounded_weights(n, weights_dtype, f"module {i}") for i, n in enumerate(nets)]
    if isinstance(shared, SharedNet):
        shared = replace(shared, trunk=rounded_weights(shared.trunk, weights_dtype, "the shared network"))

    sites = parent.model.site_list("relu")
    per_module = [site_masks(parent.model, plan, k) for k in keeps]
    masks = {s.name: torch.stack([m[s.name] for m in per_module]) for s in sites}
    features = parent.model.head.weight.shape[1]
    weights, biases = torch.zeros(len(nets), 2, features), torch.zeros(len(nets), 2)
    for i, (net, keep) in enumerate(zip(nets, keeps, strict=True)):
        lin_weight, lin_bias = head_parameters(net, plan)
        cols = _feature_index(_sorted_keep(keep, plan)[plan.head_space], plan.head.repeat)
        weights[i][:, cols] = lin_weight.detach()
        biases[i] = lin_bias.detach()
    compact = CompactNets(plan, tuple(dict(k) for k in keeps), tuple(nets), shared, engine,  # type: ignore[arg-type]
                          tuple(parent.model.input_shape), parent.model.graph, weights_dtype=weights_dtype)
    record = {"method": "compact", "sites": "relu", **(config or {})}
    return ModuleSet(parent, tuple(classes), sites, masks, weights, biases, record, compact)


# ----------------------------------------------------------------------------------------------------------
# What it cost, next to what training the parent costs


def stored_as(modules: ModuleSet, weights_dtype: str) -> ModuleSet:
    """Compact modules whose networks and heads hold `weights_dtype` values, as a store keeps them with
    `--weights-dtype` (they still run in float32): what a store of them will load is exactly what runs here."""
    from .engines import WEIGHT_DTYPES

    if modules.compact is None:
        raise CnnmodError("only compact modules (decompose --method compact) have a weights dtype")
    compact = modules.compact.stored_as(weights_dtype)
    dtype = WEIGHT_DTYPES[weights_dtype]
    return replace(modules, compact=compact, head_weight=modules.head_weight.to(dtype).to(torch.float32),
                   head_bias=modules.head_bias.to(dtype).to(torch.float32))


TRAINING_EPOCH_MEASURES = ("epoch", "steps")


def training_epoch_cost(parent: Parent, images: np.ndarray, labels: np.ndarray, measure: str = "epoch",
                        steps: int = 10, batch_size: int = 128, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None,
                        device: torch.device | str = "cpu") -> dict:
    """Time and energy of one training epoch of the parent's architecture on `images` (SGD with momentum,
    `batch_size`, the training augmentation), measured with the same meter as everything else, after two
    warm-up steps.

    `measure="epoch"` trains one whole epoch, every image once, and measures it. `measure="steps"` measures
    `steps` steps and takes the median step times the steps of an epoch: a quick estimate, and the median so that
    a step slowed by something else on the machine does not move it. The zoo architecture (with BatchNorm) trains
    where the parent is a zoo model; otherwise the folded graph does, which is a little cheaper than training the
    original. `progress(images_done, images_total)` follows a whole epoch. It trains on `device`, as the fine-tune
    it is set against does (the same meter, the same machine)."""
    from ..workflows.energy import EnergyMeter
    from ..workflows.train import augment_batch, batches, crop_padding, to_unit_float

    if measure not in TRAINING_EPOCH_MEASURES:
        raise CnnmodError(f"unknown training-epoch measure {measure!r}; expected one of "
                          f"{', '.join(TRAINING_EPOCH_MEASURES)}")
    if len(images) < 2:
        raise CnnmodError("a training epoch needs at least 2 training images")
    if steps < 1 or batch_size < 2:
        raise CnnmodError(f"a training epoch is measured on at least 1 step of at least 2 images; got {steps} "
                          f"steps of {batch_size}")
    model: nn.Module
    try:
        from ..zoo import create_model, list_models

        if parent.arch in list_models():
            model = create_model(parent.arch, num_classes=parent.num_classes, in_channels=parent.input_spec.channels,
                                 seed=seed)
            what = parent.arch
        else:
            raise KeyError(parent.arch)
    except Exception:  # not a zoo model (or one that will not build here): the folded graph
        model = copy.deepcopy(parent.model.graph)
        what = "the folded graph"
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    pad = crop_padding(*parent.input_spec.size, parent.input_spec.channels)
    rng = np.random.default_rng(seed)
    batch = min(batch_size, len(images))

    def step(pick: np.ndarray) -> None:
        x = to_unit_float(images[pick], device)
        x = parent.input_spec.prepare(augment_batch(x, pad, generator))
        loss = F.cross_entropy(model(x), torch.as_tensor(labels[pick], dtype=torch.long).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":  # the meter times what ran, not what was queued
            torch.cuda.synchronize(device)

    def random_batch() -> np.ndarray:
        return rng.choice(len(images), size=batch, replace=False)

    with torch.random.fork_rng(devices=[]):
        step(random_batch())
        step(random_batch())
        with EnergyMeter() as meter:
            if measure == "epoch":
                order = rng.permutation(len(images))
                done = 0
                for pick in batches(order, batch):
                    if len(pick) < 2:  # dropped, as training drops it (BatchNorm cannot train on one image)
                        continue
                    step(pick)
                    done += len(pick)
                    if progress is not None:
                        progress(done, len(images))
            else:
                for i in range(steps):
                    with meter.step(f"step {i}"):
                        step(random_batch())
    if measure == "epoch":
        report = meter.report
        return {"architecture": what, "measure": "one whole epoch", "measured_images": done,
                "epoch_images": int(len(images)), "epoch_seconds": report.seconds, "epoch_kwh": report.kwh,
                "method": report.method}
    per_step = list(meter.steps.values())
    scale = len(images) / batch  # steps per epoch
    return {"architecture": what, "measure": f"median of {steps} steps", "measured_images": steps * batch,
            "epoch_images": int(len(images)), "epoch_seconds": statistics.median(r.seconds for r in per_step) * scale,
            "epoch_kwh": statistics.median(r.kwh for r in per_step) * scale, "method": meter.report.method}


def cost_record(cost: CompactCost, energy: dict, epoch: dict, epochs: int = 200) -> dict:
    """The store's record of what the modules cost next to training the parent for `epochs` epochs."""
    parent_kwh = epoch["epoch_kwh"] * epochs
    train_images = epoch["epoch_images"] * epochs
    return {
        "images_seen": cost.importance_images + cost.prefix_cache_images + cost.train_images,
        "importance_images": cost.importance_images,
        "prefix_cache_images": cost.prefix_cache_images,
        "fine_tune_images": cost.train_images,
        "seconds": cost.seconds,
        "energy": energy,
        "parent_training": {**epoch, "epochs": epochs, "kwh": parent_kwh, "images": train_images},
        "fraction_of_parent_training_energy": energy["kwh"] / parent_kwh if parent_kwh > 0 else None,
    }


def decompose_compact(parent: Parent, images: np.ndarray, labels: np.ndarray,
                      config: CompactConfig = CompactConfig(), classes: Sequence[str] | None = None,
                      progress: Callable[[str, int, int, float], None] | None = None,
                      device: torch.device | str | None = "cpu") -> tuple[ModuleSet, CompactCost]:
    """Compact modules of `parent` for `classes` (default: all) as a ModuleSet, and what they cost; the fine-tune
    runs on `device`.

    `images` are uint8 NHWC training images and `labels` index the parent's classes."""
    chosen = [parent.class_index(c) for c in classes] if classes else list(range(parent.num_classes))
    result = compact_decompose(parent, images, labels, config, chosen, progress, device)
    return module_set(parent, result.plan, list(result.keeps), list(result.nets), chosen, config.to_json()), \
        result.cost
