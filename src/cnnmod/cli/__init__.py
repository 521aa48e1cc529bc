"""The `cnnmod` command line: one file per command."""

from __future__ import annotations

from .app import main

__all__ = ["main"]
