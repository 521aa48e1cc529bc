"""When progress bars are drawn: only on a terminal, and never under `cnnmod --quiet`.

Every tqdm bar in cnnmod asks `show_progress(progress)` whether to draw itself. A bar written to a log file, a
CI log or a notebook's captured stderr turns every update into a line of its own, so bars are drawn only when
stderr is a terminal; `set_quiet(True)` (the CLI's `--quiet`) turns them off everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["compact_progress", "is_quiet", "set_quiet", "show_progress"]

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars (and the CLI's progress messages on stderr) off for this process, or back on."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or replaced streams
        return False


def show_progress(progress: bool = True, stream: TextIO | None = None) -> bool:
    """Whether a bar that the caller asked for (`progress`) is drawn: not quiet, and `stream` (default: the
    current sys.stderr) is a terminal."""
    return bool(progress) and not _quiet and _is_terminal(sys.stderr if stream is None else stream)


@contextmanager
def compact_progress(total: int, desc: str, progress: bool = True) -> Iterator[Callable[[str, int, int, float], None]]:
    """A bar over the `total` images of a compact fine-tune (drawn where `show_progress` says), and the callback
    that `cnnmod.engine.compact.compact_decompose` reports to."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", leave=False, disable=not show_progress(progress))

    def tick(stage: str, seen: int, of: int, loss: float) -> None:
        bar.update(seen - bar.n)

    try:
        yield tick
    finally:
        bar.close()
