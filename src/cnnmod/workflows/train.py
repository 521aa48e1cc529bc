"""Training a classifier from scratch: SGD, cosine schedule, batched augmentation, best-epoch selection."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.errors import DataError, ModelError
from cnnmod.progress import show_progress
from cnnmod.zoo import create_model


class LabelledImages(Protocol):
    """What training reads from a dataset: uint8 images (N, H, W, C), int64 labels (N,), class names."""

    @property
    def images(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def classes(self) -> tuple[str, ...]: ...


@dataclass
class TrainResult:
    """The model holds the best epoch's weights, in eval mode, on the training device."""

    model: nn.Module
    best_val_accuracy: float  # fraction; NaN when val_fraction == 0
    best_epoch: int  # 1-based
    # one dict per epoch: epoch, train_loss, train_accuracy, val_accuracy, seconds
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) index arrays; each class gives round(val_fraction * count) images to val,
    at least one when val_fraction > 0 and the class has two or more images."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_parts.append(rng.permutation(idx)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def crop_padding(height: int, width: int, channels: int) -> int:
    """Random-crop padding: 4 px per 32 for colour images, 2 px per 28 for grey ones (at least 1)."""
    side = min(height, width)
    return max(1, round(side * (4 / 32 if channels >= 3 else 2 / 28)))


def augment_batch(x: torch.Tensor, padding: int, generator: torch.Generator, flips: bool = True) -> torch.Tensor:
    """Random crop with zero padding and (with `flips`) random horizontal flip of a float NCHW batch, all samples
    at once.

    Random numbers come from ``generator`` (a CPU generator) so results do not depend on the device.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device) if flips else torch.zeros(n, dtype=torch.bool,
                                                                                           device=x.device)
    padded = F.pad(x, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # N, H+2p, W+2p, C
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # N, H
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # N, W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def to_unit_float(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC numpy batch -> float NCHW tensor in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


@torch.inference_mode()
def _accuracy(model: nn.Module, data: LabelledImages, indices: np.ndarray, input_spec: InputSpec,
              batch_size: int, device: torch.device) -> float:
    if len(indices) == 0:
        return float("nan")
    correct = 0
    for idx in batches(indices, batch_size):
        x = input_spec.prepare(to_unit_float(data.images[idx], device), device)
        y = torch.from_numpy(np.asarray(data.labels[idx], dtype=np.int64)).to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(indices)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _check_data(data: LabelledImages) -> None:
    images, labels = data.images, data.labels
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"training images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    if len(labels) != len(images) or len(images) == 0:
        raise DataError(f"training data has {len(images)} images and {len(labels)} labels; "
                        "need as many labels as images, and at least one")
    if labels.min() < 0 or labels.max() >= len(data.classes):
        raise DataError(f"labels must lie in [0, {len(data.classes)}) for {len(data.classes)} classes; "
                        f"got [{labels.min()}, {labels.max()}]")


def train_model(
    model: nn.Module,
    data: LabelledImages,
    input_spec: InputSpec,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    val_fraction: float = 0.1,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a copy of ``model`` on ``data``; return the weights of the epoch with the best held-out accuracy.

    SGD (momentum 0.9, Nesterov), cross-entropy, a linear warm-up then a per-step cosine schedule to zero;
    weight decay applies to weights of rank > 1 only. A stratified ``val_fraction`` of ``data`` is held out
    to pick the epoch (the later epoch wins ties); with ``val_fraction == 0`` the last epoch is returned.
    ``model`` itself is not changed. On the CPU the result is the same for the same ``seed``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive; got {epochs}, {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    _check_data(data)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    labels = np.asarray(data.labels, dtype=np.int64)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if len(train_idx) == 0:
        raise DataError("no training images left after the validation split; lower val_fraction")
    _, h, w, c = data.images.shape
    padding = crop_padding(h, w, c)
    num_classes = len(data.classes)

    fork_devices: list[int] = []
    if dev.type == "cuda":
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        net = copy.deepcopy(model).to(dev)
        decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, momentum=0.9, nesterov=True,
        )
        steps_per_epoch = sum(1 for b in batches(train_idx, batch_size) if len(b) > 1)
        total = max(1, epochs * steps_per_epoch)
        warmup = max(1, min(steps_per_epoch, total // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
        shuffle = np.random.default_rng(seed)
        aug_gen = torch.Generator().manual_seed(seed)

        history: list[dict] = []
        best_state: dict[str, torch.Tensor] | None = None
        best_acc, best_epoch = -1.0, 0
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            net.train()
            loss_sum, correct, seen = 0.0, 0, 0
            order = train_idx[shuffle.permutation(len(train_idx))]
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", file=sys.stderr,
                       disable=not show_progress(progress), leave=False, dynamic_ncols=True)
            try:
                for idx in batches(order, batch_size):
                    if len(idx) < 2:  # BatchNorm cannot train on a single image
                        continue
                    x = to_unit_float(data.images[idx], dev)
                    if augment:
                        x = augment_batch(x, padding, aug_gen)
                    x = input_spec.prepare(x, dev)
                    y = torch.from_numpy(labels[idx]).to(dev, non_blocking=True)
                    logits = net(x)
                    if logits.ndim != 2 or logits.shape[1] != num_classes:
                        raise ModelError(f"model outputs shape {tuple(logits.shape)} but the data has "
                                         f"{num_classes} classes; create it with num_classes={num_classes}")
                    loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(1) == y).sum())
                    seen += len(idx)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            finally:
                bar.close()
            net.eval()
            val_acc = _accuracy(net, data, val_idx, input_spec, max(batch_size, 256), dev)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, seen),
                "train_accuracy": correct / max(1, seen),
                "val_accuracy": val_acc,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(dict(record))
            if len(val_idx) == 0 or val_acc >= best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()
    return TrainResult(model=net, best_val_accuracy=best_acc, best_epoch=best_epoch, history=history,
                       seconds=time.perf_counter() - start)


def train_parent(arch: str, data: LabelledImages, spec: InputSpec, epochs: int, seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = True) -> Parent:
    """A zoo model of `arch`, initialised from `seed` and trained from scratch on `data`, as a parent."""
    model = create_model(arch, num_classes=len(data.classes), in_channels=spec.channels, seed=seed)
    result = train_model(model, data, spec, epochs=epochs, seed=seed, device=device, progress=progress)
    return Parent.from_model(result.model.cpu().eval(), spec, data.classes, arch)
