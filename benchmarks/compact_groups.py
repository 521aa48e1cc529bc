"""The compact fine-tune of the shared ResNet-20 with its modules in `CompactConfig.fine_tune_groups` stacked
networks (the default: what lets torchrun share the fine-tune exactly) against all of them in one network.

    python benchmarks/compact_groups.py [--images 5000] [--train-images 20000] [--groups 2] [--repeats 1]

Both run in this one process, interleaved, on --images CIFAR-10 training images drawn at random. Last line:
`ratio <grouped seconds / one-network seconds>`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from common import resnet20_and_cifar10, side_by_side

from cnnmod.engine.compact import CompactConfig, compact_decompose
from cnnmod.paper.experiments import parent_labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--train-images", type=int, default=20_000)
    ap.add_argument("--groups", type=int, default=CompactConfig().fine_tune_groups)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    parent, data = resnet20_and_cifar10()
    images, labels = parent_labels(parent, data.train)
    subset = np.random.default_rng(0).permutation(len(images))[:args.images]  # the data is sorted by class
    images, labels = images[subset], labels[subset]
    grouped = CompactConfig(train_images=args.train_images, fine_tune_groups=args.groups)
    print(f"{args.images} images, {args.train_images} fine-tune images, {torch.get_num_threads()} threads")
    one, many = side_by_side(lambda: compact_decompose(parent, images, labels, replace(grouped, fine_tune_groups=1)),
                             lambda: compact_decompose(parent, images, labels, grouped), args.repeats)
    print(f"one network: {one:.1f} s; {args.groups} groups: {many:.1f} s")
    print(f"ratio {many / one:.3f}")


if __name__ == "__main__":
    main()
