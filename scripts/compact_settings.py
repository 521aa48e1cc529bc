"""Compact decompositions of one model under several settings, each evaluated on the whole test split.

    python scripts/compact_settings.py MODEL --data D [--arch A] SETTINGS [SETTINGS ...]

MODEL is anything `cnnmod decompose` takes (with --arch for a plain checkpoint). Each SETTINGS is a
comma-separated list of `CompactConfig` fields, e.g. `train_images=20000,lr=0.01` or `shared_prefix_parameters=0`
(`default` for none). One line per SETTINGS: kept parameters, the parent's and the composed top-1 and top-5, and
the seconds the decomposition took. The SmallCNN rows of docs/RESULTS.md (stop 26) were measured with

    python scripts/compact_settings.py src/cnnmod/assets/smallcnn-fmnist.safetensors \\
        --data /usr/share/datasets/fashion-mnist train_images=20000,shared_prefix_parameters=0 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from cnnmod.data import load_dataset
from cnnmod.engine.compact import CompactConfig, compact_decompose, module_set
from cnnmod.errors import CnnmodError
from cnnmod.storage.models_in import ModelSource, open_model
from cnnmod.workflows.evaluate import evaluate, relabel


def settings(text: str) -> CompactConfig:
    """`name=value,...` as a CompactConfig; each value is read as its field's type."""
    config = CompactConfig()
    if text == "default":
        return config
    types = {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)}
    changes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"error: CompactConfig has no field {name!r}")
        kind = types[name]
        try:
            changes[name] = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise SystemExit(f"error: {name}={value!r} is not a {kind.__name__}") from None
    try:
        return dataclasses.replace(config, **changes)
    except CnnmodError as e:
        raise SystemExit(f"error: {text}: {e}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--arch", default=None)
    ap.add_argument("settings", nargs="+")
    args = ap.parse_args()
    configs = [settings(text) for text in args.settings]  # every SETTINGS is read before any work
    data = load_dataset(args.data, progress=False)
    parent = open_model(ModelSource(args.model, arch=args.arch))
    train = relabel(data.train.labels, data.classes, parent.classes)
    test = relabel(data.test.labels, data.classes, parent.classes)
    for text, config in zip(args.settings, configs, strict=True):
        start = time.perf_counter()
        made = compact_decompose(parent, data.train.images[train >= 0], train[train >= 0], config)
        seconds = time.perf_counter() - start
        modules = module_set(parent, made.plan, list(made.keeps), list(made.nets), range(parent.num_classes))
        result = evaluate(modules, data.test.images[test >= 0], test[test >= 0], progress=False, engine="exact")
        composed = result.composed[result.scoring]
        print(f"{text}: kept {result.kept_parameters_mean:.3f}  parent top-1 {result.parent.top1:.4f} top-5 "
              f"{result.parent.top5:.4f}  composed top-1 {composed.top1:.4f} top-5 {composed.top5:.4f}  "
              f"{seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
