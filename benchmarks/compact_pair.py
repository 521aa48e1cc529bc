"""A 2-class classifier of compact modules against the parent: accuracy on the pair and inference time.

    python benchmarks/compact_pair.py cat dog [--prefix-keep 0.35] [--train-images 100000] [--lr 0.004]
        [--hint-weight 5] [--label-weight 0.5] [--arch resnet20|resnet56]

Decomposes the pair's two compact modules from the shared parent (a prefix narrowed to --prefix-keep of its
channels for the pair, or the parent's own with 1), composes them, and times the pair classifier and the parent
side by side on the pair's test images. Last line: `ratio <pair time / parent time>` (target: at most 0.3).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from common import DATA, SHARED, side_by_side

from cnnmod.data import load_dataset
from cnnmod.engine.compact import CompactConfig, decompose_compact
from cnnmod.engine.compose import compose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.paper.experiments import accuracy, module_parameters, parent_labels
from cnnmod.workflows.energy import EnergyMeter
from cnnmod.zoo import create_model, load_weights

WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--arch", choices=sorted(WEIGHTS), default="resnet20")
    ap.add_argument("--prefix-keep", type=float, default=0.35)
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--hint-weight", type=float, default=None)
    ap.add_argument("--label-weight", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = load_dataset(DATA, progress=False)
    model = load_weights(create_model(args.arch, num_classes=10), SHARED / "models" / WEIGHTS[args.arch]).eval()
    parent = Parent.from_model(model, InputSpec.default((32, 32), 3), data.classes, args.arch)
    config = CompactConfig().with_prefix_keep(args.prefix_keep)
    changes = {"train_images": args.train_images, "lr": args.lr, "hint_weight": args.hint_weight,
               "label_weight": args.label_weight}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    images, labels = parent_labels(parent, data.train)
    start = time.perf_counter()
    with EnergyMeter() as meter:
        modules = decompose_compact(parent, images, labels, config, [args.a, args.b])[0]
    seconds = time.perf_counter() - start
    pair = compose([modules])
    test = data.test.subset([args.a, args.b])
    parameters, whole = module_parameters(modules)
    parent_s, pair_s = side_by_side(lambda: parent.logits(test.images), lambda: pair.predict(test.images, 256),
                                    args.repeats)
    print(json.dumps({"pair": f"{args.a}/{args.b}", "config": config.to_json(),
                      "accuracy": accuracy(pair, test.images, test.labels), "params_vs_parent": parameters / whole,
                      "decompose_seconds": seconds, "kwh": meter.report.kwh, "parent_seconds": parent_s,
                      "pair_seconds": pair_s}))
    print(f"ratio {pair_s / parent_s:.3f}")


if __name__ == "__main__":
    main()
