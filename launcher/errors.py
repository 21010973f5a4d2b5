"""User-facing errors: collected, then raised once, each naming the key, the bad value and the fix."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

# A bad value is shown shortened: a few YAML aliases can make one value expand to billions of items
# (nine keys each listing the previous one nine times: 9^9), and repr() would render every one of them.
_SHORT = reprlib.Repr()  # attributes, not keywords: Python 3.11's Repr takes none
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 120, 60, 120
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxarray = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdeque = 6
# At most this many problems are listed; the rest are counted (a million unknown keys printed 164 MB).
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    fix: str
    got: Any = None
    where: str | None = None

    def render(self) -> str:
        got = f" (got {_SHORT.repr(self.got)})" if self.got is not None else ""
        where = f" [{self.where}]" if self.where else ""
        return f"{self.key}{where}: {self.message}{got}. Fix: {self.fix}"


class SftlaunchError(Exception):
    """An error the user can fix; the CLI prints it without a traceback."""

    exit_code = 1


class ConfigError(SftlaunchError):
    """One or more problems in a recipe, its overrides or a hardware profile (exit code 2)."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        merged: dict[str, Problem] = {}
        for p in problems:
            if p.key in merged and p.message not in merged[p.key].message.split("; or "):  # each message once
                old = merged[p.key]
                merged[p.key] = Problem(p.key, f"{old.message}; or {p.message}", old.fix, old.got, old.where)
            else:
                merged.setdefault(p.key, p)
        self.problems = list(merged.values())
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the configuration:"
        shown = [f"  - {p.render()}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        if count > MAX_PROBLEMS_SHOWN:
            shown.append(f"  ... and {count - MAX_PROBLEMS_SHOWN} more (fix these first)")
        super().__init__("\n".join([head] + shown))


class PlanError(SftlaunchError):
    """The recipe cannot be honoured on this hardware (exit code 2)."""

    exit_code = 2


class DataError(SftlaunchError):
    """Training or evaluation data is unusable (exit code 2)."""

    exit_code = 2


class ModelError(SftlaunchError):
    """A model reference cannot be resolved or loaded (exit code 2)."""

    exit_code = 2


class StorageError(SftlaunchError):
    """A file of the run could not be written: disk full, read-only, quota (exit code 74, EX_IOERR)."""

    exit_code = 74


def check_writable(path, key: str) -> None:
    """Before any work: path (a file or folder to create) can be written, else StorageError naming it and the fix.

    The first folder that exists on the way up is what decides; a file there instead of a folder cannot hold it.
    """
    import os
    from pathlib import Path

    target = Path(path).expanduser().absolute()
    probe = target if target.exists() else target.parent
    while not probe.exists():
        probe = probe.parent
    if target.exists() and target.is_dir():
        probe = target
    elif not probe.is_dir():
        raise StorageError(f"{key} {path}: {probe} is a file, so nothing can be created under it. Fix: choose a path "
                           "in a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"{key} {path}: {probe} is not writable (permissions, or a read-only file system). Fix: "
                           "choose a folder you can write to.")


class writing:
    """`with writing(path, key):` turns an OSError while writing (permission, read-only, not a directory, disk
    full, quota) into StorageError (exit 74) naming the file and the fix, instead of a traceback."""

    def __init__(self, path, key: str):
        self.path, self.key = path, key

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            where = exc.filename or self.path
            raise StorageError(f"{self.key}: cannot write {where} ({exc.strerror or exc}). Fix: free space there, or "
                               "choose a writable folder.") from None
        return False


class ClusterError(SftlaunchError):
    """A scheduler or cloud launcher (SLURM, SkyPilot) is missing or refused the job (exit code 2)."""

    exit_code = 2
