"""ImageSet and Dataset: decoded images with integer labels and class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnmod.errors import DataError


def _class_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images as uint8 (N, H, W, C) with C in {1, 3}, labels as int64 indices into `classes`."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images = np.ascontiguousarray(self.images)
        labels = np.ascontiguousarray(self.labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(
                f"images must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        classes = tuple(str(c) for c in self.classes)
        if len(set(classes)) != len(classes):
            raise DataError(f"class names must be unique, got {_class_list(classes)}")
        labels = labels.astype(np.int64, copy=False)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(
                f"labels must lie in [0, {len(classes)}), got [{labels.min()}, {labels.max()}]"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images of {self.images.shape[1:]}, {len(self.classes)} classes)"

    def subset(self, classes: Sequence[str]) -> ImageSet:
        """Keep the images of `classes`, relabelled 0..k-1 in the order given."""
        if isinstance(classes, str):
            classes = [classes]
        chosen = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in chosen if c not in index]
        if unknown:
            raise DataError(f"unknown class {unknown[0]!r}; valid classes are {_class_list(self.classes)}")
        if len(set(chosen)) != len(chosen):
            raise DataError(f"a class is named twice in {chosen}")
        relabel = np.full(len(self.classes), -1, dtype=np.int64)
        relabel[[index[c] for c in chosen]] = np.arange(len(chosen))
        new_labels = relabel[self.labels]
        keep = np.flatnonzero(new_labels >= 0)
        return ImageSet(self.images[keep], new_labels[keep], tuple(chosen))

    def take(self, indices: np.ndarray) -> ImageSet:
        """The images at `indices` (integer or boolean mask), with the same classes."""
        idx = np.asarray(indices)
        if idx.dtype != np.bool_:
            idx = idx.astype(np.int64, copy=False)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def spread(self, limit: int | None) -> ImageSet:
        """At most `limit` images taken evenly over the classes (the first of each, in order): files are
        often sorted by class, so the first `limit` images would hold only the first classes."""
        if limit is None or limit >= len(self):
            return self
        per_class = max(1, limit // len(self.classes))
        keep = np.concatenate([np.flatnonzero(self.labels == c)[:per_class] for c in range(len(self.classes))])
        return self.take(np.sort(keep))


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named pair of train and test sets that share their classes."""

    name: str
    train: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        if self.train.classes != self.test.classes:
            raise DataError(f"dataset {self.name!r}: train and test sets have different classes")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    def subset(self, classes: Sequence[str]) -> Dataset:
        """Keep the images of `classes` in both splits, relabelled 0..k-1 in the order given."""
        try:
            return Dataset(self.name, self.train.subset(classes), self.test.subset(classes))
        except DataError as e:
            raise DataError(f"dataset {self.name!r}: {e}") from None

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, train={self.train!r}, test={self.test!r})"
