"""Apple-silicon backend: one process on the Metal GPU."""

from __future__ import annotations

from pathlib import Path

from backends.base import LaunchSpec, Rendezvous, worker_argv
from launcher.hardware import HardwareInfo
from launcher.plan import Plan

# Cap MPS allocations at 70% of unified memory so the OS and other apps keep the rest (the default of
# 1.7x lets MPS swap the whole machine before raising out-of-memory).
MPS_HIGH_WATERMARK = "0.7"


class MpsBackend:
    name = "mps"

    def check(self, plan: Plan, hw: HardwareInfo) -> list[str]:
        return [] if hw.mps else ["no Apple-silicon GPU detected (hardware.backend=cpu or auto)"]

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        env = {
            # Ops without an MPS kernel run on the CPU instead of crashing the run.
            "PYTORCH_ENABLE_MPS_FALLBACK": "1",
            "PYTORCH_MPS_HIGH_WATERMARK_RATIO": MPS_HIGH_WATERMARK,
            "OMP_NUM_THREADS": str(plan.threads),
        }
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)
