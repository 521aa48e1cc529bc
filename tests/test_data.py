"""Dataset readers: each format on small files written here, detection, subsets, the cache and bad inputs."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnmod.data import FORMATS, Dataset, ImageSet, detect_format, load_dataset, tiny_imagenet_words
from cnnmod.data import decode as decode_module
from cnnmod.data.cache import cache_file, cache_key
from cnnmod.data.pickles import load_pickle
from cnnmod.errors import DataError

CIFAR10_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test's cache out of the home directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CNNMOD_CACHE", str(cache))
    return cache


def _pixels(label: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """A distinct, recognisable image for (label, index)."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    return dest


# ----- writers for each format ---------------------------------------------------------------------------


def write_folder(root: Path, classes: tuple[str, ...] = ("dog", "cat"), per_class: int = 3,
                 size: tuple[int, int] = (6, 8), test_dir: str = "test") -> dict[str, np.ndarray]:
    """PNG tree root/{train,test_dir}/<class>/NNNN.png; returns the images in load order (classes sorted)."""
    expected: dict[str, np.ndarray] = {}
    for split in ("train", test_dir):
        rows = []
        for label, cls in enumerate(sorted(classes)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class + (split == "train")):
                img = _pixels(label, i + 100 * (split == "train"), (*size, 3))
                Image.fromarray(img).save(root / split / cls / f"{i:04d}.png")
                rows.append(img)
        expected[split] = np.stack(rows)
    return expected


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes like Python 2's cPickle: str and bytes both as (SHORT_)BINSTRING, which read back as bytes."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes | str) -> None:
        raw = obj.encode("utf-8") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_bytes


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x and Python 2 name the array rebuilder numpy.core.multiarray, as the official files do
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _dump(obj: object, file: Path, style: str) -> None:
    if style == "py2":
        file.write_bytes(py2_pickle(obj))
    else:
        with open(file, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def write_cifar10(parent: Path, per_batch: int = 4, style: str = "py3") -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ as the official one: dicts with bytes keys, CHW rows of 3072 uint8."""
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    _dump(meta, root / "batches.meta", style)
    all_images, all_labels = [], []
    for b, file in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        images = np.stack([_pixels(lab, b * 100 + i, (32, 32, 3)) for i, lab in enumerate(labels)])
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        _dump({b"batch_label": f"batch {b}".encode(), b"labels": labels, b"data": data,
               b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}, root / file, style)
        all_images.append(images)
        all_labels.append(labels)
    return np.concatenate(all_images), np.concatenate(all_labels)


def write_cifar100(parent: Path, n: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    fine = [f"fine{i}".encode() for i in range(100)]
    _dump({b"fine_label_names": fine, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]},
          root / "meta", "py3")
    out = {}
    for split in ("train", "test"):
        fine_labels = [(7 * i + (split == "test")) % 100 for i in range(n)]
        images = np.stack([_pixels(lab, i, (32, 32, 3)) for i, lab in enumerate(fine_labels)])
        _dump({b"filenames": [b"x"] * n, b"batch_label": split.encode(), b"fine_labels": fine_labels,
               b"coarse_labels": [lab // 5 for lab in fine_labels],
               b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072)}, root / split, "py3")
        out[split] = (images, np.array(fine_labels))
    return out


def write_tiny(root: Path) -> None:
    """Official Tiny-ImageNet layout with 2 classes (wnids.txt unsorted, one grey JPEG among colour ones)."""
    wnids = ["n02", "n01"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tgorilla\nn99\tunused\n")
    for label, wnid in enumerate(sorted(wnids)):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(3):
            img = Image.fromarray(_pixels(label, i, (16, 16, 3)))
            (img.convert("L") if (label, i) == (0, 1) else img).save(images / f"{wnid}_{i}.JPEG", quality=95)
    lines = []
    for i, wnid in enumerate(["n01", "n02", "n02"]):
        Image.fromarray(_pixels(9, i, (16, 16, 3))).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(root: Path, gz: bool, n_train: int = 5, n_test: int = 3
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = np.stack([_pixels(i % 10, i, (28, 28)) for i in range(n)])
        y = np.arange(n, dtype=np.uint8) % 10
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            name = f"{split}-{kind}-idx{dims}-ubyte"
            data = _idx(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        out[split] = (x, y)
    return out


# ----- formats --------------------------------------------------------------------------------------------


def test_npz_grey_images_gain_a_channel(tmp_path: Path) -> None:
    x = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.savez(tmp_path / "toy.npz", x_train=x, y_train=np.array([0, 1, 1, 0]), x_test=x[:2],
             y_test=np.array([1, 0]), classes=np.array(["a", "b"]))
    ds = load_dataset(tmp_path / "toy.npz", progress=False)
    assert ds.name == "toy" and ds.classes == ("a", "b")
    assert ds.train.images.shape == (4, 5, 6, 1) and ds.train.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train.images[..., 0], x)


def test_npz_missing_key_is_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"bad\.npz.*y_train"):
        load_dataset(tmp_path / "bad.npz")


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_folder_directory(tmp_path: Path, test_dir: str) -> None:
    expected = write_folder(tmp_path / "pets", test_dir=test_dir)
    ds = load_dataset(tmp_path / "pets", progress=False)
    assert ds.name == "pets" and ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.train.images, expected["train"])
    np.testing.assert_array_equal(ds.test.images, expected[test_dir])
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4
    assert ds.test.images.shape == (6, 6, 8, 3) and ds.test.images.flags.c_contiguous


def test_folder_archive_nested_one_level_matches_directory(tmp_path: Path) -> None:
    expected = write_folder(tmp_path / "src")
    archive = _tar(tmp_path / "src", tmp_path / "pets-png.tar.gz", "pets-png")
    assert detect_format(archive) == "folder"
    ds = load_dataset(archive, progress=False)
    assert ds.name == "pets-png" and ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.train.images, expected["train"])
    np.testing.assert_array_equal(ds.test.images, expected["test"])


def test_folder_grey_jpeg_stays_one_channel(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "g" / split / cls).mkdir(parents=True)
            Image.fromarray(_pixels(0, 0, (5, 7))).save(tmp_path / "g" / split / cls / "x.jpg")
    ds = load_dataset(tmp_path / "g", progress=False)
    assert ds.train.images.shape == (2, 5, 7, 1)


def test_folder_mixed_sizes_name_the_file(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    Image.fromarray(_pixels(0, 0, (9, 9, 3))).save(tmp_path / "d" / "train" / "dog" / "0002.png")
    with pytest.raises(DataError, match=r"0002\.png is 9x9 .* share one size"):
        load_dataset(tmp_path / "d", progress=False)


def test_folder_corrupt_image_is_named(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "test" / "cat" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"test/cat/0001\.png: cannot decode"):
        load_dataset(tmp_path / "d", progress=False)


def test_folder_missing_test_split(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    for f in (tmp_path / "d" / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match="no images under test"):
        load_dataset(tmp_path / "d", format="folder", progress=False)


def test_truncated_archive(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", per_class=20, size=(16, 16))
    archive = _tar(tmp_path / "src", tmp_path / "d.tar.gz", "d")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"d\.tar\.gz: truncated or corrupt archive"):
        load_dataset(archive, format="folder", progress=False)


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar10_directory(tmp_path: Path, style: str) -> None:
    images, labels = write_cifar10(tmp_path, style=style)
    ds = load_dataset(tmp_path / "cifar-10-batches-py", progress=False)
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert ds.train.images.shape == (20, 32, 32, 3) and len(ds.test) == 4
    np.testing.assert_array_equal(ds.train.images, images[:20])
    np.testing.assert_array_equal(ds.test.images, images[20:])
    np.testing.assert_array_equal(ds.train.labels, labels[:20])


def test_cifar10_archive(tmp_path: Path) -> None:
    images, labels = write_cifar10(tmp_path / "src")
    archive = _tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz",
                   "cifar-10-batches-py")
    assert detect_format(archive) == "cifar"
    ds = load_dataset(archive, progress=False)
    np.testing.assert_array_equal(ds.test.images, images[20:])
    np.testing.assert_array_equal(ds.test.labels, labels[20:])


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    expected = write_cifar100(tmp_path)
    assert detect_format(tmp_path) == "cifar"
    ds = load_dataset(tmp_path, progress=False)
    assert len(ds.classes) == 100 and ds.classes[7] == "fine7"
    for split, s in (("train", ds.train), ("test", ds.test)):
        np.testing.assert_array_equal(s.images, expected[split][0])
        np.testing.assert_array_equal(s.labels, expected[split][1])


def test_cifar_label_count_mismatch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _dump({b"labels": [1, 2], b"data": np.zeros((3, 3072), np.uint8)}, batch, "py3")
    with pytest.raises(DataError, match=r"data_batch_3: 3 images but 2 labels"):
        load_dataset(tmp_path, progress=False)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing: data_batch_5"):
        load_dataset(tmp_path, progress=False)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"labels": [0], b"data": _Evil(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: .*refused global (posix|nt|os)\.system"):
        load_dataset(tmp_path, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(np.array([object()], dtype=object), protocol=2),  # object arrays need more than dtype 'O'
    pickle.dumps(print, protocol=2),
    b"\x80\x02}q\x00(X\x04\x00",  # cut short
])
def test_restricted_unpickler_refuses_anything_else(payload: bytes) -> None:
    with pytest.raises(DataError):
        load_pickle(payload, "x")


@pytest.mark.parametrize("archived", [False, True])
def test_tiny_imagenet(tmp_path: Path, archived: bool) -> None:
    write_tiny(tmp_path / "tiny-imagenet-2")
    path = _tar(tmp_path / "tiny-imagenet-2", tmp_path / "t.tar.gz", "tiny-imagenet-2") if archived \
        else tmp_path / "tiny-imagenet-2"
    assert detect_format(path) == "tiny-imagenet"
    ds = load_dataset(path, progress=False)
    assert ds.classes == ("n01", "n02")
    assert ds.train.images.shape == (6, 16, 16, 3)  # the grey JPEG was widened to RGB
    grey = ds.train.images[1]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.labels.tolist() == [0, 1, 1]
    assert tiny_imagenet_words(path) == {"n01": "goldfish, Carassius auratus", "n02": "gorilla"}


def test_tiny_imagenet_unannotated_val_image(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    Image.fromarray(_pixels(0, 0, (16, 16, 3))).save(tmp_path / "val" / "images" / "val_9.JPEG")
    with pytest.raises(DataError, match=r"val_9\.JPEG has no line in val/val_annotations\.txt"):
        load_dataset(tmp_path, progress=False)


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path: Path, gz: bool) -> None:
    expected = write_idx(tmp_path / "fashion-toy", gz=gz)
    assert detect_format(tmp_path / "fashion-toy") == "idx"
    ds = load_dataset(tmp_path / "fashion-toy", progress=False)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    assert ds.train.images.shape == (5, 28, 28, 1) and len(ds.test) == 3
    np.testing.assert_array_equal(ds.train.images[..., 0], expected["train"][0])
    np.testing.assert_array_equal(ds.test.labels, expected["t10k"][1])


def test_idx_digits_and_bad_magic(tmp_path: Path) -> None:
    write_idx(tmp_path / "mnist", gz=False)
    assert load_dataset(tmp_path / "mnist", progress=False).classes == tuple("0123456789")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: bad idx magic number 08030000"):
        load_dataset(tmp_path / "mnist", progress=False)


def test_idx_truncated(tmp_path: Path) -> None:
    write_idx(tmp_path / "m", gz=False)
    f = tmp_path / "m" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: idx file holds"):
        load_dataset(tmp_path / "m", progress=False)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "m", gz=False)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="t10k has 3 images but 2 labels"):
        load_dataset(tmp_path / "m", progress=False)


# ----- detection, subsets, cache --------------------------------------------------------------------------


def test_detection_and_unknown_paths(tmp_path: Path) -> None:
    assert set(FORMATS) == {"npz", "folder", "cifar", "tiny-imagenet", "idx"}
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"junk: found no dataset"):
        load_dataset(tmp_path / "junk")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent")
    with pytest.raises(DataError, match="unknown dataset format 'jpeg'"):
        load_dataset(tmp_path / "junk", format="jpeg")


def test_subset_relabels_in_given_order(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", classes=("ant", "bee", "cow"), per_class=2)
    ds = load_dataset(tmp_path / "d", progress=False)
    sub = load_dataset(tmp_path / "d", classes=["cow", "ant"], progress=False)
    assert sub.classes == ("cow", "ant")
    assert sub.train.labels.tolist() == [1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(sub.train.images[3:], ds.train.images[6:9])
    assert ds.classes == ("ant", "bee", "cow"), "subset must not change the parent"


def test_subset_unknown_class_names_it(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"unknown class 'horse'.*'cat', 'dog'"):
        load_dataset(tmp_path / "d", classes=["cat", "horse"], progress=False)


def test_imageset_take_and_validation() -> None:
    s = ImageSet(np.zeros((4, 2, 2, 3), np.uint8), np.array([0, 1, 0, 1]), ("a", "b"))
    assert len(s.take(np.array([3, 0]))) == 2 and s.take(np.array([3, 0])).labels.tolist() == [1, 0]
    assert len(s.take(s.labels == 1)) == 2
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        ImageSet(np.zeros((1, 2, 2, 3), np.uint8), np.array([2]), ("a", "b"))
    with pytest.raises(DataError, match="different classes"):
        Dataset("x", s, s.subset(["b", "a"]))


def test_second_load_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     _cache_in_tmp: Path) -> None:
    write_folder(tmp_path / "d")
    first = load_dataset(tmp_path / "d", progress=False)
    assert len(list(_cache_in_tmp.glob("*.npz"))) == 1

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decode_module, "decode_images", refuse)
    second = load_dataset(tmp_path / "d", classes=["dog"], progress=False)
    np.testing.assert_array_equal(second.train.images, first.train.images[4:])
    assert second.classes == ("dog",)


def test_cache_key_follows_changes(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    key = cache_key(tmp_path / "d", "folder")
    assert key != cache_key(tmp_path / "d", "npz")
    Image.fromarray(_pixels(0, 0, (6, 8, 3))).save(tmp_path / "d" / "train" / "cat" / "new.png")
    assert key != cache_key(tmp_path / "d", "folder")


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    cache = tmp_path / "own-cache"
    first = load_dataset(tmp_path / "d", cache_dir=cache, progress=False)
    expected = np.array(first.test.images)  # `first` maps the cache file, which is now truncated in place
    file = cache_file(cache, cache_key(tmp_path / "d", "folder"))
    file.write_bytes(file.read_bytes()[:100])
    again = load_dataset(tmp_path / "d", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again.test.images, expected)
    with np.load(file, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["test_images"], expected)
    assert not list(cache.glob("*.tmp"))


def test_progress_bar_goes_to_stderr_on_a_terminal_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnmod.progress

    write_folder(tmp_path / "d")
    load_dataset(tmp_path / "d", progress=True, cache_dir=tmp_path / "c1")
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # captured stderr is no terminal: a log gets no bar lines
    monkeypatch.setattr(cnnmod.progress, "_is_terminal", lambda stream: True)
    load_dataset(tmp_path / "d", progress=True, cache_dir=tmp_path / "c2")
    out, err = capsys.readouterr()
    assert out == "" and "decoding" in err


# ----- real data ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPG.is_file(), reason=f"{CIFAR10_JPG} is absent")
def test_real_cifar10_jpg(tmp_path: Path) -> None:
    ds = load_dataset(CIFAR10_JPG, cache_dir=tmp_path, progress=False)
    assert ds.name == "cifar10-jpg" and len(ds.classes) == 10 and ds.classes[0] == "airplane"
    assert ds.train.images.shape == (50_000, 32, 32, 3) and ds.test.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    cached = load_dataset(CIFAR10_JPG, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(cached.test.images, ds.test.images)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=f"{FASHION_MNIST} is absent")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    ds = load_dataset(FASHION_MNIST, cache_dir=tmp_path, progress=False)
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    assert ds.train.images.shape == (60_000, 28, 28, 1) and ds.test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
