"""Decomposing many classes through the CLI: peak resident memory and time per 1,000 images.

    python benchmarks/decompose_scale.py --workdir /tmp/scale [--classes 1000] [--per-class 2] [--size 224]
        [--batch-size 64] [--granularity node] [-- extra cnnmod decompose options]

Writes a randomly initialised ImageNet-layout ResNet-18 (`ResNet18` below, 11.7 M parameters for 1,000 classes)
and random uint8 images (`--per-class` training images per class) into --workdir, runs `cnnmod decompose
benchmarks/decompose_scale.py:resnet18 ...` in a child process, and prints its memory estimate, peak RSS (the
child's maximum resident set size) and seconds. Last line: `peak_rss_gb <x> seconds_per_1000_images <y>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.down(x))


class ResNet18(nn.Module):
    """The ImageNet ResNet-18 layout (7x7 stem, max-pool, 4 stages of 2 basic blocks, global pool, linear)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18() -> ResNet18:
    """The model `cnnmod decompose` builds (FILE.py:NAME takes no arguments): RESNET18_CLASSES outputs."""
    return ResNet18(int(os.environ.get("RESNET18_CLASSES", "1000")))


def make_inputs(workdir: Path, classes: int, per_class: int, size: int) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    weights, data = workdir / f"resnet18-{classes}.pt", workdir / f"random-{classes}x{per_class}-{size}.npz"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(ResNet18(classes).state_dict(), weights)
    if not data.exists():
        rng = np.random.default_rng(0)
        y = np.repeat(np.arange(classes), per_class)
        x = rng.integers(0, 256, size=(len(y), size, size, 3), dtype=np.uint8)
        np.savez(data, x_train=x, y_train=y, x_test=x[:classes], y_test=y[:classes],
                 classes=np.array([f"c{i}" for i in range(classes)]))
    return weights, data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--granularity", default="node")
    ap.add_argument("extra", nargs="*", help="more `cnnmod decompose` options (after --)")
    args = ap.parse_args()
    weights, data = make_inputs(args.workdir, args.classes, args.per_class, args.size)
    out = args.workdir / "store"
    command = [sys.executable, "-m", "cnnmod", "decompose", f"{Path(__file__).resolve()}:resnet18", "--weights",
               str(weights), "--data", str(data), "--input-size", str(args.size), "--mean", "0.5", "--std", "0.25",
               "--samples-per-class", str(args.per_class), "--batch-size", str(args.batch_size), "--granularity",
               args.granularity, "--out", str(out), "--overwrite", "--json", *args.extra]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True,
                         env={**os.environ, "RESNET18_CLASSES": str(args.classes)})
    wall = time.perf_counter() - start
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"decompose failed ({run.returncode})")
    result = json.loads(run.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    images = result["samples_observed"]
    steps = result["seconds_by_step"]
    print(f"{args.classes} classes, {images} images of {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.granularity} granularity")
    print(f"estimate {result['memory_estimate']['total'] / 1e9:.2f} GB; observe {steps['observe']:.1f}s, "
          f"derive masks {steps['derive']:.1f}s, decompose {result['seconds']:.1f}s, command {wall:.1f}s")
    print(f"peak_rss_gb {peak:.2f} seconds_per_1000_images {1000 * result['seconds'] / images:.1f}")


if __name__ == "__main__":
    main()
