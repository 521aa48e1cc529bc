"""Models into the CLI the ways users have them: their own code (`FILE.py:NAME`, `package.module:NAME`) with a
state dict, `.pt2` programs from torch.export, zoo names, cnnmod's own files; the parent file `cnnmod import`
writes; the input flags (--input-size HxW, --channels, --mean, --std); progress bars only on a terminal.

The user's model is written into tmp_path as a user would write it; images are the embedded Fashion-MNIST sample.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from safetensors.torch import save_file
from torch import nn

from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.progress import is_quiet, set_quiet, show_progress
from cnnmod.storage.exported import from_exported
from cnnmod.storage.models_in import ModelSource, open_model, parse_input_size
from cnnmod.storage.parentfile import load_parent_file
from cnnmod.storage.store import load_store
from cnnmod.zoo import create_model, save_model_file
from fixtures.cli import assert_error, ok_json

Cli = Callable[..., Result]

# What a user writes: a class built with no arguments, a function returning one, a helper the class uses.
USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.MaxPool2d(2))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(1, 4), block(4, 8))
            self.classifier = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))

        def forward(self, x):
            x = self.features(x)
            x = torch.flatten(x, 1)
            return self.classifier(x)


    class FullyConv(nn.Module):
        """Any input size: global average pooling before the head."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.body(x))


    def build():
        return Net()


    class NeedsArguments(nn.Module):
        def __init__(self, width):
            super().__init__()
''')


def _user_namespace() -> dict:
    namespace: dict = {}
    exec(compile(USER_CODE, "<user net.py>", "exec"), namespace)  # the eager model, to compare with
    return namespace


def _trained_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The user's Net with seeded weights and BatchNorm statistics away from their defaults."""
    torch.manual_seed(seed)
    net = _user_namespace()["Net"]()
    with torch.no_grad():
        net.train()(torch.randn(32, 1, 28, 28))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 training and 5 test images per class of the embedded Fashion-MNIST sample, as a .npz."""
    with resources.as_file(resources.files("cnnmod") / "assets" / "fmnist-sample.npz") as path:
        sample = dict(np.load(path))
    keep = {}
    for split, n in (("train", 10), ("test", 5)):
        y = sample[f"y_{split}"]
        idx = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
        keep[f"x_{split}"], keep[f"y_{split}"] = sample[f"x_{split}"][idx], y[idx]
    out = tmp_path_factory.mktemp("fmnist") / "fmnist-small.npz"
    np.savez(out, classes=sample["classes"], **keep)
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's net.py and its weights, saved four ways."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "net.py").write_text(USER_CODE)
    state = _trained_weights()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "best_prec1": 0.5},
               folder / "nested.pt")  # pytorch_resnet_cifar10 / DataParallel style
    torch.save(state, folder / "bare.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "net.safetensors"))
    return folder


def _eager_logits(images: np.ndarray, spec: InputSpec, state: dict[str, torch.Tensor]) -> torch.Tensor:
    net = _user_namespace()["Net"]()
    net.load_state_dict(state)
    with torch.no_grad():
        x = torch.as_tensor(images).float().div(255).permute(0, 3, 1, 2)
        x = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
        return net.eval()(x.contiguous())  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------
# FILE.py:NAME --weights through decompose, evaluate, import, and the parent file through decompose again
# ---------------------------------------------------------------------------------------------------------


def test_user_file_round_trip_through_decompose_evaluate_and_import(cnnmod_cli: Cli, user: Path, fmnist: Path,
                                                                   tmp_path: Path) -> None:
    model = f"{user / 'net.py'}:Net"
    first = ok_json(cnnmod_cli("decompose", model, "--weights", user / "nested.pt", "--mean", "0.5", "--std",
                               "0.5", "--data", fmnist, "--out", tmp_path / "s1", "--samples-per-class", 5,
                               "--json"))
    assert first["arch"] == "Net"
    assert first["input_spec"] == {"size": [28, 28], "channels": 1, "mean": [0.5], "std": [0.5]}
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["parent"]["input_spec"] == first["input_spec"]  # stored as printed

    evaluation = ok_json(cnnmod_cli("evaluate", tmp_path / "s1", "--data", fmnist, "--json"))
    store = load_store(tmp_path / "s1", with_activity=False)
    data = np.load(fmnist)
    cnnmod_logits = store.modules.parent.logits(data["x_test"])
    eager = _eager_logits(data["x_test"], store.modules.parent.input_spec, _trained_weights())
    assert torch.allclose(cnnmod_logits, eager, atol=1e-4)  # cnnmod's traced parent is the user's model
    top1 = float((eager.argmax(1).numpy() == data["y_test"]).mean())
    assert evaluation["parent"]["top1"] == pytest.approx(top1)
    assert evaluation["composed"]["top1"] == pytest.approx(top1)  # variant bi: the composition decides as the parent

    imported = ok_json(cnnmod_cli("import", f"{user / 'net.py'}:build", "--weights", user / "net.safetensors",
                                  "--mean", "0.5", "--std", "0.5", "--data", fmnist, "--out",
                                  tmp_path / "parent.safetensors", "--json"))
    assert imported["input_spec"] == first["input_spec"] and imported["arch"] == "build"
    assert imported["classes"] == list(data["classes"])

    # the parent file needs no code and no flags: same graph, same masks
    second = ok_json(cnnmod_cli("decompose", tmp_path / "parent.safetensors", "--data", fmnist, "--out",
                                tmp_path / "s2", "--samples-per-class", 5, "--json"))
    assert second["input_spec"] == first["input_spec"] and second["jaccard"] == first["jaccard"]
    again = load_store(tmp_path / "s2", with_activity=False).modules
    assert again.parent.fingerprint() == store.modules.parent.fingerprint()
    assert [s.name for s in again.sites] == [s.name for s in store.modules.sites]
    for site in store.modules.sites:
        assert torch.equal(again.masks[site.name], store.modules.masks[site.name])
    assert torch.equal(again.head_weight, store.modules.head_weight)

    # and out again: the composed classifier as ONNX, run by onnxruntime, agrees with `cnnmod predict`
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    ok_json(cnnmod_cli("export", tmp_path / "s2", "--format", "onnx", "--out", tmp_path / "m.onnx", "--json"))
    (tmp_path / "png").mkdir()
    for i, image in enumerate(data["x_test"]):
        Image.fromarray(image[..., 0]).save(tmp_path / "png" / f"{i:03d}.png")
    predicted = cnnmod_cli("predict", tmp_path / "s2", tmp_path / "png", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    labels_by_file = {Path(p["image"]).name: p["label"] for p in json.loads(predicted.stdout)}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    names = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
    x = data["x_test"].astype(np.float32).transpose(0, 3, 1, 2) / 255
    scores = session.run(["scores"], {session.get_inputs()[0].name: x})[0]
    assert [names[int(i)] for i in scores.argmax(1)] == [labels_by_file[f"{i:03d}.png"] for i in range(len(x))]


def test_parent_file_loads_as_data(user: Path, fmnist: Path, tmp_path: Path, cnnmod_cli: Cli) -> None:
    out = tmp_path / "p.safetensors"
    ok_json(cnnmod_cli("import", f"{user / 'net.py'}:Net", "--weights", user / "bare.pth", "--classes",
                       ",".join(f"c{i}" for i in range(10)), "--input-size", "28", "--out", out, "--json"))
    parent = load_parent_file(out)
    assert parent.classes == tuple(f"c{i}" for i in range(10)) and parent.arch == "Net"
    assert parent.input_spec == InputSpec.default((28, 28), 1)
    images = np.load(fmnist)["x_test"][:8]
    assert torch.allclose(parent.logits(images), _eager_logits(images, parent.input_spec, _trained_weights()),
                          atol=1e-4)
    # inspect reads it too, and says what it is
    payload = ok_json(cnnmod_cli("inspect", out, "--json"))
    assert payload["arch"] == "Net" and payload["classes"][0] == "c0"
    # flags cannot change what the file holds
    assert_error(cnnmod_cli("inspect", out, "--mean", "0.1"), "--mean", "parent file")


def test_import_follows_the_output_policy(user: Path, tmp_path: Path, cnnmod_cli: Cli) -> None:
    args = [f"{user / 'net.py'}:Net", "--weights", user / "bare.pth", "--input-size", "28"]
    out = tmp_path / "p.safetensors"
    ok_json(cnnmod_cli("import", *args, "--out", out, "--json"))
    assert_error(cnnmod_cli("import", *args, "--out", out), "exists", "--overwrite")
    ok_json(cnnmod_cli("import", *args, "--out", out, "--overwrite", "--json"))
    mine = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(2)}, str(mine))
    assert_error(cnnmod_cli("import", *args, "--out", mine, "--overwrite"), "not a cnnmod parent")
    assert mine.stat().st_size > 0 and load_parent_file(out).num_classes == 10


def test_damaged_parent_file_is_refused(user: Path, tmp_path: Path, cnnmod_cli: Cli) -> None:
    out = tmp_path / "p.safetensors"
    ok_json(cnnmod_cli("import", f"{user / 'net.py'}:Net", "--weights", user / "bare.pth", "--input-size", "28",
                       "--out", out, "--json"))
    data = bytearray(out.read_bytes())
    data[-8:] = b"\x00\x00\x80\x3f" * 2  # the last weights set to 1.0: the fingerprint no longer matches
    out.write_bytes(bytes(data))
    assert_error(cnnmod_cli("inspect", out), "fingerprint")
    out.write_bytes(bytes(data[: len(data) // 2]))
    assert_error(cnnmod_cli("inspect", out), "damaged cnnmod parent file")


# ---------------------------------------------------------------------------------------------------------
# state dicts: the usual wrappings, and keys that do not fit
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["nested.pt", "bare.pth", "net.safetensors"])
def test_weights_in_every_usual_form(user: Path, weights: str) -> None:
    parent = open_model(ModelSource(f"{user / 'net.py'}:Net", weights=user / weights, input_size=(28, 28)))
    state = _trained_weights()
    net = _user_namespace()["Net"]()
    net.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(parent.model.graph(x), net.eval()(x), atol=1e-5)


def test_weights_that_do_not_fit_name_a_few_keys(cnnmod_cli: Cli, user: Path, fmnist: Path, tmp_path: Path) -> None:
    state = _trained_weights()
    partial = {k: v for k, v in state.items() if not k.startswith("classifier")}
    torch.save(partial, tmp_path / "partial.pt")
    line = assert_error(cnnmod_cli("decompose", f"{user / 'net.py'}:Net", "--weights", tmp_path / "partial.pt",
                                   "--data", fmnist, "--out", tmp_path / "s"),
                        "partial.pt", "does not fit", "missing keys", "'classifier.0.weight'", "and 1 more")
    assert "unexpected" not in line
    assert not (tmp_path / "s").exists()
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    assert_error(cnnmod_cli("inspect", f"{user / 'net.py'}:Net", "--weights", tmp_path / "extra.pt"),
                 "unexpected key 'extra.weight'")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert_error(cnnmod_cli("inspect", f"{user / 'net.py'}:Net", "--weights", tmp_path / "broken.pt"),
                 "cannot read", "broken.pt")


def test_user_code_errors_are_one_line(cnnmod_cli: Cli, user: Path, tmp_path: Path) -> None:
    net = user / "net.py"
    assert_error(cnnmod_cli("inspect", f"{tmp_path / 'absent.py'}:Net"), "absent.py", "does not exist")
    assert_error(cnnmod_cli("inspect", f"{net}:Missing"), "net.py has no 'Missing'")
    assert_error(cnnmod_cli("inspect", f"{net}:NeedsArguments"), "NeedsArguments", "no arguments")
    assert_error(cnnmod_cli("inspect", f"{net}:torch"), "not an nn.Module class")
    (tmp_path / "bad.py").write_text("def broken(:\n")
    assert_error(cnnmod_cli("inspect", f"{tmp_path / 'bad.py'}:Net"), "importing bad.py failed", "SyntaxError")
    assert_error(cnnmod_cli("inspect", f"{net}:Net", "--arch", "resnet20"), "--arch", "leave --arch out")


def test_package_module_name(cnnmod_cli: Cli, user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "nets.py").write_text(USER_CODE)
    try:
        monkeypatch.chdir(tmp_path)  # uvicorn's convention: package.module is found from the current folder
        payload = ok_json(cnnmod_cli("inspect", f"{package}.nets:Net", "--weights", user / "net.safetensors",
                                     "--input-size", "28", "--json"))
        assert payload["arch"] == "Net" and len(payload["classes"]) == 10
        assert payload["input_spec"]["channels"] == 1  # from the first convolution
        monkeypatch.chdir(user)  # or from PYTHONPATH / sys.path
        monkeypatch.syspath_prepend(str(tmp_path))
        payload = ok_json(cnnmod_cli("inspect", f"{package}.nets:build", "--input-size", "28", "--json"))
        assert payload["arch"] == "build"
        assert_error(cnnmod_cli("inspect", "no_such_package_xyz.nets:Net"), "no module named 'no_such_package_xyz'")
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------------------
# .pt2 programs
# ---------------------------------------------------------------------------------------------------------


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool = False) -> Path:
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamic else {}
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(*shape),), **kwargs), str(path))
    return path


def test_pt2_round_trip(cnnmod_cli: Cli, fmnist: Path, tmp_path: Path) -> None:
    net = _user_namespace()["Net"]()
    net.load_state_dict(_trained_weights())
    program = _export(net, (2, 1, 28, 28), tmp_path / "net.pt2")
    first = ok_json(cnnmod_cli("decompose", program, "--mean", "0.5", "--std", "0.5", "--data", fmnist, "--out",
                               tmp_path / "s", "--samples-per-class", 5, "--json"))
    assert first["arch"] == "net" and first["input_spec"]["size"] == [28, 28]
    evaluation = ok_json(cnnmod_cli("evaluate", tmp_path / "s", "--data", fmnist, "--json"))
    parent = load_store(tmp_path / "s", with_activity=False).modules.parent
    images = np.load(fmnist)["x_test"]
    eager = _eager_logits(images, parent.input_spec, _trained_weights())
    assert torch.allclose(parent.logits(images), eager, atol=1e-4)
    assert evaluation["parent"]["top1"] == pytest.approx(float((eager.argmax(1).numpy() ==
                                                                np.load(fmnist)["y_test"]).mean()))
    # the program once, then a parent file: the same modules
    ok_json(cnnmod_cli("import", program, "--mean", "0.5", "--std", "0.5", "--data", fmnist, "--out",
                       tmp_path / "p.safetensors", "--json"))
    second = ok_json(cnnmod_cli("decompose", tmp_path / "p.safetensors", "--data", fmnist, "--out",
                                tmp_path / "s2", "--samples-per-class", 5, "--json"))
    assert second["jaccard"] == first["jaccard"]
    assert_error(cnnmod_cli("inspect", program, "--weights", tmp_path / "p.safetensors"), "--weights")


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # inside torch.export, with a dynamic batch
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("core_aten", [False, True])
def test_exported_programs_become_graphs_cnnmod_traces(dynamic: bool, core_aten: bool) -> None:
    """Training IR and core ATen (after run_decompositions), static and dynamic batch: the same function, as
    modules cnnmod folds and functions it backtracks through; a batch other than the exported one runs."""

    class Styles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.relu = nn.ReLU(inplace=True)
            self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
            self.fc = nn.Linear(6 * 4 * 4 + 6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn(self.conv((x - self.mean) / 0.25)))
            y = torch.relu(self.grouped(torch.nn.functional.max_pool2d(x, 2)))
            y = y + torch.nn.functional.avg_pool2d(x, 2)
            pooled = torch.nn.functional.adaptive_avg_pool2d(y, 4)
            flat = torch.cat([pooled.view(pooled.size(0), -1), y.mean((2, 3))], 1)
            return self.fc(flat)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model = Styles()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 8, 8))
    model.eval()
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamic else {}
    program = torch.export.export(model, (torch.zeros(2, 3, 8, 8),), **kwargs)
    if core_aten:
        program = program.run_decompositions()
    exported = from_exported(program, "styles.pt2")
    assert exported.input_shape == (3, 8, 8)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(exported.graph(x), model(x), atol=1e-5)
    layers = {type(m) for m in exported.graph.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= layers
    traced = Parent.from_model(exported.graph, InputSpec.default((8, 8), 3), [str(i) for i in range(10)], "s")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in traced.model.graph.modules())  # folded into the conv
    assert len(traced.model.sites["relu"]) == 2


def test_pt2_with_an_operation_cnnmod_cannot_decompose(tmp_path: Path, cnnmod_cli: Cli) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    program = _export(model, (2, 1, 8, 8), tmp_path / "gelu.pt2")
    assert_error(cnnmod_cli("inspect", program), "gelu.pt2", "aten.gelu", "not a ReLU")


# ---------------------------------------------------------------------------------------------------------
# zoo names, checkpoints, cnnmod's own files, and files that are damaged or none of these
# ---------------------------------------------------------------------------------------------------------


def test_zoo_name_with_weights_and_without(cnnmod_cli: Cli, fmnist: Path, tmp_path: Path) -> None:
    torch.save({"state_dict": create_model("resnet_tiny", num_classes=4).state_dict()}, tmp_path / "tiny.th")
    payload = ok_json(cnnmod_cli("inspect", "resnet_tiny", "--weights", tmp_path / "tiny.th", "--input-size",
                                 "24x16", "--json"))
    assert payload["classes"] == ["0", "1", "2", "3"]  # from the checkpoint's head
    assert payload["input_spec"]["size"] == [24, 16]
    same = ok_json(cnnmod_cli("inspect", tmp_path / "tiny.th", "--arch", "resnet_tiny", "--json"))
    assert same["sites"]["relu"][0]["shape"] == [4, 32, 32]  # the zoo's own 32x32
    assert_error(cnnmod_cli("decompose", "resnet_tiny", "--data", fmnist, "--out", tmp_path / "s"),
                 "resnet_tiny is an architecture", "--weights")
    assert_error(cnnmod_cli("inspect", "resnet21"), "unknown architecture 'resnet21'", "6n+2")
    assert_error(cnnmod_cli("inspect", "nonexistent/model.pt"), "does not exist")
    described = ok_json(cnnmod_cli("inspect", "resnet8", "--json"))  # an architecture without weights
    assert described["arch"] == "resnet8" and len(described["sites"]["relu"]) == 7


def test_plain_checkpoint_keeps_a_clear_error_and_damaged_files_are_called_damaged(cnnmod_cli: Cli,
                                                                                   tmp_path: Path) -> None:
    torch.save(create_model("resnet_tiny").state_dict(), tmp_path / "plain.pt")
    assert_error(cnnmod_cli("inspect", tmp_path / "plain.pt"), "plain.pt is a plain checkpoint", "--arch")
    spec = InputSpec.default((32, 32), 3)
    model_file = save_model_file(tmp_path / "m.safetensors", create_model("resnet_tiny", 2), "resnet_tiny",
                                 ["a", "b"], spec)
    data = model_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    line = assert_error(cnnmod_cli("inspect", tmp_path / "truncated.safetensors"), "damaged cnnmod model file")
    assert "plain checkpoint" not in line
    (tmp_path / "header.safetensors").write_bytes(data[:40])
    assert_error(cnnmod_cli("inspect", tmp_path / "header.safetensors"), "damaged safetensors file")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    assert_error(cnnmod_cli("inspect", tmp_path / "garbage.safetensors"), "damaged safetensors file")
    (tmp_path / "garbage.th").write_bytes(b"\x80\x02 not a pickle at all")
    line = assert_error(cnnmod_cli("inspect", tmp_path / "garbage.th"), "garbage.th is no model cnnmod reads")
    assert "plain checkpoint" not in line
    # a cnnmod model file holds its own input spec
    assert_error(cnnmod_cli("inspect", model_file, "--input-size", "16"), "--input-size", "cnnmod model file")
    assert ok_json(cnnmod_cli("inspect", model_file, "--json"))["classes"] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------
# input flags
# ---------------------------------------------------------------------------------------------------------


def test_input_size_parsing() -> None:
    assert parse_input_size("32") == (32, 32)
    assert parse_input_size("224x160") == (224, 160)
    assert parse_input_size(" 20X28 ") == (20, 28)
    for bad in ("0", "4097", "32x0", "axb", "3x4x5", "", "-3", "2.5"):
        with pytest.raises(ValueError):
            parse_input_size(bad)


def test_non_square_input_sizes(cnnmod_cli: Cli, user: Path, fmnist: Path, tmp_path: Path) -> None:
    model = f"{user / 'net.py'}:FullyConv"
    payload = ok_json(cnnmod_cli("decompose", model, "--input-size", "20x36", "--data", fmnist, "--out",
                                 tmp_path / "s", "--samples-per-class", 3, "--classes", "Bag,Sneaker", "--json"))
    assert payload["input_spec"]["size"] == [20, 36] and payload["input_spec"]["channels"] == 3
    parent = load_store(tmp_path / "s", with_activity=False).modules.parent
    assert parent.model.input_shape == (3, 20, 36)
    assert parent.model.sites["relu"][0].shape == (6, 20, 36)
    assert ok_json(cnnmod_cli("evaluate", tmp_path / "s", "--data", fmnist, "--json"))["samples"] == 10


def test_mean_and_std_per_channel_or_one_for_all(user: Path) -> None:
    model = f"{user / 'net.py'}:FullyConv"
    spec = open_model(ModelSource(model, input_size=(8, 8), mean=(0.485, 0.456, 0.406), std=(0.2,))).input_spec
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.2, 0.2, 0.2) and spec.channels == 3
    default = open_model(ModelSource(model, input_size=(8, 8))).input_spec
    assert default == InputSpec.default((8, 8), 3)


@pytest.mark.parametrize(("flags", "option", "words"), [
    (["--std", "0"], "--std", "not a finite number > 0"),
    (["--std", "0.5,-1,0.5"], "--std", "not a finite number > 0"),
    (["--mean", "nan"], "--mean", "not a finite number"),
    (["--mean", "0.5,,0.5"], "--mean", "comma-separated"),
    (["--mean", "0.1,0.2"], "--mean", "gives 2 values for a 3-channel input"),
    (["--std", "1,1,1,1"], "--std", "gives 4 values for a 3-channel input"),
    (["--input-size", "0"], "--input-size", "between 1 and 4096"),
    (["--input-size", "5000x3"], "--input-size", "between 1 and 4096"),
    (["--input-size", "big"], "--input-size", "H or HxW"),
    (["--channels", "0"], "--channels", "1<=x<=64"),
])
def test_input_flags_are_refused_with_a_usage_error(cnnmod_cli: Cli, user: Path, flags: list[str], option: str,
                                                    words: str) -> None:
    result = cnnmod_cli("inspect", f"{user / 'net.py'}:FullyConv", "--input-size", "8", *flags) \
        if flags[0] != "--input-size" else cnnmod_cli("inspect", f"{user / 'net.py'}:FullyConv", *flags)
    assert result.exit_code == 2, result.output
    assert f"'{option}'" in result.stderr and words in result.stderr
    assert "Traceback" not in result.output


def test_train_takes_non_square_sizes_and_normalisation(cnnmod_cli: Cli, fmnist: Path, tmp_path: Path) -> None:
    payload = ok_json(cnnmod_cli("train", "resnet_tiny", "--data", fmnist, "--out", tmp_path / "m.safetensors",
                                 "--epochs", 1, "--limit-per-class", 2, "--input-size", "16x24", "--mean", "0.5",
                                 "--std", "0.25", "--channels", "1", "--json"))
    from cnnmod.zoo import read_model_file_info

    info = read_model_file_info(payload["model"])
    assert info.input_spec == InputSpec((16, 24), 1, (0.5,), (0.25,))


# ---------------------------------------------------------------------------------------------------------
# progress bars and --quiet
# ---------------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal() -> None:
    assert show_progress(True, _Terminal())
    assert not show_progress(True, io.StringIO())  # a log file, a CI log, a notebook's captured stderr
    assert not show_progress(False, _Terminal())
    set_quiet(True)
    try:
        assert not show_progress(True, _Terminal())
    finally:
        set_quiet(False)


def test_commands_draw_no_bars_into_logs_and_take_quiet(cnnmod_cli: Cli, user: Path, fmnist: Path,
                                                        tmp_path: Path) -> None:
    model = f"{user / 'net.py'}:Net"
    result = cnnmod_cli("decompose", model, "--data", fmnist, "--out", tmp_path / "s", "--samples-per-class", 5)
    assert result.exit_code == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "observing" not in result.stderr
    assert "wrote" in result.stdout
    result = cnnmod_cli("--quiet", "evaluate", tmp_path / "s", "--data", fmnist)
    assert result.exit_code == 0 and result.stderr == ""
    assert is_quiet()  # set for that run ...
    result = cnnmod_cli("evaluate", tmp_path / "s", "--data", fmnist, "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    cnnmod_cli("inspect", "--models")
    assert not is_quiet()  # ... and reset by the next


def test_model_help_says_what_model_may_be(cnnmod_cli: Cli) -> None:
    for command in ("decompose", "variants", "inspect", "import"):
        text = " ".join(cnnmod_cli(command, "--help").stdout.split())
        assert "FILE.py:NAME" in text and "package.module:NAME" in text and ".pt2" in text
        assert "unpickles" in text and "runs its code" in text
