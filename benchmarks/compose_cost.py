"""The 10-module composed classifier of the shared ResNet-20 against the parent, on the CIFAR-10 test set.

    python benchmarks/compose_cost.py [--limit 2000] [--repeats 3]
Last line: `ratio <composed seconds / parent seconds>`.
"""

from __future__ import annotations

import argparse

from common import resnet20_and_cifar10, side_by_side

from cnnmod.decompose import DecomposeConfig, decompose


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    parent, data = resnet20_and_cifar10()
    modules, _ = decompose(parent, data.train.images, data.train.labels, DecomposeConfig(samples_per_class=200),
                           progress=False)
    test = data.test.images[: args.limit]
    print(f"{len(test)} test images, {len(modules)} modules")
    parent_s, composed_s = side_by_side(lambda: parent.logits(test), lambda: modules.logits(test), args.repeats)
    print(f"parent {parent_s:.2f}s, composed {composed_s:.2f}s")
    print(f"ratio {composed_s / parent_s:.3f}")


if __name__ == "__main__":
    main()
