"""Saving a traced parent as data and loading it back without the user's code and without unpickling."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from cnnmod.errors import StoreError
from cnnmod.storage.fileio import atomic_save_safetensors, load_safetensors, sha256_file
from cnnmod.storage.graphio import graph_from_data, graph_to_data, load_graph, save_graph


class Block(nn.Module):
    """A CIFAR ResNet basic block with an option-A (pad) shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.downsample = stride != 1 or cin != cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)) if self.downsample else x
        out += shortcut
        return F.relu(out)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 8, 2))
        self.register_buffer("channel_mask", (torch.arange(8) % 3 != 0).float().view(1, 8, 1, 1))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu_(self.stem(x)))
        x = self.layer1(x) * self.channel_mask
        x = x + x[..., ::1].mul(0.5)
        a = F.adaptive_avg_pool2d(x, 1)
        a = a.view(a.size(0), -1)
        b = torch.flatten(F.adaptive_max_pool2d(x, (1, 1)), 1) * self.scale
        n = x.shape[0]
        h = torch.cat([a, b.reshape(n, -1)], dim=1)
        return self.fc(self.drop(h))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def traced() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(_net())


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _rewrite(path: Path, edit: Any) -> None:
    """Apply `edit` to the stored description of the file at `path` and write it back."""
    tensors, meta = load_safetensors(path, None)
    desc = json.loads(meta["cnnmod.graph"])
    edit(desc, tensors)
    atomic_save_safetensors(path, tensors, {"cnnmod.graph": json.dumps(desc)})


def test_round_trip_is_exact(traced: torch.fx.GraphModule, x: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "parent.safetensors"
    digest = save_graph(traced, path)
    assert digest == sha256_file(path)
    loaded = load_graph(path, digest)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), traced(x))
    # Nested names survive, and so does everything the description says.
    assert isinstance(loaded.get_submodule("layer1.0.conv1"), nn.Conv2d)
    assert isinstance(loaded.get_submodule("layer1.1.bn1"), nn.BatchNorm2d)
    assert graph_to_data(loaded)[0] == graph_to_data(traced)[0]
    assert isinstance(loaded.scale, nn.Parameter) and loaded.scale.requires_grad
    assert "channel_mask" in dict(loaded.named_buffers())
    assert not any(p.is_meta for p in loaded.parameters())


def test_round_trip_covers_the_ops_asked_for(traced: torch.fx.GraphModule) -> None:
    desc, tensors = graph_to_data(traced)
    targets = {n["target"] for n in desc["nodes"]}
    assert {
        "_operator.getitem",
        "_operator.add",
        "torch.nn.functional.pad",
        "torch.nn.functional.relu",
        "torch.relu_",
        "torch.flatten",
        "torch.cat",
        "builtins.getattr",
        "torch.nn.functional.adaptive_avg_pool2d",
        "view",
        "size",
        "channel_mask",
    } <= targets
    types = {m["type"] for m in desc["modules"].values()}
    assert {"torch.nn.MaxPool2d", "torch.nn.ReLU", "torch.nn.Dropout", "torch.nn.BatchNorm2d"} <= types
    # Slices, Ellipsis, tuples and lists are told apart in the JSON.
    text = json.dumps(desc)
    assert '{"slice": [null, null, 2]}' in text and '{"ellipsis": true}' in text
    assert '{"list": [' in text and '{"tuple": [0, 0, 0, 0, 2, 2]}' in text
    assert "layer1.0.conv1.weight" in tensors and "scale" in tensors


def test_training_mode_and_dtype_survive(tmp_path: Path) -> None:
    net = _net().double().train()
    gm = torch.fx.symbolic_trace(net)
    gm.layer1.eval()
    save_graph(gm, tmp_path / "p.safetensors")
    loaded = load_graph(tmp_path / "p.safetensors")
    assert loaded.training and not loaded.get_submodule("layer1.0.bn1").training
    assert loaded.fc.weight.dtype == torch.float64
    loaded.eval()
    gm.eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_special_floats_and_dtypes_round_trip(tmp_path: Path) -> None:
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            a = F.pad(x, (1, 1), value=-math.inf)
            b = F.pad(x, (0, 1), value=math.nan)
            c = torch.sum(x, dim=(0, 1), dtype=torch.float64)
            return a, b, c

    gm = torch.fx.symbolic_trace(Odd())
    save_graph(gm, tmp_path / "odd.safetensors")
    loaded = load_graph(tmp_path / "odd.safetensors")
    x = torch.randn(2, 3)
    (a0, b0, c0), (a1, b1, c1) = gm(x), loaded(x)
    assert torch.equal(a1, a0) and a1[0, 0] == -math.inf
    assert torch.equal(b1.isnan(), b0.isnan()) and b1[0, -1].isnan()
    assert c1.dtype == torch.float64 and torch.equal(c1, c0)


def test_loads_in_a_fresh_process_without_user_code(
    traced: torch.fx.GraphModule, x: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "parent.safetensors"
    digest = save_graph(traced, path)
    with torch.no_grad():
        atomic_save_safetensors(tmp_path / "io.safetensors", {"x": x, "y": traced(x)})
    code = (
        "import sys, torch\n"
        "from cnnmod.storage.graphio import load_graph\n"
        "from cnnmod.storage.fileio import load_safetensors\n"
        f"gm = load_graph({str(path)!r}, {digest!r})\n"
        f"io, _ = load_safetensors({str(tmp_path / 'io.safetensors')!r}, None)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(gm(io['x']), io['y'])\n"
        "assert 'test_graphio' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_unknown_module_type_is_refused_at_save(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU())
    gm = torch.fx.symbolic_trace(net)
    with pytest.raises(StoreError, match=r"node '_1'.*torch\.nn.*GELU.*only standard layers"):
        save_graph(gm, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_custom_leaf_module_is_refused_at_save(tmp_path: Path) -> None:
    class Swish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

    class Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Swish) or super().is_leaf_module(m, qualname)

    class WithSwish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = Swish()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x)

    net = WithSwish()
    gm = torch.fx.GraphModule(net, Leafy().trace(net))
    with pytest.raises(StoreError, match=r"node 'act'.*Swish.*cannot be stored") as info:
        save_graph(gm, tmp_path / "p.safetensors")
    assert "\n" not in str(info.value)


def test_unknown_function_is_refused_at_save(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(lambda x: torch.sigmoid(x) + 1)
    with pytest.raises(StoreError, match=r"node 'sigmoid'.*torch.*sigmoid"):
        save_graph(gm, tmp_path / "p.safetensors")


def test_tampered_file_fails_the_hash(traced: torch.fx.GraphModule, tmp_path: Path) -> None:
    path = tmp_path / "parent.safetensors"
    digest = save_graph(traced, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit of the last tensor: safetensors itself cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"parent\.safetensors.*sha256"):
        load_graph(path, digest)


def test_damaged_header_is_store_error(traced: torch.fx.GraphModule, tmp_path: Path) -> None:
    path = tmp_path / "parent.safetensors"
    save_graph(traced, path)
    data = bytearray(path.read_bytes())
    data[8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"parent\.safetensors"):
        load_graph(path)


def test_file_without_description_is_store_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    atomic_save_safetensors(path, {"a": torch.ones(2)})
    with pytest.raises(StoreError, match=r"plain\.safetensors.*no 'cnnmod.graph'"):
        load_graph(path)


def test_unknown_function_name_is_refused_without_importing(
    traced: torch.fx.GraphModule, tmp_path: Path
) -> None:
    path = tmp_path / "parent.safetensors"
    save_graph(traced, path)

    def edit(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        node = next(n for n in desc["nodes"] if n["op"] == "call_function")
        node["target"] = "cnnmod_evil_module.run"

    _rewrite(path, edit)
    with pytest.raises(StoreError, match=r"parent\.safetensors.*cnnmod_evil_module\.run.*not a storable"):
        load_graph(path)
    assert "cnnmod_evil_module" not in sys.modules


def _edited(traced: torch.fx.GraphModule, edit: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    desc, tensors = graph_to_data(traced)
    desc = copy.deepcopy(desc)
    edit(desc, tensors)
    return desc, tensors


def _node(desc: dict[str, Any], op: str) -> dict[str, Any]:
    return next(n for n in desc["nodes"] if n["op"] == op)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d, t: _node(d, "call_method").update(target="__reduce__"), "not a storable method"),
        (lambda d, t: _node(d, "placeholder").update(target="x=os.system('echo')"), "invalid input name"),
        (lambda d, t: _node(d, "get_attr").update(target='channel_mask").x; import os; ("'), "path"),
        (lambda d, t: _node(d, "call_module").update(target="forward"), "path"),
        (lambda d, t: _node(d, "call_function").update(kwargs={"a=1); import os; f(b": 1}), "keyword"),
        (lambda d, t: d["nodes"][1].update(args=[{"node": "output"}]), "not defined before"),
        (lambda d, t: d["nodes"].append(dict(d["nodes"][-1], name="output2")), "follows the output"),
        (lambda d, t: d["nodes"].pop(), "no output"),
        (lambda d, t: d["modules"]["stem"].update(type="torch.nn.GELU"), "not a storable layer"),
        (lambda d, t: d["modules"]["stem"]["config"].update(device="cuda"), "config with keys"),
        (lambda d, t: d["modules"]["stem"]["config"].update(out_channels=5), "does not fit"),
        (lambda d, t: t.pop("fc.bias"), "misses its tensor"),
        (lambda d, t: t.update(extra=torch.ones(1)), "does not use"),
        (lambda d, t: _node(d, "call_method")["args"].append({"eval": "1"}), "unknown kind"),
        (lambda d, t: d.update(version=99), "version 99"),
    ],
)
def test_inconsistent_description_is_store_error(
    traced: torch.fx.GraphModule, edit: Any, message: str
) -> None:
    desc, tensors = _edited(traced, edit)
    with pytest.raises(StoreError, match=message) as info:
        graph_from_data(desc, tensors)
    assert "\n" not in str(info.value)


def test_getattr_is_limited_to_tensor_attributes(traced: torch.fx.GraphModule) -> None:
    def edit(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        node = next(n for n in desc["nodes"] if n["target"] == "builtins.getattr")
        node["args"][1] = "__class__"

    desc, tensors = _edited(traced, edit)
    with pytest.raises(StoreError, match="reads attribute"):
        graph_from_data(desc, tensors)
