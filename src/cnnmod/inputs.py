"""What a parent expects as input, and how raw images are adapted to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.5,)


@dataclass(frozen=True)
class InputSpec:
    """Image size (H, W), channel count, and per-channel normalisation of a parent's input."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def default(cls, size: tuple[int, int], channels: int) -> InputSpec:
        mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else (GREY_MEAN * channels, GREY_STD * channels)
        return cls((int(size[0]), int(size[1])), channels, tuple(mean), tuple(std))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(tuple(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]

    def prepare(self, images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Turn raw images (uint8 NHWC, or float NCHW in [0, 1]) into this parent's normalised input."""
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
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
        return (x - mean) / std


def as_format(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Raw uint8 images converted to the size and channels of `spec` (to train one model on two datasets, or
    to stack images of several datasets)."""
    plain = InputSpec(spec.size, spec.channels, (0.0,) * spec.channels, (1.0,) * spec.channels)
    x = plain.prepare(images).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
