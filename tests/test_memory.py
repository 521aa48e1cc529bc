"""The memory a decomposition will need: the estimate is within 20% of the peak measured in a fresh process, and
a decomposition that will not fit is refused in one line that names the options that make it fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnmod.engine.decompose import CLASSES_PER_BACKTRACK, DecomposeConfig, pass_classes, plan_for
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.memory import MemoryEstimate, estimate_decomposition, refusal
from cnnmod.engine.modules import Parent
from cnnmod.errors import CnnmodError
from cnnmod.zoo import create_model
from fixtures.cli import assert_error

MEASURE = """
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from cnnmod.engine.decompose import CLASSES_PER_BACKTRACK, DecomposeConfig, decompose_in_passes, pass_classes, plan_for
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.memory import estimate_decomposition
from cnnmod.engine.modules import Parent
from cnnmod.zoo import create_model

classes, per_pass = int(sys.argv[1]), int(sys.argv[2]) or None
parent = Parent.from_model(create_model("resnet8", num_classes=classes, seed=0), InputSpec.default((64, 64), 3),
                           [f"c{i}" for i in range(classes)], "resnet8")
labels = np.repeat(np.arange(classes), 3)
images = np.random.default_rng(0).integers(0, 256, size=(len(labels), 64, 64, 3), dtype=np.uint8)
config = DecomposeConfig(samples_per_class=3, variant="ci")
plans = [plan_for(parent, labels, config, s) for s in pass_classes(list(range(classes)), per_pass)]
estimate = estimate_decomposition(parent.model, "relu", plans, "node", 256, False, CLASSES_PER_BACKTRACK)
earlier = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # reset the high-water mark: the estimate is of the peak from now on, not of the imports' before it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
decompose_in_passes(parent, images, labels, config, progress=False, classes_per_pass=per_pass)
if reset:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    peak = int(hwm.split()[1]) * 1024
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"estimate": estimate.total, "peak": peak, "extra": estimate.extra, "process": estimate.process,
                  "peak_before": earlier, "reset": reset, "torch": torch.__version__}))
"""


@pytest.mark.parametrize("per_pass", [0, 50], ids=["one-pass", "passes-of-50"])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(per_pass: int) -> None:
    # 200 classes of a ResNet-8 at 64x64: counts, masks and one batch are about as large as the process itself
    run = subprocess.run([sys.executable, "-c", MEASURE, "200", str(per_pass)], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(found["estimate"] - found["peak"]) <= 0.2 * found["peak"], found
    assert found["extra"] > 0.3 * found["peak"]  # what the decomposition adds is a real part of it


def resnet8(classes: int) -> Parent:
    return Parent.from_model(create_model("resnet8", num_classes=classes, seed=0), InputSpec.default((32, 32), 3),
                             [f"c{i}" for i in range(classes)], "resnet8")


def test_passes_and_channel_counts_shrink_the_estimate() -> None:
    parent = resnet8(40)
    labels = np.repeat(np.arange(40), 4)
    config = DecomposeConfig(samples_per_class=4)

    def estimate(cfg: DecomposeConfig, per_pass: int | None, keep: bool = False) -> MemoryEstimate:
        plans = [plan_for(parent, labels, cfg, s) for s in pass_classes(list(range(40)), per_pass)]
        return estimate_decomposition(parent.model, "relu", plans, cfg.granularity, 64, keep, CLASSES_PER_BACKTRACK)

    whole = estimate(config, None)
    nodes = sum(s.numel for s in parent.model.site_list("relu"))
    assert whole.counts == nodes * (80 + 1)  # uint8: 2 groups per class, and the (empty) others' group
    assert whole.masks == nodes * 40
    assert estimate(config, 10).counts < whole.counts / 3
    assert estimate(config.replace(granularity="channel"), None).counts < whole.counts / 10
    assert estimate(config, 10, keep=True).counts > whole.counts  # kept counts of every pass, merged at the end


def test_a_decomposition_that_does_not_fit_names_what_helps() -> None:
    big = MemoryEstimate(process=10**9, counts=50 * 10**9, masks=10**9, batch=10**8, backtrack=10**8, classes=1000,
                         classes_per_pass=1000, extra=52 * 10**9)
    small = MemoryEstimate(process=10**9, counts=10**9, masks=10**9, batch=10**8, backtrack=10**8, classes=1000,
                           classes_per_pass=125, extra=3 * 10**9)
    error = refusal(big, 8 * 10**9, {"--classes-per-pass 125": small, "--granularity channel": big})
    assert isinstance(error, CnnmodError)
    text = str(error)
    assert "\n" not in text and "1000 classes" in text and "--classes-per-pass 125" in text
    assert "--granularity channel" not in text  # it would not fit either


def test_the_cli_refuses_a_decomposition_that_does_not_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import cnnmod.engine.memory
    from cnnmod.cli.app import cli, register_commands

    register_commands()
    assets = Path(__file__).resolve().parents[1] / "src" / "cnnmod" / "assets"
    monkeypatch.setattr(cnnmod.engine.memory, "available_bytes", lambda: 1000)
    result = CliRunner().invoke(cli, ["decompose", str(assets / "smallcnn-fmnist.safetensors"), "--data",
                                      str(assets / "fmnist-sample.npz"), "--samples-per-class", "5", "--out",
                                      str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 1
    assert_error(result, "needs about", "available")
    assert not (tmp_path / "s").exists()


def test_overlap_and_jaccard_are_those_of_the_dense_masks_computed_in_blocks() -> None:
    import torch

    from cnnmod.workflows.evaluate import overlap_matrix
    from fixtures.nets import RandomConvNet, random_modules

    parent = Parent.from_model(RandomConvNet(), InputSpec.default((6, 6), 1), ["c0", "c1", "c2", "c3"])
    modules = random_modules(parent, keep=0.6)
    flat = torch.cat([modules.masks[s.name].flatten(1) for s in modules.sites], 1).double()
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter
    expected = (inter / union.clamp(min=1)).float()
    assert torch.equal(overlap_matrix(modules, cells=7), expected)  # blocks of one or two nodes
    assert torch.equal(overlap_matrix(modules), expected)
    assert torch.allclose(modules.jaccard().double(), flat.mean(1), atol=1e-7)
