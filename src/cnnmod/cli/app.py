"""The command group, shared options, and how results and errors reach the user."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from ..energy import EnergyReport
from ..errors import CnnmodError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnnmod")
def cli() -> None:
    """Decompose a trained CNN classifier into one module per class, and build classifiers from modules."""


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")(f)


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", default=None, help="torch device (default: cuda when present, else cpu).")(f)


def reports_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Print cnnmod errors as one line on stderr and exit 1, without a traceback."""

    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except CnnmodError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def emit(as_json: bool, payload: dict[str, Any], text: str, energy: EnergyReport | None = None) -> None:
    """Print the result; `energy` (the command's measured energy) is added to both forms."""
    if energy is not None:
        payload = {**payload, "energy": energy.to_json()}
        text = f"{text}\nenergy: {energy.describe()}"
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        click.echo(text)


def split_classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [c.strip() for c in value.split(",") if c.strip()]


def main() -> None:
    from . import (  # noqa: F401  (registers the commands)
        compose,
        decompose,
        demo,
        edit,
        evaluate,
        experiment,
        inspect,
        reuse,
        tradeoff,
        train,
        variants,
    )

    cli(prog_name="cnnmod")
