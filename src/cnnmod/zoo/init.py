"""What the zoo's plain CNNs share: a convolutional body, a dense classifier, and their initialisation."""

import torch
from torch import nn


def init_relu_layers(model: nn.Module) -> None:
    """Kaiming-normal weights (ReLU gain) and zero biases for every conv and linear layer."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PlainCNN(nn.Module):
    """``features`` (given), flatten, then ``classifier``: linear-ReLU-dropout-linear; ReLU initialisation."""

    def __init__(self, features: nn.Sequential, flat: int, hidden: int, dropout: float, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_relu_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)  # type: ignore[no-any-return]
