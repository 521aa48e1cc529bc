import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnmod.errors import StoreError
from cnnmod.paper.report import (
    markdown_table,
    plot_energy,
    plot_module_sizes,
    plot_overlap_heatmap,
    plot_per_class_accuracy,
    plot_tradeoff,
    require_matplotlib,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_size: tuple[int, int] = (300, 300)) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode == "RGBA"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        im.verify()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _overlap(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    m = rng.uniform(0.0, 1.0, (n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def test_plotting_needs_no_pyplot(tmp_path: Path) -> None:
    # matplotlib.get_backend() itself imports pyplot, so "no pyplot imported" is the check that no backend
    # was chosen or switched behind the caller's back.
    code = (
        "import sys; from pathlib import Path; from cnnmod.paper.report import plot_tradeoff; "
        "row = {'granularity': 'c', 'rho': 0.1, 'jaccard': 0.5, 'top1': 0.8}; "
        f"plot_tradeoff(Path({str(tmp_path / 't.png')!r}), [row]); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    _assert_png(tmp_path / "t.png")


def test_report_module_does_not_import_torch() -> None:
    import ast

    import cnnmod.paper.report

    tree = ast.parse(Path(cnnmod.paper.report.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported


def test_pyplot_users_keep_their_backend_and_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    figures = plt.get_fignums()
    plot_overlap_heatmap(tmp_path / "o.png", ["a", "b"], np.eye(2))
    assert plt.get_backend() == backend
    assert plt.get_fignums() == figures


def test_per_class_accuracy_png(tmp_path: Path) -> None:
    classes = ["cat", "dog", "ship"]
    parent, composed = [0.9, 0.8, 0.95], [0.85, float("nan"), 1.0]  # NaN: a class with no test images
    out = plot_per_class_accuracy(tmp_path / "acc.png", classes, parent, composed, "t")
    assert out == tmp_path / "acc.png"
    _assert_png(out)
    assert _leftovers(tmp_path) == []


def test_per_class_accuracy_widens_with_many_classes(tmp_path: Path) -> None:
    few = plot_per_class_accuracy(tmp_path / "few.png", ["a", "b"], [0.5, 0.6], [0.4, 0.7])
    names = [f"class_{i:02d}" for i in range(40)]
    many = plot_per_class_accuracy(tmp_path / "many.png", names, np.linspace(0, 1, 40), np.full(40, 0.5))
    _assert_png(many)
    with Image.open(few) as a, Image.open(many) as b:
        assert b.size[0] > 2 * a.size[0]


def test_per_class_accuracy_rejects_percentages_and_wrong_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\], not percentages"):
        plot_per_class_accuracy(tmp_path / "a.png", ["a", "b"], [90.0, 80.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="one value per class"):
        plot_per_class_accuracy(tmp_path / "a.png", ["a", "b"], [0.9], [0.5, 0.5])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", [3, 30])
def test_overlap_heatmap_png(tmp_path: Path, n: int) -> None:
    out = plot_overlap_heatmap(tmp_path / "overlap.png", [f"c{i}" for i in range(n)], _overlap(n), f"{n}")
    _assert_png(out)
    assert _leftovers(tmp_path) == []


def test_overlap_heatmap_rejects_bad_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass an \\(3, 3\\) matrix"):
        plot_overlap_heatmap(tmp_path / "o.png", ["a", "b", "c"], np.ones((3, 2)))
    with pytest.raises(ValueError, match="overlap holds 1.5"):
        plot_overlap_heatmap(tmp_path / "o.png", ["a", "b"], [[1.0, 1.5], [0.2, 1.0]])


def test_tradeoff_png(tmp_path: Path) -> None:
    rows = [
        {"granularity": "channel", "rho": 0.5, "jaccard": 0.6, "top1": 0.88, "parent_top1": 0.91},
        {"granularity": "channel", "rho": 0.1, "jaccard": 0.8, "top1": 0.90, "parent_top1": 0.91},
        {"granularity": "neuron", "rho": 0.5, "jaccard": 0.4, "top1": 0.80},
        {"granularity": "neuron", "rho": 0.1, "jaccard": 0.7, "top1": 0.89},
    ]
    _assert_png(plot_tradeoff(tmp_path / "tradeoff.png", rows, "size vs accuracy"))
    assert _leftovers(tmp_path) == []


def test_tradeoff_rejects_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row 0 lacks top1"):
        plot_tradeoff(tmp_path / "t.png", [{"granularity": "c", "rho": 0.1, "jaccard": 0.5}])
    two_parents = [
        {"granularity": "c", "rho": 0.1, "jaccard": 0.5, "top1": 0.8, "parent_top1": 0.9},
        {"granularity": "c", "rho": 0.2, "jaccard": 0.4, "top1": 0.7, "parent_top1": 0.8},
    ]
    with pytest.raises(ValueError, match="disagree on parent_top1"):
        plot_tradeoff(tmp_path / "t.png", two_parents)
    with pytest.raises(ValueError, match="no rows"):
        plot_tradeoff(tmp_path / "t.png", [])


def test_module_sizes_png(tmp_path: Path) -> None:
    out = plot_module_sizes(tmp_path / "sizes.png", ["a", "b", "c"], [0.9, 0.8, 0.95], [0.7, 0.9, 1.0], "sizes")
    _assert_png(out)
    with pytest.raises(ValueError, match="not percentages"):
        plot_module_sizes(tmp_path / "s.png", ["a"], [90.0], [0.5])


def test_energy_bars_png_on_a_log_scale(tmp_path: Path) -> None:
    out = plot_energy(tmp_path / "energy.png", ["reuse", "replace"], {"train": [1e-3, 2e-3], "modules": [1e-6, 3e-7]},
                      "Figure 6", "CO2e (lbs, log scale)")
    _assert_png(out)
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        plot_energy(tmp_path / "e.png", ["a", "b", "c"], {"train": [1.0, 2.0]})


def test_a_missing_plotting_library_is_named_in_one_line() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from cnnmod.paper.report import has_matplotlib, markdown_table, require_matplotlib\n"
            "assert not has_matplotlib() and markdown_table(['a'], [[1.5]])\n"
            "require_matplotlib('cnnmod thing')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "CnnmodError: cnnmod thing needs matplotlib: pip install 'cnnmod[report]'" in run.stderr
    require_matplotlib("here it is installed")  # no error


def test_markdown_table_shape_and_floats() -> None:
    table = markdown_table(
        ["class", "recall", "params", "note"],
        [["cat", 0.931249, 1200, "a|b"], ["dog", np.float32(123.456), 7, "0.123456789"]],
    )
    lines = table.splitlines()
    assert table.endswith("\n")
    assert len(lines) == 2 + 2  # header, separator, two rows
    for line in lines:
        assert line.startswith("|") and line.endswith("|")
        assert len(line.replace("\\|", "").split("|")) - 2 == 4  # four cells per line
    assert lines[1] == "| --- | --- | --- | --- |"
    assert lines[2] == "| cat | 0.9312 | 1200 | a\\|b |"
    assert lines[3] == "| dog | 123.5 | 7 | 0.123456789 |"  # strings are kept as given


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.5, "0.5"), (2.0, "2"), (0.000123456, "0.0001235"), (1.5e-7, "1.5e-07"), (float("nan"), "nan")],
)
def test_markdown_table_float_formats(value: float, text: str) -> None:
    assert markdown_table(["x"], [[value]]).splitlines()[2] == f"| {text} |"


def test_markdown_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells but there are 2 headers"):
        markdown_table(["a", "b"], [[1, 2], [3]])


def test_write_report_sections_in_order_and_relative_images(tmp_path: Path) -> None:
    figures = tmp_path / "figures"
    image = plot_per_class_accuracy(figures / "acc.png", ["a", "b"], [0.5, 0.6], [0.4, 0.7])
    report_path = tmp_path / "report.md"
    table = markdown_table(["k", "v"], [["top1", 0.9]])
    out = write_report(
        report_path,
        "ResNet-20 on CIFAR-10",
        [("Summary", "Modules keep 60% of nodes."), ("Accuracy", table)],
        [("per-class accuracy", image)],
    )
    assert out == report_path
    text = report_path.read_text(encoding="utf-8")
    assert text.startswith("# ResNet-20 on CIFAR-10\n")
    positions = [text.index(s) for s in ("## Summary", "Modules keep", "## Accuracy", "| top1 | 0.9 |")]
    assert positions == sorted(positions)
    assert "![per-class accuracy](figures/acc.png)" in text
    assert text.index("## Accuracy") < text.index("![per-class accuracy]")
    assert (report_path.parent / "figures/acc.png").is_file()
    assert _leftovers(tmp_path) == []


def test_write_report_rejects_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist; write the plot before the report"):
        write_report(tmp_path / "r.md", "t", [], [("missing", tmp_path / "nope.png")])
    assert not (tmp_path / "r.md").exists()


def test_failed_writes_leave_no_temp_file(tmp_path: Path) -> None:
    # A destination that is a folder makes the final rename fail after the temp file was written.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    with pytest.raises(StoreError, match="cannot write .*blocked"):
        write_report(blocked, "t", [("s", "body")])
    with pytest.raises(StoreError, match="cannot write .*blocked"):
        plot_overlap_heatmap(blocked, ["a", "b", "c"], _overlap(3))
    assert _leftovers(tmp_path) == []
    assert blocked.is_dir() and list(blocked.iterdir()) == []


def test_rewrite_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.md"
    write_report(path, "first", [])
    write_report(path, "second", [])
    assert path.read_text(encoding="utf-8") == "# second\n"
