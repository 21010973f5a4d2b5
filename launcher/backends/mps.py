"""Apple-silicon backend: one process on the Metal GPU."""

from __future__ import annotations

from pathlib import Path

from launcher.backends.base import LaunchSpec, Rendezvous, worker_argv
from launcher.plan import MPS_HIGH_WATERMARK_RATIO, MPS_LOW_WATERMARK_RATIO, Plan


class MpsBackend:
    name = "mps"

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        env = {
            # Ops without an MPS kernel run on the CPU instead of crashing the run.
            "PYTORCH_ENABLE_MPS_FALLBACK": "1",
            # The limit the planner sized the batch for, and a low watermark below it: torch refuses LOW > HIGH
            # at the first allocation (launcher.plan.MPS_HIGH_WATERMARK_RATIO says why and where).
            "PYTORCH_MPS_HIGH_WATERMARK_RATIO": str(MPS_HIGH_WATERMARK_RATIO),
            "PYTORCH_MPS_LOW_WATERMARK_RATIO": str(MPS_LOW_WATERMARK_RATIO),
            "OMP_NUM_THREADS": str(plan.threads),
        }
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)
