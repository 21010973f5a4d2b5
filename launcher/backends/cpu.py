"""CPU backend: one process, torch threads pinned to the planned count, no GPU visible."""

from __future__ import annotations

from pathlib import Path

from launcher.backends.base import LaunchSpec, Rendezvous, worker_argv
from launcher.plan import Plan


class CpuBackend:
    name = "cpu"

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        threads = str(plan.threads)
        # OMP/MKL read these at start-up, before the worker can call torch.set_num_threads.
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)
