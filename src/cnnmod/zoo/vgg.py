"""A VGG-style CIFAR net: VGG-11 layout with halved widths."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .init import PlainCNN

VGG11_HALF: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


class CifarVGG(PlainCNN):
    """conv3x3-BN-ReLU blocks with 2x2 max-pools ("M" in ``cfg``), flatten, linear-ReLU-dropout, linear.

    The flattened size is fixed by ``input_size`` (32x32 by default); inputs of another size must be resized.
    """

    def __init__(self, *, cfg: Sequence[int | str] = VGG11_HALF, hidden: int = 128, dropout: float = 0.5,
                 num_classes: int = 10, in_channels: int = 3, input_size: tuple[int, int] = (32, 32)) -> None:
        layers: list[nn.Module] = []
        channels, h, w = in_channels, input_size[0], input_size[1]
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                out = int(item)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        super().__init__(nn.Sequential(*layers), channels * h * w, hidden, dropout, num_classes)
