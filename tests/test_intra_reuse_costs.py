"""`cnnmod experiment intra-reuse`: each pair's classifier against the parent and the scratch model in parameters
and inference time, with masked and with compact modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from fixtures.cli import console_error, ok_json

Cli = Callable[..., Result]
SIZE_AND_SPEED = ("composed_parameters", "parent_parameters", "scratch_parameters", "params_vs_parent",
                  "params_vs_scratch", "composed_inference_s", "parent_inference_s", "scratch_inference_s",
                  "time_vs_parent", "time_vs_scratch")


def intra_reuse(cnnmod_cli: Cli, model: Path, data: Path, *options: object) -> dict:
    return ok_json(cnnmod_cli("experiment", "intra-reuse", "--model", model, "--arch", "resnet_tiny", "--data", data,
                              "--pairs", "red:green,green:blue", "--epochs", 1, "--samples-per-class", 5, *options,
                              "--json"))


@pytest.mark.parametrize("method", ["paper", "compact"])
def test_each_pair_reports_parameters_and_inference_time_beside_the_parent_and_scratch(
        cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path, method: str) -> None:
    result = intra_reuse(cnnmod_cli, tiny_model, tiny_data, "--method", method, "--train-images", 32)
    assert result["summary"]["method"] == method
    pairs = [r for r in result["rows"] if r["pair"] != "mean"]
    assert [r["pair"] for r in pairs] == ["red/green", "green/blue"]
    for row in pairs:
        assert all(row[key] > 0 for key in SIZE_AND_SPEED), row
        assert row["params_vs_parent"] == pytest.approx(row["composed_parameters"] / row["parent_parameters"])
        assert row["params_vs_scratch"] == pytest.approx(row["composed_parameters"] / row["scratch_parameters"])
        assert row["time_vs_parent"] == pytest.approx(row["composed_inference_s"] / row["parent_inference_s"])
        assert row["scratch_parameters"] < row["parent_parameters"]  # a 2-class head on the same body
    assert {"params_vs_parent", "time_vs_scratch"} <= set(result["columns"])
    assert any("inference time" in note for note in result["notes"])


def test_two_compact_modules_hold_fewer_parameters_than_the_parent_or_the_scratch_model(
        cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path) -> None:
    result = intra_reuse(cnnmod_cli, tiny_model, tiny_data, "--method", "compact", "--train-images", 0)
    for row in result["rows"]:
        assert 0 < row["params_vs_parent"] < 1 and 0 < row["params_vs_scratch"] < 1


def test_a_prefix_narrowed_for_each_pair_makes_smaller_pair_classifiers(cnnmod_cli: Cli, tiny_model: Path,
                                                                        tiny_data: Path) -> None:
    whole = intra_reuse(cnnmod_cli, tiny_model, tiny_data, "--method", "compact", "--train-images", 16)
    narrowed = intra_reuse(cnnmod_cli, tiny_model, tiny_data, "--method", "compact", "--train-images", 16,
                           "--prefix-keep", 0.5)
    pair_config = narrowed["summary"]["pair_compact_config"]
    assert (pair_config["prefix_keep"], pair_config["freeze_prefix"], pair_config["train_images"]) == (0.5, False, 16)
    assert narrowed["summary"]["compact_config"]["prefix_keep"] == 1.0  # the store keeps the parent's prefix
    assert "pair_compact_config" not in whole["summary"]
    for small, big in zip(narrowed["rows"], whole["rows"], strict=True):
        assert small["params_vs_parent"] < big["params_vs_parent"]


@pytest.mark.parametrize(("option", "value"), [("--method", "masked"), ("--train-images", "-1"),
                                               ("--prefix-keep", "0"), ("--prefix-keep", "1.5")])
def test_an_unknown_method_or_a_negative_budget_is_a_one_line_usage_error(tiny_model: Path, tiny_data: Path,
                                                                          option: str, value: str) -> None:
    code, stderr = console_error("experiment", "intra-reuse", "--model", tiny_model, "--data", tiny_data, option,
                                 value)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and option in line and "Traceback" not in stderr
