"""Decomposing all 10 classes of the shared ResNet-20 against one inference pass over the same samples.

    python benchmarks/decompose_cost.py [--samples-per-class 1000] [--repeats 3]
Last line: `ratio <decompose seconds / inference seconds>` (target: at most 1.5).
"""

from __future__ import annotations

import argparse

import torch
from common import resnet20_and_cifar10, side_by_side

from cnnmod.engine.activity import plan_samples
from cnnmod.engine.decompose import DecomposeConfig, decompose


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples-per-class", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sites", default="relu")
    args = ap.parse_args()
    parent, data = resnet20_and_cifar10()
    images, labels = data.train.images, data.train.labels
    config = DecomposeConfig(samples_per_class=args.samples_per_class, sites=args.sites)
    plan = plan_samples(labels, 10, range(10), config.samples_per_class, config.tangling_ratio, config.seed)
    observed = images[plan.indices]
    print(f"{len(observed)} samples, {torch.get_num_threads()} threads, sites {args.sites}")
    inference, decomposition = side_by_side(
        lambda: parent.logits(observed, batch_size=256),
        lambda: decompose(parent, images, labels, config, batch_size=256, progress=False),
        args.repeats,
    )
    print(f"inference pass {inference:.2f}s, decomposition of all classes {decomposition:.2f}s")
    print(f"ratio {decomposition / inference:.3f}")


if __name__ == "__main__":
    main()
