"""JSON Lines: reading with errors that name the file and line, writing one record a line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import DataError


def check_regular_file(path: str | Path) -> None:
    """Data is read from regular files only: a device (/dev/zero) or a FIFO would be read until memory runs out."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise DataError(f"{path}: not a regular file (a folder, device or pipe). Fix: pass a data file.")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; DataError names file:line on bad input."""
    check_regular_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: invalid JSON ({exc.msg}). Fix: one JSON object per line.") from None
                except RecursionError:
                    raise DataError(f"{path}:{n}: nested too deeply to read. Fix: one flat JSON object per line.") from None
                yield n, value
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}). Fix: check the path.") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text. Fix: save the file as UTF-8.") from None


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """The records, one JSON object a line, replacing what the file held."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """One record added at the end, written as it happens (a crash keeps the lines before it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
