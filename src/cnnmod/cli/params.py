"""Option types that refuse out-of-range values where they are parsed, with a one-line usage error."""

from __future__ import annotations

import math
from typing import Any

import click

__all__ = ["COUNT", "NON_NEGATIVE", "POSITIVE", "RATE", "SEED", "FiniteFloat", "FloatList"]


class FiniteFloat(click.ParamType):
    """A finite float within [low, high]; `open_low`/`open_high` exclude the bound."""

    name = "number"

    def __init__(self, low: float = -math.inf, high: float = math.inf, open_low: bool = False,
                 open_high: bool = False) -> None:
        self.low, self.high, self.open_low, self.open_high = low, high, open_low, open_high

    def describe(self) -> str:
        left = "(" if self.open_low else "["
        right = ")" if self.open_high else "]"
        if math.isinf(self.high):
            return f"a finite number {'>' if self.open_low else '>='} {self.low:g}"
        return f"a finite number in {left}{self.low:g}, {self.high:g}{right}"

    def check(self, number: float) -> bool:
        if not math.isfinite(number):
            return False
        above = number > self.low if self.open_low else number >= self.low
        below = number < self.high if self.open_high else number <= self.high
        return above and below

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not self.check(number):
            self.fail(f"{value!r} is not {self.describe()}", param, ctx)
        return number


class FloatList(click.ParamType):
    """Comma-separated numbers, each checked by `item`; at least one."""

    name = "numbers"

    def __init__(self, item: FiniteFloat) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if not parts or any(not p for p in parts):
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 0,0.1,0.2)", param, ctx)
        return tuple(self.item.convert(p, param, ctx) for p in parts)


COUNT = click.IntRange(min=1)
SEED = click.IntRange(0, 2**32 - 1)
RATE = FiniteFloat(0.0, 1.0)
POSITIVE = FiniteFloat(0.0, open_low=True)
NON_NEGATIVE = FiniteFloat(0.0)
