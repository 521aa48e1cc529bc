"""Tracing a parent: BatchNorm folding is exact, ReLU sites are found in every form, unsupported models are
refused with a TraceError that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnmod.engine.modules import Parent
from cnnmod.errors import CnnmodError, TraceError
from fixtures.nets import parent_of, plain_spec


def _randomise_bn(bn: nn.Module, seed: int) -> None:
    """Give a BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))


class ConvBN(nn.Module):
    def __init__(self, affine: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(3, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 5 * 5, 4)
        _randomise_bn(self.bn, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))).flatten(1))


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 5 * 5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 4)
        _randomise_bn(self.bn, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.fc(x.flatten(1)))))


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: ConvBN(), id="conv-bn"),
        pytest.param(lambda: ConvBN(affine=False, bias=True), id="conv-bias-bn-no-affine"),
        pytest.param(lambda: LinearBN(), id="linear-bn1d"),
    ],
)
def test_batchnorm_folding_is_exact(make) -> None:
    torch.manual_seed(0)
    model = make().eval()
    parent = parent_of(model, (5, 5), channels=2)
    x = torch.randn(8, 2, 5, 5)
    with torch.no_grad():
        assert torch.allclose(parent.model.graph(x), model(x), atol=1e-5)
    assert not _has_bn(parent.model.graph), "BatchNorm should be folded away"
    assert _has_bn(model), "the user's model must not be modified"


def test_tracing_leaves_the_users_model_alone() -> None:
    torch.manual_seed(0)
    model = ConvBN().train()
    parent_of(model, (5, 5), channels=2)
    assert model.training
    assert model.relu.inplace
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_traced_model_equals_eager_exactly_without_bn() -> None:
    from fixtures.nets import RandomConvNet

    model = RandomConvNet().eval()
    parent = parent_of(model, (6, 6))
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(parent.model.graph(x), model(x))


class AllReluForms(nn.Module):
    """Six ReLU forms, each feeding the next; every one is a site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu_module = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x.flatten(1))
        x = self.relu_module(x)
        x = self.relu_inplace(x + 1)
        x = F.relu(x - 1, inplace=True)
        x = torch.relu_(x - 0.5)
        x = (x - 0.25).relu_()
        x = torch.relu(x - 0.1)
        x = (x + 0.1).relu()
        return self.head(x)


def test_relu_forms_are_sites_and_inplace_forms_are_made_out_of_place() -> None:
    torch.manual_seed(0)
    model = AllReluForms().eval()
    parent = parent_of(model, (1, 4))
    sites = parent.model.sites["relu"]
    assert len(sites) == 7
    assert all(s.shape == (4,) for s in sites)
    # conv sites: the hidden linear layer only, never the head
    assert [s.name for s in parent.model.sites["conv"]] == ["fc"]
    code = parent.model.graph.code
    assert "relu_(" not in code and "inplace = True" not in code
    x = torch.randn(6, 1, 1, 4)
    with torch.no_grad():
        assert torch.equal(parent.model.graph(x), model(x))


class StatementRelu(nn.Module):
    """`x.relu_()` used as a statement: its effect on x is what the model relies on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x.relu_()
        return self.head(x.flatten(1))


def test_statement_form_inplace_relu_keeps_its_effect() -> None:
    torch.manual_seed(0)
    model = StatementRelu().eval()
    parent = parent_of(model, (2, 2))
    x = torch.randn(6, 1, 2, 2)
    with torch.no_grad():
        assert torch.allclose(parent.model.graph(x), model(x))


def test_head_may_be_functional_linear() -> None:
    class FunctionalHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.w = nn.Parameter(torch.arange(6.0).view(2, 3))
            self.b = nn.Parameter(torch.tensor([0.5, -0.5]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.relu(self.fc(x.flatten(1))), self.w, self.b)

    parent = parent_of(FunctionalHead(), (1, 3))
    assert torch.equal(parent.model.head.weight, torch.arange(6.0).view(2, 3))
    assert torch.equal(parent.model.head.bias, torch.tensor([0.5, -0.5]))
    assert [s.name for s in parent.model.sites["conv"]] == ["fc"]


class WithActivation(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 3)
        self.act = nn.GELU()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        h = self.act(h) if self.kind == "gelu" else torch.sigmoid(h)
        return self.head(h)


@pytest.mark.parametrize(("kind", "named"), [("gelu", "act (GELU)"), ("sigmoid", "sigmoid")])
def test_non_relu_activation_is_refused_naming_the_layer(kind: str, named: str) -> None:
    with pytest.raises(TraceError, match="not a ReLU") as info:
        parent_of(WithActivation(kind), (1, 3), classes=["a", "b"])
    assert named in str(info.value)


def test_data_dependent_control_flow_is_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.fc(x.flatten(1)))
            if h.sum() > 0:
                h = h * 2
            return self.head(h)

    with pytest.raises(TraceError, match="cannot trace Branchy"):
        Parent.from_model(Branchy(), plain_spec((1, 3)), ["a", "b"])


def test_model_ending_in_softmax_is_refused() -> None:
    class Softmaxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softmax(self.head(F.relu(self.fc(x.flatten(1)))), dim=1)

    with pytest.raises(TraceError, match="softmax"):
        Parent.from_model(Softmaxed(), plain_spec((1, 3)), ["a", "b"])


def test_model_not_ending_in_linear_is_refused() -> None:
    class ConvOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x)).mean((2, 3))

    with pytest.raises(TraceError, match="must come from a Linear"):
        Parent.from_model(ConvOut(), plain_spec((2, 2)), ["a", "b"])


def test_model_without_relu_is_refused() -> None:
    with pytest.raises(TraceError, match="no relu sites"):
        Parent.from_model(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), plain_spec((1, 3)), ["a", "b"])


def test_class_names_must_match_the_head() -> None:
    from fixtures.nets import DenseNet

    with pytest.raises(CnnmodError, match="4 outputs but 3 class names"):
        Parent.from_model(DenseNet(), plain_spec((1, 5)), ["a", "b", "c"])


class SharedInplaceRelu(nn.Module):
    """One `nn.ReLU(inplace=True)` at two call sites, each input read again after the call: in eager, the
    reads see the ReLU's output. Tracing once switched `inplace` off at the first site for both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.relu(a)
        c = self.conv2(b) + a  # `a` is b now
        d = self.relu(c)
        return self.head((d + c).flatten(1))  # `c` is d now


def test_shared_inplace_relu_traces_equal_to_eager() -> None:
    torch.manual_seed(0)
    model = SharedInplaceRelu().eval()
    parent = parent_of(model, (6, 6))
    assert len(parent.model.sites["relu"]) == 2
    x = torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(parent.model.graph(x), model(x))
    assert model.relu.inplace


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_model_is_traced_in_its_own_dtype(dtype: torch.dtype) -> None:
    """The shape check runs in the model's dtype (it used to feed float32 and blame the model); the parent
    computes in float32 from the same weights."""
    from fixtures.nets import RandomConvNet

    model = RandomConvNet().eval().to(dtype)
    parent = Parent.from_model(model, plain_spec((6, 6)), ["a", "b", "c", "d"])
    assert all(p.dtype == torch.float32 for p in parent.model.graph.parameters())
    assert parent.model.head.weight.dtype == torch.float32
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(parent.model.graph(x), model.float()(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_is_traced_on_its_device() -> None:
    from fixtures.nets import RandomConvNet

    model = RandomConvNet().eval().cuda()
    parent = Parent.from_model(model, plain_spec((6, 6)), ["a", "b", "c", "d"])
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert torch.allclose(parent.model.graph(x), model(x.cuda()).cpu(), atol=1e-5)
    assert torch.allclose(parent.logits(x.numpy(), device="cuda"), parent.logits(x.numpy(), device="cpu"), atol=1e-5)


def test_inplace_write_into_a_view_is_refused() -> None:
    """`torch.relu_` on a slice also changes the tensor it slices; the traced graph could not say so."""

    class SliceRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 1)
            self.head = nn.Linear(3 * 2 * 2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            torch.relu_(a[:, :2])
            return self.head(F.relu(a).flatten(1) - a.flatten(1))

    torch.manual_seed(0)
    with pytest.raises(TraceError, match="differs from the model .*in-place"):
        parent_of(SliceRelu().eval(), (2, 2), classes=["a", "b"])


def test_tracing_uses_inference_semantics() -> None:
    """A model handed over in training mode is traced in eval mode (`if self.training` branches too)."""

    class TrainBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.fc(x.flatten(1)))
            if self.training:
                h = h * 0
            return self.head(h)

    model = TrainBranch().train()
    parent = parent_of(model, (1, 3), classes=["a", "b"])
    x = torch.randn(4, 1, 1, 3)
    with torch.no_grad():
        assert torch.equal(parent.model.graph(x), model.eval()(x))
