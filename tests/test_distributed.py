"""torchrun: 2 CPU processes on the loopback interface decompose into a store whose module files equal, byte for
byte, those of one process with the same seed (one rank gets no samples of some classes; compact modules: one rank
trains no module group), and evaluate to the same figures; rank 1 prints nothing, and an error is printed once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnmod.engine.activity import plan_samples
from cnnmod.engine.distributed import Shard
from cnnmod.engine.inputs import batch_slices

ASSETS = Path(__file__).resolve().parents[1] / "src" / "cnnmod" / "assets"
MODEL = ASSETS / "smallcnn-fmnist.safetensors"
DATA = ASSETS / "fmnist-sample.npz"
SAMPLES = 20
BATCH = 16  # 13 batches of the 200 samples: 6 for rank 0, 7 for rank 1


def cnnmod(*args: object, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cnnmod ARGS` in one process, or under torchrun with `processes` one-thread CPU processes on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "cnnmod", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def module_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "modules").iterdir())}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("distributed")
    args = ("decompose", MODEL, "--data", DATA, "--samples-per-class", SAMPLES, "--batch-size", BATCH,
            "--device", "cpu")
    one = cnnmod(*args, "--out", root / "one")
    assert one.returncode == 0, one.stderr
    two = cnnmod(*args, "--out", root / "two", processes=2)
    assert two.returncode == 0, two.stderr
    return root / "one", root / "two", two


def test_two_processes_write_the_module_files_of_one(stores: tuple[Path, Path, subprocess.CompletedProcess[str]]
                                                     ) -> None:
    one, two, run = stores
    assert module_files(two) == module_files(one)
    first, second = (json.loads((s / "manifest.json").read_text()) for s in (one, two))
    assert first["modules"] == second["modules"]  # names, hashes and Jaccard indices
    assert second["provenance"]["processes"] == 2
    assert second["provenance"]["samples_observed"] == first["provenance"]["samples_observed"]
    # rank 0 alone prints the result (and the memory estimate); rank 1 prints nothing
    assert run.stdout.count("wrote ") == 1 and "(2 processes)" in run.stdout
    assert run.stderr.count("memory: about") == 1


def test_one_rank_gets_no_samples_of_some_classes() -> None:
    # the same plan and batches the command makes: samples sorted by group, each rank a contiguous share of batches
    with np.load(DATA) as z:
        labels, classes = z["y_train"], z["classes"]
    plan = plan_samples(labels, len(classes), range(len(classes)), SAMPLES, 1.0, 0)
    by_group = plan.groups[np.argsort(plan.groups, kind="stable")]
    batches = batch_slices(len(by_group), BATCH)
    seen = [{int(g) // 2 for part in batches[Shard(rank, 2).part(len(batches))] for g in by_group[part]}
            for rank in range(2)]
    assert seen[0] and seen[1]  # both ranks count
    assert 0 not in seen[1] and len(classes) - 1 not in seen[0]  # ... and each misses some classes entirely


def test_two_processes_evaluate_as_one(stores: tuple[Path, Path, subprocess.CompletedProcess[str]],
                                       tmp_path: Path) -> None:
    one, _, _ = stores
    args = ("evaluate", one, "--data", DATA, "--limit", 60, "--device", "cpu", "--json")
    single = cnnmod(*args)
    double = cnnmod(*args, processes=2)
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    a, b = json.loads(single.stdout), json.loads(double.stdout)  # rank 1 printed nothing: one JSON object
    for key in ("samples", "parent", "composed", "jaccard_mean", "modules", "parent_parameters"):
        assert a[key] == b[key], key


def test_an_error_stops_every_rank_and_is_printed_once(stores: tuple[Path, Path, subprocess.CompletedProcess[str]]
                                                       ) -> None:
    one, _, _ = stores
    run = cnnmod("decompose", MODEL, "--data", DATA, "--samples-per-class", 2, "--out", one, processes=2)
    assert run.returncode != 0
    assert run.stderr.count("error: ") == 1 and "exists" in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize("processes", [2, 3])
def test_compact_modules_of_several_processes_are_those_of_one(processes: int, tmp_path: Path) -> None:
    # the fine-tune runs two module groups: with 3 processes one of them trains nothing and still takes part
    args = ("decompose", MODEL, "--data", DATA, "--method", "compact", "--train-images", 256, "--training-epoch",
            "steps", "--device", "cpu")
    one = cnnmod(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    many = cnnmod(*args, "--out", tmp_path / "many", processes=processes)
    assert many.returncode == 0, many.stderr
    assert module_files(tmp_path / "many") == module_files(tmp_path / "one")
    assert many.stdout.count("wrote ") == 1 and f"({processes} processes)" in many.stdout
    manifest = json.loads((tmp_path / "many" / "manifest.json").read_text())
    assert manifest["provenance"]["processes"] == processes
    assert f"each of {processes} processes' shares" in manifest["provenance"]["cost"]["parent_training"]["measure"]


def test_a_fine_tuned_shared_prefix_is_refused_once_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "compact"
    run = cnnmod("decompose", MODEL, "--data", DATA, "--method", "compact", "--prefix-keep", 0.5, "--out", out,
                 processes=2)
    assert run.returncode == 1
    assert run.stderr.count("error: ") == 1 and "runs in one process" in run.stderr
    assert not out.exists()


def test_a_command_that_does_not_share_its_work_is_refused_once_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "trained.safetensors"
    run = cnnmod("train", "smallcnn", "--data", DATA, "--epochs", 1, "--out", out, processes=2)
    assert run.returncode == 1
    assert run.stderr.count("error: ") == 1 and "cnnmod train runs in one process" in run.stderr
    assert run.stdout == ""
    assert not out.exists()
    shown = cnnmod("train", "--help", processes=2)  # help reads and writes nothing: every rank may show it
    assert shown.returncode == 0 and "Usage:" in shown.stdout


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_fails_so_that_torchrun_cannot_stop_it_before_its_error_is_out(rank: int, tmp_path: Path
                                                                                   ) -> None:
    # torchrun stops every worker once one fails: were rank 1 to fail first, rank 0 could die before printing
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    out = tmp_path / "trained.safetensors"
    run = subprocess.run([sys.executable, "-m", "cnnmod", "train", "smallcnn", "--data", str(DATA), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert not out.exists()
    if rank == 0:
        assert run.returncode == 1 and run.stderr.startswith("error: cnnmod train runs in one process")
    else:
        assert run.returncode == 0 and run.stdout == run.stderr == ""
