"""The commands that build classifiers from stores: compose, replace, remove, repair (four options) and reuse
(continuous learning), and the energy figures they report; errors as one `error:` line with exit code 1.

The tiny dataset, model and store come from conftest.py; a pair model's store is made once per module with
`cnnmod repair retrain --pair-store`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result

import cnnmod.cli.compose
import cnnmod.cli.edit
import cnnmod.cli.reuse  # noqa: F401  (register the commands under test)
from cnnmod.storage.store import load_composition, load_store
from fixtures.cli import assert_error, ok_json

Cli = Callable[..., Result]
TINY = ["red", "green", "blue"]




def assert_energy(energy: dict) -> None:
    assert energy["kwh"] > 0 and energy["seconds"] > 0 and energy["co2e_lbs"] > 0
    assert isinstance(energy["method"], str) and energy["method"]


def assert_accuracy(result: dict, samples: int) -> None:
    assert result["samples"] == samples
    assert 0.0 <= result["top1"] <= 1.0 and 0.0 <= result["top5"] <= 1.0
    assert all(0.0 <= r <= 1.0 for r in result["recall"].values())


@pytest.fixture(scope="module")
def composition(cnnmod_cli: Cli, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three modules of the tiny store, composed with `cnnmod compose`."""
    out = tmp_path_factory.mktemp("comp") / "all"
    payload = ok_json(cnnmod_cli("compose", tiny_store, "--out", out, "--json"))
    assert payload["labels"] == TINY
    return out


@pytest.fixture(scope="module")
def retrained(cnnmod_cli: Cli, composition: Path, tiny_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """`repair retrain` of red,green (resnet_tiny, 1 epoch): the pair store, the new composition and the JSON."""
    folder = tmp_path_factory.mktemp("retrain")
    payload = ok_json(cnnmod_cli("repair", "retrain", composition, "--pair", "red,green", "--train-data", tiny_data,
                                 "--arch", "resnet_tiny", "--epochs", 1, "--samples-per-class", 20,
                                 "--pair-store", folder / "pair", "--out", folder / "out", "--data", tiny_data,
                                 "--json"))
    return folder / "pair", folder / "out", payload


# ---------------------------------------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------------------------------------


def test_compose_two_stores_with_renamed_labels(cnnmod_cli: Cli, tiny_store: Path, retrained: tuple[Path, Path, dict],
                                                tiny_data: Path, tmp_path: Path) -> None:
    pair_store = retrained[0]
    out = tmp_path / "two"
    payload = ok_json(cnnmod_cli("compose", f"{tiny_store}:red,blue", f"{pair_store}:red=red2,green", "--out", out,
                                 "--scoring", "logit", "--json"))
    assert payload["labels"] == ["red", "blue", "red2", "green"]
    assert payload["scoring"] == "logit"
    assert [g["classes"] for g in payload["groups"]] == [["red", "blue"], ["red", "green"]]
    assert [g["arch"] for g in payload["groups"]] == ["resnet_tiny", "resnet_tiny"]
    assert_energy(payload["energy"])
    loaded = load_composition(out)
    assert loaded.labels == ("red", "blue", "red2", "green") and loaded.scoring == "logit"
    # the same class name from two stores needs a new label
    assert_error(cnnmod_cli("compose", f"{tiny_store}:red", f"{pair_store}:red", "--out", tmp_path / "clash"),
                 "'red'", "map labels explicitly")
    assert not (tmp_path / "clash").exists()


def test_compose_refuses_an_existing_out_and_a_missing_store(cnnmod_cli: Cli, tiny_store: Path,
                                                            composition: Path, tmp_path: Path) -> None:
    assert_error(cnnmod_cli("compose", tiny_store, "--out", composition), "exists", "--overwrite")
    assert_error(cnnmod_cli("compose", tmp_path / "nowhere", "--out", tmp_path / "x"), "is not a store folder")
    assert_error(cnnmod_cli("compose", f"{tiny_store}:purple", "--out", tmp_path / "x"), "'purple'")


# ---------------------------------------------------------------------------------------------------------
# replace and remove
# ---------------------------------------------------------------------------------------------------------


def test_replace_reports_accuracy_before_and_after_and_energy(cnnmod_cli: Cli, composition: Path,
                                                              retrained: tuple[Path, Path, dict], tiny_data: Path,
                                                              tmp_path: Path) -> None:
    pair_store = retrained[0]
    out = tmp_path / "replaced"
    payload = ok_json(cnnmod_cli("replace", composition, "red", f"{pair_store}:red", "--out", out, "--data",
                                 tiny_data, "--json"))
    assert payload["labels"] == ["green", "blue", "red"]
    assert payload["composition"] == str(out)
    for name in ("before", "after"):
        assert_accuracy(payload[name], 90)
    assert payload["before"]["top1"] > 0.5  # the tiny model tells the colours apart
    assert_energy(payload["energy"])
    loaded = load_composition(out)
    assert loaded.labels == ("green", "blue", "red")
    assert [g.parent.fingerprint() == load_store(pair_store).modules.parent.fingerprint() for g in loaded.groups] \
        == [False, True]


def test_replace_with_another_label_and_text_output(cnnmod_cli: Cli, composition: Path, tiny_store: Path,
                                                    tmp_path: Path) -> None:
    result = cnnmod_cli("replace", composition, "blue", f"{tiny_store}:blue", "--as", "azure", "--out",
                        tmp_path / "azure")
    assert result.exit_code == 0, result.stderr
    assert "labels red, green, azure" in result.stdout and "energy: " in result.stdout
    assert load_composition(tmp_path / "azure").labels == ("red", "green", "azure")


def test_replace_errors(cnnmod_cli: Cli, composition: Path, tiny_store: Path, tmp_path: Path) -> None:
    assert_error(cnnmod_cli("replace", composition, "purple", f"{tiny_store}:red", "--out", tmp_path / "x"),
                 "no module votes for 'purple'", "red, green, blue")
    assert_error(cnnmod_cli("replace", composition, "red", str(tiny_store), "--out", tmp_path / "x"),
                 "SOURCE is STORE:class")
    assert_error(cnnmod_cli("replace", composition, "red", f"{tiny_store}:purple", "--out", tmp_path / "x"),
                 "no module for class 'purple'")
    assert_error(cnnmod_cli("replace", composition, "red", f"{tmp_path}:red", "--out", tmp_path / "x"),
                 "not a cnnmod store")
    assert not (tmp_path / "x").exists()


def test_replace_with_calibration_fits_only_the_new_module(cnnmod_cli: Cli, composition: Path,
                                                           retrained: tuple[Path, Path, dict], tiny_data: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "calibrated"
    payload = ok_json(cnnmod_cli("replace", composition, "red", f"{retrained[0]}:red", "--calibrate", "--train-data",
                                 tiny_data, "--samples", 20, "--out", out, "--data", tiny_data, "--json"))
    calibration = payload["calibration"]
    assert calibration["labels"] == ["red"] and calibration["samples"] == 60
    assert calibration["loss_after"] <= calibration["loss_before"]
    assert 0.0 <= calibration["accuracy_after"] <= 1.0
    assert_accuracy(payload["after"], 90)
    assert_energy(payload["energy"])
    loaded, plain = load_composition(out), load_composition(composition)
    assert loaded.labels == ("green", "blue", "red")
    assert torch.equal(loaded.groups[0].head_weight, plain.groups[0].select(["green", "blue"]).head_weight)
    assert loaded.groups[1].config.get("calibrated") is True
    assert_error(cnnmod_cli("replace", composition, "red", f"{retrained[0]}:red", "--calibrate", "--out",
                            tmp_path / "x"), "--calibrate and --train-data go together")
    assert not (tmp_path / "x").exists()


def test_calibrate_command(cnnmod_cli: Cli, composition: Path, tiny_store: Path, tiny_data: Path,
                           tmp_path: Path) -> None:
    result = cnnmod_cli("calibrate", composition, "--train-data", tiny_data, "--labels", "blue", "--samples", 10,
                        "--out", tmp_path / "c")
    assert result.exit_code == 0, result.stderr
    assert "calibrated blue on 30 training images" in result.stdout and "energy: " in result.stdout
    payload = ok_json(cnnmod_cli("calibrate", composition, "--train-data", tiny_data, "--samples", 10, "--out",
                                 tmp_path / "all", "--json"))
    assert payload["calibration"]["labels"] == TINY
    renamed = tmp_path / "azure"
    ok_json(cnnmod_cli("replace", composition, "blue", f"{tiny_store}:blue", "--as", "azure", "--out", renamed,
                       "--json"))
    payload = ok_json(cnnmod_cli("calibrate", renamed, "--train-data", tiny_data, "--labels", "azure", "--samples",
                                 10, "--out", tmp_path / "azure2", "--json"))
    assert payload["calibration"]["labels"] == ["azure"] and payload["calibration"]["samples"] == 30
    assert_error(cnnmod_cli("calibrate", composition, "--train-data", tiny_data, "--labels", "purple", "--out",
                            tmp_path / "x"), "no module votes for 'purple'")
    assert not (tmp_path / "x").exists()


def test_remove(cnnmod_cli: Cli, composition: Path, tiny_data: Path, tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("remove", composition, "blue", "--out", tmp_path / "rg", "--data", tiny_data,
                                 "--json"))
    assert payload["labels"] == ["red", "green"]
    assert_accuracy(payload["before"], 90)
    assert_accuracy(payload["after"], 60)  # blue's test images are no longer scored
    assert set(payload["after"]["recall"]) == {"red", "green"}
    assert_energy(payload["energy"])
    one = tmp_path / "r"
    assert ok_json(cnnmod_cli("remove", tmp_path / "rg", "green", "--out", one, "--json"))["labels"] == ["red"]
    assert_error(cnnmod_cli("remove", one, "red", "--out", tmp_path / "none"), "would leave no modules")
    assert_error(cnnmod_cli("remove", composition, "purple", "--out", tmp_path / "none"), "'purple'")


# ---------------------------------------------------------------------------------------------------------
# repair
# ---------------------------------------------------------------------------------------------------------


def test_repair_retrain_keeps_the_pair_store(retrained: tuple[Path, Path, dict]) -> None:
    pair_store, out, payload = retrained
    assert load_store(pair_store).modules.class_names == ("red", "green")
    assert payload["labels"] == ["blue", "red", "green"]
    assert load_composition(out).labels == ("blue", "red", "green")
    for name in ("before", "after"):
        assert_accuracy(payload[name], 90)
        assert 0.0 <= payload[name]["pair_top1"] <= 1.0
    assert_energy(payload["energy"])


def test_repair_replace(cnnmod_cli: Cli, composition: Path, retrained: tuple[Path, Path, dict], tiny_data: Path,
                        tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("repair", "replace", composition, "--pair", "red,green", "--better", retrained[0],
                                 "--out", tmp_path / "o", "--data", tiny_data, "--json"))
    assert payload["labels"] == ["blue", "red", "green"]
    assert 0.0 <= payload["after"]["pair_top1"] <= 1.0
    assert_energy(payload["energy"])
    assert_error(cnnmod_cli("repair", "replace", composition, "--pair", "red,blue", "--better", retrained[0],
                            "--out", tmp_path / "x"), "the better modules have no class 'blue'")
    assert_error(cnnmod_cli("repair", "replace", composition, "--pair", "red", "--better", retrained[0],
                            "--out", tmp_path / "x"), "--pair takes two labels")


def test_repair_remove(cnnmod_cli: Cli, composition: Path, tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("repair", "remove", composition, "--label", "red", "--out", tmp_path / "o",
                                 "--json"))
    assert payload["labels"] == ["green", "blue"]
    assert load_composition(tmp_path / "o").labels == ("green", "blue")
    assert_energy(payload["energy"])
    assert_error(cnnmod_cli("repair", "remove", composition, "--label", "purple", "--out", tmp_path / "x"),
                 "'purple'")


def test_repair_remove_with_data_reports_before_and_after(cnnmod_cli: Cli, composition: Path, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("repair", "remove", composition, "--label", "red", "--out", tmp_path / "o",
                                 "--data", tiny_data, "--json"))
    assert payload["labels"] == ["green", "blue"]
    assert_accuracy(payload["before"], 90)
    assert_accuracy(payload["after"], 60)


def test_repair_reverify_writes_a_composition_with_the_reverifier(cnnmod_cli: Cli, composition: Path,
                                                                 retrained: tuple[Path, Path, dict], tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "rv"
    payload = ok_json(cnnmod_cli("repair", "reverify", composition, "--pair", "green,red", "--pair-store",
                                 retrained[0], "--out", out, "--data", tiny_data, "--json"))
    assert payload["labels"] == TINY
    for name in ("before", "after"):
        assert_accuracy(payload[name], 90)
    assert_energy(payload["energy"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reverifiers"] == [{"store": "reverify0", "labels": ["green", "red"]}]
    loaded = load_composition(out)
    assert [rv.labels for rv in loaded.reverifiers] == [("green", "red")]
    assert loaded.reverifiers[0].modules.class_names == ("green", "red")
    assert_error(cnnmod_cli("repair", "reverify", composition, "--pair", "red,blue", "--pair-store", retrained[0],
                            "--out", tmp_path / "x"), "no module for class 'blue'")


# ---------------------------------------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------------------------------------


def test_reuse_with_recalibration_reports_each_step_energy(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "reused"
    payload = ok_json(cnnmod_cli("reuse", f"{tiny_store}:red", "--data", tiny_data, f"{tiny_store}:green,blue",
                                 "--data", tiny_data, "--out", out, "--recalibrate", "--samples", 20, "--json"))
    assert payload["labels"] == TINY and payload["recalibrated"] is True
    assert set(payload["jaccard"]) == set(TINY) and all(0 <= j <= 1 for j in payload["jaccard"].values())
    steps = payload["energy_steps"]
    assert set(steps) == {"continuous learning", "recalibration"}
    for step in steps.values():
        assert_energy(step)
    assert sum(s["kwh"] for s in steps.values()) <= payload["energy"]["kwh"] + 1e-12
    assert_energy(payload["energy"])
    loaded = load_composition(out)
    assert loaded.labels == tuple(TINY)
    assert all(g.config.get("continuous_learning") and g.config.get("recalibrated") for g in loaded.groups)


def test_reuse_without_recalibration(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path, tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("reuse", f"{tiny_store}:red", "--data", tiny_data, f"{tiny_store}:blue", "--data",
                                 tiny_data, "--out", tmp_path / "o", "--samples", 10, "--json"))
    assert payload["recalibrated"] is False and list(payload["energy_steps"]) == ["continuous learning"]
    groups = load_composition(tmp_path / "o").groups
    assert all(g.config.get("continuous_learning") and not g.config.get("recalibrated") for g in groups)


def test_reuse_errors(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    assert_error(cnnmod_cli("reuse", f"{tiny_store}:red", f"{tiny_store}:green", "--data", tiny_data, "--out", out),
                 "2 sources need 2 --data, got 1")
    assert_error(cnnmod_cli("reuse", f"{tiny_store}:purple", "--data", tiny_data, "--out", out),
                 "no module for class 'purple'")
    assert_error(cnnmod_cli("reuse", f"{tiny_store}:red", "--data", tiny_data, f"{tiny_store}:red", "--data",
                            tiny_data, "--out", out), "'red'", "map labels explicitly")
    assert_error(cnnmod_cli("reuse", f"{tmp_path}:red", "--data", tiny_data, "--out", out), "not a cnnmod store")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# demo energy
# ---------------------------------------------------------------------------------------------------------


def test_demo_energy_steps_add_up_to_no_more_than_the_total(cnnmod_cli: Cli, tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("demo", "--out", tmp_path / "demo", "--samples-per-class", 20, "--json"))
    assert_energy(payload["energy"])
    steps = payload["energy_steps"]
    assert set(steps) == {"decompose", "evaluate"}
    for step in steps.values():
        assert_energy(step)
    assert sum(s["kwh"] for s in steps.values()) <= payload["energy"]["kwh"] + 1e-12
    assert sum(s["seconds"] for s in steps.values()) <= payload["energy"]["seconds"] + 1e-9


def test_reuse_of_three_datasets_with_three_image_formats(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    # each module learns against the other two datasets' images, which differ in size and channels
    rng = np.random.default_rng(3)
    paths = []
    for name, shape in (("grey12", (12, 12, 1)), ("rgb20", (20, 20, 3))):
        images = rng.integers(0, 256, size=(30, *shape), dtype=np.uint8)
        labels = np.repeat(np.arange(3), 10)
        paths.append(tmp_path / f"{name}.npz")
        np.savez(paths[-1], x_train=images, y_train=labels, x_test=images, y_test=labels, classes=np.array(TINY))
    payload = ok_json(cnnmod_cli("reuse", f"{tiny_store}:red", "--data", tiny_data, f"{tiny_store}:green", "--data",
                                 paths[0], f"{tiny_store}:blue", "--data", paths[1], "--out", tmp_path / "o",
                                 "--recalibrate", "--samples", 10, "--json"))
    assert payload["labels"] == TINY and payload["recalibrated"] is True
