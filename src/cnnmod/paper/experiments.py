"""The paper's reuse, replacement and repair scenarios (Tables 2-6, Figure 6) on real data.

Every path that builds a classifier is measured with the same energy meter as training the same
architecture from scratch on the same classes, so the two can be compared side by side.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Dataset, ImageSet
from ..engine.channels import parent_cost
from ..engine.compact import CompactConfig, decompose_compact
from ..engine.compose import ComposedClassifier, compose, replace
from ..engine.decompose import DecomposeConfig, decompose
from ..engine.engines import compact_parameters
from ..engine.inputs import InputSpec, as_format
from ..engine.modules import ModuleSet, Parent
from ..progress import compact_progress, show_progress
from ..storage.store import load_store, save_store
from ..workflows.calibrate import calibrate, labelled_sample
from ..workflows.energy import EnergyMeter, EnergyReport
from ..workflows.evaluate import relabel
from ..workflows.metrics import parameter_counts, topk_accuracy
from ..workflows.reuse import activity_on, forget, own_activity, recalibrate
from ..workflows.train import train_parent

T = TypeVar("T")


@dataclass(frozen=True)
class Experiment:
    """A scenario's table: `columns` name the keys of each row shown; `summary` holds numbers that belong to
    the whole table (an energy spent once for every row, the parents' accuracies)."""

    name: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        from ..tables import markdown_table

        return markdown_table(self.columns, [[r.get(c, "") for c in self.columns] for r in self.rows])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "columns": list(self.columns), "rows": self.rows, "notes": self.notes,
                "summary": self.summary}


def measured(fn: Callable[[], T]) -> tuple[T, EnergyReport]:
    with EnergyMeter() as meter:
        result = fn()
    return result, meter.report


def accuracy(composed: ComposedClassifier, images: np.ndarray, targets: np.ndarray,
             device: torch.device | str | None = None) -> float:
    """Top-1 of a composed classifier; `targets` index its labels."""
    if len(targets) == 0:
        return float("nan")
    return float((composed.predict(images, device=device).numpy() == targets).mean())


def parent_labels(parent: Parent, data: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """The images of `data` whose class the parent knows, with parent class indices."""
    labels = relabel(data.labels, data.classes, parent.classes)
    return data.images[labels >= 0], labels[labels >= 0]


def train_scratch(arch: str, data: ImageSet, spec: InputSpec, epochs: int, seed: int,
                  device: torch.device | str | None, progress: bool) -> tuple[Parent, EnergyReport]:
    """Train `arch` from scratch on `data` with `cnnmod train`'s loop, measured."""
    return measured(lambda: train_parent(arch, data, spec, epochs, seed, device, progress))


def parent_accuracy(parent: Parent, data: ImageSet, device: torch.device | str | None = None) -> float:
    images, labels = parent_labels(parent, data)
    return float((parent.logits(images, device=device).argmax(1).numpy() == labels).mean())


def parent_topk(parent: Parent, data: ImageSet, device: torch.device | str | None = None) -> tuple[float, float]:
    """Top-1 and top-5 of a parent on the images of `data` whose class it knows."""
    images, labels = parent_labels(parent, data)
    logits, targets = parent.logits(images, device=device), torch.as_tensor(labels)
    return topk_accuracy(logits, targets, 1), topk_accuracy(logits, targets, 5)


def _energy_columns(row: dict[str, Any], name: str, report: EnergyReport) -> None:
    row[f"{name}_kwh"] = report.kwh
    row[f"{name}_seconds"] = report.seconds
    row[f"{name}_co2e_lbs"] = report.co2e_lbs


# --- Table 2: intra-dataset reuse -------------------------------------------------------------------------


def intra_reuse(parent: Parent, data: Dataset, pairs: Sequence[tuple[str, str]], arch: str, epochs: int,
                config: DecomposeConfig, seed: int = 0, device: torch.device | str | None = None,
                progress: bool = True, compact: CompactConfig | None = None, batch_size: int = 256,
                repeats: int = 3, pair_compact: CompactConfig | None = None,
                compact_pairs: CompactConfig | None = None) -> Experiment:
    """For each class pair: modules of `parent` composed vs `arch` trained from scratch on the pair.

    Reuse is measured two ways: decomposing the pair's classes fresh and composing them, and composing them
    from a store of all the parent's modules decomposed once beforehand (what every later reuse costs). The
    modules are the paper's masked ones, or compact ones (cnnmod.engine.compact) with `compact`. Each pair's classifier
    is also set against the parent and the scratch model in parameters and in inference time (the fastest of
    `repeats` runs over the pair's test images, `batch_size` images a batch). `pair_compact` configures the
    pairs' own compact decompositions (for example a prefix narrowed to the pair) where it differs from the
    store's. `compact_pairs` adds, beside masked modules, each pair decomposed as compact modules with that
    configuration: its accuracy, size, inference time and energy in the `compact_*` columns."""
    train_images, train_labels = parent_labels(parent, data.train)
    parent.logits(train_images[:256], device=device)  # warm-up, so the first pair is not charged for it
    with tempfile.TemporaryDirectory() as folder:
        with EnergyMeter() as meter:
            save_store(Path(folder) / "store", _decompose(parent, train_images, train_labels, config, compact, None,
                                                          device, progress))
        store_energy = meter.report
        rows = [_intra_pair(parent, data, train_images, train_labels, Path(folder) / "store", a, b, arch, epochs,
                            config, pair_compact or compact, seed, device, progress, batch_size, repeats,
                            compact_pairs)
                for a, b in pairs]
    _mean_row(rows, "pair")
    method = "compact modules" if compact is not None else "masked modules"
    if pair_compact is not None:
        method += f", the shared prefix narrowed to {pair_compact.prefix_keep:g} of its channels for the pair"
    return Experiment(
        "intra-dataset reuse (Table 2)",
        ("pair", "composed", "scratch", "delta", "reuse_kwh", "store_kwh", "train_kwh", "energy_ratio",
         "store_energy_ratio", "params_vs_parent", "params_vs_scratch", "time_vs_parent", "time_vs_scratch"), rows,
        [f"scratch: {arch} trained {epochs} epochs on the pair; accuracy on the pair's test images",
         f"reuse: decompose the pair's classes from the parent in one pass ({method}) and compose; store: compose "
         "the pair from a store of all classes decomposed once (load, select, compose)",
         f"decomposing all {len(parent.classes)} classes into that store, once: {store_energy.describe()}",
         "energy ratios: train over reuse, train over store; the mean row divides mean energies",
         "params: the pair classifier's parameters (the two modules' " +
         ("networks" if compact is not None else "kept conv and linear parameters") +
         ", added) over the parent's and over the scratch model's; time: its inference time over theirs, the "
         f"fastest of {repeats} runs over the pair's test images, {batch_size} images a batch",
         *([f"compact: the pair decomposed as compact modules ({compact_pairs.train_images} fine-tune images, "
            f"the shared prefix narrowed to {compact_pairs.prefix_keep:g} of its channels) and composed; its "
            "accuracy, parameters and inference time against the parent's, and the energy of making it"]
           if compact_pairs is not None else [])],
        {"store_decompose": store_energy.to_json(), "parent_classes": len(parent.classes),
         "method": "compact" if compact is not None else "paper",
         **({"compact_config": compact.to_json()} if compact is not None else {}),
         **({"pair_compact_config": pair_compact.to_json()} if pair_compact is not None else {}),
         **({"compact_pairs_config": compact_pairs.to_json()} if compact_pairs is not None else {})})


def _decompose(parent: Parent, images: np.ndarray, labels: np.ndarray, config: DecomposeConfig,
               compact: CompactConfig | None, classes: Sequence[str] | None, device: torch.device | str | None,
               progress: bool) -> ModuleSet:
    """The parent's modules for `classes` (default: all): masked by the paper's rule, or compact with `compact`."""
    if compact is None:
        return decompose(parent, images, labels, config, classes, device=device, progress=progress)[0]
    with compact_progress(compact.train_images, "compact fine-tune", progress) as tick:
        return decompose_compact(parent, images, labels, compact, classes, tick, device)[0]


def _intra_pair(parent: Parent, data: Dataset, train_images: np.ndarray, train_labels: np.ndarray, store: Path,
                a: str, b: str, arch: str, epochs: int, config: DecomposeConfig, compact: CompactConfig | None,
                seed: int, device: torch.device | str | None, progress: bool, batch_size: int = 256,
                repeats: int = 3, compact_pairs: CompactConfig | None = None) -> dict[str, Any]:
    test = data.test.subset([a, b])
    with EnergyMeter() as meter:
        modules = _decompose(parent, train_images, train_labels, config, compact, [a, b], device, progress)
        composed = compose([modules])
    reuse_energy = meter.report
    with EnergyMeter() as meter:
        from_store = compose([load_store(store, with_activity=False).modules.select([a, b])])
    store_energy = meter.report
    scratch, train_energy = train_scratch(arch, data.train.subset([a, b]), parent.input_spec, epochs, seed, device,
                                          progress)
    row: dict[str, Any] = {"pair": f"{a}/{b}", "composed": accuracy(composed, test.images, test.labels, device),
                           "scratch": parent_accuracy(scratch, test, device)}
    row["delta"] = row["composed"] - row["scratch"]
    row["store_composed"] = accuracy(from_store, test.images, test.labels, device)
    _energy_columns(row, "reuse", reuse_energy)
    _energy_columns(row, "store", store_energy)
    _energy_columns(row, "train", train_energy)
    _energy_ratios(row)
    row.update(_size_and_speed(modules, composed, parent, scratch, test.images, batch_size, device, repeats))
    if compact_pairs is not None:
        with EnergyMeter() as meter:
            small = _decompose(parent, train_images, train_labels, config, compact_pairs, [a, b], device, progress)
            small_composed = compose([small])
        _energy_columns(row, "compact", meter.report)
        size = _size_and_speed(small, small_composed, parent, scratch, test.images, batch_size, device, repeats)
        row.update({"compact_composed": accuracy(small_composed, test.images, test.labels, device),
                    **{f"compact_{k}": size[k] for k in ("params_vs_parent", "params_vs_scratch", "time_vs_parent",
                                                         "time_vs_scratch")}})
    return row


def module_parameters(modules: ModuleSet) -> tuple[int, int]:
    """(the modules' parameters added up, the parent's conv and linear parameters): the kept parameters of masked
    modules, the parameters of compact modules' networks."""
    if modules.compact is not None:
        each, whole = compact_parameters(modules)
        return sum(each), whole
    counts = parameter_counts(modules)
    return sum(counts.kept), counts.parent


def fastest_seconds(runs: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """The fastest of `repeats` wall-clock times of each run; the runs take turns, so drift is shared."""
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _size_and_speed(modules: ModuleSet, composed: ComposedClassifier, parent: Parent, scratch: Parent,
                    images: np.ndarray, batch_size: int, device: torch.device | str | None,
                    repeats: int) -> dict[str, Any]:
    """The pair classifier's parameters and inference time, with the parent's and the scratch model's."""
    pair_parameters, parent_parameters = module_parameters(modules)
    scratch_parameters = parent_cost(scratch.model)[0]
    seconds = fastest_seconds({
        "composed": lambda: composed.predict(images, batch_size, device),
        "parent": lambda: parent.logits(images, batch_size, device),
        "scratch": lambda: scratch.logits(images, batch_size, device),
    }, repeats)
    return {"composed_parameters": pair_parameters, "parent_parameters": parent_parameters,
            "scratch_parameters": scratch_parameters,
            "params_vs_parent": pair_parameters / parent_parameters,
            "params_vs_scratch": pair_parameters / scratch_parameters,
            "composed_inference_s": seconds["composed"], "parent_inference_s": seconds["parent"],
            "scratch_inference_s": seconds["scratch"],
            "time_vs_parent": seconds["composed"] / max(seconds["parent"], 1e-12),
            "time_vs_scratch": seconds["composed"] / max(seconds["scratch"], 1e-12)}


def _energy_ratios(row: dict[str, Any]) -> None:
    row["energy_ratio"] = row["train_kwh"] / max(row["reuse_kwh"], 1e-30)
    if "store_kwh" in row:
        row["store_energy_ratio"] = row["train_kwh"] / max(row["store_kwh"], 1e-30)


def _mean_row(rows: list[dict[str, Any]], key: str) -> None:
    if len(rows) < 2:
        return
    mean: dict[str, Any] = {key: "mean"}
    for column, value in rows[0].items():
        if isinstance(value, float):
            mean[column] = float(np.mean([r[column] for r in rows]))
    _energy_ratios(mean)
    rows.append(mean)


# --- Table 3: inter-dataset reuse with continuous learning ------------------------------------------------


def inter_reuse(parent_a: Parent, data_a: Dataset, parent_b: Parent, data_b: Dataset,
                pairs: Sequence[tuple[str, str]], arch: str, epochs: int, config: DecomposeConfig,
                calibration_samples: int = 300, seed: int = 0, device: torch.device | str | None = None,
                progress: bool = True) -> Experiment:
    """Pairs (class of dataset A, class of dataset B): composed modules without and with continuous learning
    (training-free; then score calibration or head recalibration) vs `arch` trained from scratch on the pair in
    A's input format."""
    train_a, labels_a = parent_labels(parent_a, data_a.train)
    train_b, labels_b = parent_labels(parent_b, data_b.train)
    rows = [_inter_pair(parent_a, data_a, train_a, labels_a, parent_b, data_b, train_b, labels_b, a, b, arch,
                        epochs, config, calibration_samples, seed, device, progress) for a, b in pairs]
    _mean_row(rows, "pair")
    return Experiment(
        "inter-dataset reuse (Table 3)",
        ("pair", "composed", "cl", "cl_calibrated", "cl_recalibrated", "scratch", "reuse_kwh", "calibrated_kwh",
         "recalibrated_kwh", "train_kwh", "energy_ratio"), rows,
        ["composed: modules as decomposed; cl: training-free continuous learning; cl_calibrated: plus each "
         "module's score calibrated (a scale and an offset of its margin); cl_recalibrated: cl plus the 2-output "
         f"heads refitted; both on {calibration_samples} training images per class, no backprop through a body; "
         f"scratch: {arch} trained {epochs} epochs on both classes in the first dataset's input format; "
         "energy_ratio: train over reuse (decompose + cl)"])


def _inter_pair(parent_a: Parent, data_a: Dataset, train_a: np.ndarray, labels_a: np.ndarray, parent_b: Parent,
                data_b: Dataset, train_b: np.ndarray, labels_b: np.ndarray, a: str, b: str, arch: str, epochs: int,
                config: DecomposeConfig, calibration_samples: int, seed: int, device: torch.device | str | None,
                progress: bool) -> dict[str, Any]:
    own_a = _sample(data_a.train.subset([a]), calibration_samples, seed)
    own_b = _sample(data_b.train.subset([b]), calibration_samples, seed)
    with EnergyMeter() as meter:
        with meter.step("decompose"):
            ma, act_a = decompose(parent_a, train_a, labels_a, config, [a], device=device, progress=progress)
            mb, act_b = decompose(parent_b, train_b, labels_b, config, [b], device=device, progress=progress)
        with meter.step("learn"):
            fa = forget(ma, own_activity(ma, act_a), activity_on(ma, own_b, device=device), len(own_b))
            fb = forget(mb, own_activity(mb, act_b), activity_on(mb, own_a, device=device), len(own_a))
        with meter.step("calibrate"):
            calibrated = calibrate(compose([fa, fb], [a, b]), [own_a, own_b],
                                   np.repeat([0, 1], [len(own_a), len(own_b)]), device=device).composed
        with meter.step("recalibrate"):
            ra = recalibrate(fa, [own_a], own_b, device=device).modules
            rb = recalibrate(fb, [own_b], own_a, device=device).modules
    steps = meter.steps
    scratch, train_energy = train_scratch(arch, _mixed_classes(data_a, [a], data_b, b, parent_a.input_spec),
                                          parent_a.input_spec, epochs, seed, device, progress)
    test_a, test_b = data_a.test.subset([a]).images, data_b.test.subset([b]).images
    row: dict[str, Any] = {"pair": f"{a}/{b}"}
    for name, classifier in {"composed": compose([ma, mb], [a, b]), "cl": compose([fa, fb], [a, b]),
                             "cl_calibrated": calibrated, "cl_recalibrated": compose([ra, rb], [a, b])}.items():
        row[name] = _pair_score(classifier.predict, test_a, test_b)
    row["scratch"] = _pair_score(lambda im: scratch.logits(im).argmax(1), as_format(test_a, parent_a.input_spec),
                                 as_format(test_b, parent_a.input_spec))
    for name in ("cl", "cl_calibrated", "cl_recalibrated"):
        row[f"{name}_delta"] = row[name] - row["scratch"]
    _energy_columns(row, "reuse", steps["decompose"] + steps["learn"])
    _energy_columns(row, "calibrated", steps["decompose"] + steps["learn"] + steps["calibrate"])
    _energy_columns(row, "recalibrated", steps["decompose"] + steps["learn"] + steps["recalibrate"])
    _energy_columns(row, "train", train_energy)
    _energy_ratios(row)
    return row


def _sample(data: ImageSet, n: int, seed: int = 0) -> np.ndarray:
    """`n` images drawn at random (seeded) from `data`."""
    order = np.random.default_rng(seed).permutation(len(data))[:n]
    return data.images[np.sort(order)]


def _pair_score(predict: Callable[[np.ndarray], torch.Tensor], images_a: np.ndarray, images_b: np.ndarray) -> float:
    """Accuracy over the union of A's images (label 0) and B's images (label 1), which may differ in size."""
    correct = (predict(images_a) == 0).sum() + (predict(images_b) == 1).sum()
    return float(correct) / (len(images_a) + len(images_b))


def _targets(labels: Sequence[str], classes_a: Sequence[str], targets_a: np.ndarray, b: str,
             count_b: int) -> torch.Tensor:
    """Positions in `labels` of A's images (`targets_a` index `classes_a`) followed by `count_b` images of `b`."""
    lookup = np.array([labels.index(c) if c in labels else -1 for c in classes_a], dtype=np.int64)
    return torch.as_tensor(np.concatenate([lookup[targets_a], np.full(count_b, labels.index(b), dtype=np.int64)]))


def _mixed_classes(data_a: Dataset, classes_a: Sequence[str], data_b: Dataset, b: str, spec: InputSpec) -> ImageSet:
    """Training images of `classes_a` from A and of `b` from B, in A's input format, labelled in that order."""
    xa, xb = data_a.train.subset(classes_a), data_b.train.subset([b]).images
    images = np.concatenate([as_format(xa.images, spec), as_format(xb, spec)])
    labels = np.concatenate([xa.labels, np.full(len(xb), len(classes_a), dtype=np.int64)])
    return ImageSet(images, labels, (*classes_a, b))


# --- Tables 4 and 5: replacement -----------------------------------------------------------------------------


def intra_replace(weak: Parent, strong: Parent, data: Dataset, config: DecomposeConfig,
                  device: torch.device | str | None = None, progress: bool = True,
                  limit: int | None = None, calibration_samples: int = 100, seed: int = 0,
                  classes: Sequence[str] | None = None) -> Experiment:
    """Compose all of `weak`'s modules, then replace one class at a time (each of `classes`, default all) with
    `strong`'s module for it, as decomposed and with its score calibrated against the weak modules
    (`calibration_samples` training images per class).

    Every module's scores on the test set are computed once, so each replacement is a column swap."""
    replaced_classes = list(classes) if classes is not None else list(weak.classes)
    train_images, train_labels = parent_labels(weak, data.train)
    test_images, test_labels = parent_labels(weak, data.test)
    test_images, test_labels = test_images[:limit], test_labels[:limit]
    weak_modules, _ = decompose(weak, train_images, train_labels, config, device=device, progress=progress)
    strong_modules, strong_energy = measured(lambda: decompose(strong, *parent_labels(strong, data.train), config,
                                                               replaced_classes, device=device,
                                                               progress=progress)[0])
    weak_scores = weak_modules.scores(test_images, device=device, progress=progress)
    strong_scores = strong_modules.scores(test_images, device=device, progress=progress)
    weak_composed = compose([weak_modules])
    calibrated = []
    with EnergyMeter() as meter:
        for name in tqdm(replaced_classes, desc="calibrating", disable=not show_progress(progress), leave=False):
            replaced = replace(weak_composed, name, strong_modules.select([name]))
            images, truth = labelled_sample(replaced.labels, [data.train], calibration_samples, seed)
            calibrated.append(calibrate(replaced, images, truth, [name], device=device).composed.groups[-1])
    calibrated_scores = torch.cat([m.scores(test_images, device=device) for m in calibrated], 1)
    targets = torch.as_tensor(test_labels)
    base = float((weak_scores.argmax(1) == targets).float().mean())
    base_top5 = topk_accuracy(weak_scores, targets, 5)
    rows: list[dict[str, Any]] = []
    for j, name in enumerate(replaced_classes):
        c = weak.class_index(name)
        row: dict[str, Any] = {"class": name, "before": base, "before_top5": base_top5}
        in_class = targets == c
        row["class_recall_before"] = float((weak_scores.argmax(1)[in_class] == c).float().mean())
        for suffix, replacement in (("", strong_scores), ("_calibrated", calibrated_scores)):
            scores = weak_scores.clone()
            scores[:, c] = replacement[:, j]
            pred = scores.argmax(1)
            row[f"after{suffix}"] = float((pred == targets).float().mean())
            row[f"after{suffix}_top5"] = topk_accuracy(scores, targets, 5)
            row[f"class_recall_after{suffix}"] = float((pred[in_class] == c).float().mean())
        row["delta"] = row["after"] - base
        row["delta_calibrated"] = row["after_calibrated"] - base
        rows.append(row)
    if replaced_classes == list(weak.classes):
        all_strong = float((strong_scores.argmax(1) == targets).float().mean())
        rows.append({"class": "all replaced", "before": base, "after": all_strong, "delta": all_strong - base,
                     "before_top5": base_top5, "after_top5": topk_accuracy(strong_scores, targets, 5)})
    per_class = strong_energy.kwh / len(replaced_classes)
    weak_acc, strong_acc = parent_topk(weak, data.test, device), parent_topk(strong, data.test, device)
    return Experiment(
        "intra-dataset replacement (Table 4)",
        ("class", "before", "after", "delta", "after_calibrated", "delta_calibrated", "class_recall_before",
         "class_recall_after", "class_recall_after_calibrated"), rows,
        [f"weak parent {weak.arch} (top-1 {weak_acc[0]:.4f}) composed from its own "
         f"modules, one module replaced by strong parent {strong.arch}'s (top-1 "
         f"{strong_acc[0]:.4f}); {len(test_labels)} test images",
         f"decomposing the strong parent: {strong_energy.describe()} for {len(replaced_classes)} classes, "
         f"{per_class:.3g} kWh per replaced class",
         f"calibrating the replacing module's score against the weak modules ({calibration_samples} training "
         f"images per class), all {len(replaced_classes)} replacements: {meter.report.describe()}"],
        {"weak_top1": weak_acc[0], "weak_top5": weak_acc[1], "strong_top1": strong_acc[0],
         "strong_top5": strong_acc[1], "strong_decompose": strong_energy.to_json(),
         "calibrate": meter.report.to_json(), "test_images": len(test_labels)})


def inter_replace(parent_a: Parent, data_a: Dataset, parent_b: Parent, data_b: Dataset,
                  replacements: Sequence[tuple[str, str]], config: DecomposeConfig,
                  calibration_samples: int = 300, limit: int | None = 2000, seed: int = 0,
                  device: torch.device | str | None = None, progress: bool = True, arch: str | None = None,
                  epochs: int = 1) -> Experiment:
    """Replace A's module for class x with B's module for class y (another dataset): as decomposed, with
    training-free continuous learning, and with the new module's score calibrated; top-1 and top-5 on A's test
    images of the other classes plus B's test images of y. With `arch`, also that architecture trained from
    scratch for `epochs` on the same classes in A's input format (the paper's trained model), measured."""
    train_a, labels_a = parent_labels(parent_a, data_a.train)
    train_b, labels_b = parent_labels(parent_b, data_b.train)
    modules_a, act_a = decompose(parent_a, train_a, labels_a, config, device=device, progress=progress)
    test_a, tl_a = parent_labels(parent_a, data_a.test)
    test_a, tl_a = test_a[:limit], tl_a[:limit]
    rows: list[dict[str, Any]] = []
    for x, y in replacements:
        with EnergyMeter() as meter:
            mb, act_b = decompose(parent_b, train_b, labels_b, config, [y], device=device, progress=progress)
        energy = meter.report
        base = compose([modules_a])
        keep_a = tl_a != parent_a.class_index(x)
        images_a, targets_a = test_a[keep_a], tl_a[keep_a]
        images_b = data_b.test.subset([y]).images[:limit]
        own_a = _sample(data_a.train.subset([c for c in parent_a.classes if c != x]), calibration_samples, seed)
        own_b = _sample(data_b.train.subset([y]), calibration_samples, seed)
        others = [c for c in parent_a.classes if c != x]
        row: dict[str, Any] = {"replacement": f"{x} -> {y}",
                               "before_on_a": accuracy(base, test_a, tl_a, device)}
        plain = replace(base, x, mb, y)
        learned_a = forget(modules_a.select(others), own_activity(modules_a.select(others), act_a),
                           activity_on(modules_a, own_b, device=device), len(own_b))
        learned_b = forget(mb, own_activity(mb, act_b), activity_on(mb, own_a, device=device), len(own_a))
        learned = compose([learned_a, learned_b], [*others, y])
        images, truth = labelled_sample(plain.labels, [data_a.train, data_b.train], calibration_samples, seed)
        with EnergyMeter() as meter:
            calibrated = calibrate(plain, images, truth, [y], device=device).composed
        calibrate_energy = meter.report
        for name, classifier in (("replaced", plain), ("replaced_cl", learned),
                                 ("replaced_calibrated", calibrated)):
            targets = _targets(classifier.labels, parent_a.classes, targets_a, y, len(images_b))
            scores = torch.cat([classifier.scores(images_a, device=device),
                                classifier.scores(images_b, device=device)])
            row[name], row[f"{name}_top5"] = topk_accuracy(scores, targets, 1), topk_accuracy(scores, targets, 5)
        _energy_columns(row, "replace", energy)
        _energy_columns(row, "calibrate", calibrate_energy)
        if arch is not None:
            mixed = _mixed_classes(data_a, others, data_b, y, parent_a.input_spec)
            scratch, train_energy = train_scratch(arch, mixed, parent_a.input_spec, epochs, seed, device, progress)
            targets = _targets(mixed.classes, parent_a.classes, targets_a, y, len(images_b))
            logits = torch.cat([scratch.logits(as_format(images_a, parent_a.input_spec), device=device),
                                scratch.logits(as_format(images_b, parent_a.input_spec), device=device)])
            row["scratch"], row["scratch_top5"] = topk_accuracy(logits, targets, 1), topk_accuracy(logits, targets, 5)
            _energy_columns(row, "train", train_energy)
            row["energy_ratio"] = row["train_kwh"] / max(row["replace_kwh"], 1e-30)
        rows.append(row)
    scratch_columns = ("scratch", "train_kwh", "energy_ratio") if arch is not None else ()
    return Experiment("inter-dataset replacement (Table 5)",
                      ("replacement", "before_on_a", "replaced", "replaced_cl", "replaced_calibrated",
                       *scratch_columns[:1], "replace_kwh", "calibrate_kwh", *scratch_columns[1:]),
                      rows,
                      ["replaced / replaced_cl / replaced_calibrated: accuracy of the new classifier on the first "
                       "dataset's test images of the kept classes plus the second dataset's test images of the new "
                       "class: as decomposed / with training-free continuous learning / with the new module's score "
                       f"calibrated on {calibration_samples} training images per class; {limit} test images of the "
                       "first dataset at most; replace_kwh: decomposing the new class, calibrate_kwh: calibrating",
                       *([f"scratch: {arch} trained {epochs} epochs on the new classifier's classes in the first "
                          "dataset's input format, on the same test images; energy_ratio: train over replace"]
                         if arch is not None else [])])


# --- Table 6: repairing a faulty class pair ------------------------------------------------------------------


def faulty_labels(data: ImageSet, source: str, target: str, fraction: float, seed: int = 0) -> ImageSet:
    """`data` with `fraction` of the `source` class's labels turned into `target`: a parent trained on it
    mistakes one for the other (the paper's persons labelled as gorillas)."""
    labels = data.labels.copy()
    members = np.flatnonzero(labels == data.classes.index(source))
    flip = np.random.default_rng(seed).permutation(members)[: int(round(fraction * len(members)))]
    labels[flip] = data.classes.index(target)
    return ImageSet(data.images, labels, data.classes)


def repair_scenario(data: Dataset, pair: tuple[str, str], arch: str, epochs: int, spec: InputSpec,
                    config: DecomposeConfig, noise: float = 0.5, seed: int = 0,
                    device: torch.device | str | None = None, progress: bool = True) -> Experiment:
    """A parent trained with `noise` of `pair[1]`'s labels turned into `pair[0]`, composed from its modules, then
    each repair option; accuracy overall, on the pair, and how often `pair[1]` is called `pair[0]`."""
    from ..engine.compose import removed, reverified
    from ..workflows.repair import pair_modules, replace_from, train_pair_model

    wrong, right = pair
    faulty, faulty_energy = train_scratch(arch, faulty_labels(data.train, right, wrong, noise, seed), spec,
                                          epochs, seed, device, progress)
    better, better_energy = train_scratch(arch, data.train, spec, epochs, seed, device, progress)
    base_modules, base_energy = measured(lambda: decompose(faulty, data.train.images, data.train.labels, config,
                                                           device=device, progress=progress)[0])
    base = compose([base_modules])
    test = data.test
    options: list[tuple[str, ComposedClassifier, EnergyReport]] = [("faulty (composed)", base, base_energy)]
    better_modules, e1 = measured(lambda: decompose(better, data.train.images, data.train.labels, config,
                                                    [wrong, right], device=device, progress=progress)[0])
    options.append(("1 replace from better parent", replace_from(base, [wrong, right], better_modules), e1))
    with EnergyMeter() as meter:
        pair_parent = train_pair_model(arch, data.train, [wrong, right], spec, epochs, seed, device, progress)
        trained = pair_modules(pair_parent, data.train, config, device, progress)
    options.append(("2 train pair model, replace", replace_from(base, [wrong, right], trained), meter.report))
    options.append(("3 remove faulty module", removed(base, wrong), _nothing()))
    options.append(("4 re-verify with pair model", reverified(base, [wrong, right], trained), meter.report))
    rows = [{"option": "faulty parent (model)", **_repair_metrics(faulty, test, wrong, right, device)}]
    _energy_columns(rows[-1], "repair", faulty_energy)
    for name, classifier, energy in options:
        rows.append({"option": name, **_repair_metrics(classifier, test, wrong, right, device)})
        _energy_columns(rows[-1], "repair", energy)
    return Experiment(
        "repair (Table 6)", ("option", "top1", "top5", "pair_accuracy", f"{right}_as_{wrong}", "repair_kwh",
                             "repair_seconds"),
        rows,
        [f"faulty parent: {arch} trained {epochs} epochs with {noise:.0%} of {right}'s training labels set to {wrong} "
         f"({faulty_energy.describe()}; its row's energy is that training); better parent: same without the fault "
         f"({better_energy.describe()})",
         "option 3 removes the module of the class the fault predicts; options 2 and 4 share one pair model "
         "(its training and decomposition are their cost); top-5 of option 4 ranks the composed scores with the "
         "re-verified winner first"],
        {"faulty_train": faulty_energy.to_json(), "better_train": better_energy.to_json(), "classes": len(data.classes),
         "test_images": len(test)})


def _nothing() -> EnergyReport:
    with EnergyMeter() as meter:
        pass
    return meter.report


def _repair_metrics(classifier: ComposedClassifier | Parent, test: ImageSet, wrong: str, right: str,
                    device: torch.device | str | None) -> dict[str, float]:
    """Top-1 and top-5 over `test`, accuracy on the pair's images, and how often `right` is called `wrong`."""
    ranked = _ranked_names(classifier, test.images, device)
    truth = np.array(test.classes)[test.labels]
    pair = np.isin(truth, [wrong, right])
    pair_names, pair_truth = ranked[pair, 0], truth[pair]
    right_rows = pair_truth == right
    return {"top1": float((ranked[:, 0] == truth).mean()), "top5": float((ranked == truth[:, None]).any(1).mean()),
            "pair_accuracy": float((pair_names == pair_truth).mean()),
            f"{right}_as_{wrong}": float((pair_names[right_rows] == wrong).mean())}


def _ranked_names(classifier: ComposedClassifier | Parent, images: np.ndarray,
                  device: torch.device | str | None) -> np.ndarray:
    """(N, min(5, labels)) label names by falling score; a composed classifier's re-verified winner comes first."""
    if isinstance(classifier, Parent):
        scores, labels = classifier.logits(images, device=device), np.array(classifier.classes)
    else:
        scores, labels = classifier.scores(images, device=device), np.array(classifier.labels)
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices.numpy()
    if isinstance(classifier, ComposedClassifier) and classifier.reverifiers:
        winner = classifier.predict(images, device=device).numpy()
        others_first = np.argsort(ranked == winner[:, None], axis=1, kind="stable")  # the winner moves last
        rest = np.take_along_axis(ranked, others_first, 1)[:, : ranked.shape[1] - 1]
        ranked = np.concatenate([winner[:, None], rest], axis=1)
    return labels[ranked]
