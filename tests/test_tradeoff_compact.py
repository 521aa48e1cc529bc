"""`cnnmod tradeoff --compact-keeps`: compact modules of the store's parent beside the rho sweep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from fixtures.cli import console_error, ok_json

Cli = Callable[..., Result]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPACT_FIELDS = {"method", "keep", "stream_keep", "inner_keep", "train_images", "jaccard", "kept_parameters",
                  "top1", "top5", "parent_top1", "seconds"}


def test_compact_points_shrink_with_the_keep_fraction_and_share_one_plot(cnnmod_cli: Cli, tiny_store: Path,
                                                                          tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tradeoff"
    payload = ok_json(cnnmod_cli("tradeoff", tiny_store, "--data", tiny_data, "--rho", "0,0.5", "--granularity",
                                 "channel", "--limit", 30, "--compact-keeps", "0.25,0.5,1", "--compact-train-images",
                                 32, "--out", out, "--json"))
    paper = [r for r in payload["rows"] if r["method"] == "paper"]
    compact = [r for r in payload["rows"] if r["method"] == "compact"]
    assert [(r["granularity"], r["rho"]) for r in paper] == [("channel", 0.0), ("channel", 0.5)]
    assert [r["keep"] for r in compact] == [0.25, 0.5, 1.0]
    for row in compact:
        assert set(row) == COMPACT_FIELDS
        assert row["train_images"] == 32 and row["stream_keep"] == row["inner_keep"] == row["keep"]
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0 and row["parent_top1"] == paper[0]["parent_top1"]
    kept = [r["kept_parameters"] for r in compact]
    assert 0.0 < kept[0] < kept[1] < kept[2] <= 1.0
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "tradeoff.md").read_text()
    assert "compact" in report and "composed top-5" in report


def test_without_compact_keeps_the_table_is_the_rho_sweep_alone(cnnmod_cli: Cli, tiny_store: Path,
                                                                 tiny_data: Path) -> None:
    result = cnnmod_cli("tradeoff", tiny_store, "--data", tiny_data, "--rho", "0.1", "--granularity", "node",
                        "--limit", 9)
    assert result.exit_code == 0, result.stderr
    assert "compact" not in result.stdout and "keep" not in result.stdout


@pytest.mark.parametrize(("option", "value"), [("--compact-keeps", "0"), ("--compact-keeps", "1.5"),
                                               ("--compact-keeps", "0.5,x"), ("--compact-keeps", ","),
                                               ("--compact-keeps", "nan"), ("--compact-train-images", "-1")])
def test_a_bad_compact_option_is_a_one_line_usage_error(tiny_store: Path, tiny_data: Path, tmp_path: Path,
                                                        option: str, value: str) -> None:
    code, stderr = console_error("tradeoff", tiny_store, "--data", tiny_data, option, value, "--out", tmp_path / "t")
    assert code == 2 and not (tmp_path / "t").exists()
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and option in line and "Traceback" not in stderr


def test_the_plot_puts_compact_rows_in_a_series_of_their_own(tmp_path: Path) -> None:
    from cnnmod.paper.report import plot_tradeoff

    rows = [{"granularity": "channel", "rho": 0.1, "jaccard": 0.9, "kept_parameters": 0.8, "top1": 0.9},
            {"keep": 0.25, "jaccard": 0.3, "kept_parameters": 0.1, "top1": 0.85},
            {"keep": 0.5, "jaccard": 0.6, "kept_parameters": 0.3, "top1": 0.88}]
    assert plot_tradeoff(tmp_path / "t.png", rows, x="kept_parameters").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="row 1 lacks kept_parameters"):
        plot_tradeoff(tmp_path / "u.png", [rows[0], {"keep": 0.5, "top1": 0.8}], x="kept_parameters")
    with pytest.raises(ValueError, match="choose from jaccard, kept_parameters"):
        plot_tradeoff(tmp_path / "v.png", rows, x="macs")
