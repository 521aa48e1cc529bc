"""A user's own model class: `FILE.py:NAME` or `package.module:NAME` (the uvicorn convention).

NAME is an `nn.Module` subclass (constructed with no arguments), a function that returns a module, or a module
instance; a dotted NAME reaches into the file (`models.py:zoo.resnet32`). Importing the file runs its code: that
is how Python defines the class, and why a model imported once (`cnnmod import`) is then read as data.

The folder of FILE.py (or the current folder, for `package.module`) is put at the front of `sys.path` while it is
imported, so the file can import its neighbours.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError

__all__ = ["CodeRef", "build_user_model", "parse_code_ref"]

_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class CodeRef:
    """Where a model's code is: a Python file or an importable module, and the name inside it."""

    file: Path | None
    module: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.file if self.file is not None else self.module}:{self.name}"


def parse_code_ref(text: str) -> CodeRef | None:
    """`FILE.py:NAME` or `package.module:NAME` as a CodeRef; None for anything else (a path, a zoo name)."""
    where, sep, name = str(text).rpartition(":")
    if not sep or not where or not _MODULE_PATH.fullmatch(name):
        return None
    if where.endswith(".py"):
        return CodeRef(Path(where), None, name)
    if _MODULE_PATH.fullmatch(where):
        return CodeRef(None, where, name)
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:
            pass


def _import(ref: CodeRef) -> Any:
    if ref.file is not None:
        path = ref.file.expanduser()
        if not path.is_file():
            raise ModelError(f"{path} does not exist (MODEL {ref}: a Python file and a name in it)")
        path = path.resolve()
        # one module per file (the hash keeps two models.py apart); registered so that dataclasses and pickling
        # inside the user's code find it
        name = f"cnnmod_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_" \
               f"{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelError(f"cannot import {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with _on_path(path.parent):
                spec.loader.exec_module(module)
        except BaseException as e:  # the user's code may raise anything, SystemExit included
            sys.modules.pop(name, None)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise ModelError(f"importing {path.name} failed: {_one_line(e)}") from None
        return module
    assert ref.module is not None
    try:
        with _on_path(Path.cwd()):
            return importlib.import_module(ref.module)
    except ModuleNotFoundError as e:
        if e.name and ref.module.startswith(e.name):
            raise ModelError(f"no module named '{e.name}' (MODEL {ref}): run cnnmod in the folder that holds it, "
                             "or add that folder to PYTHONPATH") from None
        raise ModelError(f"importing {ref.module} failed: {_one_line(e)}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the user's code may raise anything, SystemExit included
        raise ModelError(f"importing {ref.module} failed: {_one_line(e)}") from None


def build_user_model(ref: CodeRef) -> nn.Module:
    """Import the code and build the model NAME names (a class called with no arguments, or a function)."""
    obj: Any = _import(ref)
    for part in ref.name.split("."):
        if not hasattr(obj, part):
            where = ref.file.name if ref.file is not None else ref.module
            raise ModelError(f"{where} has no '{part}' (MODEL {ref})")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelError(f"{ref} is a {type(obj).__name__}, not an nn.Module class or a function returning one")
    what = "class" if isinstance(obj, type) else "function"
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ModelError(f"{ref} is the class {obj.__name__}, which is not an nn.Module")
    try:
        model = obj()
    except TypeError as e:
        raise ModelError(f"{ref}() failed ({_one_line(e)}): NAME must be a {what} callable with no arguments; "
                         "write a function that builds the model and name it instead") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise ModelError(f"{ref}() failed: {_one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref}() returned a {type(model).__name__}, not an nn.Module")
    return model


def describe(ref: CodeRef) -> str:
    """A short architecture name for a user's model: NAME's last part."""
    return ref.name.rsplit(".", 1)[-1]
