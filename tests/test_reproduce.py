"""`cnnmod reproduce` end to end on fake datasets with tiny models: every table in results.json and report.html,
the paper's figures beside ours, resuming from the cache, the folder policy, and its one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnmod.paper.profiles import QUICK, ModelSpec, Profile
from cnnmod.paper.reproduce import (
    TABLES,
    Sources,
    Workspace,
    grid,
    open_reproduction,
    part_key,
    plan,
    reproduce,
)
from cnnmod.storage.outputs import OutputError

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GORILLA, GROOM = "n02480855", "n10148035"


def _npz(path: Path, classes: tuple[str, ...], side: int, train: int, test: int, seed: int) -> Path:
    """Images whose colour depends on the class, plus noise: learnable in one epoch, at least a little."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(classes)), n)
        colours = rng.integers(0, 256, (len(classes), 3))
        noise = rng.integers(-40, 40, (len(labels), side, side, 3))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels

    (x_train, y_train), (x_test, y_test) = split(train), split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(classes))
    return path


def tiny_profile() -> Profile:
    """QUICK's shape with resnet_tiny everywhere, a handful of images and every table still present."""
    tiny = "resnet_tiny"
    models = (
        ModelSpec("cifar10-resnet20", "cifar10", tiny, epochs=1, paper_row="CIFAR10-R20"),
        ModelSpec("cifar10-resnet32", "cifar10", tiny, epochs=1, paper_row="CIFAR10-R32"),
        ModelSpec("cifar100-resnet20", "cifar100", tiny, epochs=1, paper_row="CIFAR100-R20"),
        ModelSpec("imagenet200-resnet20", "imagenet200", tiny, epochs=1, paper_row="ImageNet200-R20"),
        ModelSpec("fashion-mnist-smallcnn", "fashion-mnist", "smallcnn", "embedded"),
    )
    return dataclasses.replace(
        QUICK, name="tiny", summary="tests", train_per_class=6, test_per_class=2, samples_per_class=3,
        imagenet_classes=4, imagenet_size=16, models=models,
        table1=("cifar10-resnet20", "cifar10-resnet32", "cifar100-resnet20", "imagenet200-resnet20"),
        detail="cifar10-resnet20", table1_test_per_class=2, rhos=(0.0, 0.5),
        intra_datasets=("cifar10", "imagenet200"), intra_pairs=1, inter_pairs=1, replacements=1,
        replace=(("cifar10", "cifar10-resnet32", "cifar10-resnet20"),), replaced_classes=2,
        calibration_samples=2, repair_classes=4, repair_arch=tiny, scratch_arch=tiny, compact_train_images=64,
        compact_pair_images=32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    folder = tmp_path_factory.mktemp("shared")
    cifar = _npz(folder / "cifar10.npz", CIFAR10, 32, 6, 2, 0)
    imagenet = _npz(folder / "imagenet.npz", (GORILLA, GROOM, "n01443537", "n01629819"), 16, 8, 3, 1)
    (folder / "models").mkdir()
    return Sources(cifar, imagenet, None, None, folder / "models")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, sources: Sources) -> dict:
    """Three runs into one folder: only Table 6, then everything, then everything again."""
    out = tmp_path_factory.mktemp("reproduction") / "r"
    profile = tiny_profile()
    assert open_reproduction(out, overwrite=False) is False
    first = reproduce(out, profile, sources, ["table6"], progress=False)
    assert open_reproduction(out, overwrite=False) is True
    second = reproduce(out, profile, sources, progress=False)
    third = reproduce(out, profile, sources, progress=False)
    return {"out": out, "first": first, "second": second, "third": third}


def _status(results: dict) -> dict[str, str]:
    return {p["part"]: p["status"] for p in results["parts"]}


def test_only_runs_the_tables_asked_for(runs: dict) -> None:
    status = _status(runs["first"])
    assert status["table6/imagenet200"] == "done"
    assert status["table1/cifar10-resnet20"] == "not run" and status["table2/cifar10"] == "not run"
    assert status["table1/cifar100-resnet20"] == "data not here"


def test_every_table_and_figure_is_written_with_the_papers_figures(runs: dict) -> None:
    out = runs["out"]
    results = json.loads((out / "results.json").read_text())  # the last run's: every part from the cache
    assert set(TABLES) <= set(results)
    status = _status(runs["second"])
    assert {s for p, s in status.items() if "cifar100" not in p} == {"done", "cached"}, status
    assert {s for p, s in status.items() if "cifar100" in p} == {"data not here"}
    assert status["table6/imagenet200"] == "cached"  # from the first run
    rows = results["table1"]["parts"]["cifar10-resnet20"]["result"]["rows"]
    assert {r["variant"] for r in rows} == {"ci", "bln", "bi"} and all(0 <= r["softmax_top1"] <= 1 for r in rows)
    assert results["table1"]["paper"]["rows"][0]["model_top1"] == 87.1
    repair = results["table6"]["parts"]["imagenet200"]["result"]["experiment"]["rows"]
    assert [r["option"][:2] for r in repair] == ["fa", "fa", "1 ", "2 ", "3 ", "4 "]
    figure6 = results["figure6"]
    assert {s["scenario"].split(" (")[0] for s in figure6["scenarios"]} == {
        "intra-dataset reuse", "intra-dataset reuse, compact pairs", "inter-dataset reuse",
        "inter-dataset replacement"}
    assert figure6["ratios"]["reuse, fixed epochs"] > 0 and figure6["compact_ratios"]["reuse, fixed epochs"] > 0
    pair = results["table2"]["parts"]["cifar10"]["result"]["experiment"]["rows"][0]  # also as compact modules
    assert 0 <= pair["compact_composed"] <= 1 and 0 < pair["compact_params_vs_parent"] < 1
    assert pair["compact_time_vs_parent"] > 0 and pair["compact_kwh"] > 0
    html = (out / "report.html").read_text()
    for figure in ("87.1", "26.6", "data not here", "not run here", "% of the parent"):  # paper's Table 1 and 6;
        # CIFAR-100; compact modules of two parents (not run); Table 2's compact pairs
        assert figure in html
    compact = results["table1"]["parts"]["cifar10-resnet20"]["result"]["compact"]
    assert compact["status"] == "done", compact
    assert 0 < compact["kept_parameters"] < 1 and 0 <= compact["top1"] <= 1 and compact["train_images"] == 64
    assert html.count("data:image/png;base64,") >= 5  # four plots of the modules, Figure 6's bars
    assert "<img" in html and 'src="http' not in html and "<link" not in html  # self-contained


def test_report_md_holds_every_table_of_the_html_report_row_for_row(runs: dict) -> None:
    out = runs["out"]
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    assert html.count("<h2") == markdown.count("\n## ") and markdown.startswith("# Pan & Rajan")
    tables = [block for block in markdown.split("\n\n") if block.startswith("| ")]
    assert len(tables) == html.count("<table")
    assert sum(len(t.splitlines()) - 1 for t in tables) == html.count("<tr")  # every row, less the --- lines
    for table in tables:
        widths = {line.count(" | ") for line in table.splitlines() if not line.startswith("|---")}
        assert len(widths) == 1, table  # colspans padded: a valid pipe table
    assert "87.1" in markdown and "data not here" in markdown and "base64" not in markdown
    assert markdown.count("*Plot in report.html: ") == html.count("<figcaption")


def test_a_second_run_loads_every_part_from_the_cache(runs: dict) -> None:
    status = _status(runs["third"])
    assert set(status.values()) == {"cached", "data not here"}
    second = runs["second"]["table2"]["parts"]["cifar10"]["result"]
    assert runs["third"]["table2"]["parts"]["cifar10"]["result"] == second
    assert sorted(p.name for p in (runs["out"] / "models").iterdir())  # trained parents are cached too


def test_cifar100_rows_run_when_its_official_files_are_given(sources: Sources, tmp_path: Path) -> None:
    from test_data import write_cifar100

    write_cifar100(tmp_path, n=300)  # the official python format, 3 training and 3 test images per class
    with_cifar100 = dataclasses.replace(sources, cifar100=tmp_path / "cifar-100-python")
    out = tmp_path / "r"
    open_reproduction(out, False)
    results = reproduce(out, tiny_profile(), with_cifar100, ["table3"], progress=False)
    status = _status(results)
    assert status["table3/cifar10-cifar100"] == "done" and status["table1/cifar100-resnet20"] == "not run"
    result = results["table3"]["parts"]["cifar10-cifar100"]["result"]
    assert result["classes"][1][0].startswith("fine") and result["experiment"]["rows"][0]["pair"].count("/") == 1
    assert "C10-C1 x C100-C1" in (out / "report.html").read_text()


def test_a_changed_input_changes_only_the_keys_of_the_parts_that_read_it(sources: Sources, tmp_path: Path) -> None:
    profile = tiny_profile()
    ws = Workspace(tmp_path, profile, sources, None, 0)
    parts = plan(profile, ws)
    before = {p.name: part_key(ws, p) for p in parts}
    st = sources.imagenet200.stat()
    os.utime(sources.imagenet200, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        after = {p.name: part_key(ws, p) for p in parts}
    finally:
        os.utime(sources.imagenet200, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"table1/imagenet200-resnet20", "table2/imagenet200", "table6/imagenet200"}
    other = dataclasses.replace(profile, epochs=2)
    assert part_key(Workspace(tmp_path, other, sources, None, 0), parts[0]) != before[parts[0].name]


def test_a_few_pairs_spread_over_both_datasets_classes() -> None:
    cells = grid("abcd", "wxyz", 16)
    assert len(set(cells)) == 16 and cells[:4] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert grid("abcd", "wxyz", 2) == [(0, 0), (1, 1)]


def test_the_folder_is_resumed_started_afresh_or_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert open_reproduction(out, False) is False
    (out / "parts").mkdir()
    (out / "parts" / "x.json").write_text("{}")
    assert open_reproduction(out, False) is True and (out / "parts" / "x.json").is_file()
    assert open_reproduction(out, True) is False and not (out / "parts").exists()  # --overwrite: afresh
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="mine"):
            open_reproduction(mine, overwrite)
    assert (mine / "notes.txt").read_text() == "precious"


def test_unknown_tables_are_a_usage_error(cnnmod_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cnnmod_cli("reproduce", "--out", tmp_path / "r", "--only", "table1,table9")
    assert result.exit_code == 2 and "table9" in result.stderr
    assert not (tmp_path / "r").exists()


MISSING_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from cnnmod.cli.app import main; main()"


@pytest.mark.parametrize("args", [["reproduce", "--out", "{tmp}/r"],
                                  ["experiment", "repair", "--data", "{exe}", "--out", "{tmp}/e"]])
def test_commands_that_plot_say_in_one_line_that_matplotlib_is_missing(args: list[str], tmp_path: Path) -> None:
    argv = [a.format(tmp=tmp_path, exe=sys.executable) for a in args]
    run = subprocess.run([sys.executable, "-c", MISSING_MATPLOTLIB, *argv], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "needs matplotlib: pip install 'cnnmod[report]'" in run.stderr
    assert not any(tmp_path.iterdir())  # refused before any work


def test_demo_without_matplotlib_writes_its_report_without_plots(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", MISSING_MATPLOTLIB, "demo", "--out", str(tmp_path / "d"),
                          "--samples-per-class", "5"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "note: the report has no plots: they need matplotlib" in run.stderr
    report = (tmp_path / "d" / "report" / "report.md").read_text()
    assert "| parent |" in report and "![" not in report
