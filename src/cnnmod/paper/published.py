"""The paper's own figures, transcribed once into `paper_results.json` (tables 1-6 and Figure 6, each row named
as in the paper), for every table of a reproduction to show beside ours."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["load_paper"]


@cache
def _text() -> str:
    return (resources.files("cnnmod.paper") / "paper_results.json").read_text(encoding="utf-8")


def load_paper() -> dict[str, Any]:
    """A fresh copy of the paper's figures: accuracies in percent, Jaccard indices as fractions, CO2e in lbs."""
    return json.loads(_text())  # type: ignore[no-any-return]
