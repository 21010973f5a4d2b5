"""The Backend protocol and the LaunchSpec every backend builds: data, not actions."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from launcher.plan import Plan


@dataclass(frozen=True)
class Rendezvous:
    """Where this node is in a job (torchrun's static rendezvous); one-process backends ignore it."""

    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass(frozen=True)
class LaunchSpec:
    """What the runner executes: an argument list (never a shell string), extra env, files to write."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # run-dir-relative path -> content


class Backend(Protocol):
    name: str

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        """The command, environment and files that start the workers (resume: continue from a checkpoint)."""
        ...


def worker_module_args(run_dir: Path, resume: bool = False) -> tuple[str, ...]:
    """The worker as Python's arguments (`-m launcher.worker RUN_DIR [--resume]`), for python or torchrun."""
    return ("-m", "launcher.worker", str(run_dir), *(("--resume",) if resume else ()))


def worker_argv(run_dir: Path, resume: bool = False) -> tuple[str, ...]:
    """The command that starts one worker process."""
    return (sys.executable, *worker_module_args(run_dir, resume))
