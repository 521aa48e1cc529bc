"""The two per-class passes of a compact decomposition before its fine-tune, at many classes, against what they
were: the channel importance (every image for every class, against each image for its own class and its rival)
and the recalibration (every module's whole network, against the frozen shared prefix run once).

    python benchmarks/compact_classes.py [--classes 40] [--per-class 4] [--repeats 1]

A ResNet-20 with --classes outputs (random weights: the work does not depend on them) at 64x64 on as many
Tiny-ImageNet classes, --per-class images each, the data the shared check `scale-k202` decomposes. Prints each
pass's seconds, baseline then candidate, and last `ratio <candidate / baseline>` for both passes together. The
every-image importance takes one backward pass per class and batch, so its cost grows with the square of the
classes; the own-and-rival one takes two per batch.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import SHARED, side_by_side

from cnnmod.data import load_dataset
from cnnmod.engine import compact
from cnnmod.engine.channels import channel_plan, materialize
from cnnmod.engine.decompose import channel_heads
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.zoo import create_model

DATA = SHARED / "data" / "tiny-imagenet-202-sub.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    data = load_dataset(DATA, progress=False)
    k = args.classes
    if not 2 <= k <= len(data.classes):
        ap.error(f"--classes must be in [2, {len(data.classes)}]")
    train = data.train.subset(data.classes[:k])
    model = create_model("resnet20", num_classes=k, seed=0).eval()
    parent = Parent.from_model(model, InputSpec.default((64, 64), 3), train.classes, "resnet20")
    plan = channel_plan(parent.model)
    config = compact.CompactConfig(importance_per_class=args.per_class)
    rng = np.random.default_rng(0)
    sample = compact._sample(train.labels, range(k), args.per_class, rng)
    images, labels, classes = train.images[sample], train.labels[sample], list(range(k))
    cut = compact.choose_cut(parent, config)
    frozen = frozenset(compact.prefix_layers(parent, plan, cut))
    importance = compact.class_importance(parent, plan, images, classes, labels=labels)
    keeps = compact.choose_keeps(importance, plan, config, compact.prefix_spaces(parent, plan, cut))
    hw, hb = channel_heads(parent.model.head.weight, parent.model.head.bias, classes)
    pick = compact._sample(train.labels, range(k), -(-config.recalibrate_images // k), rng)
    x = parent.input_spec.prepare(train.images[pick])
    with torch.no_grad():
        teacher = parent.model.graph(x)

    def recalibrated(once: bool) -> None:
        nets = [materialize(parent.model.graph, plan, keep, hw[i], hb[i]) for i, keep in enumerate(keeps)]
        compact.recalibrate(parent, plan, keeps, nets, x, teacher, skip=frozen, cut=cut if once else None)

    every, own = side_by_side(lambda: compact.class_importance(parent, plan, images, classes),
                              lambda: compact.class_importance(parent, plan, images, classes, labels=labels),
                              args.repeats)
    print(f"importance, {k} classes x {args.per_class} images: every image {every:.2f} s, own and rival {own:.2f} s")
    whole, once = side_by_side(lambda: recalibrated(False), lambda: recalibrated(True), args.repeats)
    print(f"recalibration, {k} modules on {len(pick)} images: each whole network {whole:.2f} s, prefix once "
          f"{once:.2f} s")
    print(f"ratio {(own + once) / (every + whole):.3f}")


if __name__ == "__main__":
    main()
