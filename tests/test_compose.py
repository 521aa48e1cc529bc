"""Running modules (masked forward, batched execution, scores), composing them, and the metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnmod.engine.compose import compose
from cnnmod.engine.decompose import DecomposeConfig, channel_heads, decompose
from cnnmod.engine.modules import ModuleSet
from cnnmod.errors import CnnmodError
from cnnmod.workflows.metrics import parameter_counts, precision_recall, topk_accuracy
from fixtures.nets import DenseNet, GapConvNet, RandomConvNet, parent_of, random_modules

# ---------------------------------------------------------------------------------------------------------
# Masked forward
# ---------------------------------------------------------------------------------------------------------



def by_hand(net: RandomConvNet, x: torch.Tensor, masks: list[torch.Tensor], w: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """RandomConvNet with masked nodes zeroed after each ReLU and the 2-row head: (B, 2)."""
    h = F.relu(net.conv1(x)) * masks[0]
    h = net.pool(h)
    h = F.relu(net.conv2(h)) * masks[1]
    h = F.relu(net.fc(h.flatten(1))) * masks[2]
    return h @ w.T + b


def test_module_network_is_the_masked_parent_with_a_two_row_head() -> None:
    net = RandomConvNet().eval()
    parent = parent_of(net, (6, 6))
    modules = random_modules(parent)
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = modules.network()(x)
        assert out.shape == (5, 4, 2)
        for m in range(4):
            masks = [modules.masks[s.name][m].float() for s in modules.sites]
            expected = by_hand(net, x, masks, modules.head_weight[m], modules.head_bias[m])
            assert torch.allclose(out[:, m], expected, atol=1e-6)
        # the masks matter: an all-kept module is the parent with channeled head, which differs here
        ones = [torch.ones(()) for _ in range(3)]
        full = by_hand(net, x, ones, modules.head_weight[0], modules.head_bias[0])
        assert not torch.allclose(out[:, 0], full, atol=1e-3)


def test_batched_network_equals_single_module_networks() -> None:
    parent = parent_of(RandomConvNet(), (6, 6))
    modules = random_modules(parent, keep=0.5, seed=1)
    x = torch.randn(7, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = modules.network()(x)
        for m, name in enumerate(modules.class_names):
            single = modules.select([name]).network()(x)
            assert single.shape == (7, 1, 2)
            assert torch.allclose(batched[:, m], single[:, 0], atol=1e-6)


def test_scores_are_softmax_or_logit_of_the_network_output() -> None:
    parent = parent_of(RandomConvNet(), (6, 6))
    modules = random_modules(parent)
    images = np.random.default_rng(0).normal(size=(9, 1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        out = modules.network()(torch.from_numpy(images))
    logits = modules.logits(images, batch_size=4, chunk=3)  # modules run 3 at a time, 1 image per batch
    soft = modules.scores(images, "softmax", batch_size=4)
    logit = modules.scores(images, "logit")
    assert torch.allclose(logits, out, atol=1e-6)
    assert soft.shape == logit.shape == (9, 4)
    assert torch.allclose(soft, out.softmax(-1)[..., 0], atol=1e-6)
    assert torch.allclose(logit, out[..., 0], atol=1e-6)
    with pytest.raises(CnnmodError, match="unknown scoring"):
        modules.scores(images, "probit")


def test_select_reorders_and_refuses_unknown_classes() -> None:
    parent = parent_of(RandomConvNet(), (6, 6))
    modules = random_modules(parent)
    two = modules.select(["c2", "c0"])
    assert two.class_names == ("c2", "c0")
    assert torch.equal(two.head_weight, modules.head_weight[[2, 0]])
    for k, v in two.masks.items():
        assert torch.equal(v, modules.masks[k][[2, 0]])
    with pytest.raises(CnnmodError, match="no module for class 'c9'"):
        modules.select(["c0", "c9"])


# ---------------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------------


def constant_modules(biases: list[tuple[float, float]], classes: list[str]) -> ModuleSet:
    """Modules over DenseNet whose outputs ignore the input: head weights 0, biases (z_c, z_uc) given."""
    parent = parent_of(DenseNet(classes=len(classes)), (1, 5), classes=classes)
    site = parent.model.sites["relu"][0]
    m = len(classes)
    return ModuleSet(parent, tuple(range(m)), (site,), {site.name: torch.ones(m, 5, dtype=torch.bool)},
                     torch.zeros(m, 2, 5), torch.tensor(biases))


IMAGES = np.zeros((3, 1, 1, 5), dtype=np.float32)


def test_voting_picks_the_highest_score_and_scoring_changes_the_winner() -> None:
    # cat: (z_c, z_uc) = (3, 2.9): logit 3, softmax sigmoid(0.1) = 0.525
    # dog: (1, -2):               logit 1, softmax sigmoid(3)   = 0.953
    # bird: (0, 0):               logit 0, softmax 0.5
    modules = constant_modules([(3.0, 2.9), (1.0, -2.0), (0.0, 0.0)], ["cat", "dog", "bird"])
    soft = compose([modules])
    assert soft.labels == ("cat", "dog", "bird")
    assert torch.allclose(soft.scores(IMAGES)[0], torch.sigmoid(torch.tensor([0.1, 3.0, 0.0])), atol=1e-6)
    assert soft.predict(IMAGES).tolist() == [1, 1, 1]  # dog
    logit = compose([modules], scoring="logit")
    assert torch.allclose(logit.scores(IMAGES)[0], torch.tensor([3.0, 1.0, 0.0]))
    assert logit.predict(IMAGES).tolist() == [0, 0, 0]  # cat
    # top-k over the composed scores: softmax ranks dog, cat, bird
    assert soft.scores(IMAGES).topk(2, dim=1).indices[0].tolist() == [1, 0]


def test_modules_from_two_parents_vote_together_under_their_labels() -> None:
    a = constant_modules([(0.0, 1.0), (2.0, 0.0)], ["cat", "dog"])       # 0.269, 0.881
    b = constant_modules([(1.0, 0.0), (5.0, 0.0)], ["cat", "truck"])     # 0.731, 0.993
    with pytest.raises(CnnmodError, match="label 'cat' is used by more than one module"):
        compose([a, b])
    classifier = compose([a, b], labels=["cat", "dog", "kitten", "truck"])
    assert len(classifier) == 4
    assert classifier.predict(IMAGES).tolist() == [3, 3, 3]
    without_truck = compose([a, b.select(["cat"])], labels=["cat", "dog", "kitten"])
    assert without_truck.predict(IMAGES).tolist() == [1, 1, 1]


def test_compose_refuses_bad_requests() -> None:
    a = constant_modules([(0.0, 1.0), (2.0, 0.0)], ["cat", "dog"])
    with pytest.raises(CnnmodError, match="3 labels given for 2 modules"):
        compose([a], labels=["x", "y", "z"])
    with pytest.raises(CnnmodError, match="unknown scoring"):
        compose([a], scoring="vote")
    with pytest.raises(CnnmodError, match="nothing to compose"):
        compose([])


def test_composed_modules_of_a_one_hot_parent_recognise_their_class() -> None:
    # DenseNet with head 3 * I: class k input activates unit k only, so module k scores highest on it.
    parent = parent_of(DenseNet(head=3 * torch.eye(4, 5)), (1, 5))
    x = -np.ones((4, 5), dtype=np.float32)
    x[np.arange(4), np.arange(4)] = 1.0
    images, labels = np.repeat(x, 2, axis=0).reshape(8, 1, 1, 5), np.repeat(np.arange(4), 2)
    modules, _ = decompose(parent, images, labels, DecomposeConfig(samples_per_class=2), progress=False)
    classifier = compose([modules])
    assert classifier.predict(images).tolist() == labels.tolist()
    assert topk_accuracy(classifier.scores(images), torch.from_numpy(labels), 1) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([2, 0, 0])
    assert topk_accuracy(scores, targets, 1) == pytest.approx(1 / 3)   # only row 1
    assert topk_accuracy(scores, targets, 2) == pytest.approx(2 / 3)   # row 0's 2 is second
    assert topk_accuracy(scores, targets, 5) == 1.0                    # k capped at 3 columns
    assert np.isnan(topk_accuracy(scores[:0], targets[:0], 1))


def test_precision_recall_by_hand() -> None:
    pred = torch.tensor([0, 0, 1, 2])
    targets = torch.tensor([0, 1, 1, 2])
    precision, recall = precision_recall(pred, targets, 4)
    # class 0: predicted twice, right once; class 1: predicted once (right), present twice; class 3: never
    assert precision == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert recall[:3] == pytest.approx([1.0, 0.5, 1.0]) and recall[3] is None  # class 3 has no samples


def test_jaccard_is_kept_over_all_nodes() -> None:
    parent = parent_of(RandomConvNet(), (6, 6))
    sites = parent.model.sites["relu"]  # (3,6,6) = 108, (4,3,3) = 36, (8,) = 8: 152 nodes
    masks = {s.name: torch.zeros(2, *s.shape, dtype=torch.bool) for s in sites}
    masks[sites[0].name][0, 0] = True   # module 0: one channel of site 0, 36 nodes
    masks[sites[2].name][0, :2] = True  # + 2 dense units = 38
    masks[sites[1].name][1] = True      # module 1: all of site 1, 36 nodes
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, [0, 1])
    modules = ModuleSet(parent, (0, 1), sites, masks, w, b)
    assert torch.allclose(modules.jaccard(), torch.tensor([38 / 152, 36 / 152]))
    full = dataclasses.replace(modules, masks={k: torch.ones_like(v) for k, v in masks.items()})
    assert torch.equal(full.jaccard(), torch.ones(2))


def gap_modules_masking_a_channel() -> ModuleSet:
    """Two modules of a GapConvNet parent: module 0 masks channel 1 of the first ReLU completely, module 1
    keeps everything."""
    parent = parent_of(GapConvNet(), (4, 4))
    sites = parent.model.sites["relu"]
    masks = {s.name: torch.ones(2, *s.shape, dtype=torch.bool) for s in sites}
    masks[sites[0].name][0, 1] = False
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, [0, 1])
    return ModuleSet(parent, (0, 1), sites, masks, w, b)


def test_parameter_counts_with_a_masked_conv_channel() -> None:
    # GapConvNet: conv1 (1->2, 3x3) -> relu a -> conv2 (2->2, 3x3) -> relu b -> GAP -> head (2->3).
    # Parent: conv1 2*9 + 2 = 20, conv2 2*2*9 + 2 = 38, head 3*2 + 3 = 9 -> 67.
    # Module 0 masks a's channel 1 completely:
    #   head: 2 rows x 2 inputs + 2 biases = 6
    #   conv1: 1 live output channel x 1 input channel x 9 + 1 bias = 10
    #   conv2: 2 live outputs x 1 live input channel x 9 + 2 biases = 20          -> 36
    # Module 1 keeps everything: 6 + (2*9 + 2) + (2*2*9 + 2) = 64.
    counts = parameter_counts(gap_modules_masking_a_channel())
    assert counts.parent == 67
    assert counts.kept == [36, 64]


def test_parameter_counts_parent_total_and_masking_a_channel_saves_its_weights() -> None:
    # The part of the count that does not involve the input layer: parent total 67 (see above), and masking
    # a's channel 1 saves at least conv2's 2 x 9 weights reading it.
    counts = parameter_counts(gap_modules_masking_a_channel())
    assert counts.parent == 67
    assert counts.kept[1] - counts.kept[0] >= 18
    assert all(k <= counts.parent for k in counts.kept)


def test_module_network_with_a_functional_linear_head() -> None:
    class FunctionalHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.w = torch.nn.Parameter(torch.arange(6.0).view(2, 3) / 6)
            self.b = torch.nn.Parameter(torch.tensor([0.5, -0.5]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.relu(self.fc(x.flatten(1))), self.w, self.b)

    torch.manual_seed(0)
    net = FunctionalHead().eval()
    parent = parent_of(net, (1, 3))
    x = torch.randn(4, 1, 1, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.tensor([[True, False, True], [False, True, True]])
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, [0, 1])
    modules = ModuleSet(parent, (0, 1), parent.model.sites["relu"], {"relu": masks}, w, b)
    with torch.no_grad():
        out = modules.network()(x)
        h = F.relu(net.fc(x.flatten(1)))
        for m in range(2):
            assert torch.allclose(out[:, m], (h * masks[m]) @ w[m].T + b[m], atol=1e-6)


def test_duplicate_class_names_are_refused_or_each_module_scores_as_itself() -> None:
    try:
        parent = parent_of(DenseNet(classes=3), (1, 5), classes=["a", "a", "b"])
    except CnnmodError:
        return  # refusing duplicate names is fine
    site = parent.model.sites["relu"][0]
    w, b = channel_heads(parent.model.head.weight, parent.model.head.bias, [0, 1, 2])
    modules = ModuleSet(parent, (0, 1, 2), (site,), {site.name: torch.ones(3, 5, dtype=torch.bool)}, w, b)
    x = torch.randn(2, 1, 1, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = modules.network()(x)[..., 0]
    assert torch.allclose(modules.scores(x.numpy(), "logit"), expected, atol=1e-6)
