"""The zoo: registry, fx-traceability of every architecture, checkpoint import, model files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx
from safetensors.torch import save_file
from torch import nn

from cnnmod.engine.inputs import InputSpec
from cnnmod.errors import ModelError, StoreError
from cnnmod.zoo import (
    arch_of,
    create_model,
    list_models,
    load_model_file,
    load_weights,
    model_info,
    read_model_file_info,
    register,
    save_model_file,
)

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
RESNET20 = MODELS / "resnet20-12fca82f.th"
RESNET56 = MODELS / "resnet56-4bfd9763.th"



def _expected_names() -> set[str]:
    names = {"smallcnn", "smallcnn_tiny", "vgg", "vgg_tiny"}
    for suffix in ("", "_b", "_nobn", "_b_nobn"):
        names |= {f"resnet{d}{suffix}" for d in (20, 32, 44, 56)} | {f"resnet_tiny{suffix}"}
    return names


def _input(name: str, batch: int = 3) -> torch.Tensor:
    info = model_info(name)
    return torch.randn(batch, info.in_channels, *info.input_size, generator=torch.Generator().manual_seed(0))


DEEP = {f"resnet{d}{s}" for d in (110, 1202) for s in ("", "_b", "_nobn", "_b_nobn")}


def test_registry_lists_every_variant() -> None:
    assert set(list_models()) == _expected_names() | DEEP
    tiny = ["resnet_tiny", "resnet_tiny_b", "resnet_tiny_b_nobn", "resnet_tiny_nobn"]
    assert list_models("resnet_tiny*") == tiny
    assert model_info("smallcnn").input_size == (28, 28) and model_info("smallcnn").in_channels == 1
    assert model_info("resnet56").input_size == (32, 32) and model_info("resnet56").in_channels == 3


def test_cifar_resnets_of_any_depth_6n_plus_2() -> None:
    """pytorch_resnet_cifar10's ResNet-110 and -1202 are listed; other depths 6n+2 are built when named."""
    assert model_info("resnet110").description.startswith("CIFAR ResNet-110")
    model = create_model("resnet110", num_classes=10).eval()
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 18
    assert sum(p.numel() for p in model.parameters()) == 1_727_962  # the paper's 1.7M
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model_info("resnet1202").in_channels == 3
    tiny = create_model("resnet8_b_nobn", num_classes=3)
    assert len(tiny.layer3) == 1 and "layer2.0.shortcut.0.weight" in tiny.state_dict()
    assert arch_of(tiny) == "resnet8_b_nobn"
    assert "resnet8" not in list_models()  # built on demand, not added to the list
    for name in ("resnet21", "resnet2", "resnet6008"):
        with pytest.raises(ModelError, match=r"6n\+2"):
            model_info(name)
    with pytest.raises(ModelError, match="unknown architecture 'resnet020'"):
        model_info("resnet020")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ModelError, match="resnet20") as e:
        create_model("resnet21")
    assert "\n" not in str(e.value)


def test_register_refuses_a_duplicate_name() -> None:
    with pytest.raises(ModelError, match="already registered"):
        register("resnet20", lambda **kw: nn.Identity(), (32, 32), 3)


def test_import_builds_no_architecture() -> None:
    code = ("import sys, cnnmod.zoo; "
            "print(sorted(m for m in sys.modules if m.startswith('cnnmod.zoo.') and m.split('.')[-1] in "
            "('resnet', 'smallcnn', 'vgg')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(_expected_names()))
def test_traced_equals_eager(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input(name)
    with torch.no_grad():
        eager_out, traced_out = model(x), traced(x)
    assert eager_out.shape == (3, 7)
    assert torch.equal(eager_out, traced_out)
    relus = [n for n in traced.graph.nodes
             if n.target in (torch.relu, nn.functional.relu)
             or (n.op == "call_module" and isinstance(traced.get_submodule(n.target), nn.ReLU))]
    assert relus, "decomposition needs ReLU sites"
    allowed = (nn.ReLU, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.MaxPool2d, nn.Dropout)
    called = {type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"}
    assert all(issubclass(t, allowed) for t in called), called


def test_in_channels_override() -> None:
    model = create_model("resnet_tiny", num_classes=4, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_option_a_shortcut_is_parameter_free_and_traced_through() -> None:
    model = create_model("resnet_tiny")
    assert not any(k.startswith("layer2.0.shortcut") for k in model.state_dict())
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes}
    assert nn.functional.pad in targets
    assert not any(str(t).endswith("shortcut") for t in targets)
    assert any(k.startswith("layer2.0.shortcut.0.") for k in create_model("resnet_tiny_b").state_dict())


def test_nobn_variants_have_no_batchnorm_and_start_as_shortcuts() -> None:
    model = create_model("resnet20_nobn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert "layer1.0.conv1.bias" in model.state_dict()
    assert torch.count_nonzero(model.layer1[0].conv2.weight) == 0
    out = model.eval()(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out).all() and out.abs().max() < 100


@pytest.mark.skipif(not RESNET20.is_file(), reason="shared ResNet-20 checkpoint absent")
def test_shared_resnet20_checkpoint_loads_strictly() -> None:
    model = load_weights(create_model("resnet20"), RESNET20).eval()
    ckpt = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, ckpt["module.linear.weight"])
    assert torch.equal(model.layer3[2].bn2.running_var, ckpt["module.layer3.2.bn2.running_var"])
    probs = model(torch.rand(16, 3, 32, 32) * 4 - 2).softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(16))


@pytest.mark.skipif(not RESNET56.is_file(), reason="shared ResNet-56 checkpoint absent")
def test_wrong_checkpoint_is_one_line_model_error() -> None:
    with pytest.raises(ModelError, match=r"resnet20.*layer1\.3\.conv1\.weight") as e:
        load_weights(create_model("resnet20"), RESNET56)
    assert "\n" not in str(e.value)


def test_shape_mismatch_and_bare_state_dict(tmp_path: Path) -> None:
    source = create_model("resnet_tiny", num_classes=5)
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    target = load_weights(create_model("resnet_tiny", num_classes=5), tmp_path / "bare.pt")
    assert torch.equal(target.linear.weight, source.linear.weight)
    expected = r"'linear.weight' has shape \(5, 16\), resnet_tiny expects \(3, 16\)"
    with pytest.raises(ModelError, match=expected):
        load_weights(create_model("resnet_tiny", num_classes=3), tmp_path / "bare.pt")


def test_safetensors_checkpoint(tmp_path: Path) -> None:
    source = create_model("vgg_tiny")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = load_weights(create_model("vgg_tiny"), tmp_path / "w.safetensors")
    loaded = target.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.state_dict().items())


def test_corrupt_or_missing_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(StoreError) as e:
        load_weights(create_model("resnet_tiny"), bad)
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="does not exist"):
        load_weights(create_model("resnet_tiny"), tmp_path / "absent.th")


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/")}, path)
    with pytest.raises(StoreError, match="cannot read"):
        load_weights(create_model("resnet_tiny"), path)


@pytest.mark.parametrize("name", ["resnet_tiny", "smallcnn_tiny", "resnet_tiny_b_nobn"])
def test_model_file_round_trip(tmp_path: Path, name: str) -> None:
    info = model_info(name)
    model = create_model(name, num_classes=3)
    model.train()(_input(name, 8))  # move BatchNorm statistics away from their defaults
    model.eval()
    spec = InputSpec.default(info.input_size, info.in_channels)
    path = save_model_file(tmp_path / "m.safetensors", model, name, ["cat", "dog", "emu"], spec,
                           {"epochs": 3, "accuracy": 0.5})
    assert not (tmp_path / "m.safetensors.tmp").exists()
    loaded, meta = load_model_file(path)
    assert meta.arch == name and meta.classes == ("cat", "dog", "emu") and meta.input_spec == spec
    assert meta.extra == {"epochs": 3, "accuracy": 0.5}
    assert read_model_file_info(path) == meta
    x = _input(name, 4)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_model_file_errors(tmp_path: Path) -> None:
    spec = InputSpec.default((32, 32), 3)
    path = save_model_file(tmp_path / "m.safetensors", create_model("resnet_tiny", 2), "resnet_tiny",
                           ["a", "b"], spec)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        load_model_file(tmp_path / "truncated.safetensors")
    assert "\n" not in str(e.value)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(StoreError):
        load_model_file(tmp_path / "garbage.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StoreError, match="not a cnnmod model file"):
        load_model_file(tmp_path / "plain.safetensors")
    with pytest.raises(StoreError, match="JSON"):
        save_model_file(tmp_path / "x.safetensors", create_model("resnet_tiny", 2), "resnet_tiny", ["a", "b"],
                        spec, {"bad": object()})
    # weights that do not fit the architecture the metadata names
    lie = create_model("resnet_tiny_b", 2)
    save_model_file(tmp_path / "lie.safetensors", lie, "resnet_tiny", ["a", "b"], spec)
    with pytest.raises(ModelError, match="unexpected keys 'layer2.0.shortcut"):
        load_model_file(tmp_path / "lie.safetensors")


def test_a_seeded_model_starts_from_the_same_weights_whatever_ran_before() -> None:
    torch.manual_seed(1)
    first = create_model("resnet_tiny", num_classes=3, seed=7).state_dict()
    torch.manual_seed(2)
    torch.rand(100)
    state = torch.get_rng_state()
    second = create_model("resnet_tiny", num_classes=3, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = create_model("resnet_tiny", num_classes=3, seed=8).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
