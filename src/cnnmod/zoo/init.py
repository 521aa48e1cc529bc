"""Weight initialisation shared by the zoo's plain CNNs."""

from torch import nn


def init_relu_layers(model: nn.Module) -> None:
    """Kaiming-normal weights (ReLU gain) and zero biases for every conv and linear layer."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
