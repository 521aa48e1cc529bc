"""What a parent expects as input, and how raw images are adapted to it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.5,)
MAX_SIDE = 8192
MAX_CHANNELS = 64


@dataclass(frozen=True)
class InputSpec:
    """Image size (H, W), channel count, and per-channel normalisation of a parent's input."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.size) != 2 or not all(isinstance(s, int) and 1 <= s <= MAX_SIDE for s in self.size):
            raise ValueError(f"input size must be two sides of 1 to {MAX_SIDE} pixels, got {list(self.size)}")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ValueError(f"input channels must be 1 to {MAX_CHANNELS}, got {self.channels}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels or not all(math.isfinite(v) for v in values):
                raise ValueError(f"input {name} must be {self.channels} finite numbers, got {list(values)}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"input std must be above 0, got {list(self.std)}")

    @classmethod
    def default(cls, size: tuple[int, int], channels: int) -> InputSpec:
        mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else (GREY_MEAN * channels, GREY_STD * channels)
        return cls((int(size[0]), int(size[1])), channels, tuple(mean), tuple(std))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        """Raises ValueError, KeyError or TypeError for a spec that is not one (callers name the file)."""
        return cls(tuple(int(s) for s in d["size"]), int(d["channels"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

    def prepare(self, images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Turn raw images (uint8 NHWC, or float NCHW in [0, 1]) into this parent's normalised input: float32
        NCHW with the strides of a fresh tensor (given a channels-last one, convolutions answer channels-last
        and a model's `x.view(x.size(0), -1)` fails)."""
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            x = _nchw_strides(x.to(device).permute(0, 3, 1, 2)).float() / 255.0
        else:
            x = x.to(device=device, dtype=torch.float32)
        if x.shape[1] != self.channels:
            if x.shape[1] == 3 and self.channels == 1:
                x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            elif x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise ValueError(f"cannot adapt {x.shape[1]}-channel images to {self.channels} channels")
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return _nchw_strides((x - mean) / std)


def _nchw_strides(x: torch.Tensor) -> torch.Tensor:
    """`x`, copied unless its strides are those of a fresh tensor of its shape. `contiguous()` is not enough: a
    one-channel NHWC batch permuted to NCHW counts as contiguous, yet convolutions treat it as channels-last."""
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    if x.stride() == tuple(reversed(strides)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of `batch_size` items (at least 2; the last two may differ by one or merge) covering
    `range(n)`, none of one item unless n is 1: a model with `x.squeeze()` before its head loses the batch
    dimension on a batch of one."""
    size = max(2, batch_size)
    slices = [slice(start, min(start + size, n)) for start in range(0, n, size)]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start == 1:
        before = slices[-2]
        if before.stop - before.start > 2:
            slices[-2:] = [slice(before.start, before.stop - 1), slice(before.stop - 1, n)]
        else:
            slices[-2:] = [slice(before.start, n)]
    return slices


def as_format(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Raw uint8 images converted to the size and channels of `spec` (to train one model on two datasets, or
    to stack images of several datasets)."""
    plain = InputSpec(spec.size, spec.channels, (0.0,) * spec.channels, (1.0,) * spec.channels)
    x = plain.prepare(images).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
