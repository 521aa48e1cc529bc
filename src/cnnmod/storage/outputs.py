"""The one output-path policy that every writer follows (stores, compositions, reports, model files, exports).

- An existing path is refused unless `overwrite` is given, and even then only a cnnmod artefact of the same
  kind (recognised by its manifest or metadata) is replaced; a user's folder or file is never touched.
- `check_output` runs before any work, so a bad `--out` costs nothing: it also checks that the destination's
  folder can be written.
- An artefact is written whole into a temporary sibling and then swapped into place, so at every instant the
  path holds the old artefact or the new one. Folders are swapped with one `renameat2(RENAME_EXCHANGE)` where the
  kernel has it; elsewhere the old folder is moved aside and a later write or load puts it back if the process
  died between the two renames.
- Files and folders get the permissions of the process's umask (0644 and 0755 under umask 022).
- Temporary siblings left by killed cnnmod processes are removed by the next write into the same folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import CnnmodError
from .fileio import process_umask

__all__ = [
    "OutputError",
    "OutputKind",
    "check_output",
    "kind_of",
    "recover_interrupted",
    "register_kind",
    "write_file",
    "write_folder",
    "write_report_folder",
]

_TEMP_MARK = "cnnmod-tmp"
_OLD_MARK = "cnnmod-old"
_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.(?:{_TEMP_MARK}|{_OLD_MARK})-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class OutputError(CnnmodError):
    """An output path that cnnmod will not write: it exists, belongs to the user, or cannot be written."""


@dataclass(frozen=True)
class OutputKind:
    """A kind of artefact: its name as the user reads it, whether it is a folder, and how to recognise one."""

    name: str
    folder: bool
    recognise: Callable[[Path], bool]


_KINDS: dict[str, OutputKind] = {}


def register_kind(name: str, folder: bool, recognise: Callable[[Path], bool]) -> OutputKind:
    """Declare an artefact kind; `recognise(path)` says whether an existing path is one (never raises)."""
    kind = OutputKind(name, folder, recognise)
    _KINDS[name] = kind
    return kind


def _kind(name: str) -> OutputKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown output kind {name!r}; known: {', '.join(sorted(_KINDS))}") from None


def _manifest_format(folder: Path) -> str | None:
    try:
        with open(folder / "manifest.json", encoding="utf-8") as f:
            manifest = json.loads(f.read(1 << 20))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    value = manifest.get("format") if isinstance(manifest, dict) else None
    return value if isinstance(value, str) else None


def folder_with_format(fmt: str) -> Callable[[Path], bool]:
    """A recogniser for folders whose manifest.json names `fmt` as its format."""
    return lambda path: path.is_dir() and not path.is_symlink() and _manifest_format(path) == fmt


def safetensors_with_metadata(key: str, value: str | None = None) -> Callable[[Path], bool]:
    """A recogniser for safetensors files whose metadata holds `key` (equal to `value` when given)."""

    def recognise(path: Path) -> bool:
        if not path.is_file() or path.is_symlink():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # noqa: BLE001  (any unreadable file is simply not ours)
            return False
        return key in metadata and (value is None or metadata[key] == value)

    return recognise


def kind_of(path: Path) -> str | None:
    """The name of the registered kind that `path` is, or None when it is not a cnnmod artefact."""
    for kind in _KINDS.values():
        try:
            if kind.recognise(path):
                return kind.name
        except OSError:
            continue
    return None


def check_output(path: Path | str, kind: str, overwrite: bool) -> Path:
    """Refuse, before any work, an output path that cnnmod would not write; returns it as a Path.

    The path must not exist, or (with `overwrite`) must hold a cnnmod artefact of `kind`; its folder must exist
    or be creatable, and be writable.
    """
    path = Path(path)
    spec = _kind(kind)
    if path.name in ("", ".", "..") or path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise OutputError(f"{path} is the current folder or above it: name a new {spec.name} path for --out")
    recover_interrupted(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{path} exists; choose another --out or pass --overwrite")
        found = kind_of(path)
        if found != kind:
            plain = "a folder" if path.is_dir() else "a file"
            what = f"a cnnmod {found}" if found else f"{plain} cnnmod did not write"
            raise OutputError(f"{path} is {what}, not a cnnmod {spec.name}: --overwrite only replaces a {spec.name}; "
                              "choose another --out")
    _check_parent_writable(path)
    return path


def _check_parent_writable(path: Path) -> None:
    parent = path.absolute().parent
    existing = parent
    while not existing.exists():
        if existing.is_symlink() or existing == existing.parent:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {existing} is not writable")


def _apply_umask(path: Path, folder: bool) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~process_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary siblings that dead cnnmod processes left in `folder` (never anything else).

    An aside copy of an artefact whose path is empty is restored instead of removed.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or _pid_alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if _OLD_MARK in entry.name and not target.exists() and not target.is_symlink():
            try:
                os.replace(entry, target)
            except OSError:
                pass
            continue
        _remove(entry)


def recover_interrupted(path: Path | str) -> None:
    """Put back an artefact that a killed swap left aside (only when `path` itself is missing)."""
    path = Path(path)
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return
    remove_stale_temporaries(path.parent)


def _temp_name(path: Path, mark: str) -> str:
    return f".{path.name}.{mark}-{os.getpid()}-"


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _exchange(a: Path, b: Path, flags: int = _RENAME_EXCHANGE) -> bool:
    """Swap two existing paths in one atomic step (or, with RENAME_NOREPLACE, move `a` to a `b` that must not
    exist); False when the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, path: Path, folder: bool) -> None:
    """Move a finished temporary artefact onto `path`, so that `path` never stops holding one of the two."""
    if not (path.exists() or path.is_symlink()):
        # a plain rename would replace an empty folder that appeared at `path` meanwhile
        if not _exchange(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)
    elif not folder:
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        _remove(tmp)  # tmp now holds the old artefact
    else:
        old = Path(tempfile.mkdtemp(prefix=_temp_name(path, _OLD_MARK), dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)
    _fsync_dir(path.parent)


def _prepare(path: Path, kind: str, overwrite: bool) -> OutputKind:
    spec = _kind(kind)
    check_output(path, kind, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder of {path}: {e.strerror or e}") from None
    remove_stale_temporaries(path.parent)
    return spec


def _as_output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {e.strerror or e}")


@contextmanager
def write_folder(path: Path | str, kind: str, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; swapped into place when the block succeeds, else removed."""
    path = Path(path)
    spec = _prepare(path, kind, overwrite)
    if not spec.folder:
        raise ValueError(f"a {spec.name} is a file, not a folder")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(path, _TEMP_MARK), dir=path.parent))
        _apply_umask(tmp, folder=True)
    except OSError as e:
        raise _as_output_error(path, e) from None
    try:
        yield tmp
        check_output(path, kind, overwrite)  # nothing else appeared there while we worked
        try:
            _put_in_place(tmp, path, folder=True)
        except OSError as e:
            raise _as_output_error(path, e) from None
    finally:
        if tmp.exists():
            _remove(tmp)


def write_file(path: Path | str, kind: str, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it onto `path` atomically."""
    path = Path(path)
    spec = _prepare(path, kind, overwrite)
    if spec.folder:
        raise ValueError(f"a {spec.name} is a folder, not a file")
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_name(path, _TEMP_MARK), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _as_output_error(path, e) from None
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _apply_umask(tmp, folder=False)
        check_output(path, kind, overwrite)
        _put_in_place(tmp, path, folder=False)
    except OSError as e:
        raise _as_output_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


REPORT_FORMAT = "cnnmod.report"


@contextmanager
def write_report_folder(path: Path | str, overwrite: bool, what: str = "report") -> Iterator[Path]:
    """`write_folder` for a report (Markdown, JSON, plots): marked by a manifest so `--overwrite` can recognise
    it next time."""
    from .fileio import atomic_write_text

    with write_folder(path, "report", overwrite) as tmp:
        yield tmp
        atomic_write_text(tmp / "manifest.json", json.dumps({"format": REPORT_FORMAT, "version": 1, "what": what}))


register_kind("report", folder=True, recognise=folder_with_format(REPORT_FORMAT))
