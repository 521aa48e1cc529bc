"""`cnnmod reproduce`: the paper's evaluation (Tables 1-6, Figure 6) regenerated into one folder.

The work is split into parts (a Table 1 row, a dataset's reuse table, ...). Each finished part is written to
`OUT/parts/<part>-<key>.json` at once, where the key hashes everything the part reads: the profile, the
fingerprints (path, size, modification time) of its datasets and weight files, the cnnmod version and the
device kind. A later run into the same folder loads every part whose key still matches and runs the rest, so an
interrupted run resumes where it stopped. Models trained here are cached the same way under `OUT/models/`.
`OUT/results.json`, `OUT/report.html` and `OUT/report.md` (its tables in Markdown) are rebuilt from the parts at
the end of every run.

Folder policy (outputs.py): OUT must not exist, or be a reproduction folder (recognised by its manifest), which
is resumed. `--overwrite` starts a reproduction folder afresh (its cached parts and models are discarded); it
never replaces anything else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ..errors import CnnmodError
from ..storage.outputs import (
    OutputError,
    check_output,
    folder_with_format,
    kind_of,
    recover_interrupted,
    register_kind,
    write_folder,
)
from .profiles import GORILLA, GROOM, ModelSpec, Profile
from .published import load_paper

if TYPE_CHECKING:
    from ..data import Dataset, ImageSet
    from ..engine.decompose import DecomposeConfig
    from ..engine.modules import Parent

__all__ = ["TABLES", "Outcome", "Sources", "compact_status", "open_reproduction", "plan", "reproduce",
           "write_outputs"]

REPRODUCTION_FORMAT = "cnnmod.reproduction"
RESULTS_FORMAT = "cnnmod.reproduction.results"
register_kind("reproduction", folder=True, recognise=folder_with_format(REPRODUCTION_FORMAT))

TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "figure6")
FIGURE6_NEEDS = ("table2", "table3", "table5", "table6")  # Figure 6 is drawn from their energies
SHARED = Path("../shared")


class DataNotHere(CnnmodError):
    """A dataset or weight file a part needs is not on this machine."""


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Sources:
    """Where the data and the pretrained weights are; `fashion_mnist=None` takes the embedded sample and
    `cifar100=None` leaves its rows marked "data not here"."""

    cifar10: Path
    imagenet200: Path
    fashion_mnist: Path | None
    cifar100: Path | None
    models: Path

    @classmethod
    def default(cls, shared: Path = SHARED, cifar100: Path | None = None) -> Sources:
        fmnist = Path("/usr/share/datasets/fashion-mnist")
        return cls(shared / "data/cifar10-jpg.tar.gz", shared / "data/tiny-imagenet-202-sub.tar.gz",
                   fmnist if fmnist.exists() else None, cifar100, shared / "models")

    def path(self, dataset: str) -> Path | None:
        return {"cifar10": self.cifar10, "cifar100": self.cifar100, "imagenet200": self.imagenet200,
                "fashion-mnist": self.fashion_mnist}[dataset]

    def to_json(self) -> dict[str, str | None]:
        return {"cifar10": str(self.cifar10), "cifar100": _str(self.cifar100), "imagenet200": str(self.imagenet200),
                "fashion-mnist": _str(self.fashion_mnist) or "embedded sample", "models": str(self.models)}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def fingerprint(path: Path) -> list[list[Any]]:
    """(path, size, mtime) of a file, or of every file under a folder: what a cache key depends on."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    out: list[list[Any]] = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def compact_status(table: str) -> dict[str, str]:
    """What a table says in its compact columns: reproduce runs compact modules for Table 1, Table 2's pairs and
    Figure 6's ratio of those pairs; inter-dataset pairs and replacements of compact modules are not run."""
    if table in ("table1", "table2", "figure6"):
        return {"status": "–", "note": "compact modules (--method compact); Table 2: each pair decomposed with "
                                         "the shared prefix narrowed to it (--prefix-keep)"}
    return {"status": "not run here",
            "note": "compact modules of two parents (inter-dataset pairs, replacements) are not part of the "
                    "reproduction; compact pairs of one parent are Table 2's"}


# ---------------------------------------------------------------------------------------------- folder


def open_reproduction(out: Path, overwrite: bool) -> bool:
    """Make OUT ready before any work; True when an existing reproduction is resumed.

    A reproduction folder is resumed (no --overwrite needed); with `overwrite` it is replaced by an empty one.
    Anything else at OUT is refused by the output policy."""
    from ..storage.fileio import atomic_write_text

    out = Path(out)
    recover_interrupted(out)
    if not overwrite and kind_of(out) == "reproduction":
        check_output(out, "reproduction", True)  # still checks that its folder can be written
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {out}: the reproduction folder is not writable")
        return True
    check_output(out, "reproduction", overwrite)
    with write_folder(out, "reproduction", overwrite) as tmp:
        atomic_write_text(tmp / "manifest.json", json.dumps({"format": REPRODUCTION_FORMAT, "version": 1}))
    return False


def _write_json(path: Path, value: Any) -> None:
    from ..storage.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1, allow_nan=False, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _finite(value: Any) -> Any:
    """NaN and infinities become None, so results are strict JSON (a class without images has no recall)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- workspace


class Workspace:
    """Datasets and parents of one run, loaded once each; trained parents are cached under OUT/models."""

    def __init__(self, folder: Path, profile: Profile, sources: Sources, device: str | None, seed: int) -> None:
        self.folder, self.profile, self.sources, self.device, self.seed = folder, profile, sources, device, seed
        self.bars = False  # the scenarios' own progress bars, under the parts' bar (on a terminal only)
        self._datasets: dict[str, Dataset] = {}
        self._parents: dict[str, Parent] = {}
        self.records: dict[str, dict[str, Any]] = {}

    # --- what a part depends on

    def missing(self, dataset: str) -> str | None:
        """Why a dataset is not here, or None."""
        if dataset == "fashion-mnist":
            return None  # the embedded sample stands in
        path = self.sources.path(dataset)
        if path is None:
            return "data not here (pass --cifar100 with the official cifar-100-python folder)" \
                if dataset == "cifar100" else "data not here"
        if not path.exists():
            return f"data not here: {path}"
        return None

    def missing_model(self, key: str) -> str | None:
        spec = self.profile.model(key)
        reason = self.missing(spec.dataset)
        if reason:
            return reason
        if spec.weights not in (None, "embedded") and not (self.sources.models / spec.weights).is_file():
            return f"weights not here: {self.sources.models / spec.weights}"
        return None

    def inputs(self, datasets: Iterable[str], models: Iterable[str]) -> dict[str, Any]:
        """Fingerprints of the files behind `datasets` and `models`: part of every cache key."""
        found: dict[str, Any] = {}
        for name in sorted(set(datasets) | {self.profile.model(k).dataset for k in models}):
            path = self.sources.path(name)
            found[name] = fingerprint(path) if path is not None else "embedded" if name == "fashion-mnist" else None
        for key in sorted(set(models)):
            spec = self.profile.model(key)
            if spec.weights not in (None, "embedded"):
                found[f"weights:{spec.weights}"] = fingerprint(self.sources.models / spec.weights)
        return found

    # --- datasets

    def dataset(self, name: str) -> Dataset:
        from ..data import Dataset, load_dataset

        if name in self._datasets:
            return self._datasets[name]
        reason = self.missing(name)
        if reason:
            raise DataNotHere(reason)
        path = self.sources.path(name)
        if path is None:  # fashion-mnist: the embedded sample
            from importlib import resources

            with resources.as_file(resources.files("cnnmod") / "assets" / "fmnist-sample.npz") as sample:
                data = load_dataset(sample, format="npz", progress=self.bars)
        else:
            data = load_dataset(path, progress=self.bars)
        p = self.profile
        if name == "imagenet200":
            others = [c for c in data.classes if c not in (GORILLA, GROOM)]
            count = len(data.classes) if p.imagenet_classes is None else p.imagenet_classes
            data = data.subset([GORILLA, GROOM, *others[: max(count - 2, 0)]])
        data = Dataset(data.name, per_class(data.train, p.train_per_class), per_class(data.test, p.test_per_class))
        if name == "imagenet200" and data.train.images.shape[1] != p.imagenet_size:
            data = Dataset(data.name, self._resized(data.train), self._resized(data.test))
        self._datasets[name] = data
        return data

    def _resized(self, data: ImageSet) -> ImageSet:
        """Tiny-ImageNet's 64x64 images at the profile's side, once (rather than in every forward pass)."""
        from ..data import ImageSet
        from ..engine.inputs import InputSpec, as_format

        spec = InputSpec.default((self.profile.imagenet_size,) * 2, 3)
        parts = [as_format(data.images[i:i + 2048], spec) for i in range(0, len(data.images), 2048)]
        images = np.concatenate(parts) if parts else data.images[:, : spec.size[0], : spec.size[1]]
        return ImageSet(images, data.labels, data.classes)

    def config(self) -> DecomposeConfig:
        from ..engine.decompose import DecomposeConfig

        return DecomposeConfig(samples_per_class=self.profile.samples_per_class, seed=self.seed)

    # --- parents

    def parent(self, key: str) -> Parent:
        """The parent of model `key`: pretrained weights loaded, or trained here (once: cached under models/)."""
        if key in self._parents:
            return self._parents[key]
        from ..engine.inputs import InputSpec
        from ..engine.modules import Parent
        from ..zoo import create_model, load_model_file, load_weights

        spec = self.profile.model(key)
        reason = self.missing_model(key)
        if reason:
            raise DataNotHere(reason)
        data = self.dataset(spec.dataset)
        if spec.weights == "embedded":
            from importlib import resources

            with resources.as_file(resources.files("cnnmod") / "assets" / "smallcnn-fmnist.safetensors") as path:
                model, info = load_model_file(path)
            parent = Parent.from_model(model, info.input_spec, info.classes, info.arch)
            self.records[key] = {"model": key, "arch": spec.arch, "source": "embedded Fashion-MNIST model"}
        elif spec.weights is not None:
            model = load_weights(create_model(spec.arch, num_classes=len(data.classes)),
                                 self.sources.models / spec.weights).eval()
            size = data.train.images.shape[1:3]
            parent = Parent.from_model(model, InputSpec.default(size, data.train.images.shape[3]), data.classes,
                                       spec.arch)
            self.records[key] = {"model": key, "arch": spec.arch, "source": f"pretrained weights {spec.weights}"}
        else:
            parent = self._trained(spec, data)
        self._parents[key] = parent
        return parent

    def model_path(self, spec: ModelSpec) -> Path:
        p = self.profile
        training = {"train_per_class": p.train_per_class}
        if spec.dataset == "imagenet200":
            training.update(imagenet_classes=p.imagenet_classes, imagenet_size=p.imagenet_size)
        key = _digest({"model": spec.key, "spec": spec.__dict__, "training": training, "device": _device_kind(
            self.device), "inputs": self.inputs([spec.dataset], []), "seed": self.seed, "version": _version()})
        return self.folder / "models" / f"{spec.key}-{key[:16]}.safetensors"

    def _trained(self, spec: ModelSpec, data: Dataset) -> Parent:
        from ..engine.inputs import InputSpec
        from ..engine.modules import Parent
        from ..workflows.energy import EnergyMeter
        from ..workflows.train import train_model
        from ..zoo import create_model, load_model_file, read_model_file_info, save_model_file

        path = self.model_path(spec)
        if path.is_file():
            model, info = load_model_file(path)
            record = dict(info.extra)
        else:
            shape = data.train.images.shape
            input_spec = InputSpec.default((shape[1], shape[2]), shape[3])
            model = create_model(spec.arch, num_classes=len(data.classes), in_channels=shape[3], seed=self.seed)
            with EnergyMeter() as meter:
                result = train_model(model, data.train, input_spec, epochs=spec.epochs, seed=self.seed,
                                     device=self.device, progress=self.bars)
            model = result.model.cpu().eval()
            record = {"model": spec.key, "arch": spec.arch, "source": "trained here",
                      "epochs": spec.epochs, "train_images": len(data.train),
                      "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                      "energy": meter.report.to_json()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model_file(path, model, spec.arch, data.classes, input_spec, extra=record)
            info = read_model_file_info(path)
        self.records[spec.key] = record
        return Parent.from_model(model, info.input_spec, info.classes, spec.arch)

    def record(self, key: str) -> dict[str, Any]:
        self.parent(key)
        return self.records[key]


def per_class(data: ImageSet, n: int | None) -> ImageSet:
    """The first `n` images of every class (all of them for None), in the set's order."""
    if n is None:
        return data
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:n] for c in range(len(data.classes))])
    return data.take(np.sort(keep))


def four_classes(classes: Sequence[str], seed: int) -> list[str]:
    """The paper's C1..C4: four classes drawn at random (seeded), in the dataset's order."""
    picked = np.random.default_rng(seed).choice(len(classes), size=min(4, len(classes)), replace=False)
    return [classes[i] for i in sorted(picked)]


def grid(first: Sequence[str], second: Sequence[str], count: int) -> list[tuple[int, int]]:
    """`count` cells (i, j) of the first x second grid of the paper's Tables 3 and 5, diagonal first, so that a
    few pairs still spread over both datasets' classes."""
    n, m = len(first), len(second)
    cells = [(i, (i + d) % m) for d in range(m) for i in range(n)]
    return list(dict.fromkeys(cells))[:count]


def _version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Part:
    """One cached unit of work: `run(workspace)` returns its JSON result."""

    name: str
    table: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    run: Callable[[Workspace], dict[str, Any]]
    cost: float  # an estimate in units of one ResNet-20 forward pass of a 32x32 image

    @property
    def file_stem(self) -> str:
        return self.name.replace("/", "_")


@dataclass
class Outcome:
    """What became of a part in this run."""

    part: Part
    status: str  # done, cached, failed, data not here, not run
    result: dict[str, Any] | None = None
    seconds: float = 0.0
    energy: dict[str, Any] | None = None
    message: str = ""
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"part": self.part.name, "status": self.status, "seconds": self.seconds, "energy": self.energy,
                "message": self.message, "key": self.key}


_ARCH_COST = {"resnet20": 1.0, "resnet32": 1.65, "resnet56": 2.9, "smallcnn": 0.05}
_BUILD = 500.0  # tracing, checking and setting up one model: as much as about 500 images through a ResNet-20
_COMPACT_IMAGE = 1.3  # one fine-tune image of compact modules (teacher pass; the modules stacked, forward and backward)
_COMPACT_PAIR_IMAGE = 2.0  # one fine-tune image of a compact pair with a narrowed prefix (measured: 100,000 in 244 s)


def _classes(profile: Profile, dataset: str) -> int:
    return {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10,
            "imagenet200": profile.imagenet_classes or 202}[dataset]


def _factor(profile: Profile, spec: ModelSpec) -> float:
    side = profile.imagenet_size if spec.dataset == "imagenet200" else 32
    return _ARCH_COST.get(spec.arch, 0.3) * (side / 32) ** 2


def _images(profile: Profile, dataset: str, per_class_count: int | None) -> int:
    full = {"cifar10": (5000, 1000), "cifar100": (500, 100), "imagenet200": (250, 50), "fashion-mnist": (6000, 1000)}
    return _classes(profile, dataset) * (per_class_count or full[dataset][0])


def plan(profile: Profile, ws: Workspace) -> list[Part]:
    """Every part of the paper's evaluation under `profile`, in the order they run."""
    p = profile
    parts: list[Part] = []
    trained: set[str] = set()

    def train_cost(keys: Iterable[str]) -> float:
        cost = 0.0
        for key in keys:
            spec = p.model(key)
            if spec.trained_here and key not in trained:
                trained.add(key)
                if not ws.model_path(spec).is_file() and not ws.missing(spec.dataset):
                    cost += 3 * spec.epochs * _images(p, spec.dataset, p.train_per_class) * _factor(p, spec)
        return cost

    def observe(key: str, classes: int | None = None) -> float:
        spec = p.model(key)
        return 2 * p.samples_per_class * (classes or _classes(p, spec.dataset)) * _factor(p, spec)

    def composed(key: str, images: int, modules: int | None = None) -> float:
        spec = p.model(key)
        return images * (1 + (modules or _classes(p, spec.dataset))) * _factor(p, spec)

    for spec in p.models:
        if spec.paper_row is None or spec.key not in p.table1:
            continue
        test = _classes(p, spec.dataset) * (p.table1_test_per_class or 100)
        compact = _COMPACT_IMAGE * p.compact_train_images * _factor(p, spec)
        cost = train_cost([spec.key]) + len(p.sites) * (observe(spec.key) + composed(spec.key, test)) + compact
        parts.append(Part(f"table1/{spec.key}", "table1", (spec.dataset,), (spec.key,),
                          _bind(table1_row, spec.key), cost))
    detail = p.model(p.detail)
    test = _classes(p, detail.dataset) * (p.table1_test_per_class or 100)
    parts.append(Part("table1/detail", "table1", (detail.dataset,), (detail.key,), _bind(table1_detail, detail.key),
                      train_cost([detail.key]) + observe(detail.key) + composed(detail.key, test)
                      + 2 * len(p.rhos) * composed(detail.key, min(test, 500))))
    for dataset in p.intra_datasets:
        key = p.reuse_parent(dataset)
        spec = p.model(key)
        pair_train = 3 * p.epochs * 2 * (p.train_per_class or 5000) * _factor(p, spec) + 2 * _BUILD
        compact_pair = _COMPACT_PAIR_IMAGE * p.compact_pair_images * _factor(p, spec) + _BUILD
        cost = train_cost([key]) + observe(key) + p.intra_pairs * (observe(key, 2) + pair_train + compact_pair)
        parts.append(Part(f"table2/{dataset}", "table2", (dataset,), (key,), _bind(table2, dataset), cost))
    for other in ("fashion-mnist", "cifar100"):
        keys = (p.reuse_parent("cifar10"), p.reuse_parent(other))
        spec = p.model(keys[0])
        pair_train = 3 * p.epochs * 2 * (p.train_per_class or 5000) * _factor(p, spec)
        cost = train_cost(keys) + p.inter_pairs * (2 * observe(keys[0], 1) + pair_train + 2 * _BUILD
                                                   + 8 * p.calibration_samples * _factor(p, spec))
        parts.append(Part(f"table3/cifar10-{other}", "table3", ("cifar10", other), keys, _bind(table3, other), cost))
    for dataset, weak, strong in p.replace:
        test = _classes(p, dataset) * (p.test_per_class or 100)
        k = _classes(p, dataset)
        cost = (train_cost([weak, strong]) + observe(weak) + observe(strong) + composed(weak, test)
                + composed(strong, test)
                + min(k, p.replaced_classes) * p.calibration_samples * k * (k + 1) * _factor(p, p.model(weak)))
        parts.append(Part(f"table4/{dataset}", "table4", (dataset,), (weak, strong),
                          _bind(table4, dataset, weak, strong), cost))
    for other in ("fashion-mnist", "cifar100"):
        keys = (p.reuse_parent("cifar10"), p.reuse_parent(other))
        spec = p.model(keys[0])
        test = 10 * (p.test_per_class or 1000)
        cost = train_cost(keys) + observe(keys[0]) + p.replacements * (
            observe(keys[1], 1) + 3 * composed(keys[0], test)
            + 3 * p.epochs * _images(p, "cifar10", p.train_per_class) * _factor(p, spec))
        parts.append(Part(f"table5/cifar10-{other}", "table5", ("cifar10", other), keys, _bind(table5, other), cost))
    k = p.repair_classes or 202
    side = (p.imagenet_size / 32) ** 2 * _ARCH_COST.get(p.repair_arch, 0.3)
    train = 3 * p.epochs * k * (p.train_per_class or 250) * side
    parts.append(Part("table6/imagenet200", "table6", ("imagenet200",), (), table6,
                      2.2 * train + 3 * 2 * p.samples_per_class * k * side + 7 * k * (p.test_per_class or 50) * k
                      * side + 3 * _BUILD))
    return parts


def _bind(fn: Callable[..., dict[str, Any]], *args: str) -> Callable[[Workspace], dict[str, Any]]:
    return lambda ws: fn(ws, *args)


def _test_set(ws: Workspace, dataset: str, per: int | None) -> ImageSet:
    return per_class(ws.dataset(dataset).test, per)


def table1_row(ws: Workspace, key: str) -> dict[str, Any]:
    """The paper's Table 1 row for one model: every variant at both site kinds, both scorings."""
    from .experiments import parent_labels
    from .variants import compare_variants

    spec = ws.profile.model(key)
    data, parent = ws.dataset(spec.dataset), ws.parent(key)
    test = _test_set(ws, spec.dataset, ws.profile.table1_test_per_class)
    rows = compare_variants(parent, parent_labels(parent, data.train), parent_labels(parent, test), ws.config(),
                            sites=ws.profile.sites, device=ws.device, progress=ws.bars)
    return {"model": ws.record(key), "paper_row": spec.paper_row, "test_images": len(test),
            "train_images": len(data.train), "rows": rows, "compact": _compact_table1(ws, key, parent, data, test)}


def _compact_table1(ws: Workspace, key: str, parent: Parent, data: Dataset, test: ImageSet) -> dict[str, Any]:
    """Size and accuracy of compact modules (`--method compact`) of one Table 1 parent, with the profile's
    fine-tune budget."""
    from ..engine.compact import CompactConfig, decompose_compact
    from ..workflows.evaluate import evaluate, relabel
    from .experiments import parent_labels

    config = CompactConfig(train_images=ws.profile.compact_train_images, seed=ws.config().seed)
    try:
        modules, cost = decompose_compact(parent, *parent_labels(parent, data.train), config, device=ws.device)
        result = evaluate(modules, test.images, relabel(test.labels, test.classes, modules.class_names),
                          device=ws.device, progress=ws.bars)
    except CnnmodError as e:
        return {"status": "failed", "note": str(e)}
    return {"status": "done", "top1": result.composed[result.scoring].top1,
            "top5": result.composed[result.scoring].top5, "kept_parameters": result.kept_parameters_mean,
            "engine": result.engine, "train_images": config.train_images, "seconds": cost.seconds}


def table1_detail(ws: Workspace, key: str) -> dict[str, Any]:
    """The plots' numbers for one model's default modules: per-class recall, overlap, sizes, the trade-off."""
    from ..engine.decompose import decompose
    from ..storage.store import save_store
    from ..workflows.evaluate import evaluate, overlap_matrix, relabel
    from .experiments import parent_labels
    from .tradeoff import sweep

    spec = ws.profile.model(key)
    data, parent = ws.dataset(spec.dataset), ws.parent(key)
    test = _test_set(ws, spec.dataset, ws.profile.table1_test_per_class)
    modules, activity = decompose(parent, *parent_labels(parent, data.train), ws.config(), device=ws.device,
                                  progress=ws.bars)
    result = evaluate(modules, test.images, relabel(test.labels, test.classes, modules.class_names),
                      device=ws.device, progress=ws.bars, engine="exact")  # the paper's modules, each run alone
    with tempfile.TemporaryDirectory() as folder:
        save_store(Path(folder) / "store", modules, activity)
        trade = sweep(Path(folder) / "store", test.spread(500), list(ws.profile.rhos), ["node", "channel"],
                      device=ws.device, progress=ws.bars)
    parameters = max(result.parent_parameters, 1)
    return {"model": ws.record(key), "classes": list(modules.class_names), "test_images": len(test),
            "config": ws.config().to_json(), "evaluation": result.to_json(),
            "parent_recall": [m.parent_recall for m in result.modules],
            "composed_recall": [m.recall for m in result.modules],
            "jaccard": [m.jaccard for m in result.modules],
            "kept_parameters": [m.kept_parameters / parameters for m in result.modules],
            "overlap": overlap_matrix(modules).numpy().tolist(), "tradeoff": trade.rows}


def table2(ws: Workspace, dataset: str) -> dict[str, Any]:
    """Intra-dataset reuse: all pairs of four random classes, modules composed vs a model trained on the pair;
    each pair also as compact modules."""
    from ..engine.compact import CompactConfig
    from .experiments import intra_reuse

    key = ws.profile.reuse_parent(dataset)
    parent, data = ws.parent(key), ws.dataset(dataset)
    classes = four_classes(parent.classes, ws.seed)
    pairs = list(itertools.combinations(classes, 2))[: ws.profile.intra_pairs]
    p = ws.profile
    compact_pairs = replace(CompactConfig(seed=ws.config().seed).with_prefix_keep(p.compact_prefix_keep),
                            train_images=p.compact_pair_images)
    result = intra_reuse(parent, data, pairs, p.model(key).arch, p.epochs, ws.config(), ws.seed, ws.device,
                         progress=ws.bars, compact_pairs=compact_pairs)
    return {"parent": ws.record(key), "classes": classes, "experiment": result.to_json()}


def _scratch_arch(ws: Workspace, key: str) -> str:
    return ws.profile.scratch_arch or ws.profile.model(key).arch


def table3(ws: Workspace, other: str) -> dict[str, Any]:
    """Inter-dataset reuse: a CIFAR-10 class with a class of another dataset, with and without continuous
    learning, vs a model trained on the pair."""
    from .experiments import inter_reuse

    ka, kb = ws.profile.reuse_parent("cifar10"), ws.profile.reuse_parent(other)
    pa, pb = ws.parent(ka), ws.parent(kb)
    ca, cb = four_classes(pa.classes, ws.seed), four_classes(pb.classes, ws.seed)
    cells = grid(ca, cb, ws.profile.inter_pairs)
    pairs = [(ca[i], cb[j]) for i, j in cells]
    result = inter_reuse(pa, ws.dataset("cifar10"), pb, ws.dataset(other), pairs, _scratch_arch(ws, ka),
                         ws.profile.epochs, ws.config(), ws.profile.calibration_samples, ws.seed, ws.device,
                         progress=ws.bars)
    return {"parents": [ws.record(ka), ws.record(kb)], "classes": [ca, cb], "cells": cells,
            "experiment": result.to_json()}


def table4(ws: Workspace, dataset: str, weak: str, strong: str) -> dict[str, Any]:
    """Intra-dataset replacement: each module of a weaker parent replaced by a stronger parent's."""
    from ..data import Dataset
    from .experiments import intra_replace

    data = ws.dataset(dataset)
    pw, ps = ws.parent(weak), ws.parent(strong)
    replaced = list(pw.classes[: ws.profile.replaced_classes])
    result = intra_replace(pw, ps, Dataset(data.name, data.train, data.test), ws.config(), ws.device,
                           progress=ws.bars, calibration_samples=ws.profile.calibration_samples, seed=ws.seed,
                           classes=replaced)
    return {"weak": ws.record(weak), "strong": ws.record(strong), "experiment": result.to_json()}


def table5(ws: Workspace, other: str) -> dict[str, Any]:
    """Inter-dataset replacement: a CIFAR-10 module replaced by another dataset's module for another class."""
    from .experiments import inter_replace

    ka, kb = ws.profile.reuse_parent("cifar10"), ws.profile.reuse_parent(other)
    pa, pb = ws.parent(ka), ws.parent(kb)
    ca, cb = four_classes(pa.classes, ws.seed), four_classes(pb.classes, ws.seed)
    cells = grid(ca, cb, ws.profile.replacements)
    replacements = [(ca[i], cb[j]) for i, j in cells]
    result = inter_replace(pa, ws.dataset("cifar10"), pb, ws.dataset(other), replacements, ws.config(),
                           ws.profile.calibration_samples, limit=None, seed=ws.seed, device=ws.device,
                           progress=ws.bars, arch=_scratch_arch(ws, ka), epochs=ws.profile.epochs)
    return {"parents": [ws.record(ka), ws.record(kb)], "classes": [ca, cb], "cells": cells,
            "experiment": result.to_json()}


def table6(ws: Workspace) -> dict[str, Any]:
    """Repair (Figure 1): a parent that calls grooms gorillas, and the four repair options."""
    from ..engine.inputs import InputSpec
    from .experiments import repair_scenario

    data = ws.dataset("imagenet200")
    count = ws.profile.repair_classes or len(data.classes)
    data = data.subset(list(data.classes[:count]))
    size = data.train.images.shape[1]
    result = repair_scenario(data, (GORILLA, GROOM), ws.profile.repair_arch, ws.profile.epochs,
                             InputSpec.default((size, size), 3), ws.config(), 0.5, ws.seed, ws.device,
                             progress=ws.bars)
    return {"classes": list(data.classes), "train_images": len(data.train), "test_images": len(data.test),
            "epochs": ws.profile.epochs, "arch": ws.profile.repair_arch, "experiment": result.to_json()}


# ---------------------------------------------------------------------------------------------- running


@dataclass
class _Clock:
    """Progress per part with an estimate of the time left: a bar on a terminal, one short line per part
    otherwise (none under --quiet)."""

    parts: list[Part]
    bar: bool
    lines: bool
    done_cost: float = 0.0
    spent: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    _bar: Any = None

    def __post_init__(self) -> None:
        if self.bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max(1.0, sum(p.cost for p in self.parts)), unit="", leave=False,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}", file=sys.stderr)

    def start(self, index: int, part: Part) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"reproduce [{index}/{len(self.parts)}] {part.name}")

    def finish(self, index: int, outcome: Outcome, remaining: list[Part]) -> None:
        if outcome.status == "done":
            self.done_cost += outcome.part.cost
            self.spent += outcome.seconds
        if self._bar is not None:
            self._bar.update(outcome.part.cost)
        if self.lines:
            took = f" in {outcome.seconds:.0f} s" if outcome.status == "done" else ""
            left = self.left(remaining)
            tail = f"; about {_duration(left)} left" if left is not None and remaining else ""
            what = outcome.status if not outcome.message or outcome.status == "done" else \
                f"{outcome.status}: {outcome.message}"
            click.echo(f"reproduce [{index}/{len(self.parts)}] {outcome.part.name}: {what}{took}{tail}", err=True)

    def left(self, remaining: list[Part]) -> float | None:
        if self.done_cost <= 0:
            return None
        return sum(p.cost for p in remaining) * self.spent / self.done_cost

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def part_key(ws: Workspace, part: Part) -> str:
    return _digest({"part": part.name, "profile": ws.profile.sizes(), "inputs": ws.inputs(part.datasets, part.models),
                    "seed": ws.seed, "device": _device_kind(ws.device), "version": _version()})


def _device_kind(device: str | None) -> str:
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def _cached(folder: Path, part: Part, key: str) -> dict[str, Any] | None:
    path = folder / "parts" / f"{part.file_stem}-{key[:16]}.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or "result" not in saved:
        return None
    return saved


def _save_part(folder: Path, outcome: Outcome) -> None:
    stem = outcome.part.file_stem
    for old in (folder / "parts").glob(f"{stem}-*.json"):  # an earlier key of the same part
        if old.name != f"{stem}-{outcome.key[:16]}.json":
            old.unlink(missing_ok=True)
    _write_json(folder / "parts" / f"{stem}-{outcome.key[:16]}.json",
                {"part": outcome.part.name, "key": outcome.key, "seconds": outcome.seconds, "energy": outcome.energy,
                 "result": _finite(outcome.result)})


def selected_tables(only: Sequence[str] | None) -> set[str]:
    """The tables `--only` asks for, with those Figure 6 is drawn from."""
    if not only:
        return set(TABLES)
    unknown = [t for t in only if t not in TABLES]
    if unknown:
        raise CnnmodError(f"--only takes {', '.join(TABLES)}; got {unknown[0]!r}")
    chosen = set(only)
    if "figure6" in chosen:
        chosen |= set(FIGURE6_NEEDS)
    return chosen


def reproduce(out: Path, profile: Profile, sources: Sources, only: Sequence[str] | None = None,
              device: str | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run (or load from OUT's cache) every part of the evaluation that `only` selects; write results.json and
    report.html into OUT (opened with `open_reproduction`), and return the results."""
    from ..progress import is_quiet, show_progress
    from ..workflows.energy import EnergyMeter

    folder = Path(out)
    wanted = selected_tables(only)
    ws = Workspace(folder, profile, sources, device, seed)
    parts = plan(profile, ws)
    outcomes: dict[str, Outcome] = {}
    todo: list[Part] = []
    for part in parts:
        key = part_key(ws, part)
        saved = _cached(folder, part, key)
        reason = next((r for r in (ws.missing(d) for d in part.datasets) if r), None) or next(
            (r for r in (ws.missing_model(m) for m in part.models) if r), None)
        if saved is not None:
            outcomes[part.name] = Outcome(part, "cached", saved["result"], saved.get("seconds", 0.0),
                                          saved.get("energy"), key=key)
        elif reason:
            outcomes[part.name] = Outcome(part, "data not here", message=reason, key=key)
        elif part.table not in wanted:
            outcomes[part.name] = Outcome(part, "not run", message="not selected by --only", key=key)
        else:
            todo.append(part)
    clock = _Clock(todo, bar=show_progress(progress), lines=progress and not is_quiet() and not show_progress())
    ws.bars = clock.bar
    start = time.perf_counter()
    try:
        for i, part in enumerate(todo, 1):
            clock.start(i, part)
            key = part_key(ws, part)
            began = time.perf_counter()
            try:
                with EnergyMeter() as meter:
                    result = part.run(ws)
                outcome = Outcome(part, "done", _finite(result), time.perf_counter() - began,
                                  meter.report.to_json(), key=key)
                _save_part(folder, outcome)
            except DataNotHere as e:
                outcome = Outcome(part, "data not here", message=str(e), key=key)
            except (CnnmodError, OSError, MemoryError) as e:
                outcome = Outcome(part, "failed", seconds=time.perf_counter() - began,
                                  message=" ".join(str(e).split()) or type(e).__name__, key=key)
            outcomes[part.name] = outcome
            clock.finish(i, outcome, todo[i:])
    finally:
        clock.close()
    results = assemble(profile, sources, [outcomes[p.name] for p in parts], time.perf_counter() - start, seed)
    write_outputs(folder, results)
    return results


# ---------------------------------------------------------------------------------------------- results


def assemble(profile: Profile, sources: Sources, outcomes: list[Outcome], run_seconds: float,
             seed: int = 0) -> dict[str, Any]:
    """results.json: every number by table, with the paper's own figures and the status of every part."""
    paper = load_paper()
    by_table: dict[str, list[Outcome]] = {t: [] for t in TABLES}
    for outcome in outcomes:
        by_table[outcome.part.table].append(outcome)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": 1, "cnnmod": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.to_json(), "sources": sources.to_json(), "seed": seed,
        "run_seconds": run_seconds,
        "seconds": sum(o.seconds for o in outcomes if o.status in ("done", "cached")),
        "energy": _energy_sum([o.energy for o in outcomes if o.energy and o.status in ("done", "cached")]),
        "parts": [o.to_json() for o in outcomes],
    }
    for table in TABLES[:-1]:
        results[table] = {"title": paper[table]["title"], "paper": paper[table], "compact": compact_status(table),
                          "parts": {o.part.name.split("/", 1)[1]: _part_json(o) for o in by_table[table]}}
    results["figure6"] = figure6(results, paper, compact_status("figure6"))
    return results


def _part_json(outcome: Outcome) -> dict[str, Any]:
    return {"status": outcome.status, "message": outcome.message, "seconds": outcome.seconds,
            "energy": outcome.energy, "result": outcome.result}


def _energy_sum(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    from ..workflows.energy import EnergyReport

    if not reports:
        return None
    return sum(EnergyReport.from_json(r) for r in reports).to_json()  # type: ignore[union-attr]


def _rows(results: dict[str, Any], table: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(part, row) for every row of every finished part of a scenario table (mean rows left out)."""
    for name, part in results[table]["parts"].items():
        result = part.get("result")
        if not result:
            continue
        for row in result["experiment"]["rows"]:
            label = row.get("pair", row.get("replacement", row.get("option")))
            if label != "mean":
                yield name, row


def figure6(results: dict[str, Any], paper: dict[str, Any], compact: dict[str, str]) -> dict[str, Any]:
    """The paper's Figure 6 from the scenario tables: CO2e of each way to build a classifier against training one
    from scratch, and the ratios the paper's text gives."""
    scenarios: list[dict[str, Any]] = []

    def scenario(label: str, table: str, paths: dict[str, str]) -> None:
        rows = [row for _, row in _rows(results, table) if all(f"{k}_co2e_lbs" in row for k in paths.values())]
        if rows:
            scenarios.append({"scenario": label, "rows": len(rows),
                              "co2e_lbs": {name: float(np.mean([r[f"{k}_co2e_lbs"] for r in rows]))
                                           for name, k in paths.items()},
                              "kwh": {name: float(np.mean([r[f"{k}_kwh"] for r in rows]))
                                      for name, k in paths.items()}})

    scenario("intra-dataset reuse (Table 2)", "table2",
             {"train from scratch": "train", "decompose + compose": "reuse", "compose from a store": "store"})
    scenario("intra-dataset reuse, compact pairs (Table 2)", "table2",
             {"train from scratch": "train", "decompose compact + compose": "compact"})
    scenario("inter-dataset reuse (Table 3)", "table3",
             {"train from scratch": "train", "decompose + continuous learning": "reuse",
              "+ score calibration": "calibrated", "+ head recalibration": "recalibrated"})
    scenario("inter-dataset replacement (Table 5)", "table5",
             {"train from scratch": "train", "decompose the new module": "replace",
              "+ score calibration": "calibrate"})
    repair = [row for _, row in _rows(results, "table6")]
    ours: dict[str, Any] = {}

    def ratio(tables: Sequence[str], path: str) -> float | None:
        rows = [row for t in tables for _, row in _rows(results, t) if "train_kwh" in row and f"{path}_kwh" in row]
        if not rows:
            return None
        return float(np.mean([r["train_kwh"] for r in rows]) / max(np.mean([r[f"{path}_kwh"] for r in rows]), 1e-30))

    ours["reuse, fixed epochs"] = ratio(["table2", "table3"], "reuse")
    ours["replace, fixed epochs"] = ratio(["table5"], "replace")
    compact_ratios = {"reuse, fixed epochs": ratio(["table2"], "compact")}
    one_time = {}
    for name, part in results["table2"]["parts"].items():
        result = part.get("result")
        if result and "store_decompose" in result["experiment"].get("summary", {}):
            one_time[name] = result["experiment"]["summary"]["store_decompose"]["co2e_lbs"]
    return {"title": paper["figure6"]["title"], "paper": paper["figure6"], "compact": compact,
            "scenarios": scenarios, "ratios": ours, "compact_ratios": compact_ratios,
            "repair": [{"option": r["option"], "co2e_lbs": r.get("repair_co2e_lbs"), "kwh": r.get("repair_kwh")}
                       for r in repair],
            "one_time_decomposition_co2e_lbs": one_time,
            "notes": ["ratios: mean training energy over mean energy of the path, over the rows of the tables named "
                      "(compact modules: Table 2's compact pairs)",
                      "the paper also gives ratios up to the best epoch; every model here is charged for all its "
                      "epochs, so only the fixed-epoch ratios are measured"]}


def write_outputs(folder: Path, results: dict[str, Any]) -> None:
    """results.json, the self-contained report.html and its tables as report.md, each written atomically into the
    reproduction folder."""
    from ..storage.fileio import atomic_write_text
    from .html import render_report
    from .markdown import report_markdown

    _write_json(folder / "results.json", _finite(results))
    html = render_report(results)
    atomic_write_text(folder / "report.html", html)
    atomic_write_text(folder / "report.md", report_markdown(html))
