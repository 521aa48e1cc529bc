"""The `cnnmod` command line: one file per command.

Importing this package imports nothing but the standard library's `sys` and `signal`, so the console script's
`main` has Ctrl-C covered from its first instruction: the commands (click, torch) are imported inside it.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    from .interrupt import install, uninstall

    install()
    try:
        from .app import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    finally:
        uninstall()
