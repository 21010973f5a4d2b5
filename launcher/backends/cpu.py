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
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "",
               # Trainer imports DeepSpeed whenever it is installed, unused or not (accelerate 1.15's
               # extract_model_from_parallel, via Trainer.__init__'s unwrap_model); told its accelerator,
               # it does not probe for a GPU and warn "Setting accelerator to CPU" at the start of every run.
               "DS_ACCELERATOR": "cpu"}
        return LaunchSpec(argv=worker_argv(run_dir, resume), env=env)
