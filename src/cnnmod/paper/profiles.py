"""How big `cnnmod reproduce` runs: the quick smoke run, the 2-core CPU run, and the paper's sizes for a GPU.

A profile names every size the scenarios take (images per class, decomposition samples, epochs, which models
and rows run), so a part's cache key is the profile itself plus the files it reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CnnmodError

__all__ = ["DATASETS", "PROFILES", "ModelSpec", "Profile", "get_profile"]

# the datasets a reproduction reads, by the names results use
DATASETS = ("cifar10", "cifar100", "imagenet200", "fashion-mnist")
GORILLA, GROOM = "n02480855", "n10148035"  # the paper's gorilla and "person" classes in the Tiny-ImageNet subset


@dataclass(frozen=True)
class ModelSpec:
    """A parent: pretrained weights from the models folder (`weights`), the embedded Fashion-MNIST model
    (`weights="embedded"`), or `arch` trained here from scratch for `epochs` on the profile's training images."""

    key: str
    dataset: str
    arch: str
    weights: str | None = None
    epochs: int = 0
    paper_row: str | None = None

    @property
    def trained_here(self) -> bool:
        return self.weights is None


@dataclass(frozen=True)
class Profile:
    """Every size of a reproduction. `None` for a per-class count means all the images there are."""

    name: str
    summary: str
    train_per_class: int | None  # training images kept per class (training, decomposition, calibration)
    test_per_class: int | None  # test images kept per class (every accuracy)
    samples_per_class: int  # decomposition: CI inputs per class (TI takes as many)
    epochs: int  # models trained from scratch to compare with (Tables 2, 3, 5) and repair models (Table 6)
    imagenet_classes: int | None  # classes of the Tiny-ImageNet subset: gorilla, groom and the first others
    imagenet_size: int  # its images are resized to this side (64: as they are)
    models: tuple[ModelSpec, ...]  # every parent a table can use
    table1: tuple[str, ...]  # model keys whose Table 1 row runs (when its data is here)
    sites: tuple[str, ...]  # Table 1: the site kinds decomposed (relu: cnnmod's default; conv: the paper's)
    detail: str  # the model whose modules the plots show (per-class accuracy, overlap, sizes, trade-off)
    table1_test_per_class: int | None  # Table 1 and its plots evaluate on this many test images per class
    # (the trade-off sweep on at most 500 of them)
    rhos: tuple[float, ...]  # the trade-off sweep
    reuse_parents: tuple[tuple[str, str], ...]  # (dataset, model key): the parent of Tables 2, 3 and 5
    intra_datasets: tuple[str, ...]  # Table 2 runs on these (when their data is here)
    intra_pairs: int  # Table 2 pairs per dataset, of the paper's 6
    inter_pairs: int  # Table 3 pairs, of the paper's 16
    replacements: int  # Table 5 replacements, of the paper's 16
    replace: tuple[tuple[str, str, str], ...]  # Table 4: (dataset, weaker model key, stronger model key)
    replaced_classes: int  # Table 4: the first classes whose module is replaced (the paper's RM0..RM9: 10)
    calibration_samples: int  # score calibration and head recalibration, images per class
    repair_classes: int | None  # Table 6: gorilla, groom and the first others (None: all 202)
    repair_arch: str
    scratch_arch: str | None = None  # the model trained to compare with in Tables 3 and 5 (None: parent A's)
    compact_train_images: int = 300_000  # Table 1's compact modules: fine-tune images (cnnmod's default)
    compact_pair_images: int = 100_000  # Table 2's compact pairs: fine-tune images (the narrowed prefix's default)
    compact_prefix_keep: float = 0.3  # Table 2's compact pairs: the share of the prefix's channels they keep

    def model(self, key: str) -> ModelSpec:
        for spec in self.models:
            if spec.key == key:
                return spec
        raise KeyError(key)

    def reuse_parent(self, dataset: str) -> str:
        return dict(self.reuse_parents)[dataset]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sizes(self) -> dict[str, Any]:
        """What the numbers depend on: everything but the name and the description (a cache key)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "summary")}


def _models(trained_epochs: int, imagenet_epochs: int) -> tuple[ModelSpec, ...]:
    """The paper's nine Table 1 parents plus the Fashion-MNIST one: the two CIFAR-10 ResNets that have public
    weights load them; the others are trained here."""
    return (
        ModelSpec("cifar10-resnet20", "cifar10", "resnet20", "resnet20-12fca82f.th", paper_row="CIFAR10-R20"),
        ModelSpec("cifar10-resnet32", "cifar10", "resnet32", epochs=trained_epochs, paper_row="CIFAR10-R32"),
        ModelSpec("cifar10-resnet56", "cifar10", "resnet56", "resnet56-4bfd9763.th", paper_row="CIFAR10-R56"),
        ModelSpec("cifar100-resnet20", "cifar100", "resnet20", epochs=trained_epochs, paper_row="CIFAR100-R20"),
        ModelSpec("cifar100-resnet32", "cifar100", "resnet32", epochs=trained_epochs, paper_row="CIFAR100-R32"),
        ModelSpec("cifar100-resnet56", "cifar100", "resnet56", epochs=trained_epochs, paper_row="CIFAR100-R56"),
        ModelSpec("imagenet200-resnet20", "imagenet200", "resnet20", epochs=imagenet_epochs,
                  paper_row="ImageNet200-R20"),
        ModelSpec("imagenet200-resnet32", "imagenet200", "resnet32", epochs=imagenet_epochs,
                  paper_row="ImageNet200-R32"),
        ModelSpec("imagenet200-resnet56", "imagenet200", "resnet56", epochs=imagenet_epochs,
                  paper_row="ImageNet200-R56"),
        ModelSpec("fashion-mnist-smallcnn", "fashion-mnist", "smallcnn", "embedded"),
    )


ALL_TABLE1 = ("cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet56", "cifar100-resnet20", "cifar100-resnet32",
              "cifar100-resnet56", "imagenet200-resnet20", "imagenet200-resnet32", "imagenet200-resnet56")

QUICK = Profile(
    name="quick",
    summary="a smoke run of every table in about 5 minutes on 2 CPU cores: 50 training and 5 test images per "
            "class, 1-epoch models (their accuracies are near chance), relu sites only, a 10-class ImageNet subset "
            "at 32x32, one or two pairs per table",
    train_per_class=50, test_per_class=5, samples_per_class=10, epochs=1,
    imagenet_classes=10, imagenet_size=32,
    models=_models(1, 1),
    table1=("cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet56", "cifar100-resnet20", "imagenet200-resnet20"),
    sites=("relu",),
    detail="cifar10-resnet20", table1_test_per_class=5, rhos=(0.0, 0.2),
    reuse_parents=(("cifar10", "cifar10-resnet20"), ("cifar100", "cifar100-resnet20"),
                   ("imagenet200", "imagenet200-resnet20"), ("fashion-mnist", "fashion-mnist-smallcnn")),
    intra_datasets=("cifar10", "cifar100"), intra_pairs=2, inter_pairs=2, replacements=1,
    replace=(("cifar10", "cifar10-resnet32", "cifar10-resnet20"),), replaced_classes=3,
    calibration_samples=5, repair_classes=4, repair_arch="resnet20", scratch_arch="resnet20",
    compact_train_images=1_000, compact_pair_images=200,
)

CPU = Profile(
    name="cpu",
    summary="every table at sizes a 2-core CPU finishes in about 70 minutes: 200 training and 50 test images per "
            "class, 10-epoch parents and 10-epoch models to compare with, a 20-class ImageNet subset at 32x32, "
            "all pairs of the paper's four classes, compact modules on 100,000 fine-tune images (pairs: 20,000)",
    train_per_class=200, test_per_class=50, samples_per_class=100, epochs=10,
    imagenet_classes=20, imagenet_size=32,
    models=_models(10, 5),
    table1=tuple(k for k in ALL_TABLE1 if k != "imagenet200-resnet56"), sites=("relu", "conv"),
    detail="cifar10-resnet20", table1_test_per_class=50,
    rhos=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    reuse_parents=(("cifar10", "cifar10-resnet20"), ("cifar100", "cifar100-resnet20"),
                   ("imagenet200", "imagenet200-resnet20"), ("fashion-mnist", "fashion-mnist-smallcnn")),
    intra_datasets=("cifar10", "cifar100", "imagenet200"), intra_pairs=6, inter_pairs=4, replacements=2,
    replace=(("cifar10", "cifar10-resnet32", "cifar10-resnet20"),
             ("cifar100", "cifar100-resnet32", "cifar100-resnet20"),
             ("imagenet200", "imagenet200-resnet32", "imagenet200-resnet20")), replaced_classes=10,
    calibration_samples=10, repair_classes=10, repair_arch="resnet20", scratch_arch="resnet20",
    compact_train_images=100_000, compact_pair_images=20_000,
)

FULL = Profile(
    name="full",
    summary="the paper's sizes, for a GPU: every image, 200-epoch models, all 202 ImageNet classes at 64x64, all "
            "pairs and replacements",
    train_per_class=None, test_per_class=None, samples_per_class=1000, epochs=200,
    imagenet_classes=None, imagenet_size=64,
    models=_models(200, 200),
    table1=ALL_TABLE1, sites=("relu", "conv"), detail="cifar10-resnet20", table1_test_per_class=None,
    rhos=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    reuse_parents=(("cifar10", "cifar10-resnet56"), ("cifar100", "cifar100-resnet20"),
                   ("imagenet200", "imagenet200-resnet20"), ("fashion-mnist", "fashion-mnist-smallcnn")),
    intra_datasets=("cifar10", "cifar100", "imagenet200"), intra_pairs=6, inter_pairs=16, replacements=16,
    replace=(("cifar10", "cifar10-resnet32", "cifar10-resnet20"),
             ("cifar100", "cifar100-resnet32", "cifar100-resnet20"),
             ("imagenet200", "imagenet200-resnet32", "imagenet200-resnet20")), replaced_classes=10,
    calibration_samples=300, repair_classes=None, repair_arch="resnet20", scratch_arch="resnet20",
)

PROFILES: dict[str, Profile] = {p.name: p for p in (QUICK, CPU, FULL)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise CnnmodError(f"unknown profile {name!r}; choose {', '.join(PROFILES)}") from None
