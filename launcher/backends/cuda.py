"""Single-GPU backend: one process on one CUDA device (Trainer drives it through accelerate)."""

from __future__ import annotations

from pathlib import Path

from launcher.backends.base import LaunchSpec, Rendezvous, worker_argv
from launcher.plan import Plan


class CudaBackend:
    name = "cuda"

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        # Pin the one device the plan was made for (so a multi-GPU box gets no accidental DataParallel wrap), the
        # first the user's CUDA_VISIBLE_DEVICES allowed, by its PCI index (launcher.hardware.visible_gpus).
        env = {**gpu_environment(plan.hardware.gpus[:1]), "OMP_NUM_THREADS": str(plan.threads)}
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)


def gpu_environment(gpus) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES naming exactly these GPUs, by the index nvidia-smi gave them at detection.

    CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and nvidia-smi always in PCI bus
    order: without the order variable, index 1 of one is not index 1 of the other on a mixed box. A GPU of
    a hardware profile (planned elsewhere) has no index: its position stands in.
    """
    indices = [str(g.index if g.index is not None else i) for i, g in enumerate(gpus)]
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(indices)}
