"""Loading what commands take as arguments: datasets, models as parents, stores."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from ..data import Dataset, load_dataset
from ..engine.inputs import MAX_CHANNELS, InputSpec
from ..engine.modules import Parent
from ..errors import ModelError
from ..storage import models_in
from ..storage.models_in import (  # noqa: F401  (describe_spec: how commands print an input spec)
    MAX_INPUT_SIDE,
    InputOptionError,
    ModelSource,
    describe_spec,
    make_input_spec,
    open_model,
    parse_input_size,
)
from .params import POSITIVE, FiniteFloat, FloatList


def data_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--format", "data_format", default=None,
                     help="Dataset format (npz, folder, cifar, tiny-imagenet, idx); detected from the path.")(f)
    f = click.option("--classes", default=None, help="Comma-separated class names to use (default: all).")(f)
    return click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=Path),
                        help="Dataset: .npz, image-folder tree or .tar.gz, CIFAR python, Tiny-ImageNet, idx.")(f)


def open_dataset(path: Path, data_format: str | None, classes: list[str] | None, quiet: bool) -> Dataset:
    return load_dataset(path, format=data_format, classes=classes, progress=not quiet)


class InputSizeType(click.ParamType):
    """`--input-size`: H or HxW, each side 1..4096 pixels."""

    name = "H[xW]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_input_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class ModelType(click.ParamType):
    """A MODEL: a file, FILE.py:NAME, package.module:NAME or a zoo name (checked when it is opened)."""

    name = "MODEL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not text:
            self.fail("MODEL is empty", param, ctx)
        return text


MODEL = ModelType()

MODEL_HELP = (
    "MODEL is a cnnmod model file (cnnmod train), a parent file (cnnmod import), a .pt2 file written by "
    "torch.export.save (loading one unpickles, as torch itself does: open only files you trust), a checkpoint "
    "of a zoo architecture with --arch, a zoo name (resnet20, resnet110, any CIFAR ResNet of depth 6n+2) with "
    "--weights, or FILE.py:NAME / package.module:NAME: NAME is an nn.Module class built with no arguments, or a "
    "function returning a model (importing the file runs its code; `cnnmod import` makes a parent file once, "
    "which every command then reads as data)."
)


def input_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--input-size, --channels, --mean, --std: the input a model takes, where its file does not say."""
    options = [
        click.option("--input-size", type=InputSizeType(), default=None, metavar="H[xW]",
                     help="Input size in pixels, H or HxW (default: the model's, else the zoo's or the data's)."),
        click.option("--channels", type=click.IntRange(1, MAX_CHANNELS), default=None,
                     help="Input channels of a model from code (default: its first convolution's)."),
        click.option("--mean", type=FloatList(FiniteFloat()), default=None,
                     help="Per-channel normalisation mean, comma-separated (0.485,0.456,0.406); one value for all "
                          "channels (default: ImageNet's for RGB, 0.5 for grey)."),
        click.option("--std", type=FloatList(POSITIVE), default=None,
                     help="Per-channel normalisation std, positive, comma-separated; one value for all channels."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(f)
        def unpacked(*args: Any, **kwargs: Any) -> Any:
            model = kwargs.pop("model")
            flags = {k: kwargs.pop(k) for k in ("arch", "weights", "input_size", "channels", "mean", "std")}
            kwargs["model"] = None if model is None else ModelSource(model, **flags)
            if model is None and any(v is not None for v in flags.values()):
                raise click.UsageError("model flags (--arch, --weights, --input-size, ...) need a MODEL")
            return f(*args, **kwargs)

        unpacked.__doc__ = f"{inspect.cleandoc(f.__doc__ or '')}\n\n{MODEL_HELP}"
        wrapper = input_options(unpacked)
        wrapper = click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                               default=None, help="State dict for MODEL given as code or a zoo name: .pt/.pth/.th "
                               "(read with weights_only=True) or .safetensors.")(wrapper)
        wrapper = click.option("--arch", default=None,
                               help="Zoo architecture of a plain checkpoint MODEL (e.g. resnet20).")(wrapper)
        return click.argument("model", type=MODEL, required=required)(wrapper)

    return decorate


model_options = _model_options(required=True)
"""MODEL and the flags that say how to read it; the command receives `model` as a ModelSource."""
optional_model_options = _model_options(required=False)
"""As model_options, with MODEL optional (`model` is None when it is not given)."""


def open_parent(model: ModelSource | str | Path, classes: Sequence[str] | None = None, *,
                images: np.ndarray | None = None, allow_random: bool = False) -> Parent:
    """The parent MODEL names (see MODEL_HELP): classes from the file where it has them, else `classes`, else
    numbered. `images` (uint8 NHWC) give the input size and channels where neither flags nor model do."""
    source = model if isinstance(model, ModelSource) else ModelSource(str(model))
    size = (int(images.shape[1]), int(images.shape[2])) if images is not None and images.ndim == 4 else None
    channels = int(images.shape[3]) if images is not None and images.ndim == 4 else None
    try:
        return open_model(source, classes, default_size=size, default_channels=channels,
                          allow_random=allow_random)
    except InputOptionError as e:
        raise click.BadParameter(e.reason, param_hint=f"'{e.option}'") from None


def input_spec(size: tuple[int, int], channels: int, mean: tuple[float, ...] | None,
               std: tuple[float, ...] | None) -> InputSpec:
    """The input spec that --input-size/--channels/--mean/--std give (a usage error when they do not fit)."""
    try:
        return make_input_spec(size, channels, mean, std)
    except InputOptionError as e:
        raise click.BadParameter(e.reason, param_hint=f"'{e.option}'") from None


def warn_resized(images: np.ndarray, spec: InputSpec, quiet: bool) -> None:
    """Say on stderr when images are resized to the parent's input size: small images blown up (4x4 to 28x28)
    give predictions the user should know are made on upscaled pixels."""
    if images.ndim != 4 or len(images) == 0:
        return
    height, width = int(images.shape[1]), int(images.shape[2])
    if (height, width) != tuple(spec.size):
        how = "upscaled" if height * width < spec.size[0] * spec.size[1] else "resized"
        click.echo(f"warning: images are {height}x{width}; {how} to the parent's {spec.size[0]}x{spec.size[1]}",
                   err=True)


def check_input(model: torch.nn.Module, spec: InputSpec, arch: str) -> None:
    """A one-line error, before any work, when the architecture cannot take inputs of `spec`'s shape."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, spec.channels, *spec.size))
    except RuntimeError as e:
        raise ModelError(f"{arch} cannot take {spec.channels}x{spec.size[0]}x{spec.size[1]} inputs "
                         f"({str(e).splitlines()[0]}); choose another --input-size") from None


def head_size(path: Path, arch: str) -> int:
    """The number of classes of a checkpoint of a zoo architecture: rows of its last Linear layer."""
    return models_in.head_size(path, arch)
