"""Fuzzing store and composition loading: random byte and field mutations of valid folders. The only outcomes
allowed are a load (of something that still checks out) or one StoreError line; never another exception.

The default run loads a few hundred mutants; `-m slow` adds the long run (CNNMOD_FUZZ_EXAMPLES, default 10,000).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnmod.engine.compose import compose
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.errors import StoreError
from cnnmod.storage.store import load_composition, load_store, save_composition, save_store

QUICK = 150
LONG = int(os.environ.get("CNNMOD_FUZZ_EXAMPLES", "10000"))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    parent = Parent.from_model(_Net().eval(), InputSpec.default((8, 8), 1), ("a", "b", "c"), "fuzznet")
    rng = torch.Generator().manual_seed(0)
    images = (torch.rand(30, 8, 8, 1, generator=rng) * 255).to(torch.uint8).numpy()
    labels = torch.arange(30).remainder(3).numpy()
    modules, activity = decompose(parent, images, labels, DecomposeConfig(samples_per_class=5), progress=False)
    root = tmp_path_factory.mktemp("fuzz")
    save_store(root / "store", modules, activity)
    save_composition(root / "comp", compose([modules.select(["a", "c"])]))
    return root / "store", root / "comp"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False), st.text(max_size=20),
    st.just([]), st.just({}), st.lists(st.integers(-3, 3), max_size=4), st.just("../x"), st.just("/etc/passwd"),
    st.just("0" * 64), st.just("group0"),
)


@st.composite
def mutations(draw: st.DrawFn, n_files: int, manifests: list[tuple[int, list[tuple]]]) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "delete-field", "bytes", "truncate"]))
        if kind in ("field", "delete-field"):
            index, paths = draw(st.sampled_from(manifests))
            path = draw(st.sampled_from(paths))
            ops.append((kind, index, path, draw(REPLACEMENTS) if kind == "field" else None))
        else:
            ops.append((kind, draw(st.integers(0, n_files - 1)), draw(st.integers(0, 1 << 20)),
                        draw(st.binary(min_size=1, max_size=8))))
    return ops


def _apply(folder: Path, ops: list[tuple]) -> None:
    files = _files(folder)
    for kind, index, where, value in ops:
        file = files[index]
        if kind in ("field", "delete-field"):
            try:
                manifest = json.loads(file.read_bytes())
            except ValueError:
                continue  # an earlier byte mutation already broke this manifest
            if not where:
                if kind == "delete-field":
                    continue
                manifest = value
            else:
                target = manifest
                try:
                    for key in where[:-1]:
                        target = target[key]
                    if kind == "field":
                        target[where[-1]] = value
                    else:
                        del target[where[-1]]
                except (KeyError, IndexError, TypeError):
                    pass
            file.write_text(json.dumps(manifest))
        elif kind == "bytes":
            data = bytearray(file.read_bytes())
            if data:
                at = where % len(data)
                data[at:at + len(value)] = value
                file.write_bytes(bytes(data))
        else:
            data = file.read_bytes()
            file.write_bytes(data[: where % (len(data) + 1)])


def _fuzz(source: Path, tmp: Path, examples: int, load: Any) -> None:
    files = _files(source)
    manifests = [(i, _paths(json.loads(f.read_text()))) for i, f in enumerate(files) if f.name == "manifest.json"]
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,  # the same mutants every run
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutations(len(files), manifests))
    def check(ops: list[tuple]) -> None:
        target = tmp / "mutant"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        _apply(target, ops)
        try:
            load(target)
            outcomes["loaded"] += 1
        except StoreError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] > 0


@pytest.mark.parametrize("which", ["store", "composition"])
def test_mutated_folders_load_or_raise_store_error(which: str, valid: tuple[Path, Path], tmp_path: Path) -> None:
    store, comp = valid
    _fuzz(store if which == "store" else comp, tmp_path, QUICK, load_store if which == "store" else load_composition)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["store", "composition"])
def test_mutated_folders_long_run(which: str, valid: tuple[Path, Path], tmp_path: Path) -> None:
    store, comp = valid
    _fuzz(store if which == "store" else comp, tmp_path, LONG // 2,
          load_store if which == "store" else load_composition)
