"""The JSON files fxmerge writes (plans, latency and importance tables): a format name and a
version in every file, reads that say what is wrong with a bad file, and writes that never
leave a half-written file behind.

Writes go to a temporary file of their own in the target folder, synced to disk, then renamed
over the target in one step (``os.replace``): a reader sees the old file or the new one, never
a mix, and two processes saving the same path at once cannot trip over each other's
temporary file.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from fxmerge.errors import FxMergeError, InvalidArgumentError, MalformedFileError


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an importance table", "a plan"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def check_header(data: Any, fmt: str, version: int | Collection[int], error: type[FxMergeError] = MalformedFileError,
                 *, source: str | os.PathLike | None = None, retired: Mapping[int, str] | None = None) -> None:
    """Raise ``error`` unless ``data`` is a ``fmt`` object of a supported ``version`` (one
    version or several). ``source`` (a file) is named in the message. ``retired`` maps old
    versions this fxmerge no longer reads to what to say about them (why, and what to do)."""
    where = f"{source}: " if source is not None else ""
    if isinstance(data, dict) and data.get("format") == fmt and type(data.get("version")) is int \
            and data["version"] in (retired or {}):
        raise error(f"{where}{retired[data['version']]}")
    if not isinstance(data, dict):
        raise error(f"{where}not {_a(fmt)} file: it holds a JSON {_json_kind(data)}, not an object")
    found = data.get("format")
    if found != fmt:
        what = f"its format is {found!r}" if found is not None else "it has no 'format' field"
        raise error(f"{where}not {_a(fmt)} file ({what}); pass a file that fxmerge saved as {fmt}")
    versions = (version,) if isinstance(version, int) else tuple(version)
    found = data.get("version")
    readable = " or ".join(map(str, versions))
    if type(found) is not int:  # `type`: JSON true must not pass as 1
        raise error(f"{where}the 'version' field must be an integer ({readable} for this fxmerge); got {found!r}")
    if found not in versions:
        raise error(f"{where}{fmt} version {found!r} is not supported (this fxmerge reads version {readable}); "
                    "re-create the file with this version of fxmerge")


def write_json(path: str | os.PathLike, data: dict, indent: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see the module's docstring)."""
    path = Path(path)
    text = json.dumps(data, indent=indent)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # a replaced file keeps its permissions
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def _new_temporary(path: Path) -> tuple[int, str]:
    """A new file of our own beside ``path``, created with mode 0o666 so that the process's
    umask applies as for any new file (``tempfile.mkstemp`` would make it owner-only)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | os.PathLike, what: str = "fxmerge") -> dict:
    """The JSON object in ``path``; :class:`MalformedFileError` naming the file (and that it
    should hold a ``what`` file) when it is empty, not JSON, cut off or not an object."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise MalformedFileError(f"{path}: the {what} file is empty (an interrupted write?); delete it or re-create it")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise MalformedFileError(f"{path}: not {_a(what)} file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        if exc.pos >= len(raw.rstrip()) or exc.msg.startswith("Unterminated string"):
            problem = "the JSON ends too early (a truncated file?)"
        else:
            problem = f"the JSON is malformed: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise MalformedFileError(f"{path}: not a valid {what} file: {problem}; delete it or re-create it") from None
    if not isinstance(data, dict):
        raise MalformedFileError(f"{path}: not {_a(what)} file: it holds a JSON {_json_kind(data)}, not an object")
    return data


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_output_folder(path: str | os.PathLike | None) -> None:
    """Long work saves as it goes: the folder of ``path`` must exist before any of it is done."""
    if path is not None and not Path(path).parent.is_dir():
        raise InvalidArgumentError(f"path: the folder {str(Path(path).parent)!r} of {str(path)!r} does not exist; "
                                   "create it or choose another path")
