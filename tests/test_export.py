"""Models out of cnnmod: `cnnmod export` (ONNX, torch.export) and `cnnmod predict`.

The exported graph is run by onnxruntime (and torch.export.load) on real Fashion-MNIST images of the embedded
sample and must predict what cnnmod's composed classifier predicts, for one parent, for parents of different
input sizes and channel counts, for a subset of labels and with a reverifier; `cnnmod predict` on PNG files of
the same images must agree too.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from cnnmod.data import load_dataset
from cnnmod.engine.compose import ComposedClassifier, compose, reverified
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec, as_format
from cnnmod.engine.modules import ModuleSet, Parent
from cnnmod.storage.export import (
    ExportedClassifier,
    _Resize,
    composed_scores,
    export_classifier,
    read_images,
    read_labels,
    select_labels,
)
from cnnmod.storage.outputs import kind_of
from cnnmod.storage.store import load_composition, save_composition, save_store
from cnnmod.zoo import create_model, load_model_file
from fixtures.cli import assert_error, ok_json
from fixtures.nets import random_modules

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

N_IMAGES = 60


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the embedded model decomposed (few samples), real test images, a small RGB 32x32 parent
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist() -> tuple[Parent, np.ndarray, np.ndarray]:
    """The embedded Fashion-MNIST parent, its training images and labels, and N_IMAGES test images."""
    assets = resources.files("cnnmod") / "assets"
    with resources.as_file(assets / "smallcnn-fmnist.safetensors") as model_path, \
            resources.as_file(assets / "fmnist-sample.npz") as sample_path:
        model, info = load_model_file(model_path)
        data = load_dataset(sample_path, format="npz", progress=False)
    parent = Parent.from_model(model, info.input_spec, info.classes, info.arch)
    step = len(data.test.images) // N_IMAGES
    return parent, data.train, data.test.images[::step][:N_IMAGES]


@pytest.fixture(scope="module")
def fm_modules(fmnist: tuple) -> ModuleSet:
    parent, train, _ = fmnist
    torch.set_num_threads(1)
    modules, _ = decompose(parent, train.images, train.labels, DecomposeConfig(samples_per_class=8), progress=False)
    return modules


@pytest.fixture(scope="module")
def fm_images(fmnist: tuple) -> np.ndarray:
    """uint8 NHWC 28x28 grey test images."""
    return fmnist[2]


@pytest.fixture(scope="module")
def fm_store(fm_modules: ModuleSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_store(tmp_path_factory.mktemp("export") / "store", fm_modules)


@pytest.fixture(scope="module")
def rgb_modules() -> ModuleSet:
    """A random-weight RGB 32x32 zoo model (vgg_tiny) with 3 classes and random keep-masks."""
    torch.manual_seed(0)
    model = create_model("vgg_tiny", num_classes=3, in_channels=3).eval()
    parent = Parent.from_model(model, InputSpec.default((32, 32), 3), ["cat", "dog", "ship"], "vgg_tiny")
    return random_modules(parent, keep=0.8)


def as_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]: what the exported graph takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    return session.run(["scores"], {"images": x})[0]


def onnx_labels(path: Path) -> list[str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map["labels"])


def assert_agrees(composed: ComposedClassifier, scores: np.ndarray, images: np.ndarray) -> None:
    """Same prediction as cnnmod's composed classifier on every image, and the same scores."""
    expected = composed.predict(images).numpy()
    assert (scores.argmax(1) == expected).all(), f"{(scores.argmax(1) != expected).sum()} predictions differ"
    np.testing.assert_allclose(scores, composed_scores(composed, images).numpy(), atol=1e-5)


def cli_run(*args: object) -> Result:
    from cnnmod.cli import export, predict  # noqa: F401  (registers the commands)
    from cnnmod.cli.app import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------


def test_resize_matrices_match_torch_antialiased_interpolation() -> None:
    x = torch.rand(2, 3, 28, 30)
    for size in [(32, 32), (14, 20), (28, 11), (7, 7)]:
        expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                                   antialias=True)
        torch.testing.assert_close(_Resize((28, 30), size)(x), expected, atol=1e-6, rtol=0)


def test_onnx_export_of_a_store_predicts_like_cnnmod_and_like_predict(
        fm_store: Path, fm_images: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "fmnist.onnx"
    payload = ok_json(cli_run("export", fm_store, "--format", "onnx", "--out", out, "--json"))
    composed = load_composition(fm_store)
    assert payload["labels"] == list(composed.labels) == onnx_labels(out)
    assert payload["input"]["shape"] == ["N", 1, 28, 28]
    assert payload["verification"]["images"] > 0 and payload["verification"]["max_abs_diff"] < 1e-4
    assert kind_of(out) == "onnx"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["cnnmod"])["size"] == [28, 28]

    scores = run_onnx(out, as_input(fm_images))
    assert scores.shape == (len(fm_images), 10)
    assert_agrees(composed, scores, fm_images)
    one = run_onnx(out, as_input(fm_images[:1]))  # the batch dimension is dynamic
    np.testing.assert_allclose(one, scores[:1], atol=1e-5)

    folder = tmp_path / "png"
    (folder / "nested").mkdir(parents=True)
    names = []
    for i, image in enumerate(fm_images):
        name = f"{'nested/' if i % 3 == 0 else ''}{i:03d}.png"
        Image.fromarray(image[..., 0]).save(folder / name)
        names.append(name)
    result = cli_run("predict", fm_store, folder, "--json", "--top-k", 3, "--batch-size", 7)
    assert result.exit_code == 0, result.stderr
    predicted = {str(Path(p["image"]).relative_to(folder)): p for p in json.loads(result.stdout)}
    assert sorted(predicted) == sorted(names)
    labels = onnx_labels(out)
    for name, s in zip(names, scores, strict=True):
        entry = predicted[name]
        assert entry["label"] == labels[int(s.argmax())]
        assert entry["score"] == pytest.approx(float(s.max()), abs=1e-5)
        assert len(entry["top"]) == 3 and entry["top"][0][0] == entry["label"]

    text = cli_run("predict", fm_store, folder / "nested" / "000.png", folder / "001.png")
    assert text.exit_code == 0, text.stderr
    assert "| image | label | score | top 5 |" in text.stdout and predicted["001.png"]["label"] in text.stdout


@pytest.mark.parametrize("grey_first", [True, False], ids=["grey-28-first", "rgb-32-first"])
def test_parents_of_different_sizes_and_channels_export_and_agree(
        fm_modules: ModuleSet, rgb_modules: ModuleSet, fm_images: np.ndarray, grey_first: bool,
        tmp_path: Path) -> None:
    grey = fm_modules.select(["Bag", "Sneaker", "Trouser", "Coat"])
    groups = [grey, rgb_modules] if grey_first else [rgb_modules, grey]
    composed = compose(groups, scoring="softmax" if grey_first else "logit")
    images = fm_images if grey_first else as_format(fm_images, rgb_modules.parent.input_spec)
    assert images.shape[1:] == ((28, 28, 1) if grey_first else (32, 32, 3))

    result = export_classifier(composed, tmp_path / "mixed.onnx", "onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    scores = run_onnx(tmp_path / "mixed.onnx", as_input(images))
    assert scores.shape == (len(images), 7)
    assert onnx_labels(tmp_path / "mixed.onnx") == list(composed.labels)
    assert_agrees(composed, scores, images)
    # the same classifier saved as a composition exports the same graph through the CLI
    save_composition(tmp_path / "comp", composed)
    ok_json(cli_run("export", tmp_path / "comp", "--out", tmp_path / "cli.onnx", "--json"))
    np.testing.assert_allclose(run_onnx(tmp_path / "cli.onnx", as_input(images)), scores, atol=1e-5)


def test_labels_selects_a_subset_in_the_given_order(fm_store: Path, fm_modules: ModuleSet, fm_images: np.ndarray,
                                                    tmp_path: Path) -> None:
    chosen = ["Sneaker", "Bag", "Coat", "Trouser"]
    out = tmp_path / "subset.onnx"
    payload = ok_json(cli_run("export", fm_store, "--labels", ",".join(chosen), "--out", out, "--json"))
    assert payload["labels"] == chosen == onnx_labels(out)
    scores = run_onnx(out, as_input(fm_images))
    assert scores.shape == (len(fm_images), 4)
    assert_agrees(compose([fm_modules.select(chosen)]), scores, fm_images)


def test_labels_interleaving_parents_keep_their_order(fm_modules: ModuleSet, rgb_modules: ModuleSet,
                                                      fm_images: np.ndarray) -> None:
    composed = compose([fm_modules, rgb_modules])
    subset = select_labels(composed, ["dog", "Bag", "cat", "Coat"])
    assert subset.labels == ("dog", "Bag", "cat", "Coat")
    net = ExportedClassifier(subset)
    assert (net.channels, net.size) == (3, (32, 32))  # "dog" comes first: its parent's format is the input
    images = as_format(fm_images, rgb_modules.parent.input_spec)
    with torch.no_grad():
        scores = net(torch.from_numpy(as_input(images)))
    full = composed_scores(composed, images)
    idx = [composed.labels.index(lab) for lab in subset.labels]
    torch.testing.assert_close(scores, full[:, idx], atol=1e-5, rtol=0)


def test_reverifiers_are_part_of_the_exported_graph(fm_modules: ModuleSet, fm_images: np.ndarray,
                                                    tmp_path: Path) -> None:
    pair = ["Shirt", "T-shirt/top", "Pullover", "Coat"]
    composed = compose([fm_modules])
    other = random_modules(fm_modules.parent, keep=0.6, seed=3).select(pair)
    repaired = reverified(composed, pair, other)
    assert (repaired.predict(fm_images) != composed.predict(fm_images)).any(), "the reverifier changes nothing"
    path = save_composition(tmp_path / "repaired", repaired)
    ok_json(cli_run("export", path, "--out", tmp_path / "r.onnx", "--json"))
    assert_agrees(load_composition(path), run_onnx(tmp_path / "r.onnx", as_input(fm_images)), fm_images)
    # a subset without one of the reverifier's labels drops the reverifier
    assert select_labels(repaired, ["Shirt", "Bag"]).reverifiers == ()
    assert len(select_labels(repaired, [*pair, "Bag"]).reverifiers) == 1


def test_more_than_sixteen_modules_run_in_chunks(fm_images: np.ndarray, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("smallcnn_tiny", num_classes=20, in_channels=1).eval()
    parent = Parent.from_model(model, InputSpec.default((28, 28), 1), [f"k{i}" for i in range(20)], "smallcnn_tiny")
    composed = compose([random_modules(parent, keep=0.7)], scoring="logit")
    assert len(ExportedClassifier(composed).groups[0].chunks) == 2
    export_classifier(composed, tmp_path / "twenty.onnx", "onnx")
    assert_agrees(composed, run_onnx(tmp_path / "twenty.onnx", as_input(fm_images)), fm_images)


# ---------------------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------------------


def test_pt2_round_trip_agrees(fm_store: Path, fm_images: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "fmnist.pt2"
    payload = ok_json(cli_run("export", fm_store, "--format", "pt2", "--labels", "Bag,Coat,Dress", "--out", out,
                              "--json"))
    assert payload["format"] == "pt2" and payload["verification"]["max_abs_diff"] < 1e-4
    assert kind_of(out) == "pt2"
    extra = {"labels": "", "cnnmod": ""}
    with open(out, "rb") as f:
        program = torch.export.load(f, extra_files=extra)
    assert json.loads(extra["labels"]) == ["Bag", "Coat", "Dress"] == read_labels(out)
    composed = select_labels(load_composition(fm_store), ["Bag", "Coat", "Dress"])
    module = program.module()
    with torch.no_grad():
        scores = module(torch.from_numpy(as_input(fm_images))).numpy()
        one = module(torch.from_numpy(as_input(fm_images[:1]))).numpy()
    assert_agrees(composed, scores, fm_images)
    np.testing.assert_allclose(one, scores[:1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line, no traceback
# ---------------------------------------------------------------------------------------------------------


def test_existing_out_is_refused_without_overwrite_and_only_an_export_is_overwritten(
        fm_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    ok_json(cli_run("export", fm_store, "--out", out, "--labels", "Bag,Coat", "--json"))
    before = out.read_bytes()
    assert_error(cli_run("export", fm_store, "--out", out), "exists", "--overwrite")
    assert out.read_bytes() == before
    payload = ok_json(cli_run("export", fm_store, "--out", out, "--overwrite", "--json"))
    assert len(payload["labels"]) == 10 and len(onnx_labels(out)) == 10
    mine = tmp_path / "notes.onnx"
    mine.write_text("a user's file")
    assert_error(cli_run("export", fm_store, "--out", mine, "--overwrite"), "not a cnnmod")
    assert mine.read_text() == "a user's file"
    assert_error(cli_run("export", fm_store, "--format", "pt2", "--out", out, "--overwrite"), "not a cnnmod")
    assert not list(tmp_path.glob(".*cnnmod-tmp*"))


def test_unknown_label_is_refused(fm_store: Path, tmp_path: Path) -> None:
    assert_error(cli_run("export", fm_store, "--labels", "Bag,Parrot", "--out", tmp_path / "x.onnx"), "Parrot")
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_package_says_how_to_install(fm_store: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert_error(cli_run("export", fm_store, "--out", tmp_path / "x.onnx"), "pip install")


def test_unreadable_or_missing_images_are_refused(fm_store: Path, fm_images: np.ndarray, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(fm_images[0][..., 0]).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_error(cli_run("predict", fm_store, good, bad), "bad.png")
    assert_error(cli_run("predict", fm_store, tmp_path / "gone.jpg"), "gone.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(cli_run("predict", fm_store, empty), "empty")
    usage = cli_run("predict", fm_store, good, "--top-k", 0)
    assert usage.exit_code == 2 and "Traceback" not in usage.output


def test_predict_reads_rgb_files_of_other_sizes(fm_store: Path, fm_images: np.ndarray, tmp_path: Path) -> None:
    """An RGB JPEG-sized file is read as PIL's grey and resized (antialiased) to the parent's 28x28."""
    big = Image.fromarray(np.repeat(fm_images[5], 3, axis=2)).resize((56, 56), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    x = read_images([tmp_path / "big.png"], 1, (28, 28))
    assert x.shape == (1, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    grey = torch.from_numpy(np.asarray(big.convert("L"), dtype=np.float32) / 255)[None, None]
    expected = torch.nn.functional.interpolate(grey, size=(28, 28), mode="bilinear", antialias=True)
    np.testing.assert_allclose(x, expected.numpy(), atol=1e-6)
    shutil.copy(tmp_path / "big.png", tmp_path / "copy.png")
    result = cli_run("predict", fm_store, tmp_path / "big.png", tmp_path / "copy.png", "--json")
    entries = json.loads(result.stdout)
    assert [Path(e["image"]).name for e in entries] == ["big.png", "copy.png"]
    assert entries[0]["label"] == entries[1]["label"]

