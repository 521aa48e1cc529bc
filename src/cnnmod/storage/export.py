"""Composed classifiers out of cnnmod: one plain network that ONNX runtimes and torch.export run, and images
from files in the format that network takes.

The network (`ExportedClassifier`) has one input, `images`: float32 NCHW in [0, 1] at the size and channel count
of the composition's first parent (any batch size). Inside the graph, each parent group adapts the images to its
parent's input (grey <-> RGB as `InputSpec.prepare` does, bilinear antialiased resizing, mean/std), runs its
modules (masked parent forward, 2-output heads) and scores them (softmax or logit); reverifiers then re-decide
among their labels. The one output, `scores` (N, labels), has its argmax where cnnmod's composed classifier
predicts.

Resizing is written as two constant matrices (rows x image x columns^T) computed by torch's own antialiased
bilinear kernel, so it exports with every exporter and opset (ONNX's Resize has no antialiasing before opset 18,
and torch's TorchScript exporter has none at all) and matches `F.interpolate(..., antialias=True)` to float
rounding.

ONNX files carry the labels as a JSON list under the metadata key `labels`, and a JSON object under `cnnmod`
(the input format, the scoring); `.pt2` files (torch.export) carry the same two as extra files.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..engine.compose import ComposedClassifier, Reverifier, compose, with_reverifiers
from ..engine.inputs import InputSpec
from ..engine.modules import ModuleSet, _MultiHead, _Repeat, _replace_head, resolve_device, score_from_logits
from ..engine.trace import with_taps
from ..errors import CnnmodError
from .outputs import check_output, register_kind, write_file

__all__ = [
    "EXPORT_FORMATS", "ExportError", "ExportResult", "ExportedClassifier", "composed_scores", "export_classifier",
    "image_files", "input_format", "predict_files", "read_images", "read_labels", "require_onnx", "select_labels",
]

EXPORT_FORMATS = ("onnx", "pt2")
METADATA_KEY = "cnnmod"
LABELS_KEY = "labels"
INPUT_NAME = "images"
OUTPUT_NAME = "scores"
ONNX_OPSET = 17
MODULE_CHUNK = 16
INSTALL_HINT = "pip install 'cnnmod[export]' (or: pip install onnx onnxruntime)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A verification whose scores differ by more than this, relative to the largest score (at least 1), fails the
# export: float32 rounding differs between runtimes by orders of magnitude less.
TOLERANCE = 1e-3


class ExportError(CnnmodError):
    """A composition that cannot be exported, or an export whose output disagrees with cnnmod."""


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): torch's antialiased bilinear resize (align_corners=False) along one axis, as a matrix."""
    # Unit images n_in x 2 (torch's kernel is separable; a width of 1 takes a degenerate path), kept at width 2.
    eye = torch.eye(n_in, dtype=torch.float32).view(n_in, 1, n_in, 1).expand(-1, -1, -1, 2).contiguous()
    cols = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return cols[..., 0].reshape(n_in, n_out).t().contiguous()


class _Resize(nn.Module):
    """(B, C, H, W) -> (B, C, h, w) as `F.interpolate(bilinear, antialias=True)`: rows @ x @ cols^T."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        super().__init__()
        self.rows: torch.Tensor
        self.cols: torch.Tensor
        self.register_buffer("rows", resize_matrix(size_in[0], size_out[0]))
        self.register_buffer("cols", resize_matrix(size_in[1], size_out[1]).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


class _Adapt(nn.Module):
    """Images of one format ([0, 1], `channels` x `size`) -> a parent's normalised input, as InputSpec.prepare."""

    def __init__(self, channels: int, size: tuple[int, int], spec: InputSpec) -> None:
        super().__init__()
        if channels != spec.channels and not (channels == 3 and spec.channels == 1) and channels != 1:
            raise ExportError(f"cannot adapt {channels}-channel images to a parent that takes {spec.channels} "
                              "channels; put a parent with that input first")
        self.channels_in = channels
        self.channels_out = spec.channels
        self.resize = _Resize(size, spec.size) if tuple(size) != tuple(spec.size) else None
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_in != self.channels_out:
            if self.channels_in == 3 and self.channels_out == 1:
                x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            else:
                x = x.repeat(1, self.channels_out, 1, 1)
        if self.resize is not None:
            x = self.resize(x)
        return (x - self.mean) / self.std


class _Mask(nn.Module):
    """Multiplies each of the M stacked copies of the batch by its module's keep-mask (out of place)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask: torch.Tensor
        self.register_buffer("mask", mask.unsqueeze(1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mask is brought to x's layout rather than x to the mask's: reshaping the product back to
        # (M * B, ...) makes torch.export guard on the batch size.
        m = self.mask.shape[0]
        return x * self.mask.expand(m, x.shape[0] // m, *x.shape[1:]).reshape(x.shape)


def _module_network(modules: ModuleSet) -> nn.Module:
    """Modules of one parent as one network: normalised input (B, C, H, W) -> (B, M, 2), without in-place ops."""
    if modules.compact is not None:  # compact modules: their own networks, by the exact engine
        from ..engine.engines import runner_for

        return runner_for(modules.compact, modules.head_weight, modules.head_bias, torch.device("cpu"), "exact")
    traced = modules.parent.model
    placeholder = next(n for n in traced.graph.graph.nodes if n.op == "placeholder")
    taps: dict[str, nn.Module] = {placeholder.name: _Repeat(len(modules))}
    for site in modules.sites:
        taps[site.name] = _Mask(modules.masks[site.name])
    net = with_taps(traced.graph, taps)
    for module in net.modules():
        if hasattr(module, "inplace"):
            setattr(module, "inplace", False)  # noqa: B010  (nn.Module typing of attributes)
    _replace_head(net, traced.head.node, _MultiHead(modules.head_weight, modules.head_bias))
    return net.eval()


class _GroupScores(nn.Module):
    """One parent's modules: images of the exported format -> (B, M) scores, modules run in chunks of 16."""

    def __init__(self, modules: ModuleSet, channels: int, size: tuple[int, int], scoring: str) -> None:
        super().__init__()
        self.adapt = _Adapt(channels, size, modules.parent.input_spec)
        names = modules.class_names
        self.chunks = nn.ModuleList(_module_network(modules.select(names[i:i + MODULE_CHUNK]))
                                    for i in range(0, len(names), MODULE_CHUNK))
        self.scoring = scoring

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.adapt(images)
        logits = torch.cat([chunk(x) for chunk in self.chunks], 1)
        return score_from_logits(logits, self.scoring)


class _Reverify(nn.Module):
    """Where the scores' winner is one of `targets`, the reverifier's winner swaps scores with it."""

    def __init__(self, group: _GroupScores, targets: Sequence[int], num_labels: int) -> None:
        super().__init__()
        self.group = group
        self.targets: torch.Tensor
        self.columns: torch.Tensor
        self.register_buffer("targets", torch.tensor(list(targets), dtype=torch.long))
        self.register_buffer("columns", torch.arange(num_labels, dtype=torch.long))

    def forward(self, images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pred = scores.argmax(1, keepdim=True)
        winner = self.targets[self.group(images).argmax(1)].unsqueeze(1)
        hit = (pred == self.targets.unsqueeze(0)).any(1, keepdim=True)
        top = scores.gather(1, pred)
        won = scores.gather(1, winner)
        swapped = torch.where(self.columns == winner, top, torch.where(self.columns == pred, won, scores))
        return torch.where(hit, swapped, scores)


class ExportedClassifier(nn.Module):
    """A composed classifier as one plain network: `images` (N, C, H, W) in [0, 1] -> `scores` (N, labels)."""

    def __init__(self, composed: ComposedClassifier) -> None:
        super().__init__()
        self.channels, self.size = input_format(composed)
        self.labels = tuple(composed.labels)
        self.scoring = composed.scoring
        self.groups = nn.ModuleList(_GroupScores(g, self.channels, self.size, composed.scoring)
                                    for g in composed.groups)
        self.reverifiers = nn.ModuleList(
            _Reverify(_GroupScores(rv.modules, self.channels, self.size, composed.scoring),
                      [composed.labels.index(lab) for lab in rv.labels], len(composed.labels))
            for rv in composed.reverifiers)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.cat([group(images) for group in self.groups], 1)
        for rv in self.reverifiers:
            scores = rv(images, scores)
        return scores

    def example(self, n: int = 2, seed: int = 0) -> torch.Tensor:
        """`n` images of the input format: seeded noise quantised to 8 bits (what image files hold)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, self.channels, *self.size), generator=g, dtype=torch.uint8).float() / 255.0

    def metadata(self) -> dict[str, Any]:
        return {"format": "cnnmod.export", "cnnmod_version": __version__, "input": INPUT_NAME,
                "output": OUTPUT_NAME, "channels": self.channels, "size": list(self.size), "range": [0.0, 1.0],
                "scoring": self.scoring}


def input_format(composed: ComposedClassifier) -> tuple[int, tuple[int, int]]:
    """Channel count and (H, W) that the exported network and `cnnmod predict` take: the first parent's."""
    spec = composed.groups[0].parent.input_spec
    return spec.channels, (int(spec.size[0]), int(spec.size[1]))


# ---------------------------------------------------------------------------------------------------------
# cnnmod's own scores, with reverifiers applied the way the exported network applies them
# ---------------------------------------------------------------------------------------------------------


def composed_scores(composed: ComposedClassifier, images: np.ndarray, batch_size: int = 256,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(N, labels) scores of the composed classifier (raw uint8 NHWC, or float NCHW in [0, 1]); where a
    reverifier re-decides, its winner swaps scores with the previous winner, so the argmax is
    `composed.predict(images)`."""
    scores = composed.scores(images, batch_size, device)
    for rv in composed.reverifiers:
        targets = torch.tensor([composed.labels.index(lab) for lab in rv.labels])
        pred = scores.argmax(1)
        rows = torch.isin(pred, targets).nonzero().flatten()
        if not len(rows):
            continue
        winner = targets[rv.modules.scores(images[rows.numpy()], composed.scoring, batch_size, device).argmax(1)]
        before = pred[rows]
        top = scores[rows, before].clone()
        scores[rows, before] = scores[rows, winner]
        scores[rows, winner] = top
    return scores


# ---------------------------------------------------------------------------------------------------------
# Choosing labels
# ---------------------------------------------------------------------------------------------------------


def select_labels(composed: ComposedClassifier, labels: Sequence[str]) -> ComposedClassifier:
    """The classifier restricted to `labels`, in this order; reverifiers whose labels all remain are kept."""
    if not labels:
        raise ExportError("--labels names no label")
    dup = sorted({lab for lab in labels if list(labels).count(lab) > 1})
    if dup:
        raise ExportError(f"label {dup[0]!r} is named twice in --labels")
    where: dict[str, tuple[int, str]] = {}
    offset = 0
    for gi, group in enumerate(composed.groups):
        for name, lab in zip(group.class_names, composed.labels[offset:offset + len(group)], strict=True):
            where[lab] = (gi, name)
        offset += len(group)
    for lab in labels:
        if lab not in where:
            shown = ", ".join(composed.labels[:12]) + (", ..." if len(composed.labels) > 12 else "")
            raise ExportError(f"no module votes for {lab!r}; labels are {shown}")
    runs: list[tuple[int, list[str], list[str]]] = []  # consecutive labels of one group stay one group
    for lab in labels:
        gi, name = where[lab]
        if runs and runs[-1][0] == gi:
            runs[-1][1].append(name)
            runs[-1][2].append(lab)
        else:
            runs.append((gi, [name], [lab]))
    groups = [composed.groups[gi].select(names) for gi, names, _ in runs]
    chosen = [lab for _, _, labs in runs for lab in labs]
    kept: list[Reverifier] = [rv for rv in composed.reverifiers if all(lab in chosen for lab in rv.labels)]
    return with_reverifiers(compose(groups, chosen, composed.scoring), kept)


# ---------------------------------------------------------------------------------------------------------
# Files: what cnnmod wrote, and writing them
# ---------------------------------------------------------------------------------------------------------


def _onnx_metadata(path: Path) -> dict[str, str] | None:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (anything unreadable is not a cnnmod export)
        return None
    return {p.key: p.value for p in model.metadata_props}


def _is_cnnmod_onnx(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    meta = _onnx_metadata(path)
    return meta is not None and METADATA_KEY in meta


def _pt2_extra(path: Path, name: str) -> str | None:
    """An extra file that torch.export.save wrote into a .pt2 archive, read without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.namelist():
                if entry.endswith(f"/extra/{name}") or entry == f"extra/{name}":
                    return archive.read(entry).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError):
        return None
    return None


def _is_cnnmod_pt2(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    text = _pt2_extra(path, METADATA_KEY)
    try:
        return text is not None and json.loads(text).get("format") == "cnnmod.export"
    except (ValueError, AttributeError):
        return False


register_kind("onnx", folder=False, recognise=_is_cnnmod_onnx)
register_kind("pt2", folder=False, recognise=_is_cnnmod_pt2)


def require_onnx() -> None:
    """A one-line error naming how to install when the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    labels: tuple[str, ...]
    channels: int
    size: tuple[int, int]
    scoring: str
    verified_on: int  # images the check ran on (0: not verified, see `note`)
    max_abs_diff: float | None
    same_predictions: int
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.path), "format": self.format, "labels": list(self.labels),
                "input": {"name": INPUT_NAME, "shape": ["N", self.channels, *self.size], "range": [0.0, 1.0]},
                "output": {"name": OUTPUT_NAME, "shape": ["N", len(self.labels)]}, "scoring": self.scoring,
                "verification": {"images": self.verified_on, "max_abs_diff": self.max_abs_diff,
                                 "same_predictions": self.same_predictions, "note": self.note}}

    def describe(self) -> str:
        head = (f"wrote {self.path} ({self.format}): input {INPUT_NAME} N x {self.channels} x {self.size[0]} x "
                f"{self.size[1]} in [0, 1], output {OUTPUT_NAME} N x {len(self.labels)} ({self.scoring} scores); "
                f"labels {', '.join(self.labels)}")
        if not self.verified_on:
            return f"{head}\nnot verified: {self.note}"
        return (f"{head}\nverified against cnnmod on {self.verified_on} images: max abs difference of the scores "
                f"{self.max_abs_diff:.2e}, same prediction on {self.same_predictions} of {self.verified_on}")


def export_classifier(composed: ComposedClassifier, out: Path | str, format: str, overwrite: bool = False,
           verify_images: int = 16) -> ExportResult:
    """Write `composed` as an ONNX file or a torch.export program, then check it against cnnmod on
    `verify_images` seeded noise images (before it is moved into place: a file that disagrees is not written)."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if format == "onnx":
        require_onnx()
    out = check_output(out, format, overwrite)
    net = ExportedClassifier(composed)
    example = net.example(max(2, verify_images))
    reference = composed_scores(composed, example.numpy(), device="cpu")
    found: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with torch.no_grad():
            if format == "onnx":
                _write_onnx(net, tmp)
                found.update(_check_onnx(tmp, example, reference))
            else:
                _write_pt2(net, tmp)
                found.update(_check_pt2(tmp, example, reference))

    write_file(out, format, write, overwrite)
    return ExportResult(out, format, net.labels, net.channels, net.size, net.scoring, found.get("images", 0),
                        found.get("max_abs_diff"), found.get("same", 0), found.get("note", ""))


def _write_onnx(net: ExportedClassifier, path: Path) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(net, (net.example(2),), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    model = onnx.load(str(path))
    for key, value in ((LABELS_KEY, json.dumps(list(net.labels))), (METADATA_KEY, json.dumps(net.metadata()))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"cnnmod {__version__}: composed classifier over {len(net.labels)} labels"
    onnx.save(model, str(path))


def _write_pt2(net: ExportedClassifier, path: Path) -> None:
    batch = torch.export.Dim("N", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (net.example(2),), dynamic_shapes={INPUT_NAME: {0: batch}})
    with open(path, "wb") as f:  # a file object: torch warns about paths that do not end in .pt2
        torch.export.save(program, f, extra_files={
            LABELS_KEY: json.dumps(list(net.labels)), METADATA_KEY: json.dumps(net.metadata())})


def _compare(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    diff = float((scores - reference).abs().max())
    same = int((scores.argmax(1) == reference.argmax(1)).sum())
    allowed = TOLERANCE * max(1.0, float(reference.abs().max()))
    if not diff <= allowed:
        raise ExportError(f"the exported network's scores differ from cnnmod's by up to {diff:.2e} (more than "
                          f"{allowed:.1e}); nothing was written")
    return {"images": len(reference), "max_abs_diff": diff, "same": same}


def _check_onnx(path: Path, images: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"note": f"onnxruntime is not installed ({INSTALL_HINT})"}
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    scores = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    return _compare(torch.from_numpy(scores), reference)


def _check_pt2(path: Path, images: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    with open(path, "rb") as f:
        program = torch.export.load(f)
    return _compare(program.module()(images).detach(), reference)


def read_labels(path: Path | str) -> list[str]:
    """The labels recorded in an exported file (ONNX metadata or .pt2 extra file), in score order."""
    path = Path(path)
    text = _pt2_extra(path, LABELS_KEY) if zipfile.is_zipfile(path) else (_onnx_metadata(path) or {}).get(LABELS_KEY)
    if text is None:
        raise ExportError(f"{path} is not a classifier exported by cnnmod (no {LABELS_KEY!r} metadata)")
    return list(json.loads(text))


# ---------------------------------------------------------------------------------------------------------
# Image files -> the exported network's input
# ---------------------------------------------------------------------------------------------------------


def image_files(paths: Sequence[Path | str]) -> list[Path]:
    """Image files named, and those under named folders (recursively, sorted); a missing path is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CnnmodError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CnnmodError(f"{path} does not exist")
    return files


def read_images(files: Sequence[Path], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Images decoded with PIL into float32 NCHW in [0, 1] at `channels` x `size`: grey ("L") or RGB as PIL
    converts, then resized (bilinear, antialiased) where a file's size differs. A file PIL cannot read is a
    one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise CnnmodError(f"images can be read for parents of 1 or 3 channels, not {channels}")
    out = np.empty((len(files), channels, *size), dtype=np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                img.load()
                pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CnnmodError(f"cannot read image {file}: {reason}") from None
        x = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = x / np.float32(255)
        if tuple(x.shape[-2:]) != tuple(size):
            t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None], size=size, mode="bilinear",
                              align_corners=False, antialias=True)
            x = t[0].clamp(0, 1).numpy()
        out[i] = x
    return out


def predict_files(composed: ComposedClassifier, files: Sequence[Path], top_k: int = 5, batch_size: int = 64,
                  device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """Classify image files: for each, the winning label and score and the `top_k` labels with their scores."""
    channels, size = input_format(composed)
    device = resolve_device(device)
    k = min(top_k, len(composed.labels))
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = list(files[start:start + batch_size])
        scores = composed_scores(composed, read_images(chunk, channels, size), batch_size, device)
        best = scores.argmax(1).tolist()  # the exported network's argmax (topk may order ties differently)
        values, indices = scores.topk(k, dim=1)
        for i, (file, vals, idx) in enumerate(zip(chunk, values.tolist(), indices.tolist(), strict=True)):
            top = [[composed.labels[j], float(v)] for j, v in zip(idx, vals, strict=True)]
            results.append({"image": str(file), "label": composed.labels[best[i]], "score": float(scores[i, best[i]]),
                            "top": top})
    return results
