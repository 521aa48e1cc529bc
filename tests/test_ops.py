"""The op table (cnnmod.engine.ops), and models written the way users write them.

Each user-style model is traced by cnnmod equal to the eager model on the embedded Fashion-MNIST test images,
and the classifier composed from its modules (variant bi, rho 0) predicts what the parent predicts. The
tracer, backtracking and the store read one table: an operation added to it is supported by all three, one
outside it is refused by `Parent.from_model` before any work, naming the layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import cnnmod
from cnnmod.engine import ops
from cnnmod.engine.backtrack import backtrack
from cnnmod.engine.decompose import DecomposeConfig, decompose
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import ModuleSet, Parent
from cnnmod.engine.trace import trace_model
from cnnmod.errors import StoreError, TraceError
from cnnmod.storage.graphio import graph_from_data, graph_to_data
from cnnmod.storage.store import load_store, save_store
from cnnmod.zoo import create_model, list_models, model_info

SPEC = InputSpec.default((28, 28), 1)
Fmnist = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]


@pytest.fixture(scope="module")
def fmnist() -> Fmnist:
    """The embedded sample: 2,000 training and 1,000 test images (uint8 NHWC), 10 classes."""
    with np.load(Path(cnnmod.__file__).parent / "assets" / "fmnist-sample.npz") as d:
        return d["x_train"], d["y_train"].astype(np.int64), d["x_test"], [str(c) for c in d["classes"]]


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """`make()` with seeded weights and BatchNorm statistics that are not the identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _parent_equal_to_eager(model: nn.Module, data: Fmnist) -> Parent:
    """Trace `model`; its graph and `Parent.logits` (raw uint8 images in) equal the eager model on every test
    image (up to BatchNorm folding's rounding)."""
    _, _, x_test, classes = data
    parent = Parent.from_model(model, SPEC, classes, "user")
    x = SPEC.prepare(x_test)
    with torch.no_grad():
        eager = model(x)
        traced = parent.model.graph(x)
    assert torch.allclose(traced, eager, rtol=1e-5, atol=1e-5)
    logits = parent.logits(x_test)
    assert torch.allclose(logits, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), eager.argmax(1))
    return parent


def _composed_equal_to_parent(parent: Parent, data: Fmnist, **config: Any) -> ModuleSet:
    """Decompose (variant bi, rho 0 unless told) and check the composed vote on every test image."""
    x_train, y_train, x_test, _ = data
    modules, _ = decompose(parent, x_train, y_train, DecomposeConfig(samples_per_class=200, **config),
                           progress=False)
    assert modules.config["variant"] == config.get("variant", "bi") and modules.config["rho"] == 0
    composed = modules.scores(x_test).argmax(1)
    assert torch.equal(composed, parent.logits(x_test).argmax(1))
    assert float(modules.jaccard().max()) < 1.0, "backtracking and CI should remove some nodes"
    return modules


# ---------------------------------------------------------------------------------------------------------
# Models in the styles users write.


class VGGView(nn.Module):
    """VGG-style: conv features, `x.view(x.size(0), -1)`, two dense layers with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(8 * 7 * 7, 32), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)  # type: ignore[no-any-return]


class PreActCat(nn.Module):
    """Two branches concatenated, then BatchNorm and ReLU (pre-activation): a BatchNorm no conv precedes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 5, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x), self.b(x)], 1)
        x = self.conv(F.relu(self.bn(x)))
        x = F.relu(self.bn2(x))
        return self.fc(torch.flatten(self.pool(x), 1))  # type: ignore[no-any-return]


class Grouped(nn.Module):
    """Depthwise, grouped and pointwise convolutions, global average pooling by `mean`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.depthwise(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.pointwise(x))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock: one `nn.ReLU(inplace=True)` called twice, `out += identity`."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out  # type: ignore[no-any-return]


class TorchvisionResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TorchvisionBlock(8, 8, 1), TorchvisionBlock(8, 8, 1))
        self.layer2 = nn.Sequential(TorchvisionBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)  # type: ignore[no-any-return]


class SqueezeHead(nn.Module):
    """`.squeeze()` before the head: a batch of one would lose its batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(self.pool(x).squeeze())  # type: ignore[no-any-return]


class Flattened(nn.Module):
    """`nn.Flatten()` or `torch.flatten(x, 1)` between a conv and a hidden dense layer."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(1, 4, 5, stride=3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = self.flatten(x) if self.form == "module" else torch.flatten(x, 1)
        return self.head(F.relu(self.fc(x)))  # type: ignore[no-any-return]


class Reshaping(nn.Module):
    """nn.ZeroPad2d, `.expand`, `.clone`, torch.transpose, `.permute`, `.reshape`."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.conv = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 15 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 4, -1, -1).clone()
        x = torch.transpose(x, 2, 3)
        x = F.relu(self.conv(self.pad(x)))
        x = x.permute(0, 1, 3, 2)
        return self.fc(x.reshape(x.size(0), -1))  # type: ignore[no-any-return]


def test_vgg_with_view_after_conv_features(fmnist: Fmnist) -> None:
    parent = _parent_equal_to_eager(_seeded(VGGView), fmnist)
    _composed_equal_to_parent(parent, fmnist)


def test_prepared_images_are_not_channels_last(fmnist: Fmnist) -> None:
    """A one-channel NHWC batch permuted to NCHW counts as contiguous, yet convolutions answered channels-last
    and `x.view(x.size(0), -1)` failed: `prepare` hands over the strides of a fresh NCHW tensor."""
    x = SPEC.prepare(fmnist[2][:4])
    assert x.stride() == (28 * 28, 28 * 28, 28, 1)
    out = nn.Conv2d(1, 3, 3)(x)
    assert out.is_contiguous() and out.view(4, -1).shape == (4, 3 * 26 * 26)


def test_batchnorm_after_cat_stays_in_the_graph(fmnist: Fmnist) -> None:
    parent = _parent_equal_to_eager(_seeded(PreActCat), fmnist)
    bns = [m for m in parent.model.graph.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1, "the BatchNorm after cat has no conv to fold into; the one after `conv` is folded"
    _composed_equal_to_parent(parent, fmnist)


def test_depthwise_and_grouped_convolutions(fmnist: Fmnist) -> None:
    parent = _parent_equal_to_eager(_seeded(Grouped), fmnist)
    _composed_equal_to_parent(parent, fmnist)
    # MC-BI through a depthwise conv is exact: one kept node of its output needs its own channel's 3x3 window
    stem, depthwise, *rest = (s.name for s in parent.model.sites["relu"])
    masks = {name: torch.ones(1, *s.shape, dtype=torch.bool) for s in parent.model.sites["relu"]
             for name in [s.name]}
    masks[depthwise] = torch.zeros_like(masks[depthwise])
    masks[depthwise][0, 3, 10, 10] = True
    kept, _ = backtrack(parent.model, masks, torch.ones(1, 12, dtype=torch.bool), through_conv=True)
    expected = torch.zeros(1, 8, 28, 28, dtype=torch.bool)
    expected[0, 3, 9:12, 9:12] = True
    assert torch.equal(kept[stem], expected)


def test_torchvision_resnet_with_one_inplace_relu_per_block(fmnist: Fmnist) -> None:
    model = _seeded(TorchvisionResNet)
    parent = _parent_equal_to_eager(model, fmnist)
    graph = parent.model.graph
    assert not any(isinstance(m, nn.BatchNorm2d) for m in graph.modules())
    assert "iadd" not in graph.code and "inplace = True" not in graph.code
    # the stem's ReLU and each block's shared ReLU at both of its call sites are sites
    assert len(parent.model.sites["relu"]) == 1 + 2 * 3
    assert model.layer1[0].relu.inplace, "the user's model is untouched"
    _composed_equal_to_parent(parent, fmnist)


def test_squeeze_before_the_head(fmnist: Fmnist) -> None:
    parent = _parent_equal_to_eager(_seeded(SqueezeHead), fmnist)
    modules = _composed_equal_to_parent(parent, fmnist)
    # one class alone is backtracked as a batch of one class: `.squeeze()` must not lose that batch
    x_train, y_train, _, classes = fmnist
    alone, _ = decompose(parent, x_train, y_train, DecomposeConfig(samples_per_class=200), classes=[classes[8]],
                         progress=False)
    for site in modules.sites:
        assert bool(alone.masks[site.name].any())
        assert torch.equal(alone.masks[site.name][0], modules.masks[site.name][8])
    # nor is any batch of one run for inference: one image alone, or one past a full batch
    x_test = fmnist[2]
    every = parent.logits(x_test[:257], batch_size=64)
    assert torch.allclose(parent.logits(x_test[:257], batch_size=256), every, atol=1e-6)
    assert torch.allclose(parent.logits(x_test[:1]), every[:1], atol=1e-6)
    assert torch.allclose(modules.scores(x_test[:1]), modules.scores(x_test[:2])[:1], atol=1e-6)
    assert torch.allclose(alone.scores(x_test[:1]), modules.scores(x_test[:1])[:, 8:9], atol=1e-6)


@pytest.mark.parametrize("form", ["module", "function"])
def test_flatten_forms(form: str, fmnist: Fmnist) -> None:
    parent = _parent_equal_to_eager(_seeded(lambda: Flattened(form)), fmnist)
    _composed_equal_to_parent(parent, fmnist)


def test_pad_clone_expand_transpose_permute_are_supported_end_to_end(fmnist: Fmnist, tmp_path: Path) -> None:
    parent = _parent_equal_to_eager(_seeded(Reshaping), fmnist)
    modules = _composed_equal_to_parent(parent, fmnist)
    assert modules.config["conservative_ops"] == []
    save_store(tmp_path / "store", modules)
    loaded = load_store(tmp_path / "store").modules
    desc = json.loads(json.dumps(graph_to_data(loaded.parent.model.graph)[0]))
    targets = {n["target"] for n in desc["nodes"]}
    assert {"expand", "clone", "torch.transpose", "permute", "reshape"} <= targets
    assert "torch.nn.ZeroPad2d" in {m["type"] for m in desc["modules"].values()}
    x_test = fmnist[2]
    assert torch.equal(loaded.scores(x_test), modules.scores(x_test))


class Tuples(nn.Module):
    """Operations that return tuples: `x.chunk(2, 1)` (exact through each part), and a max-pool returning its
    indices (no exact stand-in: conservative, recorded under the pool's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.conv(x)).chunk(2, 1)
        x, _ = self.pool(a - b)
        return self.fc(F.relu(x).flatten(1))  # type: ignore[no-any-return]


def test_tuple_outputs_chunk_and_pool_indices(fmnist: Fmnist, tmp_path: Path) -> None:
    parent = _parent_equal_to_eager(_seeded(Tuples), fmnist)
    modules = _composed_equal_to_parent(parent, fmnist)
    assert modules.config["conservative_ops"] == ["pool"]
    save_store(tmp_path / "store", modules)
    assert torch.equal(load_store(tmp_path / "store").modules.scores(fmnist[2][:20]), modules.scores(fmnist[2][:20]))


@pytest.mark.parametrize("name", list_models("*tiny*"))
def test_zoo_traced_by_cnnmod_equals_eager(name: str) -> None:
    """Every zoo architecture (tiny variant, random weights) through cnnmod's own tracer: in-place rewrites,
    BatchNorm folding, the op table's checks; exact without BatchNorm."""
    info = model_info(name)
    model = _seeded(lambda: create_model(name, 10, seed=0))
    traced = trace_model(model, (info.in_channels, *info.input_size))
    x = torch.randn(8, info.in_channels, *info.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, out = model(x), traced.graph(x)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5) if has_bn else torch.equal(out, eager)
    assert traced.sites["relu"] and traced.sites["conv"]


# ---------------------------------------------------------------------------------------------------------
# One table: refused everywhere outside it, supported everywhere once added.


class Flipped(nn.Module):
    """Test-time flip averaging inside the model: `torch.flip` is not in the table."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = x + torch.flip(x, [3])
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


_TABLE = ops.TABLE


def _with_flip(monkeypatch: pytest.MonkeyPatch, passes: ops.Pass, **kw: Any) -> None:
    """cnnmod's table plus `torch.flip`, for this test only."""
    op = ops.Op("function", torch.flip, "torch.flip", passes, **kw)
    monkeypatch.setattr(ops, "TABLE", _TABLE.with_ops(op))


@pytest.mark.parametrize("passes", [ops.Pass.EXACT, ops.Pass.CONSERVATIVE])
def test_an_op_added_to_the_table_is_supported_by_trace_backtrack_and_store(
    passes: ops.Pass, fmnist: Fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _seeded(Flipped)
    with pytest.raises(TraceError, match=r"^layer flip \(flip\) is not an operation cnnmod supports"):
        Parent.from_model(model, SPEC, fmnist[3])
    _with_flip(monkeypatch, passes)
    parent = _parent_equal_to_eager(model, fmnist)
    modules = _composed_equal_to_parent(parent, fmnist)
    assert modules.config["conservative_ops"] == ([] if passes is ops.Pass.EXACT else ["flip"])
    save_store(tmp_path / "store", modules)
    assert torch.equal(load_store(tmp_path / "store").modules.scores(fmnist[2][:50]), modules.scores(fmnist[2][:50]))
    monkeypatch.undo()  # the same store, read with the table that lacks the op
    with pytest.raises(StoreError, match=r"torch\.flip.*not a storable function"):
        load_store(tmp_path / "store")


def test_exact_and_conservative_passes_differ_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through an exact flip the needed mask is mirrored; a conservative one needs every input node."""
    from fixtures.nets import plain_spec

    class Mirror(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flip(F.relu(self.conv(x)), [3]).flatten(1))

    need = torch.tensor([[True, False, False], [False, False, True]])
    for passes, expected in [(ops.Pass.EXACT, need.flip(1)), (ops.Pass.CONSERVATIVE, torch.ones(2, 3, dtype=bool))]:
        _with_flip(monkeypatch, passes)
        parent = Parent.from_model(Mirror(), plain_spec((1, 3)), ["a", "b"])
        relu = parent.model.sites["relu"][0].name
        masks, _ = backtrack(parent.model, {relu: torch.ones(2, 1, 1, 3, dtype=torch.bool)}, need, True)
        assert torch.equal(masks[relu].view(2, 3), expected)


def test_backtracking_failure_is_an_error_naming_the_layer(fmnist: Fmnist, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in that does not fit is an error, never a silent 'keep everything'."""
    _with_flip(monkeypatch, ops.Pass.EXACT, stand_in=lambda node, module: lambda x, dims: x.sum(1))
    parent = Parent.from_model(_seeded(Flipped), SPEC, fmnist[3])
    with pytest.raises(TraceError, match=r"cannot backtrack through layer flip \(flip\): its stand-in gives"):
        decompose(parent, fmnist[0], fmnist[1], DecomposeConfig(samples_per_class=5), progress=False)


class DilatedPool(nn.Module):
    """A dilated max-pool has no exact stand-in: backtracked conservatively, and recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, dilation=2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.pool(F.relu(self.conv(x)))).flatten(1))  # type: ignore[no-any-return]


def test_conservative_ops_are_recorded_stored_and_inspected(fmnist: Fmnist, tmp_path: Path,
                                                            cnnmod_cli: Callable[..., Any]) -> None:
    parent = _parent_equal_to_eager(_seeded(DilatedPool), fmnist)
    for variant in ("bln", "bi"):
        modules = _composed_equal_to_parent(parent, fmnist, variant=variant)
        assert modules.config["conservative_ops"] == ["pool"]
    save_store(tmp_path / "store", modules)
    assert load_store(tmp_path / "store").modules.config["conservative_ops"] == ["pool"]
    result = cnnmod_cli("inspect", tmp_path / "store")
    assert result.exit_code == 0, result.stderr
    assert "backtracked conservatively (every input kept): pool" in result.stdout
    result = cnnmod_cli("inspect", tmp_path / "store", "--json")
    assert json.loads(result.stdout)["config"]["conservative_ops"] == ["pool"]


class _Unsupported(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm([4, 26, 26])
        self.fc = nn.Linear(4 * 26 * 26, 10)
        self.bad = nn.Linear(7, 7)  # called on the wrong shape: running the model would fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if self.kind == "layernorm":
            x = self.norm(x)
        elif self.kind == "attribute":
            x = x.mT
        elif self.kind == "sigmoid":
            x = torch.sigmoid(x)
        elif self.kind == "batch-mixing":
            x = x - x.mean(0)
        if self.kind != "batch-mixing":
            x = self.bad(x)
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("layernorm", r"^layer norm \(LayerNorm\) is not an operation cnnmod supports"),
        ("attribute", r"^layer getattr_1 \(getattr\) reads attribute \('mT',\)"),
        ("sigmoid", r"^layer sigmoid \(sigmoid\) is not a ReLU"),
        ("batch-mixing", r"^layer mean \(\.mean\(\)\) mixes the samples of a batch"),
    ],
)
def test_unsupported_operations_are_refused_before_any_work(kind: str, message: str) -> None:
    """Named in one line, before the model runs (it would fail on the wrong-shaped `bad` layer)."""
    with pytest.raises(TraceError, match=message) as info:
        Parent.from_model(_Unsupported(kind).eval(), SPEC, [str(i) for i in range(10)])
    assert "\n" not in str(info.value)


def test_every_module_type_in_the_table_is_stored_and_rebuilt() -> None:
    examples = [
        nn.ReLU(), nn.Linear(3, 4), nn.Flatten(), nn.Unflatten(1, (2, 2)), nn.Identity(), nn.Dropout(0.1),
        nn.Upsample(scale_factor=2.0, mode="nearest"),
        nn.Conv1d(2, 4, 3), nn.Conv2d(2, 4, 3, groups=2, padding_mode="reflect", padding=1),
        nn.Conv3d(2, 4, 3, bias=False), nn.MaxPool1d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool3d(2),
        nn.AvgPool1d(2), nn.AvgPool2d(2, divisor_override=3), nn.AvgPool3d(2), nn.AdaptiveAvgPool1d(1),
        nn.AdaptiveAvgPool2d((2, 3)), nn.AdaptiveAvgPool3d(1), nn.AdaptiveMaxPool1d(1), nn.AdaptiveMaxPool2d(1),
        nn.AdaptiveMaxPool3d(1), nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.Dropout1d(),
        nn.Dropout2d(), nn.Dropout3d(), nn.ZeroPad1d(1), nn.ZeroPad2d((1, 2, 3, 4)), nn.ZeroPad3d(1),
        nn.ReflectionPad1d(1), nn.ReflectionPad2d(1), nn.ReflectionPad3d(1), nn.ReplicationPad1d(1),
        nn.ReplicationPad2d(1), nn.ReplicationPad3d(1), nn.ConstantPad1d(1, 0.5), nn.ConstantPad2d(1, -1.0),
        nn.ConstantPad3d(1, 2.0),
    ]
    assert {type(m) for m in examples} == {op.target for op in ops.TABLE.ops if op.kind == "module"}
    for module in examples:
        gm = torch.fx.symbolic_trace(nn.Sequential(module))
        desc, tensors = graph_to_data(gm)
        loaded = graph_from_data(json.loads(json.dumps(desc)), tensors)
        assert type(loaded.get_submodule("0")) is type(module)
        assert graph_to_data(loaded)[0] == desc
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.get_submodule("0").state_dict()[key], value)


def test_the_table_refuses_aliases() -> None:
    """F.relu_ is torch.relu_, F.conv2d is torch.conv2d: one entry per function object, one name each."""
    relu_ = ops.TABLE.for_target("function", F.relu_)
    assert relu_ is not None and relu_.name == "torch.relu_"
    with pytest.raises(ValueError, match="twice"):
        ops.TABLE.with_ops(ops.Op("function", torch.relu_, "torch.nn.functional.relu_", ops.Pass.ELEMENTWISE))
