"""Markdown tables from plain numbers: what every command prints (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["format_float", "markdown_table"]


def format_float(value: float) -> str:
    """Four significant digits; positional for everyday magnitudes, scientific for tiny or huge ones."""
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if value == 0.0 or 1e-4 <= abs(value) < 1e6:
        return np.format_float_positional(value, precision=4, unique=True, fractional=False, trim="-")
    return f"{value:.4g}"


def _cell(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, float | np.floating):
        text = format_float(float(value))
    else:
        text = str(value)
    return text.replace("\r\n", " ").replace("\n", " ").replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, ending in a newline.

    Floats (Python or numpy) get four significant digits (0.93124 -> "0.9312", 123.456 -> "123.5"); strings
    are kept as given, other values go through str(). Pipes are escaped and newlines become spaces.
    """
    if not headers:
        raise ValueError("a table needs at least one header")
    width = len(headers)
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"row {i} has {len(row)} cells but there are {width} headers; pass one cell per header"
            )
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
