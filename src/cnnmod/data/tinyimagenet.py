"""Tiny-ImageNet in its official layout; its labelled `val` split serves as the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnmod.data import decode
from cnnmod.data.files import Source, is_image_name, read_bytes, read_files, single_root
from cnnmod.data.imageset import ImageSet
from cnnmod.errors import DataError


def _kind(rel: list[str]) -> tuple[str, str] | None:
    """What a path (relative to the dataset root) holds: ('train', wnid), ('val', ''), or a text file."""
    name = "/".join(rel)
    if name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        return name, ""
    if len(rel) == 4 and rel[0] == "train" and rel[2] == "images" and is_image_name(name):
        return "train", rel[1]
    if len(rel) == 3 and rel[:2] == ["val", "images"] and is_image_name(name):
        return "val", ""
    return None


def parse_tiny_name(name: str) -> tuple[str, str, str] | None:
    """(root, kind, wnid) of a Tiny-ImageNet file at the top or one directory down, else None."""
    parts = name.split("/")
    for depth in (0, 1):
        kind = _kind(parts[depth:])
        if kind is not None:
            return "/".join(parts[:depth]), *kind
    return None


def _read_tiny_files(path: Path, want: set[str]) -> tuple[dict[str, Source], dict[str, tuple[str, str]]]:
    files = read_files(path, lambda n: (p := parse_tiny_name(n)) is not None and p[1] in want)
    parsed = {n: (p[1], p[2]) for n in files if (p := parse_tiny_name(n)) is not None}
    roots = {p[0] for n in files if (p := parse_tiny_name(n)) is not None}
    single_root(roots, str(path))
    return files, parsed


def _text(files: dict[str, Source], parsed: dict[str, tuple[str, str]], kind: str, path: Path) -> str | None:
    names = [n for n, p in parsed.items() if p[0] == kind]
    if not names:
        return None
    where = f"{path}: {names[0]}"
    try:
        return read_bytes(files[names[0]], where).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e})") from None


def read_tiny_imagenet(path: Path, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    files, parsed = _read_tiny_files(path, {"wnids.txt", "val/val_annotations.txt", "train", "val"})
    wnids_text = _text(files, parsed, "wnids.txt", path)
    train_wnids = {p[1] for p in parsed.values() if p[0] == "train"}
    if not train_wnids:
        raise DataError(f"{path}: no training images under train/<wnid>/images/")
    classes = tuple(sorted(wnids_text.split() if wnids_text is not None else train_wnids))
    index = {c: i for i, c in enumerate(classes)}
    stray = sorted(train_wnids - index.keys())
    if stray:
        raise DataError(f"{path}: train/{stray[0]}/ is not listed in wnids.txt")

    annotations_text = _text(files, parsed, "val/val_annotations.txt", path)
    if annotations_text is None:
        raise DataError(f"{path}: no val/val_annotations.txt, so the val (test) images have no labels")
    val_label: dict[str, int] = {}
    for line_no, line in enumerate(annotations_text.splitlines(), 1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not fields or not fields[0].strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{path}: val/val_annotations.txt line {line_no}: "
                            f"unknown or missing wnid in {line!r}")
        val_label[fields[0]] = index[fields[1]]

    train_items = sorted((n for n, p in parsed.items() if p[0] == "train"), key=lambda n: (parsed[n][1], n))
    val_items = sorted(n for n, p in parsed.items() if p[0] == "val")
    if not val_items:
        raise DataError(f"{path}: no validation images under val/images/")
    unlabelled = [n for n in val_items if n.rsplit("/", 1)[-1] not in val_label]
    if unlabelled:
        raise DataError(f"{path}: {unlabelled[0]} has no line in val/val_annotations.txt")

    y_train = np.array([index[parsed[n][1]] for n in train_items], dtype=np.int64)
    y_val = np.array([val_label[n.rsplit("/", 1)[-1]] for n in val_items], dtype=np.int64)
    x_train = decode.decode_images([(n, files[n]) for n in train_items], f"{path} train", progress)
    x_val = decode.decode_images([(n, files[n]) for n in val_items], f"{path} val", progress)
    x_train, x_val = decode.match_channels(x_train, x_val)
    return ImageSet(x_train, y_train, classes), ImageSet(x_val, y_val, classes)


def tiny_imagenet_words(path: str | Path) -> dict[str, str]:
    """wnid -> words ('n02480855' -> 'gorilla, Gorilla gorilla') for the classes of a Tiny-ImageNet copy."""
    path = Path(path)
    files, parsed = _read_tiny_files(path, {"wnids.txt", "words.txt"})
    words_text = _text(files, parsed, "words.txt", path)
    if words_text is None:
        raise DataError(f"{path}: no words.txt")
    words: dict[str, str] = {}
    for line in words_text.splitlines():
        wnid, _, text = line.partition("\t")
        if wnid.strip():
            words[wnid.strip()] = text.strip()
    wnids_text = _text(files, parsed, "wnids.txt", path)
    if wnids_text is None:
        return words
    return {w: words.get(w, "") for w in sorted(wnids_text.split())}
