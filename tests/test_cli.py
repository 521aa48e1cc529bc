"""The command line: each command's exit code, the files it writes, and its --json output; errors as one
line on stderr with exit code 1.

The tiny dataset, model and store come from conftest.py (built once per session with the CLI itself).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result

from cnnmod.zoo import load_model_file
from fixtures.cli import assert_error, assert_usage_error, ok_json

Cli = Callable[..., Result]
TINY_CLASSES = ["red", "green", "blue"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def store_copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "store"))


@pytest.fixture
def plain_checkpoint(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model's weights as a pytorch_resnet_cifar10-style `.th` file: no architecture inside."""
    model, _ = load_model_file(tiny_model)
    path = tmp_path / "tiny.th"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------


def test_train_writes_a_model_file_that_loads(tiny_train: tuple[Path, dict]) -> None:
    path, payload = tiny_train
    assert path.is_file()
    model, info = load_model_file(path)
    assert info.arch == "resnet_tiny"
    assert list(info.classes) == TINY_CLASSES
    assert info.input_spec.size == (16, 16)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    assert payload["model"] == str(path) and payload["arch"] == "resnet_tiny"
    assert payload["classes"] == TINY_CLASSES
    assert len(payload["history"]) == payload["epochs"] == 2
    # coloured blocks are easy: two epochs already separate them
    assert 0.9 <= payload["best_val_accuracy"] <= 1.0


def test_train_text_output_names_the_file(cnnmod_cli: Cli, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = cnnmod_cli("train", "smallcnn_tiny", "--data", tiny_data, "--out", out, "--epochs", 1,
                        "--limit-per-class", 10, "--classes", "red,blue")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    _, info = load_model_file(out)
    assert info.classes == ("red", "blue") and info.input_spec.channels == 1
    assert info.input_spec.size == (28, 28)  # the architecture's own input size


def test_train_input_size_the_arch_cannot_take_is_an_error(cnnmod_cli: Cli, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    result = cnnmod_cli("train", "smallcnn_tiny", "--data", tiny_data, "--out", tmp_path / "m.safetensors",
                        "--epochs", 1, "--input-size", 8, "--limit-per-class", 10)
    assert_error(result, "smallcnn_tiny", "8")


# ---------------------------------------------------------------------------------------------------------
# decompose
# ---------------------------------------------------------------------------------------------------------


def test_decompose_writes_a_store(tiny_decompose: tuple[Path, dict]) -> None:
    store, payload = tiny_decompose
    assert (store / "manifest.json").is_file()
    assert (store / "parent.safetensors").is_file()
    assert (store / "activity.safetensors").is_file()
    assert sorted(p.name for p in (store / "modules").iterdir()) == [f"{i:04d}.safetensors" for i in range(3)]
    manifest = json.loads((store / "manifest.json").read_text())
    assert [m["class"] for m in manifest["modules"]] == TINY_CLASSES
    assert manifest["config"]["samples_per_class"] == 20
    assert payload["store"] == str(store)
    assert payload["classes"] == TINY_CLASSES
    assert 0.0 < payload["jaccard_mean"] <= 1.0
    assert set(payload["jaccard"]) == set(TINY_CLASSES)


def test_decompose_classes_gives_only_those_modules(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "store"
    payload = ok_json(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", out,
                                 "--samples-per-class", 10, "--classes", "blue,red", "--json"))
    assert payload["classes"] == ["blue", "red"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["class"] for m in manifest["modules"]] == ["blue", "red"]
    assert len(list((out / "modules").iterdir())) == 2


def test_decompose_refuses_an_existing_out_unless_overwrite(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("decompose", tiny_model, "--data", tiny_data, "--out", out, "--samples-per-class", 10)
    refused = cnnmod_cli(*args)
    assert refused.exit_code != 0
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.output
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / "manifest.json").exists()

    not_ours = cnnmod_cli(*args, "--overwrite")  # --overwrite replaces a store, never a user's folder
    assert not_ours.exit_code != 0 and "not a cnnmod store" in not_ours.stderr
    assert (out / "keep.txt").read_text() == "mine"

    store = tmp_path / "real"
    first = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", store, "--samples-per-class", 10)
    assert first.exit_code == 0, first.stderr
    replaced = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", store, "--samples-per-class", 5,
                          "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert json.loads((store / "manifest.json").read_text())["config"]["samples_per_class"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "store"]  # no temporary folders left beside it


def test_decompose_plain_checkpoint_with_arch(cnnmod_cli: Cli, plain_checkpoint: Path, tiny_data: Path,
                                              tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("decompose", plain_checkpoint, "--arch", "resnet_tiny", "--input-size", 16,
                                 "--data", tiny_data, "--out", tmp_path / "store", "--samples-per-class", 10,
                                 "--json"))
    assert payload["classes"] == TINY_CLASSES  # a plain checkpoint takes its class names from the data
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["parent"]["arch"] == "resnet_tiny"
    assert manifest["parent"]["input_spec"]["size"] == [16, 16]


def test_decompose_text_output(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    result = cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", out, "--samples-per-class", 5)
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}: 3 modules of resnet_tiny" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_json(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path) -> None:
    payload = ok_json(cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--json"))
    assert payload["samples"] == 90
    assert payload["scoring"] == "softmax"
    for key in ("parent", "composed"):
        for k in ("top1", "top5"):
            assert 0.0 <= payload[key][k] <= 1.0
    assert payload["composed"] == payload["composed_by_scoring"]["softmax"]
    assert payload["parent"]["top5"] == 1.0  # 3 classes: the true one is always in the top 5
    assert payload["parent"]["top1"] >= 0.9
    assert abs(payload["composed"]["top1"] - payload["parent"]["top1"]) <= 0.05
    assert 0.0 < payload["jaccard_mean"] <= 1.0
    assert [m["class"] for m in payload["modules"]] == TINY_CLASSES
    for m in payload["modules"]:
        assert {"class", "jaccard", "kept_parameters", "precision", "recall"} <= set(m)
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert 0 < m["kept_parameters"] <= payload["parent_parameters"]
    assert payload["jaccard_mean"] == pytest.approx(sum(m["jaccard"] for m in payload["modules"]) / 3)


def test_evaluate_classes_subset(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path) -> None:
    payload = ok_json(cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--classes", "blue,red", "--json"))
    assert [m["class"] for m in payload["modules"]] == ["blue", "red"]
    assert payload["samples"] == 60  # only the test images of the two classes


def test_evaluate_logit_scoring(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path) -> None:
    payload = ok_json(cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--scoring", "logit", "--json"))
    assert payload["scoring"] == "logit"
    assert payload["composed"] == payload["composed_by_scoring"]["logit"]
    assert 0.0 <= payload["composed"]["top1"] <= 1.0


def test_evaluate_limit_and_text_output(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path) -> None:
    result = cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--limit", 10)  # 3 classes: 3 each
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("9 images")
    assert "composed (softmax)" in result.stdout and "red" in result.stdout


def test_evaluate_report_writes_markdown_and_plots(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                   tmp_path: Path) -> None:
    report = tmp_path / "report"
    ok_json(cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--report", report, "--json"))
    text = (report / "report.md").read_text()
    for png in ("per_class_accuracy.png", "module_overlap.png"):
        assert (report / png).read_bytes()[:8] == PNG_MAGIC
        assert png in text
    assert "top-1" in text


# ---------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------


def test_inspect_store(cnnmod_cli: Cli, tiny_store: Path) -> None:
    payload = ok_json(cnnmod_cli("inspect", tiny_store, "--json"))
    assert payload["arch"] == "resnet_tiny"
    assert payload["parent_classes"] == TINY_CLASSES
    assert [m["class"] for m in payload["modules"]] == TINY_CLASSES
    assert payload["input_spec"]["size"] == [16, 16]
    assert payload["nodes_per_module"] == sum(s["nodes"] for s in payload["sites"]) > 0
    assert payload["config"]["samples_per_class"] == 20
    text = cnnmod_cli("inspect", tiny_store)
    assert text.exit_code == 0 and "3 modules of resnet_tiny" in text.stdout


def test_inspect_model_file(cnnmod_cli: Cli, tiny_model: Path) -> None:
    payload = ok_json(cnnmod_cli("inspect", tiny_model, "--json"))
    assert payload["arch"] == "resnet_tiny"
    assert payload["classes"] == TINY_CLASSES
    assert payload["head"]["features"] == 16  # resnet_tiny's last stage is 16 channels wide
    assert payload["sites"]["relu"]


def test_inspect_plain_checkpoint_of_three_classes(cnnmod_cli: Cli, plain_checkpoint: Path) -> None:
    payload = ok_json(cnnmod_cli("inspect", plain_checkpoint, "--arch", "resnet_tiny", "--json"))
    assert payload["arch"] == "resnet_tiny"
    assert len(payload["classes"]) == 3


def test_inspect_models_lists_the_zoo(cnnmod_cli: Cli) -> None:
    payload = ok_json(cnnmod_cli("inspect", "--models", "--json"))
    names = {m["name"] for m in payload["models"]}
    assert {"resnet20", "smallcnn", "resnet_tiny"} <= names
    resnet20 = next(m for m in payload["models"] if m["name"] == "resnet20")
    assert resnet20["input_size"] == [32, 32] and resnet20["in_channels"] == 3
    text = cnnmod_cli("inspect", "--models")
    assert text.exit_code == 0 and "resnet20" in text.stdout and "smallcnn" in text.stdout


# ---------------------------------------------------------------------------------------------------------
# tradeoff, variants, demo
# ---------------------------------------------------------------------------------------------------------


def test_tradeoff_writes_plot_and_table(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tradeoff"
    payload = ok_json(cnnmod_cli("tradeoff", tiny_store, "--data", tiny_data, "--rho", "0,0.5",
                                 "--granularity", "node,channel", "--limit", 30, "--out", out, "--json"))
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    assert "mean Jaccard" in (out / "tradeoff.md").read_text()
    assert payload["plot"] == str(out / "tradeoff.png") and payload["report"] == str(out / "tradeoff.md")
    rows = {(r["granularity"], r["rho"]): r for r in payload["rows"]}
    assert set(rows) == {("node", 0.0), ("node", 0.5), ("channel", 0.0), ("channel", 0.5)}
    for granularity in ("node", "channel"):
        assert rows[granularity, 0.5]["jaccard"] <= rows[granularity, 0.0]["jaccard"]
    # a node is kept at rho 0 if it is ever active; a channel if any of its nodes is: channels keep more
    assert rows["channel", 0.0]["jaccard"] >= rows["node", 0.0]["jaccard"]
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["kept_parameters"] <= 1.0


def test_tradeoff_without_out_prints_and_writes_nothing(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    store = store_copy(tiny_store, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = cnnmod_cli("tradeoff", store, "--data", tiny_data, "--rho", "0.1", "--granularity", "node",
                        "--limit", 9)
    assert result.exit_code == 0, result.stderr
    assert "mean Jaccard" in result.stdout
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_tradeoff_rho_out_of_range_is_an_error(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                               tmp_path: Path) -> None:
    result = cnnmod_cli("tradeoff", tiny_store, "--data", tiny_data, "--rho", "1.5", "--out", tmp_path / "t", "--json")
    assert_usage_error(result, "--rho", "1.5")


def test_tradeoff_rho_that_is_no_number_is_an_error(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                    tmp_path: Path) -> None:
    result = cnnmod_cli("tradeoff", tiny_store, "--data", tiny_data, "--rho", "0,abc", "--out", tmp_path / "t",
                        "--json")
    assert_usage_error(result, "abc")


def test_variants_table(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path) -> None:
    payload = ok_json(cnnmod_cli("variants", tiny_model, "--data", tiny_data, "--samples-per-class", 10,
                                 "--limit", 30, "--json"))
    rows = payload["rows"]
    assert len(rows) == 6
    assert {(r["sites"], r["variant"]) for r in rows} == {(s, v) for s in ("relu", "conv")
                                                          for v in ("ci", "bln", "bi")}
    for r in rows:
        assert {"sites", "variant", "softmax_top1", "logit_top1", "jaccard"} <= set(r)
        assert 0.0 <= r["softmax_top1"] <= 1.0 and 0.0 <= r["logit_top1"] <= 1.0 and 0.0 < r["jaccard"] <= 1.0
    assert payload["test_images"] == 30


def test_demo_runs_on_the_embedded_assets(cnnmod_cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    payload = ok_json(cnnmod_cli("demo", "--out", out, "--json"))
    assert 0.0 <= payload["parent"]["top1"] <= 1.0 and 0.0 <= payload["composed"]["top1"] <= 1.0
    assert payload["parent"]["top1"] > 0.8  # the embedded Fashion-MNIST CNN is trained
    assert abs(payload["composed"]["top1"] - payload["parent"]["top1"]) <= 0.02
    assert len(payload["modules"]) == 10
    assert Path(payload["report"]).is_file() and Path(payload["report"]).name == "report.md"
    assert (Path(payload["store"]) / "manifest.json").is_file()


def test_python_dash_m_cnnmod(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cnnmod", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("decompose", "demo", "evaluate", "inspect", "tradeoff", "train", "variants"):
        assert command in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit code 1, no traceback
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_unknown_class_is_an_error(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path) -> None:
    result = cnnmod_cli("evaluate", tiny_store, "--data", tiny_data, "--classes", "red,purple")
    assert_error(result, "'purple'", "red")


def test_decompose_unknown_class_is_an_error(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "store"
    assert_error(cnnmod_cli("decompose", tiny_model, "--data", tiny_data, "--out", out, "--classes", "purple"),
                 "'purple'")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "decompose", "train"])
def test_a_path_that_is_no_dataset_is_an_error(cnnmod_cli: Cli, command: str, tiny_store: Path,
                                               tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    args = {"evaluate": ("evaluate", tiny_store),
            "decompose": ("decompose", tiny_model, "--out", tmp_path / "store"),
            "train": ("train", "resnet_tiny", "--out", tmp_path / "m.safetensors")}[command]
    assert_error(cnnmod_cli(*args, "--data", folder), str(folder), "no dataset")


def test_a_corrupt_module_file_is_an_error(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                           tmp_path: Path) -> None:
    store = store_copy(tiny_store, tmp_path)
    module = store / "modules" / "0000.safetensors"
    data = bytearray(module.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    module.write_bytes(bytes(data))
    line = assert_error(cnnmod_cli("evaluate", store, "--data", tiny_data), "0000.safetensors", "sha256")
    assert "restore" in line
    assert_error(cnnmod_cli("inspect", store), "sha256")


def test_a_manifest_that_is_not_json_is_an_error(cnnmod_cli: Cli, tiny_store: Path, tiny_data: Path,
                                                 tmp_path: Path) -> None:
    store = store_copy(tiny_store, tmp_path)
    (store / "manifest.json").write_text('{"format": "cnnmod.store", ')
    assert_error(cnnmod_cli("evaluate", store, "--data", tiny_data), "manifest.json", "not valid JSON")
    assert_error(cnnmod_cli("inspect", store, "--json"), "manifest.json")
    assert_error(cnnmod_cli("tradeoff", store, "--data", tiny_data), "manifest.json")


def test_a_folder_that_is_no_store_is_an_error(cnnmod_cli: Cli, tiny_data: Path, tmp_path: Path) -> None:
    assert_error(cnnmod_cli("evaluate", tmp_path, "--data", tiny_data), "not a cnnmod store")


def test_a_model_file_of_another_arch_is_refused(cnnmod_cli: Cli, tiny_model: Path, tiny_data: Path,
                                                 tmp_path: Path) -> None:
    result = cnnmod_cli("decompose", tiny_model, "--arch", "resnet20", "--data", tiny_data,
                        "--out", tmp_path / "store")
    assert_error(result, "resnet_tiny", "resnet20")
    assert not (tmp_path / "store").exists()


def test_a_checkpoint_that_does_not_fit_arch_is_an_error(cnnmod_cli: Cli, plain_checkpoint: Path,
                                                         tiny_data: Path, tmp_path: Path) -> None:
    result = cnnmod_cli("decompose", plain_checkpoint, "--arch", "resnet20", "--data", tiny_data,
                        "--out", tmp_path / "store")
    assert_error(result, "tiny.th", "does not fit", "resnet20")
    assert_error(cnnmod_cli("inspect", plain_checkpoint, "--arch", "resnet20"), "does not fit")


def test_a_plain_checkpoint_without_arch_is_an_error(cnnmod_cli: Cli, plain_checkpoint: Path, tiny_data: Path,
                                                     tmp_path: Path) -> None:
    result = cnnmod_cli("decompose", plain_checkpoint, "--data", tiny_data, "--out", tmp_path / "store")
    assert_error(result, "plain checkpoint", "--arch")


def test_an_unknown_arch_is_an_error(cnnmod_cli: Cli, plain_checkpoint: Path, tiny_data: Path,
                                     tmp_path: Path) -> None:
    result = cnnmod_cli("decompose", plain_checkpoint, "--arch", "resnet21", "--data", tiny_data,
                        "--out", tmp_path / "store")
    assert_error(result, "unknown architecture 'resnet21'")
    result = cnnmod_cli("train", "resnet21", "--data", tiny_data, "--out", tmp_path / "m.safetensors")
    assert_error(result, "unknown architecture 'resnet21'")
    assert not (tmp_path / "m.safetensors").exists()
