"""Figures and a Markdown report from plain numbers: per-class accuracy, module overlap, size vs accuracy,
module sizes, energy.

Everything here takes lists or numpy arrays, never tensors, so reports can be rebuilt from saved JSON.
Plots draw on a `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no backend switch, no
global figure state, so a caller that already uses pyplot interactively is left as it was. Accuracies come
in as fractions in [0, 1] (what `cnnmod.workflows.metrics` returns) and are drawn as percentages.

matplotlib is an optional extra (`pip install 'cnnmod[report]'`): it is imported when a plot is drawn, and a
missing one is a one-line CnnmodError. Markdown needs nothing beyond numpy.

Every file is written to a temporary file in its destination folder and renamed into place, so a failed
write never leaves a half-written figure or report behind.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnmod.errors import CnnmodError, StoreError
from cnnmod.storage.fileio import atomic_write_bytes
from cnnmod.tables import markdown_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_EXTRA",
    "has_matplotlib",
    "markdown_table",
    "plot_energy",
    "plot_module_sizes",
    "plot_overlap_heatmap",
    "plot_per_class_accuracy",
    "plot_tradeoff",
    "require_matplotlib",
    "write_report",
]

REPORT_EXTRA = "pip install 'cnnmod[report]'"

_DPI = 120
_ANNOTATE_MAX_CLASSES = 12
_TICK_LABELS_MAX_CLASSES = 100  # beyond this, class names overprint each other at any sane figure size
_MAX_INCHES = 40.0


# ---------------------------------------------------------------------------------------------- files


def _write(path: Path, data: bytes) -> None:
    """Atomic write that creates the folder first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    atomic_write_bytes(path, data)


def has_matplotlib() -> bool:
    """Whether the optional plotting library can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(what: str = "plotting") -> None:
    """Raise the one-line error that says how to install the plotting extra, unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CnnmodError(f"{what} needs matplotlib: {REPORT_EXTRA}") from None


def _figure(figsize: tuple[float, float], dpi: int = _DPI) -> Figure:
    require_matplotlib("plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _save_figure(fig: Figure, path: Path | str) -> Path:
    """Render `fig` to PNG in memory, then write it atomically; the figure is cleared either way."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    try:
        canvas = FigureCanvasAgg(fig)
        fig.tight_layout()
        buffer = io.BytesIO()
        canvas.print_png(buffer)
    finally:
        fig.clear()
    _write(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------- checks


def _fractions(name: str, values: Sequence[float] | np.ndarray, length: int | None = None) -> np.ndarray:
    """`values` as a float array of fractions in [0, 1] (NaN allowed: an empty class has no accuracy)."""
    array = np.asarray(values, dtype=float)
    if length is not None and array.shape != (length,):
        raise ValueError(
            f"{name} has shape {array.shape} but there are {length} classes; pass one value per class"
        )
    finite = array[~np.isnan(array)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        bad = finite[(finite < 0.0) | (finite > 1.0)][0]
        raise ValueError(f"{name} holds {bad:g}; pass fractions in [0, 1], not percentages")
    return array


def _scaled(per_item: float, count: int, base: float, low: float) -> float:
    """A figure dimension in inches that grows with `count` items, clamped to a readable range."""
    return float(min(max(base + per_item * count, low), _MAX_INCHES))


def _tick_font(count: int) -> float:
    return 10.0 if count <= 20 else 8.0 if count <= 50 else 6.0


# ---------------------------------------------------------------------------------------------- plots


def plot_per_class_accuracy(
    path: Path | str,
    classes: Sequence[str],
    parent_recall: Sequence[float] | np.ndarray,
    composed_recall: Sequence[float] | np.ndarray,
    title: str = "",
) -> Path:
    """Grouped bars of each class's recall under the parent and under the composed classifier; returns `path`.

    Recalls are fractions in [0, 1]; a NaN (class absent from the test set) draws no bar.
    """
    n = len(classes)
    if n == 0:
        raise ValueError("no classes to plot; pass at least one class name")
    parent = _fractions("parent_recall", parent_recall, n) * 100.0
    composed = _fractions("composed_recall", composed_recall, n) * 100.0

    return _paired_percent_bars(path, classes, (parent, "parent", "#4c72b0"), (composed, "composed", "#dd8452"),
                                "per-class accuracy (recall, %)", "class", title)


def plot_overlap_heatmap(
    path: Path | str, classes: Sequence[str], overlap: np.ndarray | Sequence[Sequence[float]], title: str = ""
) -> Path:
    """Heatmap of the (classes x classes) Jaccard overlap between modules' kept-node sets; returns `path`.

    Values must lie in [0, 1] (NaN allowed); cells carry their value when there are at most 12 classes.
    """
    n = len(classes)
    if n == 0:
        raise ValueError("no classes to plot; pass at least one class name")
    matrix = np.asarray(overlap, dtype=float)
    if matrix.shape != (n, n):
        raise ValueError(
            f"overlap has shape {matrix.shape} but there are {n} classes; pass an ({n}, {n}) matrix"
        )
    _fractions("overlap", matrix.reshape(-1))

    side = _scaled(0.4, n, 2.5, 4.5)
    fig = _figure((side + 1.2, side))  # extra width for the colorbar
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Jaccard overlap")
    if n <= _TICK_LABELS_MAX_CLASSES:
        names = [str(c) for c in classes]
        font = _tick_font(n)
        ax.set_xticks(np.arange(n), names, rotation=0 if n <= 6 else 90, fontsize=font)
        ax.set_yticks(np.arange(n), names, fontsize=font)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= _ANNOTATE_MAX_CLASSES:
        for (i, j), value in np.ndenumerate(matrix):
            if math.isnan(value):
                continue
            # viridis is dark below ~0.6: white text there, black above.
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if value < 0.6 else "black")
    ax.set_xlabel("module")
    ax.set_ylabel("module")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


_TRADEOFF_KEYS = ("granularity", "rho", "jaccard", "top1")
_TRADEOFF_AXES = {"jaccard": "mean Jaccard index (kept-node fraction)",
                  "kept_parameters": "mean kept parameters (fraction of the parent's)"}


def plot_tradeoff(path: Path | str, rows: Sequence[Mapping[str, Any]], title: str = "",
                  x: str = "jaccard") -> Path:
    """Composed top-1 (%) against mean module size (`x`: "jaccard", the mean Jaccard index / kept-node
    fraction, or "kept_parameters", the mean kept-parameter fraction); returns `path`.

    Each row is one decomposition: "granularity" (str), "rho" (float), the `x` key (fraction in [0, 1]),
    "top1" (composed top-1, fraction) and optionally "parent_top1" (fraction). A row with "keep" (float) in place
    of granularity and rho is a compact decomposition: those rows are one series of square markers, labelled
    with their keep fraction. One line per granularity, in order of first appearance, points sorted by size and
    labelled with rho; the parent's top-1 is a dashed horizontal line. Rows that disagree on "parent_top1" raise
    ValueError: one plot, one parent.
    """
    if x not in _TRADEOFF_AXES:
        raise ValueError(f"x is {x!r}; choose from {', '.join(_TRADEOFF_AXES)}")
    if not rows:
        raise ValueError("no rows to plot; pass at least one decomposition result")
    groups: dict[str, list[tuple[float, float, str]]] = {}
    parents: set[float] = set()
    for i, row in enumerate(rows):
        compact = "keep" in row
        needed = (x, "top1") if compact else tuple(x if key == "jaccard" else key for key in _TRADEOFF_KEYS)
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}; each row needs {', '.join(needed)}")
        size, top1 = _fractions(f"row {i} {x}/top1", [row[x], row["top1"]])
        series, label = ("compact", f"keep={float(row['keep']):g}") if compact else \
            (str(row["granularity"]), f"ρ={float(row['rho']):g}")
        groups.setdefault(series, []).append((float(size), float(top1) * 100.0, label))
        if row.get("parent_top1") is not None:
            parents.add(float(_fractions(f"row {i} parent_top1", [row["parent_top1"]])[0]))
    if len(parents) > 1:
        raise ValueError(
            f"rows disagree on parent_top1 ({', '.join(f'{p:g}' for p in sorted(parents))}); "
            "plot results of one parent model at a time"
        )

    fig = _figure((7.0, 5.0))
    ax = fig.add_subplot()
    mixed = "compact" in groups
    for series, points in groups.items():
        points.sort()
        xs, ys, _ = zip(*points, strict=True)
        name = f"paper, {series}" if mixed and series != "compact" else series
        (line,) = ax.plot(xs, ys, marker="s" if series == "compact" else "o", label=name)
        for px, py, label in points:
            ax.annotate(label, (px, py), xytext=(4, 4), textcoords="offset points", fontsize=8,
                        color=line.get_color())
    if parents:
        ax.axhline(parents.pop() * 100.0, linestyle="--", color="0.3", label="parent")
    ax.margins(x=0.08)  # room for the point labels at the ends
    ax.set_xlabel(_TRADEOFF_AXES[x])
    ax.set_ylabel("composed top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(title=None if mixed else "granularity")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- markdown


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _image_link(image: Path, folder: Path) -> str:
    try:
        target = Path(os.path.relpath(image.resolve(), folder.resolve())).as_posix()
    except ValueError:  # different drive on Windows: no relative path exists
        target = image.resolve().as_posix()
    if any(c in target for c in " ()<>"):
        target = f"<{target}>"
    return target


def write_report(
    path: Path | str,
    title: str,
    sections: Sequence[tuple[str, str]],
    images: Sequence[tuple[str, Path | str]] = (),
) -> Path:
    """Write a Markdown report atomically and return `path`.

    Layout: "# title", then each (heading, Markdown body) as a "## heading" section in the order given, then a
    "## Figures" section embedding each (caption, image) as "![caption](link)", the link relative to the
    report's folder. Images must exist already (write the plots first), so the report never links to nothing.
    """
    path = Path(path)
    parts = [f"# {_one_line(title)}\n"]
    for heading, body in sections:
        parts.append(f"## {_one_line(heading)}\n\n{body.strip()}\n")
    if images:
        figures = ["## Figures\n"]
        for caption, image in images:
            image = Path(image)
            if not image.is_file():
                raise ValueError(f"image {image} does not exist; write the plot before the report")
            alt = _one_line(caption).replace("[", "\\[").replace("]", "\\]")
            figures.append(f"![{alt}]({_image_link(image, path.parent)})\n")
        parts.append("\n".join(figures))
    _write(path, "\n".join(parts).encode("utf-8"))
    return path


def plot_energy(path: Path | str, labels: Sequence[str], series: Mapping[str, Sequence[float]],
                title: str = "", ylabel: str = "energy (kWh, log scale)") -> Path:
    """Grouped bars, log scale: energy (kWh) of each way to build each classifier (the paper's Figure 6).

    Values must be positive (a log scale has no zero); `ylabel` names another positive quantity (CO2e)."""
    count = len(labels)
    if count == 0:
        raise ValueError("no bars to plot; pass at least one label")
    for name, values in series.items():
        if len(values) != count:
            raise ValueError(f"series {name!r} has {len(values)} values for {count} labels")
    fig = _figure((max(6.0, 1.2 * count + 2), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(series), 1)
    x = np.arange(count)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30 if count > 4 else 0, ha="right" if count > 4 else "center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def plot_module_sizes(path: Path | str, classes: Sequence[str], jaccard: Sequence[float] | np.ndarray,
                      kept_parameters: Sequence[float] | np.ndarray, title: str = "") -> Path:
    """Grouped bars per module: its Jaccard index (kept-node fraction) and its kept-parameter fraction, in %."""
    n = len(classes)
    if n == 0:
        raise ValueError("no classes to plot; pass at least one class name")
    nodes = _fractions("jaccard", jaccard, n) * 100.0
    params = _fractions("kept_parameters", kept_parameters, n) * 100.0
    return _paired_percent_bars(path, classes, (nodes, "kept nodes (Jaccard index)", "#55a868"),
                                (params, "kept parameters", "#8172b2"), "share of the parent (%)", "module", title)


def _paired_percent_bars(path: Path | str, classes: Sequence[str], left: tuple[np.ndarray, str, str],
                         right: tuple[np.ndarray, str, str], ylabel: str, xlabel: str, title: str) -> Path:
    """Two bars (values in %, label, colour) per class, side by side, on a 0-105% axis."""
    n = len(classes)
    fig = _figure((_scaled(0.45, n, 2.0, 6.0), 4.5 if n <= 10 else 5.5))
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.4
    for offset, (values, label, colour) in ((-width / 2, left), (width / 2, right)):
        ax.bar(x + offset, values, width, label=label, color=colour)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 105.0)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if n <= _TICK_LABELS_MAX_CLASSES:
        rotation, align = (0, "center") if n <= 6 else (45, "right") if n <= 20 else (90, "center")
        ax.set_xticks(x, [str(c) for c in classes], rotation=rotation, ha=align, fontsize=_tick_font(n))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)
