"""Where composed compact modules spend their time: the ten modules' own layers after the shared prefix against the
parent's layers they replace, on the same prefix output.

    python benchmarks/compose_tail.py [--limit 2000] [--repeats 5] [--batching folded|grouped] [--align 8]

Compact modules share the parent's first layers (about 68% of its multiply-accumulates on the shared ResNet-20)
and then each runs its own narrow copy of the rest. The composed classifier can only be faster than the parent
where those ten narrow tails are faster than the parent's one wide tail. Both tails are timed channels-last (the
layout the exact engine runs on a CPU) on the prefix output of the same test images. Last line: `ratio <composed
tails seconds / parent tail seconds>`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import resnet20_and_cifar10, side_by_side
from compose_cost import compact_modules

from cnnmod.engine import engines
from cnnmod.engine.channels import cut_points, network_cost, split_at
from cnnmod.engine.engines import common_prefix, runner_for
from cnnmod.engine.modules import inference_network


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batching", choices=["folded", "grouped"], default="folded")
    ap.add_argument("--align", type=int, default=engines.CHANNEL_ALIGN,
                    help="pad each module's own channel counts to a multiple of this (1: as the modules keep them)")
    args = ap.parse_args()
    engines.CHANNEL_ALIGN = args.align
    parent, data = resnet20_and_cifar10()
    modules = compact_modules(parent, data, None)
    compact = dataclasses.replace(modules.compact, batching=args.batching)
    cpu = torch.device("cpu")
    runner = runner_for(compact, modules.head_weight, modules.head_bias, cpu)
    cut = common_prefix(list(compact.networks(modules.head_weight, modules.head_bias)), compact.input_shape)
    assert cut is not None, "these modules share no prefix"
    prefix, composed_tail = split_at(runner, cut)
    parent_net = inference_network(parent.model).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    _, parent_tail = split_at(parent_net, cut)
    test = data.test.images[: args.limit]
    with torch.inference_mode():
        cuts = [prefix(parent.input_spec.prepare(test[i:i + 256], cpu)) for i in range(0, len(test), 256)]

    def run(net):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return [net(h) for h in cuts]

    shape = tuple(parent.model.input_shape)
    total = network_cost(parent.model.graph, shape)[1]
    before_cut = dict(cut_points(parent.model.graph, shape))[cut]
    tails = sum(network_cost(n, shape)[1] for n in compact.nets) - len(compact.nets) * total * before_cut
    print(f"{len(test)} test images, {len(compact.nets)} modules, cut at {cut}, batching {args.batching}, "
          f"channels aligned to {args.align}")
    print(f"multiply-accumulates after the cut: the modules' tails {tails / total:.3f} of the parent's whole network, "
          f"the parent's tail {1 - before_cut:.3f}")
    parent_s, composed_s = side_by_side(lambda: run(parent_tail), lambda: run(composed_tail), args.repeats)
    print(f"parent tail {parent_s:.3f}s, composed tails {composed_s:.3f}s")
    print(f"ratio {composed_s / parent_s:.3f}")


if __name__ == "__main__":
    main()
