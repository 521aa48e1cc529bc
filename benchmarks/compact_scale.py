"""The composed classifier of compact modules against its parent, as the classes grow.

    python benchmarks/compact_scale.py [--classes 10,20,40,100,202] [--limit 404] [--repeats 3] [--steps 4]

For each K, a ResNet-20 with K outputs (random weights: the time does not depend on them) at 64x64, on the first K
Tiny-ImageNet classes of the data the shared check `scale-k202` decomposes, and its K compact modules with the
default keep fractions for K classes (`CompactConfig.for_classes`, as `cnnmod decompose --method compact` makes
them; no fine-tune: the shapes are the same). Times the parent and the composed classifier (the modules' default
engine) side by side on --limit test images, and times --steps fine-tune steps of 64 images after a first one (without
the prefix cache, as a fine-tune that cannot cache it runs); the default
fine-tune is 300,000 images, 4,688 such steps. Prints a line per K; the last line is `ratio <composed / parent>` at
the largest K. `--method auto` takes compact up to `COMPACT_MOST_CLASSES` classes by these figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

from common import SHARED, side_by_side

from cnnmod.data import load_dataset
from cnnmod.engine.compact import CompactConfig, compact_decompose, module_set
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.zoo import create_model

DATA = SHARED / "data" / "tiny-imagenet-202-sub.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", default="10,20,40,100,202")
    ap.add_argument("--limit", type=int, default=404)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    data = load_dataset(DATA, progress=False)
    counts = sorted(int(k) for k in args.classes.split(","))
    if not counts or counts[0] < 2 or counts[-1] > len(data.classes):
        ap.error(f"--classes must be in [2, {len(data.classes)}]")
    ratio = float("nan")
    for k in counts:
        part = data.subset(data.classes[:k])
        model = create_model("resnet20", num_classes=k, seed=0).eval()
        parent = Parent.from_model(model, InputSpec.default((64, 64), 3), part.classes, "resnet20")
        config = CompactConfig(train_images=0, importance_per_class=2, recalibrate_images=0,
                               cache_prefix=False).for_classes(k)
        result = compact_decompose(parent, part.train.images, part.train.labels, config)
        stamps: list[float] = []

        def stamp(stage: str, seen: int, total: int, loss: float, stamps: list[float] = stamps) -> None:
            if stage == "fine-tune":
                stamps.append(time.perf_counter())

        compact_decompose(parent, part.train.images, part.train.labels,
                          dataclasses.replace(config, train_images=64 * (args.steps + 1)), progress=stamp)
        step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        default_steps = math.ceil(CompactConfig().train_images / 64)
        modules = module_set(parent, result.plan, list(result.keeps), list(result.nets), range(k))
        test = part.test.images[: args.limit]
        parent_s, composed_s = side_by_side(lambda p=parent, t=test: p.logits(t),
                                            lambda m=modules, t=test: m.logits(t), args.repeats)
        ratio = composed_s / parent_s
        print(f"{k} classes (keeps {config.stream_keep:.3f} / {config.inner_keep:.3f}), {len(test)} images: parent "
              f"{parent_s:.2f}s, composed {composed_s:.2f}s ({modules.compact.engine}), ratio {ratio:.2f}; fine-tune "
              f"{step:.2f}s a step, {step * default_steps / 60:.0f} min for the default", flush=True)
    print(f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
