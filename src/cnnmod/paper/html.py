"""report.html of a reproduction: one self-contained file (inline CSS, plots as base64 PNG), rebuilt from
results.json alone, every table showing the paper's figures beside ours.

Accuracies are shown in percent with one decimal, as the paper prints them; the paper's rows are grey, ours
black. A part that did not run says why in its row ("data not here", "not run in this profile", "failed: ...").
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.paper td{color:#666;background:#fafafa}tr.ours td{font-weight:600}
tr.status td{color:#8a6d3b;background:#fcf8e3;font-weight:400;text-align:left}
td.na{color:#999;font-weight:400}tr.ours td.p{color:#666;font-weight:400;background:#fafafa}
.wide{overflow-x:auto;max-width:100%}
figure{display:inline-block;margin:.6em 1em .6em 0;vertical-align:top}figure img{max-width:560px;height:auto;
border:1px solid #ddd}figcaption{font-size:.85em;color:#555;max-width:560px}
.notes{font-size:.88em;color:#444}.key{font-size:.9em;background:#f6f8fa;padding:.6em 1em;border-radius:4px}
nav a{margin-right:1em}
"""


# ---------------------------------------------------------------------------------------------- cells


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pct(value: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage, as the paper prints it (0.871 -> 87.1)."""
    return f"{100 * value:.{digits}f}" if _num(value) else "–"


def paper_pct(value: Any) -> str:
    """A figure the paper gives in percent (87.1), as it prints it."""
    return f"{value:.1f}" if _num(value) else "–"


def num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _num(value) else "–"


def sci(value: Any) -> str:
    """Energies and ratios span decades: three significant digits."""
    if not _num(value):
        return "–"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _row(cells: Sequence[str], cls: str = "", first_left: int = 1, paper_cells: int = 0) -> str:
    """A table row; the first `paper_cells` cells hold the paper's figures in a row of ours (drawn grey)."""

    def td(i: int, c: str) -> str:
        classes = " ".join(k for k, on in (("l", i < first_left), ("p", i < paper_cells)) if on)
        return f'<td class="{classes}">{c}</td>' if classes else f"<td>{c}</td>"

    tds = "".join(td(i, c) for i, c in enumerate(cells))
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


def _inter_section(title: str, other: str, part: Any, result: dict | None, headers: list[str],
                   body: list[str]) -> str:
    """One dataset pair of an inter-dataset table (3 or 5): title, our classes, the table and our notes."""
    if not result:
        body.append(_status_row("ours", _why(part), len(headers) - 1))
    if other == "fashion-mnist":
        title += " (stands in for CIFAR-100 where its data is not here)"
    out = [f"<h3>{_e(title)}</h3>"]
    if result:
        ca, cb = result.get("classes", [[], []])
        out.append(f'<p class="notes">our C1..C4, drawn at random: CIFAR-10 {_e(", ".join(ca))}; '
                   f"{_e(_DATASET_NAMES[other])} {_e(', '.join(cb))}; each of our pairs sits beside the paper's "
                   "cell of the same indices</p>")
    out.append(_table(headers, body))
    if result:
        out.append(_notes(result["experiment"].get("notes", [])))
    return "".join(out)


def _status_row(label: str, message: str, span: int) -> str:
    return f'<tr class="status"><td class="l">{_e(label)}</td><td class="l" colspan="{span}">{_e(message)}</td></tr>'


def _table(headers: Sequence[str], body: Sequence[str], left: int = 1) -> str:
    head = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _why(part: dict[str, Any] | None) -> str:
    """Why a part has no numbers, in words."""
    if part is None:
        return "not run in this profile"
    status = part.get("status", "")
    message = part.get("message", "")
    if status == "not run":
        return f"not run ({message})" if message else "not run"
    if status == "failed":
        return f"failed: {message}"
    return message or status


def _result(results: dict[str, Any], table: str, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    part = results.get(table, {}).get("parts", {}).get(name)
    return part, (part or {}).get("result")


def _compact_cell(results: dict[str, Any], table: str) -> str:
    status = results.get(table, {}).get("compact", {}).get("status", "not available")
    return f'<span title="{_e(results.get(table, {}).get("compact", {}).get("note", ""))}">{_e(status)}</span>'


def _model_line(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    text = f"{record.get('arch', '')}: {record.get('source', '')}"
    if record.get("source") == "trained here":
        epochs = record.get("epochs")
        text += (f", {epochs} epoch{'' if epochs == 1 else 's'} on {record.get('train_images')} images "
                 f"(held-out accuracy {pct(record.get('best_val_accuracy'))}%)")
    return text


# ---------------------------------------------------------------------------------------------- plots


class _Plots:
    """Plots drawn from the results' numbers into a temporary folder and embedded as base64 PNG."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory()
        self.count = 0

    def figure(self, draw: Callable[[Path], Path], caption: str) -> str:
        self.count += 1
        path = Path(self._folder.name) / f"plot{self.count}.png"
        try:
            draw(path)
        except ValueError as e:  # numbers a plot cannot show (no rows): say so rather than fail the report
            return f'<p class="notes">({_e(caption)}: no plot, {_e(e)})</p>'
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>")

    def close(self) -> None:
        self._folder.cleanup()


def _fractions(values: Sequence[Any]) -> list[float]:
    return [float(v) if _num(v) else float("nan") for v in values]


# ---------------------------------------------------------------------------------------------- tables


_VARIANTS = (("ci", "CI+TI+MC"), ("bln", "+MC-BLN"), ("bi", "+MC-BI"))


def _table1(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table1", {})
    paper = section.get("paper", {})
    headers = ["model", "", "model top-1", "top-5"]
    for _, name in _VARIANTS:
        headers += [f"{name} top-1", "top-5", "JI"]
    headers += ["compact kept params", "compact top-1"]
    span = len(headers) - 1
    body, described = [], []
    compact = _compact_cell(results, "table1")
    for prow in paper.get("rows", []):
        cells = [_e(prow["row"]), "paper", paper_pct(prow["model_top1"]), paper_pct(prow["model_top5"])]
        for key, _ in _VARIANTS:
            cells += [paper_pct(prow[f"{key}_top1"]), paper_pct(prow[f"{key}_top5"]), num(prow[f"{key}_ji"])]
        body.append(_row([*cells, "", ""], "paper", 2))
        name = f"{prow['dataset']}-{prow['arch']}"
        part, result = _result(results, "table1", name)
        if not result:
            body.append(_status_row("", f"ours: {_why(part)}", span))
            continue
        by = {(r["sites"], r["variant"]): r for r in result["rows"]}
        for sites in ("relu", "conv"):
            if not any(s == sites for s, _ in by):
                continue
            first = next(r for (s, _), r in by.items() if s == sites)
            cells = ["", f"ours, {sites} sites", pct(first["parent_top1"]), pct(first["parent_top5"])]
            for key, _ in _VARIANTS:
                r = by.get((sites, key), {})
                cells += [pct(r.get("softmax_top1")), pct(r.get("softmax_top5")), num(r.get("jaccard"))]
            c = result.get("compact", {})
            if sites == "relu" and c.get("status") == "done":
                cells += [pct(c.get("kept_parameters")), pct(c.get("top1"))]
            else:
                cells += [compact if sites == "relu" else "", ""]
            body.append(_row(cells, "ours", 2))
        described.append(f"{prow['row']}: {_model_line(result.get('model'))}; decomposed on "
                         f"{result.get('train_images')} training images, evaluated on {result.get('test_images')} "
                         "test images")
    out = [_table(headers, body, 2)]
    notes = [*paper.get("notes", []), *described,
             "ours: composed top-1/top-5 with the paper's softmax vote (results.json also holds the logit vote); "
             "JI: mean Jaccard index of the modules (kept nodes over all nodes)",
             "CIFAR-10 here is JPEG-compressed: the public ResNets lose about 10 points of top-1 on it; compare a "
             "model with its own modules, not with the paper's model"]
    out.append(_notes(notes))
    out.append(_detail(results, plots))
    return "".join(out)


def _detail(results: dict[str, Any], plots: _Plots) -> str:
    part, result = _result(results, "table1", "detail")
    if not result:
        return f'<p class="notes">Plots of one model\'s modules: {_e(_why(part))}.</p>'
    from .report import plot_module_sizes, plot_overlap_heatmap, plot_per_class_accuracy, plot_tradeoff

    classes = result["classes"]
    model = result.get("model", {}).get("model", "")
    figures = [
        plots.figure(lambda p: plot_per_class_accuracy(p, classes, _fractions(result["parent_recall"]),
                                                       _fractions(result["composed_recall"]),
                                                       f"{model}: per-class accuracy"),
                     f"Per-class accuracy (recall) of the parent and of the classifier composed from its modules "
                     f"({result.get('test_images')} test images)"),
        plots.figure(lambda p: plot_overlap_heatmap(p, classes, np.array(result["overlap"], dtype=float),
                                                    f"{model}: module overlap"),
                     "Overlap between modules: Jaccard index of their kept-node sets"),
        plots.figure(lambda p: plot_module_sizes(p, classes, _fractions(result["jaccard"]),
                                                 _fractions(result["kept_parameters"]), f"{model}: module sizes"),
                     "Module sizes: kept nodes (Jaccard index) and kept parameters, as shares of the parent"),
        plots.figure(lambda p: plot_tradeoff(p, result["tradeoff"], f"{model}: size vs accuracy"),
                     "Size/accuracy frontier: mean module size against composed top-1 as the activity threshold "
                     "rho rises, node and channel granularity (compact modules: their own sweep, "
                     "cnnmod tradeoff --method compact)"),
    ]
    return f"<h3>{_e(model)}: its modules</h3>" + "".join(figures)


_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet200": "ImageNet-200",
                  "fashion-mnist": "Fashion-MNIST"}


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if _num(v)]
    return float(np.mean(finite)) if finite else None


def _experiment_rows(result: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not result:
        return []
    return [r for r in result["experiment"]["rows"] if r.get(key) != "mean"]


def _by_cell(result: dict[str, Any] | None, key: str, count: int) -> list[dict[str, Any] | None]:
    """Our rows of Tables 3 and 5 at the positions of the paper's cells (C10-Ci x C100-Cj is cell 4i + j)."""
    rows = _experiment_rows(result, key)
    placed: list[dict[str, Any] | None] = [None] * count
    cells = (result or {}).get("cells") or [[k // 4, k % 4] for k in range(len(rows))]
    for (i, j), row in zip(cells, rows, strict=False):
        if 4 * i + j < count:
            placed[4 * i + j] = row
    return placed


def _table2(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table2", {})
    paper = section.get("paper", {})
    compact = _compact_cell(results, "table2")
    out = []
    headers = ["paper pair", "paper TMA", "paper MA", "paper Δ", "our pair", "our TMA", "our MA", "our Δ",
               "our MA from a store", "energy: train / reuse", "compact MA", "compact pair size",
               "compact inference time", "energy: train / compact"]
    for dataset in ("cifar10", "cifar100", "imagenet200"):
        prows = [r for r in paper.get("rows", []) if r["dataset"] == dataset]
        part, result = _result(results, "table2", dataset)
        ours = _experiment_rows(result, "pair")
        body = []
        for i in range(max(len(prows), len(ours))):
            p = prows[i] if i < len(prows) else None
            o = ours[i] if i < len(ours) else None
            cells = ([_e(p["row"]), paper_pct(p["tma"]), paper_pct(p["ma"]), paper_pct(p["ma"] - p["tma"])]
                     if p else ["", "", "", ""])
            if o:
                cells += [_e(o["pair"]), pct(o["scratch"]), pct(o["composed"]), pct(o["delta"]),
                          pct(o.get("store_composed")), sci(o.get("energy_ratio")), *_compact_pair_cells(o, compact)]
            else:
                cells += [""] * 10
            body.append(_row(cells, "ours" if o else "paper", 1, 4))
        text = paper.get("text", {}).get(f"{dataset}_mean_gain")
        mean_ours = _mean([o["delta"] for o in ours])
        mean_row: dict[str, Any] = next(
            (r for r in (result or {}).get("experiment", {}).get("rows", []) if r.get("pair") == "mean"), {})
        compact_mean = _compact_pair_cells(mean_row, "") if _num(mean_row.get("compact_composed")) else [""] * 4
        body.append(_row(["mean Δ", "", "", paper_pct(text), "", "", "", pct(mean_ours), "", "", *compact_mean],
                         "ours"))
        if not result:
            body.append(_status_row("ours", _why(part), len(headers) - 1))
        out.append(f"<h3>{_DATASET_NAMES[dataset]}</h3>")
        if result:
            parent = result.get("parent")
            out.append(f'<p class="notes">our parent: {_e(_model_line(parent))}; classes C1..C4 drawn at random: '
                       f"{_e(', '.join(result.get('classes', [])))}</p>")
        out.append(_table(headers, body))
        if result:
            out.append(_notes(result["experiment"].get("notes", [])))
    out.append(_notes([*paper.get("notes", []),
                       "TMA: a model of the parent's architecture trained from scratch on the pair; MA: the pair's "
                       "modules composed; Δ = MA − TMA, in points; the paper's classes are unnamed, so rows pair up "
                       "by position only"]))
    return "".join(out)


def _compact_pair_cells(row: dict[str, Any], missing: str) -> list[str]:
    """Table 2's compact columns of one pair: accuracy, parameters and inference time against the parent, and
    the energy of training the pair model over that of making the compact pair."""
    if not _num(row.get("compact_composed")):
        return [missing] * 4
    energy = row["train_kwh"] / max(row["compact_kwh"], 1e-30) if _num(row.get("compact_kwh")) else None
    return [pct(row["compact_composed"]), f"{pct(row.get('compact_params_vs_parent'))}% of the parent",
            f"{num(row.get('compact_time_vs_parent'))}x the parent", sci(energy)]


def _table3(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table3", {})
    paper = section.get("paper", {})
    compact = _compact_cell(results, "table3")
    prows = paper.get("rows", [])
    headers = ["paper pair", "TMA", "MA", "MMA", "our pair", "our TMA", "our MA", "our MMA", "MMA + score calib.",
               "MMA + head recalib.", "energy: train / reuse", "compact pair size", "compact inference time"]
    out = []
    for other in ("fashion-mnist", "cifar100"):
        part, result = _result(results, "table3", f"cifar10-{other}")
        ours = _experiment_rows(result, "pair")
        placed = _by_cell(result, "pair", len(prows))
        body = []
        for i in range(len(prows)):
            p, o = prows[i], placed[i]
            cells = [_e(p["row"]), paper_pct(p["tma"]), paper_pct(p["ma"]), paper_pct(p["mma"])] if p else [""] * 4
            if o:
                cells += [_e(o["pair"]), pct(o["scratch"]), pct(o["composed"]), pct(o["cl"]),
                          pct(o.get("cl_calibrated")), pct(o.get("cl_recalibrated")), sci(o.get("energy_ratio")),
                          compact, compact]
            else:
                cells += [""] * 9
            body.append(_row(cells, "ours" if o else "paper", 1, 4))
        text = paper.get("text", {})
        body.append(_row(["mean loss vs TMA", "", paper_pct(text.get("mean_loss_ma")),
                          paper_pct(text.get("mean_loss_mma")), "", "",
                          pct(_mean([o["scratch"] - o["composed"] for o in ours])),
                          pct(_mean([o["scratch"] - o["cl"] for o in ours])),
                          pct(_mean([o["scratch"] - o["cl_calibrated"] for o in ours if _num(o.get("cl_calibrated"))])),
                          pct(_mean([o["scratch"] - o["cl_recalibrated"] for o in ours
                                     if _num(o.get("cl_recalibrated"))])), "", "", ""], "ours"))
        out.append(_inter_section(f"CIFAR-10 x {_DATASET_NAMES[other]}", other, part, result, headers, body))
    out.append(_notes([*paper.get("notes", []),
                       "MMA here is training-free continuous learning (DESIGN.md); the two columns after it add score "
                       "calibration or head recalibration on a few images per class"]))
    return "".join(out)


def _table4(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table4", {})
    paper = section.get("paper", {})
    compact = _compact_cell(results, "table4")
    headers = ["", "", "TMA", "Prior MA", *[f"RM{i}" for i in range(10)], "mean gain", "compact"]
    out = []
    for dataset in ("cifar10", "cifar100", "imagenet200"):
        part, result = _result(results, "table4", dataset)
        body = []
        for metric in ("top1", "top5"):
            prow = next((r for r in paper.get("rows", []) if r["dataset"] == dataset and r["metric"] == metric), None)
            if prow:
                gain = float(np.mean(prow["rm"])) - prow["prior_ma"]
                body.append(_row([metric.replace("top", "top-"), "paper", paper_pct(prow["tma"]),
                                  paper_pct(prow["prior_ma"]), *[paper_pct(v) for v in prow["rm"]],
                                  paper_pct(gain), ""], "paper", 2))
            if not result:
                continue
            rows = [r for r in result["experiment"]["rows"] if r.get("class") != "all replaced"]
            summary = result["experiment"].get("summary", {})
            suffix = "" if metric == "top1" else "_top5"
            for label, key in (("ours", f"after{suffix}"), ("ours, calibrated", f"after_calibrated{suffix}")):
                after = [r.get(key) for r in rows]
                before = rows[0].get(f"before{suffix}") if rows else None
                mean_after = _mean(after)
                gain = mean_after - float(before) if mean_after is not None and _num(before) else None  # type: ignore[arg-type]
                cells = ["", label, pct(summary.get(f"weak_{metric}")), pct(before),
                         *[pct(v) for v in after[:10]], *[""] * (10 - min(len(after), 10)), pct(gain), compact]
                body.append(_row(cells, "ours", 2))
        if not result:
            body.append(_status_row("ours", _why(part), len(headers) - 1))
        out.append(f"<h3>{_DATASET_NAMES[dataset]}</h3>")
        if result:
            classes = [r["class"] for r in result["experiment"]["rows"] if r.get("class") != "all replaced"]
            out.append(f'<p class="notes">weaker parent: {_e(_model_line(result.get("weak")))}; stronger parent: '
                       f"{_e(_model_line(result.get('strong')))}; RM0..RM9 replace the modules of "
                       f"{_e(', '.join(classes[:10]))}</p>")
        out.append(_table(headers, body, 2))
        if result:
            out.append(_notes(result["experiment"].get("notes", [])))
    out.append(_notes([*paper.get("notes", []),
                       "TMA: the weaker parent's own accuracy; Prior MA: its modules composed; RMx: the module of "
                       "class x replaced by the stronger parent's; mean gain: mean RM minus Prior MA, in points"]))
    return "".join(out)


def _table5(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table5", {})
    paper = section.get("paper", {})
    compact = _compact_cell(results, "table5")
    prows = paper.get("rows", [])
    headers = ["paper replacement", "M1", "D1", "M5", "D5", "our replacement", "our M1", "our D1", "our M5",
               "our D5", "D1 + cont. learning", "D1 + score calib.", "energy: train / replace", "compact pair size",
               "compact inference time"]
    out = []
    for other in ("fashion-mnist", "cifar100"):
        part, result = _result(results, "table5", f"cifar10-{other}")
        ours = _experiment_rows(result, "replacement")
        placed = _by_cell(result, "replacement", len(prows))
        body = []
        for i in range(len(prows)):
            p, o = prows[i], placed[i]
            cells = ([_e(p["row"]), paper_pct(p["m1"]), paper_pct(p["d1"]), paper_pct(p["m5"]), paper_pct(p["d5"])]
                     if p else [""] * 5)
            if o:
                cells += [_e(o["replacement"]), pct(o.get("scratch")), pct(o["replaced"]), pct(o.get("scratch_top5")),
                          pct(o.get("replaced_top5")), pct(o.get("replaced_cl")), pct(o.get("replaced_calibrated")),
                          sci(o.get("energy_ratio")), compact, compact]
            else:
                cells += [""] * 10
            body.append(_row(cells, "ours" if o else "paper", 1, 5))
        text = paper.get("text", {})
        body.append(_row(["mean gain D − M", "", paper_pct(text.get("mean_gain_top1")), "",
                          paper_pct(text.get("mean_gain_top5")), "", "",
                          pct(_mean([o["replaced"] - o["scratch"] for o in ours if _num(o.get("scratch"))])), "",
                          pct(_mean([o["replaced_top5"] - o["scratch_top5"] for o in ours
                                     if _num(o.get("scratch_top5")) and _num(o.get("replaced_top5"))])),
                          "", "", "", "", ""], "ours"))
        out.append(_inter_section(f"CIFAR-10 module replaced by a {_DATASET_NAMES[other]} module", other, part,
                                  result, headers, body))
    out.append(_notes(["M1/M5: a model trained from scratch on the new classifier's classes, top-1/top-5; D1/D5: "
                       "the composed modules after the replacement; both on the same test images"]))
    return "".join(out)


_OPTIONS = (("Initial Model", "faulty parent (model)"), ("MA", "faulty (composed)"),
            ("Option 1", "1 replace from better parent"), ("Option 2", "2 train pair model, replace"),
            ("Option 3", "3 remove faulty module"), ("Option 4", "4 re-verify with pair model"))


def _table6(results: dict[str, Any], plots: _Plots) -> str:
    section = results.get("table6", {})
    paper = section.get("paper", {})
    part, result = _result(results, "table6", "imagenet200")
    ours = {r["option"]: r for r in _experiment_rows(result, "option")}
    confusion = next((k for r in ours.values() for k in r if k.endswith("_as_n02480855")), None)
    headers = ["strategy", "paper top-1", "paper top-5", "our option", "our top-1", "our top-5",
               "pair accuracy", "grooms called gorillas", "CO2e (lbs)", "seconds"]
    body = []
    prows = {r["row"]: r for r in paper.get("rows", [])}
    for paper_name, our_name in _OPTIONS:
        p = prows.get(paper_name, {})
        o = ours.get(our_name)
        cells = [_e(paper_name), paper_pct(p.get("top1")), paper_pct(p.get("top5"))]
        if o:
            cells += [_e(our_name), pct(o.get("top1")), pct(o.get("top5")), pct(o.get("pair_accuracy")),
                      pct(o.get(confusion)) if confusion else "–", sci(o.get("repair_co2e_lbs")),
                      num(o.get("repair_seconds"), 1)]
        else:
            cells += [""] * 7
        body.append(_row(cells, "ours" if o else "paper", 1, 3))
    if not result:
        body.append(_status_row("ours", _why(part), len(headers) - 1))
    out = [_table(headers, body)]
    if result:
        epochs = result.get("epochs")
        out.append(f'<p class="notes">{_e(result.get("arch"))} parents of {len(result.get("classes", []))} classes '
                   f"(gorilla n02480855, groom n10148035 as the paper's person, and the first others), "
                   f"{epochs} epoch{'' if epochs == 1 else 's'} on {result.get('train_images')} images, "
                   f"{result.get('test_images')} test images</p>")
        out.append(_notes(result["experiment"].get("notes", [])))
    out.append(_notes(paper.get("notes", [])))
    return "".join(out)


def _figure6(results: dict[str, Any], plots: _Plots) -> str:
    from .report import plot_energy

    section = results.get("figure6", {})
    paper = section.get("paper", {})
    out = []
    scenarios = section.get("scenarios", [])
    if scenarios:
        labels = [s["scenario"].split(" (")[0].replace(" ", "\n") for s in scenarios]
        train = [max(s["co2e_lbs"].get("train from scratch", 0.0), 1e-12) for s in scenarios]
        modules = [max(next(v for k, v in s["co2e_lbs"].items() if k != "train from scratch"), 1e-12)
                   for s in scenarios]
        out.append(plots.figure(
            lambda p: plot_energy(p, labels, {"train from scratch": train, "with modules": modules},
                                  "CO2e: modules against training from scratch", "CO2e (lbs, log scale)"),
            "The paper's Figure 6: mean CO2e of building each classifier from modules (decompose and compose, or "
            "decompose the new module) against training the same architecture from scratch"))
        body = []
        for s in scenarios:
            for path, lbs in s["co2e_lbs"].items():
                body.append(_row([_e(s["scenario"]), _e(path), sci(lbs), sci(s["kwh"].get(path)), str(s["rows"])]))
        out.append(_table(["scenario", "path", "CO2e (lbs)", "kWh", "rows"], body, 2))
    else:
        out.append('<p class="notes">No scenario energies yet: Tables 2, 3 and 5 have not run.</p>')
    repair = [r for r in section.get("repair", []) if _num(r.get("co2e_lbs"))]
    if repair:
        out.append(plots.figure(
            lambda p: plot_energy(p, [r["option"] for r in repair], {"CO2e": [max(r["co2e_lbs"], 1e-12)
                                                                             for r in repair]},
                                  "Repair options (Table 6)", "CO2e (lbs, log scale)"),
            "CO2e of each repair option of Table 6 (the faulty parent's row: training it)"))
    ratios = section.get("ratios", {})
    body = []
    for prow in paper.get("rows", []):
        compact_ratio = section.get("compact_ratios", {}).get(prow["row"])
        body.append(_row([_e(prow["row"]), f"{prow['ratio']:g}x",
                          f"{sci(ratios.get(prow['row']))}x" if _num(ratios.get(prow["row"])) else "not measured",
                          f"{sci(compact_ratio)}x" if _num(compact_ratio) else _compact_cell(results, "figure6")]))
    out.append("<h3>Training over decomposition: the paper's ratios and ours</h3>")
    out.append(_table(["ratio", "paper", "ours", "compact modules"], body))
    one_time = section.get("one_time_decomposition_co2e_lbs", {})
    body = []
    for dataset, lbs in paper.get("one_time_decomposition_co2e_lbs", {}).items():
        body.append(_row([_DATASET_NAMES.get(dataset, dataset), f"{lbs:g}", sci(one_time.get(dataset))]))
    out.append("<h3>One-time decomposition of a parent into all its modules (lbs CO2e)</h3>")
    out.append(_table(["dataset", "paper", "ours (this profile's sizes)"], body))
    out.append(_notes([*paper.get("notes", []), *section.get("notes", [])]))
    return "".join(out)


_SECTIONS: tuple[tuple[str, Callable[[dict[str, Any], _Plots], str]], ...] = (
    ("table1", _table1), ("table2", _table2), ("table3", _table3), ("table4", _table4), ("table5", _table5),
    ("table6", _table6), ("figure6", _figure6))


def _header(results: dict[str, Any]) -> str:
    profile = results.get("profile", {})
    energy = results.get("energy") or {}
    sources = results.get("sources", {})
    counts: dict[str, int] = {}
    for part in results.get("parts", []):
        counts[part["status"]] = counts.get(part["status"], 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [
        f"<h1>Pan &amp; Rajan (ICSE 2022) reproduced by cnnmod {_e(results.get('cnnmod', ''))}</h1>",
        f"<p><b>profile {_e(profile.get('name', ''))}</b>: {_e(profile.get('summary', ''))}.</p>",
        f"<p>created {_e(results.get('created', ''))}; parts: {_e(status)}; compute {num(results.get('seconds'), 0)} "
        f"s ({num(results.get('run_seconds'), 0)} s in the last run), "
        f"{sci(energy.get('kwh'))} kWh, {sci(energy.get('co2e_lbs'))} lbs CO2e ({_e(energy.get('method', '–'))})</p>",
        '<p class="key">Rows in grey are the paper\'s figures (transcribed in cnnmod/paper/paper_results.json); '
        "rows in bold are ours. Accuracies in percent. Our sizes follow the profile, so our figures are those of "
        "smaller runs unless the profile is <code>full</code>.</p>",
        "<p class=\"notes\">data: " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in sources.items()) + "</p>",
        "<nav>" + "".join(f'<a href="#{t}">{t.replace("table", "Table ").replace("figure", "Figure ")}</a>'
                          for t, _ in _SECTIONS) + '<a href="#parts">parts</a></nav>',
    ]
    return "".join(lines)


def _parts(results: dict[str, Any]) -> str:
    body = [_row([_e(p["part"]), _e(p["status"]), num(p.get("seconds"), 1),
                  sci((p.get("energy") or {}).get("kwh"))], first_left=2)
            .replace("</tr>", f'<td class="l">{_e(p.get("message", ""))}</td></tr>')
            for p in results.get("parts", [])]
    return ('<h2 id="parts">Parts</h2><p class="notes">Each part is cached in parts/ under a hash of its inputs; '
            "running the same command again loads it (cached) and runs only what is missing or changed.</p>"
            + _table(["part", "status", "seconds", "kWh", "note"], body, 2))


def render_report(results: dict[str, Any]) -> str:
    """The whole report as one HTML document (plots need matplotlib: `pip install 'cnnmod[report]'`)."""
    plots = _Plots()
    try:
        body = [_header(results)]
        for table, render in _SECTIONS:
            title = results.get(table, {}).get("title", table)
            body.append(f'<section id="{table}"><h2>{_e(title)}</h2>{render(results, plots)}</section>')
        body.append(_parts(results))
    finally:
        plots.close()
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>cnnmod reproduction ({_e(results.get('profile', {}).get('name', ''))})</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
