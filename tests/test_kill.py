"""SIGKILL a writer at random moments: the path must always hold the old artefact or the new one, loadable.

The writer is a forked child that keeps replacing one store (and one composition) with `--overwrite`
semantics, alternating two contents; the parent kills it after a random delay, then loads the path. The default
run kills 12 times; `-m slow` kills 100 times per artefact kind.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from cnnmod.engine.compose import compose
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import ModuleSet, Parent
from cnnmod.storage.store import load_composition, load_store, save_composition, save_store

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def two_module_sets() -> tuple[ModuleSet, ModuleSet]:
    torch.manual_seed(0)
    parent = Parent.from_model(_Net().eval(), InputSpec.default((8, 8), 1), ("a", "b", "c"), "killnet")
    images = (torch.rand(30, 8, 8, 1) * 255).to(torch.uint8).numpy()
    labels = torch.arange(30).remainder(3).numpy()
    modules, _ = decompose(parent, images, labels, DecomposeConfig(samples_per_class=5), progress=False)
    return modules.select(["a", "b"]), modules.select(["c"])


def _writer(path: Path, kind: str, contents: tuple[ModuleSet, ModuleSet]) -> None:
    """The child: replace `path` forever, alternating the two contents. Never returns."""
    try:
        torch.set_num_threads(1)
        i = 0
        while True:
            modules = contents[i % 2]
            if kind == "store":
                save_store(path, modules, overwrite=True)
            else:
                save_composition(path, compose([modules]), overwrite=True)
            i += 1
    finally:
        os._exit(0)


def _kill_repeatedly(tmp_path: Path, kind: str, contents: tuple[ModuleSet, ModuleSet], kills: int) -> None:
    path = tmp_path / kind
    (save_store if kind == "store" else lambda p, m: save_composition(p, compose([m])))(path, contents[0])
    expected = {contents[0].class_names, contents[1].class_names}
    rng = random.Random(0)
    for k in range(kills):
        pid = os.fork()
        if pid == 0:
            _writer(path, kind, contents)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if kind == "store":
            names = load_store(path).modules.class_names
        else:
            names = tuple(load_composition(path).labels)
        assert names in expected, f"kill {k}: {names}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != kind]
    save_store(tmp_path / "after", contents[0])  # the next write clears what killed writers left
    assert [p.name for p in tmp_path.iterdir() if p.name not in (kind, "after")] == [], leftovers


@pytest.mark.parametrize("kind", ["store", "composition"])
def test_random_kills_leave_a_loadable_artefact(kind: str, two_module_sets: tuple[ModuleSet, ModuleSet],
                                                tmp_path: Path) -> None:
    _kill_repeatedly(tmp_path, kind, two_module_sets, 12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["store", "composition"])
def test_a_hundred_random_kills(kind: str, two_module_sets: tuple[ModuleSet, ModuleSet], tmp_path: Path) -> None:
    _kill_repeatedly(tmp_path, kind, two_module_sets, 100)
