"""This process's place in the job (rank, world size, main process), read once from torchrun's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Process:
    """Parsed once from torchrun's environment (one process: rank 0 of 1) and passed down."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Process":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0


# `python -m launcher.worker RUN_DIR --final-evaluation`: the worker replaced itself (exec) after training, and this
# process only evaluates what it saved (launcher.job, Plan.final_eval_fresh).
FINAL_EVALUATION_FLAG = "--final-evaluation"
