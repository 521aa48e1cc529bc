"""The composed classifier of compact modules against its parent, as the classes grow.

    python benchmarks/compact_scale.py [--classes 10,20,40,100,202] [--limit 404] [--repeats 3]

For each K, a ResNet-20 with K outputs (random weights: the time does not depend on them) at 64x64, on the first K
Tiny-ImageNet classes of the data the shared check `scale-k202` decomposes, and its K compact modules with the
default keep fractions for K classes (`CompactConfig.for_classes`, as `cnnmod decompose --method compact` makes
them; no fine-tune: the shapes are the same). Times the parent and the composed classifier (the modules' default
engine) side by side on --limit test images and prints a line per K; the last line is `ratio <composed / parent>`
at the largest K. This is what `--method auto` reads: compact modules cost at most the parent up to
`COMPACT_MOST_CLASSES` classes.
"""

from __future__ import annotations

import argparse

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
        config = CompactConfig(train_images=0, importance_per_class=2, recalibrate_images=0).for_classes(k)
        result = compact_decompose(parent, part.train.images, part.train.labels, config)
        modules = module_set(parent, result.plan, list(result.keeps), list(result.nets), range(k))
        test = part.test.images[: args.limit]
        parent_s, composed_s = side_by_side(lambda p=parent, t=test: p.logits(t),
                                            lambda m=modules, t=test: m.logits(t), args.repeats)
        ratio = composed_s / parent_s
        print(f"{k} classes (keeps {config.stream_keep:.3f} / {config.inner_keep:.3f}), {len(test)} images: parent "
              f"{parent_s:.2f}s, composed {composed_s:.2f}s ({modules.compact.engine}), ratio {ratio:.2f}", flush=True)
    print(f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
