"""CIFAR ResNets (He et al. 2016, 6n+2 layers) with the state_dict layout of pytorch_resnet_cifar10.

Keys: ``conv1.weight``, ``bn1.*``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}.*``, ``linear.{weight,bias}``;
option-B shortcuts add ``layer{2,3}.0.shortcut.{0,1}.*``. Without BatchNorm the convolutions carry a bias
and the ``bn*`` keys are absent.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channel dimension; no parameters."""

    def __init__(self, stride: int, pad_before: int, pad_after: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = pad_before
        self.pad_after = pad_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (each followed by BatchNorm when enabled) and a shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Literal["A", "B"],
                 batch_norm: bool) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=not batch_norm)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=not batch_norm)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()  # empty: traces to nothing
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                extra = planes - in_planes
                self.shortcut = PadShortcut(stride, extra // 2, extra - extra // 2)
            else:
                conv = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=not batch_norm)
                layers: list[nn.Module] = [conv]
                if batch_norm:
                    layers.append(nn.BatchNorm2d(planes))
                self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.batch_norm:
            out = self.bn1(out)
        out = F.relu(out)
        out = self.conv2(out)
        if self.batch_norm:
            out = self.bn2(out)
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` basic blocks (stride 1, 2, 2), global average pool,
    ``linear``. Traceable by ``torch.fx.symbolic_trace`` and independent of the input size.

    Without BatchNorm the last convolution of every residual branch starts at zero (as in Fixup), so each
    block starts as its shortcut and a deep net trains with plain SGD.
    """

    def __init__(self, *, blocks_per_stage: int, widths: tuple[int, int, int] = (16, 32, 64),
                 shortcut: Literal["A", "B"] = "A", batch_norm: bool = True, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.batch_norm = batch_norm
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=not batch_norm)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut, batch_norm))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)
        self._init_weights(3 * blocks_per_stage)

    def _init_weights(self, num_blocks: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if isinstance(m, nn.Conv2d) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        if not self.batch_norm:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    # Fixup: scale the first branch conv by L^-1/2, start the last one at zero.
                    with torch.no_grad():
                        m.conv1.weight.mul_(num_blocks ** -0.5)
                    nn.init.zeros_(m.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.batch_norm:
            out = self.bn1(out)
        out = F.relu(out)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)  # type: ignore[no-any-return]
