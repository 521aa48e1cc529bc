"""Shared test setup: one intra-op thread (the default suite runs on a shared 2-core machine), and a tiny
dataset, model and store made with the CLI once per session."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from fixtures.images import COLOUR_NAMES, coloured_squares


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny nets run faster on one thread, and two threads spin on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# A tiny separable dataset, a model trained on it and a store decomposed from it, built once per session
# through the CLI (tests/test_cli.py and anything else that needs real files).
# ---------------------------------------------------------------------------------------------------------

TINY_CLASSES = COLOUR_NAMES


def coloured_blocks(n_per_class: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images: a red, green or blue block covering at least a quarter of a noisy grey image."""
    return coloured_squares(n_per_class, size, (size // 2, size - 1), rng)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .npz dataset of 3 classes of 16x16 RGB images, 60 train and 30 test images per class."""
    rng = np.random.default_rng(0)
    x_train, y_train = coloured_blocks(60, 16, rng)
    x_test, y_test = coloured_blocks(30, 16, rng)
    path = tmp_path_factory.mktemp("data") / "blocks.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(TINY_CLASSES))
    return path


def run_cli(*args: object) -> Result:
    """`cnnmod ARGS...` in-process on one thread, with every command registered; stdout and stderr apart."""
    from cnnmod.cli.app import cli, register_commands

    register_commands()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cnnmod_cli() -> Callable[..., Result]:
    """`run_cli`: call as cnnmod_cli("evaluate", store, "--data", data, "--json")."""
    return run_cli


def _checked(result: Result) -> Result:
    if result.exit_code != 0:
        raise AssertionError(f"exit code {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
                             ) from result.exception
    return result


@pytest.fixture(scope="session")
def tiny_train(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`cnnmod train resnet_tiny` on tiny_data at 16x16 for 2 epochs: the model file and the --json output."""
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    result = _checked(run_cli("train", "resnet_tiny", "--data", tiny_data, "--out", out, "--epochs", 2,
                              "--batch-size", 16, "--input-size", 16, "--json"))
    return out, json.loads(result.stdout)


@pytest.fixture(scope="session")
def tiny_model(tiny_train: tuple[Path, dict]) -> Path:
    return tiny_train[0]


@pytest.fixture(scope="session")
def tiny_decompose(tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`cnnmod decompose --keep-activity` of tiny_model with 20 samples per class: the store folder and the --json
    output.

    Tests must not change this store; copy it (shutil.copytree) to damage or overwrite it.
    """
    out = tmp_path_factory.mktemp("store") / "store"
    result = _checked(run_cli("decompose", tiny_model, "--data", tiny_data, "--out", out,
                              "--samples-per-class", 20, "--keep-activity", "--json"))
    return out, json.loads(result.stdout)


@pytest.fixture(scope="session")
def tiny_store(tiny_decompose: tuple[Path, dict]) -> Path:
    return tiny_decompose[0]
