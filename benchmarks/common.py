"""Shared set-up for the benchmarks: the shared ResNet-20 and CIFAR-10, and a side-by-side timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cnnmod.data import load_dataset
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.zoo import create_model, load_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "resnet20-12fca82f.th"
DATA = SHARED / "data" / "cifar10-jpg.tar.gz"


def resnet20_and_cifar10():  # type: ignore[no-untyped-def]
    data = load_dataset(DATA, progress=False)
    model = load_weights(create_model("resnet20", num_classes=10), MODEL).eval()
    return Parent.from_model(model, InputSpec.default((32, 32), 3), data.classes, "resnet20"), data


def side_by_side(baseline: Callable[[], object], candidate: Callable[[], object],
                 repeats: int = 3) -> tuple[float, float]:
    """Median seconds of each, runs interleaved (baseline, candidate, baseline, ...) after one warm-up of each."""
    baseline()
    candidate()
    base, cand = [], []
    for _ in range(repeats):
        for fn, out in ((baseline, base), (candidate, cand)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(base), statistics.median(cand)
