"""The command group, shared options, and how results and errors reach the user."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from ..errors import CnnmodError
from .interrupt import install as install_interrupt_handler

if TYPE_CHECKING:
    from ..workflows.energy import EnergyReport

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_QUIET_HELP = ("No progress bars or progress messages on stderr (results, warnings and errors still print); "
               "bars are only drawn when stderr is a terminal anyway.")


SHARDED_COMMANDS = frozenset({"decompose", "evaluate"})
"""The commands whose processes share the work under torchrun (they take a `cnnmod.engine.distributed.Shard`)."""


class _Command(click.Command):
    """A command that refuses torchrun, unless it shares its work between the processes: checked once its
    arguments are parsed (so --help and usage errors read as usual) and before it reads or writes anything."""

    def invoke(self, ctx: click.Context) -> Any:
        name = ctx.command_path.partition(" ")[2]
        if name not in SHARDED_COMMANDS:
            from ..engine.distributed import one_process_only

            try:
                one_process_only(f"cnnmod {name}")
            except CnnmodError as e:
                _fail(str(e), EXIT_USER_ERROR)
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups (cnnmod repair, cnnmod experiment) are of this class too


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnnmod")
@click.option("--quiet", "-q", is_flag=True, help=_QUIET_HELP)
def cli(quiet: bool) -> None:
    """Decompose a trained CNN classifier into one module per class, and build classifiers from modules."""
    from ..progress import set_quiet

    set_quiet(quiet)  # every invocation sets it, so one in-process run does not leak into the next


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        from ..progress import set_quiet

        set_quiet(True)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--json, and --quiet (also accepted after the command name)."""
    f = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet, help=_QUIET_HELP)(f)
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")(f)


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"this machine has {torch.cuda.device_count()} CUDA device(s); "
                                     f"{value} does not exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise click.BadParameter("MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise click.BadParameter(f"cnnmod runs on cpu, cuda or mps, not {device.type}")
    return value


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", default=None, callback=_check_device,
                        help="torch device (default: cuda when present, else cpu).")(f)


def reports_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Print cnnmod errors as one line on stderr and exit 1, without a traceback."""

    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except CnnmodError as e:
            _fail(str(e), EXIT_USER_ERROR)
        except OSError as e:  # a file the user named, or the disk, refused: not a bug in cnnmod
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}", EXIT_USER_ERROR)
        except MemoryError:
            _fail("out of memory: use fewer images, classes or a smaller --batch-size", EXIT_USER_ERROR)

    return wrapper


def _fail(message: str, code: int) -> None:
    text = " ".join(message.split())  # one line, whatever the message held
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


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
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise CnnmodError(f"no class names in {value!r}: write them comma-separated, e.g. cat,dog")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CnnmodError(f"class {twice[0]!r} is named twice in {value!r}")
    return names


def main() -> None:
    """The console script: every user error is one line on stderr and an exit status (see the README)."""
    install_interrupt_handler()
    try:
        code = _run()
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except click.UsageError as e:
        if e.ctx is not None and type(e).__name__ == "NoArgsIsHelpError":
            click.echo(e.ctx.get_help())
            sys.exit(0)
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None and e.ctx.parent else \
            " (see 'cnnmod --help')"
        click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        code = EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        code = e.exit_code
    except BrokenPipeError:  # output piped into a command that stopped reading (head, less)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_USER_ERROR
    sys.exit(code)


def register_commands() -> None:
    """Import every command's file, which registers it on `cli` (kept out of import time: they import torch)."""
    from . import (  # noqa: F401
        compose,
        decompose,
        demo,
        edit,
        evaluate,
        experiment,
        export,
        import_,
        inspect,
        predict,
        reproduce,
        reuse,
        tradeoff,
        train,
        variants,
    )


def _run() -> int:
    register_commands()
    try:
        cli.main(prog_name="cnnmod", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    return 0
