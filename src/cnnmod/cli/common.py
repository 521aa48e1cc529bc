"""Loading what commands take as arguments: datasets, models as parents, stores."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..data import Dataset, load_dataset
from ..errors import ModelError
from ..inputs import InputSpec
from ..modules import Parent


def data_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--format", "data_format", default=None,
                     help="Dataset format (npz, folder, cifar, tiny-imagenet, idx); detected from the path.")(f)
    f = click.option("--classes", default=None, help="Comma-separated class names to use (default: all).")(f)
    return click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=Path),
                        help="Dataset: .npz, image-folder tree or .tar.gz, CIFAR python, Tiny-ImageNet, idx.")(f)


def open_dataset(path: Path, data_format: str | None, classes: list[str] | None, quiet: bool) -> Dataset:
    return load_dataset(path, format=data_format, classes=classes, progress=not quiet)


def open_parent(model_path: Path, arch: str | None, classes: tuple[str, ...], input_size: int | None) -> Parent:
    """A parent from a cnnmod model file (arch inside) or a checkpoint of a zoo architecture (--arch)."""
    from ..zoo import create_model, load_model_file, load_weights, model_info, read_model_file_info
    from ..zoo.checkpoints import _is_safetensors

    if _is_safetensors(model_path) and _has_cnnmod_metadata(model_path):
        info = read_model_file_info(model_path)
        if arch and arch != info.arch:
            raise ModelError(f"{model_path.name} holds a {info.arch}, not a {arch}")
        model, info = load_model_file(model_path)
        return Parent.from_model(model, info.input_spec, info.classes, info.arch)
    if not arch:
        raise ModelError(f"{model_path.name} is a plain checkpoint: name its architecture with --arch")
    zoo = model_info(arch)
    model = load_weights(create_model(arch, num_classes=len(classes), in_channels=zoo.in_channels), model_path)
    size = (input_size, input_size) if input_size else zoo.input_size
    return Parent.from_model(model.eval(), InputSpec.default(size, zoo.in_channels), classes, arch)


def check_input(model: torch.nn.Module, spec: InputSpec, arch: str) -> None:
    """A one-line error, before any work, when the architecture cannot take inputs of `spec`'s shape."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, spec.channels, *spec.size))
    except RuntimeError as e:
        raise ModelError(f"{arch} cannot take {spec.channels}x{spec.size[0]}x{spec.size[1]} inputs "
                         f"({str(e).splitlines()[0]}); choose another --input-size") from None


def head_size(path: Path, arch: str) -> int:
    """The number of classes of a plain checkpoint of a zoo architecture: rows of its last Linear layer."""
    from ..zoo import create_model
    from ..zoo.checkpoints import _read_state_dict

    model = create_model(arch, num_classes=10)
    last = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    state = _read_state_dict(path)
    weight = state.get(f"{last}.weight", state.get(f"module.{last}.weight"))
    if weight is None:
        raise ModelError(f"{path.name} has no '{last}.weight': it is not a {arch} checkpoint")
    return int(weight.shape[0])


def _has_cnnmod_metadata(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "arch" in (f.metadata() or {})
    except (SafetensorError, OSError):  # unreadable: loaded as a checkpoint, which reports its own error
        return False
