"""User-facing errors: collected, then raised once, each naming the key, the bad value and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    fix: str
    got: Any = None
    where: str | None = None

    def render(self) -> str:
        got = f" (got {self.got!r})" if self.got is not None else ""
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
            if p.key in merged and merged[p.key].message != p.message:
                old = merged[p.key]
                merged[p.key] = Problem(p.key, f"{old.message}; or {p.message}", old.fix, old.got, old.where)
            else:
                merged.setdefault(p.key, p)
        self.problems = list(merged.values())
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the configuration:"
        super().__init__("\n".join([head] + [f"  - {p.render()}" for p in self.problems]))


class PlanError(SftlaunchError):
    """The recipe cannot be honoured on this hardware (exit code 2)."""

    exit_code = 2


class DataError(SftlaunchError):
    """Training or evaluation data is unusable (exit code 2)."""

    exit_code = 2


class ModelError(SftlaunchError):
    """A model reference cannot be resolved or loaded (exit code 2)."""

    exit_code = 2
