"""Single-GPU backend: one process on one CUDA device (Trainer drives it through accelerate)."""

from __future__ import annotations

from pathlib import Path

from launcher.backends.base import LaunchSpec, Rendezvous, worker_argv
from launcher.plan import Plan


class CudaBackend:
    name = "cuda"

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        # Pin one device so a multi-GPU box does not get an accidental DataParallel wrap.
        env = {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": str(plan.threads)}
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)
