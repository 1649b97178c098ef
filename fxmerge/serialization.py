"""The JSON files fxmerge writes (plans, latency and importance tables): a format name and a
version in every file, and writes that never leave a half-written file behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

from fxmerge.errors import FxMergeError


def check_header(data: dict, fmt: str, version: int, error: type[FxMergeError] = FxMergeError) -> None:
    if data.get("format") != fmt:
        raise error(f"not an {fmt} file (format={data.get('format')!r})")
    if data.get("version") != version:
        raise error(f"{fmt} version {data.get('version')} is not supported (expected {version})")


def write_json(path: str | os.PathLike, data: dict, indent: int | None = None) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
