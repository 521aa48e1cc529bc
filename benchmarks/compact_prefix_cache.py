"""The compact fine-tune with the frozen prefix cached (the default) against running the prefix at every step.

    python benchmarks/compact_prefix_cache.py [--images 5000] [--train-images 20000] [--repeats 1]

Decomposes the shared ResNet-20 into compact modules from --images CIFAR-10 training images drawn at random, with a
fine-tune of --train-images images (at least 4x --images, so that the cache is used), once with
`cache_prefix=False` (the baseline) and once with the cache, interleaved. The cached run computes the prefix of
every image and its mirror once, then runs only the layers after the cut at each step. Last line:
`ratio <cached seconds / uncached seconds>` (below 1: the cache is faster).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from common import resnet20_and_cifar10, side_by_side

from cnnmod.engine.compact import CompactConfig, compact_decompose
from cnnmod.paper.experiments import parent_labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--train-images", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.train_images < 4 * args.images:
        ap.error("--train-images must be at least 4x --images for the cache to be used")
    parent, data = resnet20_and_cifar10()
    images, labels = parent_labels(parent, data.train)
    subset = np.random.default_rng(0).permutation(len(images))[:args.images]  # the data is sorted by class
    images, labels = images[subset], labels[subset]
    cached = CompactConfig(train_images=args.train_images)
    costs = {}

    def run(config: CompactConfig) -> None:
        costs[config.cache_prefix] = compact_decompose(parent, images, labels, config).cost

    uncached_s, cached_s = side_by_side(lambda: run(replace(cached, cache_prefix=False)), lambda: run(cached),
                                        args.repeats)
    assert costs[True].prefix_cache_images == 2 * len(images) and costs[False].prefix_cache_images == 0
    print(f"uncached: {uncached_s:.1f} s; cached: {cached_s:.1f} s ({costs[True].prefix_cache_images} prefix passes "
          f"cached, {args.train_images} fine-tune images each)")
    print(f"ratio {cached_s / uncached_s:.3f}")


if __name__ == "__main__":
    main()
