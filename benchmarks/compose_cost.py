"""The 10-module composed classifier of the shared ResNet-20 against the parent, on the CIFAR-10 test set.

    python benchmarks/compose_cost.py [--method paper|compact] [--store S] [--classes cat,dog] [--limit 2000]
        [--repeats 5] [--batchings]
Last line: `ratio <composed seconds / parent seconds>` (compact: with the modules' default engine; every engine's
ratio is printed above it).

Compact modules' inference time depends on their shapes only, so without `--store` the benchmark builds modules
of the default keep fractions from importance alone (no fine-tune): the same shapes as `cnnmod decompose
--method compact` makes. `--store` times a store's own modules instead.
"""

from __future__ import annotations

import argparse
import dataclasses

from common import resnet20_and_cifar10, side_by_side

from cnnmod.engine.decompose import DecomposeConfig, decompose


def compact_modules(parent, data, store):  # type: ignore[no-untyped-def]
    if store:
        from cnnmod.storage.store import load_store

        return load_store(store, with_activity=False).modules
    from cnnmod.engine.compact import CompactConfig, compact_decompose, module_set

    config = CompactConfig(train_images=0, importance_per_class=8, recalibrate_images=0)
    result = compact_decompose(parent, data.train.images, data.train.labels, config)
    return module_set(parent, result.plan, list(result.keeps), list(result.nets), range(parent.num_classes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["paper", "compact"], default="paper")
    ap.add_argument("--store", default=None, help="compact: time this store's modules")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--classes", default=None, help="compose only these modules (a reused pair, say)")
    ap.add_argument("--batchings", action="store_true",
                    help="compact: also time the exact engine's grouped and folded batching, and each against the "
                         "parent run channels-last")
    args = ap.parse_args()
    parent, data = resnet20_and_cifar10()
    test = data.test.images[: args.limit]
    if args.method == "paper":
        modules, _ = decompose(parent, data.train.images, data.train.labels,
                               DecomposeConfig(samples_per_class=200), progress=False)
        if args.classes:
            modules = modules.select(args.classes.split(","))
        print(f"{len(test)} test images, {len(modules)} modules")
        parent_s, composed_s = side_by_side(lambda: parent.logits(test), lambda: modules.logits(test), args.repeats)
        print(f"parent {parent_s:.2f}s, composed {composed_s:.2f}s")
        print(f"ratio {composed_s / parent_s:.3f}")
        return
    modules = compact_modules(parent, data, args.store)
    if args.classes:
        modules = modules.select(args.classes.split(","))
    compact = modules.compact
    engines = ["exact"] + (["shared"] if compact.shared is not None else [])
    print(f"{len(test)} test images, {len(modules)} compact modules, engines {', '.join(engines)}, "
          f"default {compact.engine}")
    ratios = {}
    for engine in engines:
        run = dataclasses.replace(modules, compact=compact.with_engine(engine))
        parent_s, composed_s = side_by_side(lambda: parent.logits(test), lambda r=run: r.logits(test), args.repeats)
        ratios[engine] = composed_s / parent_s
        print(f"{engine}: parent {parent_s:.2f}s, composed {composed_s:.2f}s, ratio {ratios[engine]:.3f}")
    if args.batchings:
        channels_last = channels_last_parent(parent)
        for batching in ("grouped", "folded"):
            run = dataclasses.replace(modules, compact=dataclasses.replace(compact, engine="exact", batching=batching))
            parent_s, composed_s = side_by_side(lambda: parent.logits(test), lambda r=run: r.logits(test),
                                                args.repeats)
            last_s, against_last_s = side_by_side(lambda: channels_last(test), lambda r=run: r.logits(test),
                                                  args.repeats)
            print(f"exact, {batching}: parent {parent_s:.2f}s, composed {composed_s:.2f}s, ratio "
                  f"{composed_s / parent_s:.3f}; the parent channels-last {last_s:.2f}s, composed "
                  f"{against_last_s:.2f}s, ratio {against_last_s / last_s:.3f}")
    print(f"ratio {ratios[compact.engine]:.3f}")


def channels_last_parent(parent):  # type: ignore[no-untyped-def]
    """The parent's inference pass with its layers channels-last, as the exact engine runs modules on a CPU."""
    import torch

    from cnnmod.engine.modules import _batched, inference_network

    net = inference_network(parent.model).to(memory_format=torch.channels_last).eval()
    return lambda images: _batched(lambda x: net(parent.input_spec.prepare(x, torch.device("cpu"))), images, 256,
                                   False, "parent")


if __name__ == "__main__":
    main()
