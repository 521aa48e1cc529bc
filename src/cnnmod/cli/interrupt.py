"""Ctrl-C as one line, whenever it comes.

Python's own handler raises KeyboardInterrupt wherever the main thread happens to be. Inside an import (for example
in importlib's module-lock weakref callback) or a finaliser, the exception cannot propagate: Python prints
"Exception ignored in ... Traceback" and carries on. This handler raises only where the exception can reach the
command's `except KeyboardInterrupt`; elsewhere it remembers the signal and looks again a moment later.

Two more places count as elsewhere. Inside the `__init__` of an object that has a `__del__`: raising there leaves a
half-built object whose finaliser then fails (zipfile.ZipFile's, for one, reads an attribute its `__init__` had not
set yet). And once the interrupt is raised, the command is ending: a finaliser that fails on an object it cut short
is not reported.

Standard library only, and nothing heavy: the console script installs it before importing click or torch.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

RETRY_SECONDS = 0.02
_pending = False


def _building_a_finalised_object(frame: FrameType) -> bool:
    if frame.f_code.co_name != "__init__" or frame.f_code.co_argcount == 0:
        return False
    built = frame.f_locals.get(frame.f_code.co_varnames[0])
    return getattr(type(built), "__del__", None) is not None


def _unsafe(frame: FrameType | None) -> bool:
    top = frame
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib") or _building_a_finalised_object(frame):
            return True
        frame = frame.f_back
    return top is not None and top.f_code.co_name in ("__del__", "cb", "_remove", "_callback")


def _ignore_unraisable(unraisable: object) -> None:
    return None


def _raise_when_safe(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _unsafe(frame):
        _pending = True
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        return
    _pending = False
    sys.unraisablehook = _ignore_unraisable
    raise KeyboardInterrupt


def _retry(signum: int, frame: FrameType | None) -> None:
    if _pending:
        _raise_when_safe(signal.SIGINT, frame)


def install() -> None:
    """Route SIGINT through the safe handler (idempotent; main thread only)."""
    signal.signal(signal.SIGALRM, _retry)
    signal.signal(signal.SIGINT, _raise_when_safe)


def uninstall() -> None:
    """Stop any pending retry and ignore Ctrl-C from here on: the command has finished and the interpreter is
    shutting down, where no handler can run cleanly."""
    global _pending
    _pending = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
