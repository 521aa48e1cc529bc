"""Activity counts in stores: saved only with --keep-activity (integers of the smallest type), refused in one line
by the commands that need them otherwise, and read from stores written when counts were float32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.storage.fileio import sha256_file
from cnnmod.storage.store import load_store, save_store
from fixtures.cli import assert_error
from fixtures.nets import RandomConvNet

ASSETS = Path(__file__).resolve().parents[1] / "src" / "cnnmod" / "assets"
MODEL = ASSETS / "smallcnn-fmnist.safetensors"
DATA = ASSETS / "fmnist-sample.npz"


def cli(*args: object) -> Result:
    from cnnmod.cli.app import cli as group
    from cnnmod.cli.app import register_commands

    register_commands()
    return CliRunner().invoke(group, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("activity")
    for name, extra in (("bare", []), ("kept", ["--keep-activity"])):
        run = cli("decompose", MODEL, "--data", DATA, "--samples-per-class", 5, "--out", root / name, "--quiet",
                  *extra)
        assert run.exit_code == 0, run.stderr
    return root / "bare", root / "kept"


def test_activity_is_saved_only_when_asked_for(stores: tuple[Path, Path]) -> None:
    bare, kept = stores
    assert not (bare / "activity.safetensors").exists()
    assert json.loads((bare / "manifest.json").read_text())["activity"] is None
    assert (kept / "activity.safetensors").is_file()
    activity = load_store(kept).activity
    assert activity is not None and activity.granularity == "node"
    assert {c.dtype for c in activity.counts.values()} == {torch.uint8}  # 5 samples a group
    # the modules are the same either way
    assert [p.read_bytes() for p in sorted((bare / "modules").iterdir())] == \
        [p.read_bytes() for p in sorted((kept / "modules").iterdir())]


@pytest.mark.parametrize("command", ["tradeoff", "reuse"])
def test_commands_that_need_the_counts_name_the_flag(stores: tuple[Path, Path], command: str,
                                                     tmp_path: Path) -> None:
    bare, _ = stores
    args = ["tradeoff", bare, "--data", DATA, "--rho", "0"] if command == "tradeoff" else \
        ["reuse", f"{bare}:Bag", "--data", DATA, "--out", tmp_path / "c"]
    line = assert_error(cli(*args), "--keep-activity", f"cnnmod {command}")
    assert str(bare) in line


def test_a_store_with_the_float_counts_of_every_class_reads_as_integer_counts(tmp_path: Path) -> None:
    # what stores held before counts were integers: float32 counts of both groups of every class (the groups of
    # classes not decomposed hold their TI shares only), float32 group sizes
    parent = Parent.from_model(RandomConvNet(), InputSpec.default((6, 6), 1), ["c0", "c1", "c2", "c3"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 6, 6, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)
    modules, activity = decompose(parent, images, labels, DecomposeConfig(samples_per_class=4),
                                  classes=["c2", "c0"], progress=False)
    path = save_store(tmp_path / "s", modules, activity)
    old_counts, old_sizes = {}, torch.zeros(8)
    for i, c in enumerate(activity.chosen):
        old_sizes[2 * c: 2 * c + 2] = activity.group_sizes[2 * i: 2 * i + 2].float()
    old_sizes[[3, 7]] = activity.group_sizes[-1].float() / 2  # classes 1 and 3: one TI share each
    for s in activity.sites:
        whole = torch.zeros((8, *s.shape))
        for i, c in enumerate(activity.chosen):
            whole[2 * c: 2 * c + 2] = activity.counts[s.name][2 * i: 2 * i + 2].float()
        whole[3] = activity.others[s.name].float()  # all of the others' counts on one of them: sums agree
        old_counts[f"counts.{s.name}"] = whole
    save_file({**old_counts, "group_sizes": old_sizes, "chosen": torch.tensor([2, 0])}, path / "activity.safetensors")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["activity"] = {"file": "activity.safetensors", "sha256": sha256_file(path / "activity.safetensors"),
                            "site_kind": "relu"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_store(path).activity
    assert loaded is not None and loaded.chosen == (2, 0)
    assert torch.equal(loaded.group_sizes, activity.group_sizes)
    for s in activity.sites:
        assert not loaded.counts[s.name].is_floating_point()
        assert torch.equal(loaded.counts[s.name].long(), activity.counts[s.name].long())
        assert torch.equal(loaded.others[s.name].long(), activity.others[s.name].long())
