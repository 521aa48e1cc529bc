"""Architecture registry in the style of timm: a name maps to a factory and its default input.

Importing this module imports no architecture: the built-in entries import their module the first time a
model is created.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnmod.errors import ModelError

ModelFactory = Callable[..., "nn.Module"]
"""A callable taking keyword arguments ``num_classes`` and ``in_channels`` and returning a fresh model."""

ARCH_ATTRIBUTE = "_cnnmod_arch"


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: its default input size (H, W) and channel count."""

    name: str
    input_size: tuple[int, int]
    in_channels: int
    description: str
    factory: ModelFactory = field(repr=False, compare=False)


@dataclass(frozen=True)
class _LazyFactory:
    """Imports ``module`` and calls ``module.attr(**kwargs, num_classes=..., in_channels=...)``."""

    module: str
    attr: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, *, num_classes: int, in_channels: int) -> nn.Module:
        build = getattr(importlib.import_module(self.module), self.attr)
        return build(num_classes=num_classes, in_channels=in_channels, **dict(self.kwargs))  # type: ignore[no-any-return]


_REGISTRY: dict[str, ModelInfo] = {}


def register(
    name: str,
    factory: ModelFactory,
    input_size: tuple[int, int],
    in_channels: int,
    description: str = "",
    *,
    overwrite: bool = False,
) -> ModelInfo:
    """Add an architecture; ``factory(num_classes=..., in_channels=...)`` must return a new model."""
    if name in _REGISTRY and not overwrite:
        raise ModelError(f"architecture '{name}' is already registered; pass overwrite=True to replace it")
    info = ModelInfo(name, (int(input_size[0]), int(input_size[1])), int(in_channels), description, factory)
    _REGISTRY[name] = info
    return info


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; ModelError naming close matches if there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _CIFAR_RESNET.fullmatch(name)
    if match:  # a CIFAR ResNet of another depth, built on demand (not added to the registry's list)
        depth, suffix = int(match["depth"]), match["suffix"]
        if depth < 8 or (depth - 2) % 6 or depth > _MAX_RESNET_DEPTH:
            close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown architecture '{name}': CIFAR ResNets have depth 6n+2 between 8 and "
                             f"{_MAX_RESNET_DEPTH} (8, 14, 20, 32, 44, 56, 110, 1202, ...){hint}")
        return _resnet_info(depth, suffix)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see cnnmod.zoo.list_models()"
    raise ModelError(f"unknown architecture '{name}'; {hint}")


def create_model(name: str, num_classes: int = 10, in_channels: int | None = None,
                 seed: int | None = None) -> nn.Module:
    """A freshly initialised model of architecture ``name`` (channels default to the registered ones).

    With ``seed`` the initial weights depend on it alone, not on what used torch's global generator before."""
    info = model_info(name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1 for '{name}', got {num_classes}")
    channels = info.in_channels if in_channels is None else int(in_channels)
    if seed is None:
        model = info.factory(num_classes=int(num_classes), in_channels=channels)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = info.factory(num_classes=int(num_classes), in_channels=channels)
    setattr(model, ARCH_ATTRIBUTE, name)
    return model


def arch_of(model: nn.Module) -> str | None:
    """The registry name a model was created under by ``create_model``, if any."""
    arch = getattr(model, ARCH_ATTRIBUTE, None)
    return arch if isinstance(arch, str) else None


_RESNET = "cnnmod.zoo.resnet"
_RESNET_VARIANTS = {
    "": ("A", True, "option-A shortcuts, BatchNorm"),
    "_b": ("B", True, "option-B (1x1 conv) shortcuts, BatchNorm"),
    "_nobn": ("A", False, "option-A shortcuts, no BatchNorm"),
    "_b_nobn": ("B", False, "option-B (1x1 conv) shortcuts, no BatchNorm"),
}
# resnet<depth><suffix>, any depth 6n+2: the names of pytorch_resnet_cifar10 (resnet110, resnet1202) and more
_CIFAR_RESNET = re.compile(r"resnet(?P<depth>[1-9][0-9]{0,5})(?P<suffix>_b_nobn|_b|_nobn|)")
_MAX_RESNET_DEPTH = 6 * 1000 + 2


def _resnet_info(depth: int, suffix: str) -> ModelInfo:
    shortcut, bn, what = _RESNET_VARIANTS[suffix]
    kwargs: tuple[tuple[str, Any], ...] = (
        ("blocks_per_stage", (depth - 2) // 6), ("shortcut", shortcut), ("batch_norm", bn))
    return ModelInfo(f"resnet{depth}{suffix}", (32, 32), 3, f"CIFAR ResNet-{depth} (He et al. 2016), {what}",
                     _LazyFactory(_RESNET, "CifarResNet", kwargs))


def _register_builtins() -> None:
    resnet = _RESNET
    for suffix, (shortcut, bn, what) in _RESNET_VARIANTS.items():
        for depth in (20, 32, 44, 56, 110, 1202):
            info = _resnet_info(depth, suffix)
            register(info.name, info.factory, info.input_size, info.in_channels, info.description)
        kwargs: tuple[tuple[str, Any], ...] = (
            ("blocks_per_stage", 1), ("widths", (4, 8, 16)), ("shortcut", shortcut), ("batch_norm", bn))
        register(f"resnet_tiny{suffix}", _LazyFactory(resnet, "CifarResNet", kwargs), (32, 32), 3,
                 f"tiny CIFAR ResNet for tests (1 block per stage, widths 4/8/16), {what}")
    small = "cnnmod.zoo.smallcnn"
    register("smallcnn", _LazyFactory(small, "SmallCNN"), (28, 28), 1,
             "two conv+BN+ReLU+maxpool stages and a 64-unit hidden layer, for 28x28 grey images")
    tiny_small = (("widths", (4, 8)), ("hidden", 16))
    register("smallcnn_tiny", _LazyFactory(small, "SmallCNN", tiny_small), (28, 28), 1,
             "tiny smallcnn for tests (4/8 channels, 16 hidden units)")
    vgg = "cnnmod.zoo.vgg"
    register("vgg", _LazyFactory(vgg, "CifarVGG"), (32, 32), 3,
             "VGG-11-style CIFAR net with halved widths, conv3x3+BN+ReLU, 128-unit hidden layer")
    register("vgg_tiny", _LazyFactory(vgg, "CifarVGG", (("cfg", (8, "M", 16, "M", 32, "M", 32, "M", 32, "M")),
                                                        ("hidden", 16))), (32, 32), 3,
             "tiny VGG-style net for tests")


_register_builtins()
