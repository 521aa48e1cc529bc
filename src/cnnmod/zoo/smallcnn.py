"""A small CNN for 28x28 grey images (Fashion-MNIST and the like)."""

from __future__ import annotations

from torch import nn

from .init import PlainCNN


class SmallCNN(PlainCNN):
    """conv3x3-BN-ReLU-maxpool2 twice, flatten, linear-ReLU-dropout, linear.

    The flattened size is fixed by ``input_size`` (28x28 by default); inputs of another size must be resized.
    """

    def __init__(self, *, widths: tuple[int, int] = (16, 32), hidden: int = 64, dropout: float = 0.25,
                 num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (28, 28)) -> None:
        c1, c2 = widths
        features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * (input_size[0] // 4) * (input_size[1] // 4)
        super().__init__(features, flat, hidden, dropout, num_classes)
