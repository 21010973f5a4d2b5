"""DeepSpeed backend: one worker per device on each node, started by torchrun; ZeRO JSON from the plan.

The ZeRO config leaves batch sizes, clipping and precision as "auto" so the Trainer fills them from the
same plan values it trains with: the two can never disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.backends.base import LaunchSpec, Rendezvous, worker_module_args
from launcher.backends.cuda import gpu_environment
from launcher.plan import Plan
from launcher.rundir import RunDir


# Seconds a stopping worker has for its last step and checkpoint before torchrun kills it.
STOP_GRACE_SECONDS = 300


def zero_config(plan: Plan) -> dict:
    zero: dict = {"stage": plan.zero_stage, "overlap_comm": plan.device == "cuda", "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if plan.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     # The adapter is saved whole from rank 0, not as shards.
                     "stage3_gather_16bit_weights_on_model_save": True})
    if plan.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": plan.device == "cuda"}
        if plan.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": plan.device == "cuda"}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        # fp16 keeps fp32 master weights inside DeepSpeed and a dynamic loss scale (loss_scale 0).
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # The Trainer's AdamW also runs on offloaded state; DeepSpeedCPUAdam would need a compiled op.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    name = "deepspeed"

    def build(self, plan: Plan, run_dir: Path, resume: bool = False, rendezvous: Rendezvous = Rendezvous()) -> LaunchSpec:
        # torchrun's own flags, then the worker's module and arguments as one process would get them.
        argv = [sys.executable, "-m", "torch.distributed.run",
                f"--nnodes={plan.nodes}", f"--node_rank={rendezvous.node_rank}",
                f"--nproc_per_node={plan.processes_per_node}",
                f"--master_addr={rendezvous.master_addr}", f"--master_port={rendezvous.master_port}",
                *worker_module_args(run_dir, resume)]
        # On SIGTERM/SIGINT torchrun passes the signal to the workers and SIGKILLs them 30 s later (torch
        # 2.13 torch/distributed/launcher/api.py: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30; elastic agent
        # _shutdown -> pcontext.close(death_sig, timeout)). A worker finishes its step and writes a full
        # checkpoint first, which can take longer: give it STOP_GRACE_SECONDS.
        env = {"OMP_NUM_THREADS": str(plan.threads), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_GRACE_SECONDS)}
        if plan.device == "cuda":
            env.update(gpu_environment(plan.hardware.gpus[:plan.processes_per_node]))
        if plan.device == "cpu":
            # DeepSpeed on CPU: its CPU accelerator, collectives over gloo.
            env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
        # No hostfile: torchrun's static rendezvous (--nnodes/--node_rank/--master_addr) places the nodes, and
        # each node is started by its own `sftlaunch run` (the commands `sftlaunch plan` prints).
        return LaunchSpec(argv=tuple(argv), env=env, files={RunDir.DS_CONFIG: json.dumps(zero_config(plan), indent=2)})
