"""make_plan(recipe, hardware) -> Plan: every automatic choice, each with the reason it was made.

Pure: no probing, no imports of torch. Tests build fake HardwareInfo (a T4, an M2, 8xA100) and check
the plan directly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from launcher.errors import PlanError
from launcher.hardware import HardwareInfo
from launcher.recipe import Recipe
from launcher.tasks import get_task

# Beyond this, a bigger micro-batch on a CPU only adds padding: rows of one batch are padded to its
# longest sample, and a CPU gains little from wider matrix products.
CPU_MAX_MICRO_BATCH = 32
# Until the memory planner exists (backends issue), a GPU micro-batch this small fits any model the
# single-GPU backend is meant for (up to ~1B parameters with LoRA at 256 tokens on 16 GB).
GPU_DEFAULT_MICRO_BATCH = 8


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)
    field: str
    value: Any
    reason: str


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    recipe: Recipe
    hardware: HardwareInfo
    backend: str
    device: str
    precision: str
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    threads: int
    max_length: int
    trust_remote_code: bool
    decisions: tuple[Decision, ...]

    def decision(self, field: str) -> Decision:
        return next(d for d in self.decisions if d.field == field)

    def summary(self) -> dict:
        """The JSON view `sftlaunch plan --json` prints."""
        keys = ("backend", "device", "precision", "world_size", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "threads", "max_length", "trust_remote_code")
        out = {k: getattr(self, k) for k in keys}
        out["effective_batch_size"] = self.recipe.train.effective_batch_size
        out["hardware"] = self.hardware.name
        out["decisions"] = [d.model_dump(mode="json") for d in self.decisions]
        return out


def choose_backend(requested: str, hw: HardwareInfo) -> tuple[str, str]:
    """The backend to run on, and why. Raises PlanError if the hardware cannot run the request."""
    n = len(hw.gpus)
    if requested == "auto":
        if n > 1 or hw.nodes > 1:
            total = n * hw.nodes
            raise PlanError(
                f"hardware.backend=auto: this machine has {total} GPUs across {hw.nodes} node(s), which needs the "
                "multi-GPU DeepSpeed backend, not available in this version. Fix: set hardware.backend=cuda to "
                "train on one GPU."
            )
        if n == 1:
            return "cuda", f"one CUDA GPU ({hw.gpus[0].name}, {hw.gpus[0].memory_gb:.0f} GB)"
        if hw.mps:
            return "mps", "Apple-silicon GPU (MPS) detected, no CUDA GPU"
        return "cpu", "no CUDA GPU and no Apple-silicon GPU detected: training runs on the CPU"
    if requested == "cuda" and n == 0:
        raise PlanError("hardware.backend=cuda, but no CUDA GPU was detected. Fix: hardware.backend=auto (or cpu).")
    if requested == "mps" and not hw.mps:
        raise PlanError("hardware.backend=mps, but this is not an Apple-silicon Mac. Fix: hardware.backend=auto.")
    return requested, "requested by the recipe (hardware.backend)"


def choose_precision(requested: str, backend: str, hw: HardwareInfo) -> tuple[str, str]:
    """The precision policy as one table: (precision, reason), or PlanError for an impossible request."""
    if backend == "cuda":
        cc = hw.gpus[0].compute_capability
        has_bf16 = cc >= (8, 0)
        if requested == "auto":
            if has_bf16:
                return "bf16", f"compute capability {cc[0]}.{cc[1]} >= 8.0 has native bf16: bf16 autocast, fp32 master weights"
            return "fp16", (f"compute capability {cc[0]}.{cc[1]} < 8.0 has no bf16: fp16 autocast with a loss scaler; "
                            "weights stay fp32 under the optimizer (fp16 weights under Adam give grad_norm: nan)")
        if requested == "bf16" and not has_bf16:
            raise PlanError(f"hardware.precision=bf16, but {hw.gpus[0].name} (compute capability {cc[0]}.{cc[1]}) has no bf16. "
                            "Fix: hardware.precision=fp16 (or auto).")
        return requested, "requested by the recipe (hardware.precision)"
    if backend == "mps":
        if requested in ("auto", "fp32"):
            return "fp32", ("MPS: fp32, because mixed-precision training on MPS is not reliable across macOS/torch "
                            "versions (bf16 autocast needs macOS 14+, fp16 has no loss scaler there)")
        raise PlanError(f"hardware.precision={requested} is not supported for training on MPS. Fix: hardware.precision=fp32 (or auto).")
    # CPU
    if requested == "fp16":
        raise PlanError("hardware.precision=fp16 needs a CUDA GPU; CPUs have no fp16 training path. Fix: hardware.precision=bf16 or fp32.")
    if requested == "auto":
        if hw.cpu_bf16:
            return "bf16", ("CPU has native bf16 (avx512_bf16/AMX): bf16 autocast, measured 1.2x-2.4x faster than fp32 "
                            "here with similar loss; weights stay fp32 under the optimizer")
        return "fp32", "CPU has no native bf16 instructions: emulated bf16 would be slower than fp32"
    if requested == "bf16" and not hw.cpu_bf16:
        return "bf16", "requested by the recipe; this CPU has no native bf16, so it is emulated and may be slower than fp32"
    return requested, "requested by the recipe (hardware.precision)"


def _largest_pow2_divisor(n: int, cap: int) -> int:
    m = 1
    while m * 2 <= cap and n % (m * 2) == 0:
        m *= 2
    return m


def make_plan(recipe: Recipe, hw: HardwareInfo) -> Plan:
    """Decide backend, precision, batch layout, checkpointing and threads for this recipe on this hardware."""
    hwr = recipe.hardware
    decisions: list[Decision] = []

    def decide(field: str, value: Any, reason: str) -> Any:
        decisions.append(Decision(field=field, value=value, reason=reason))
        return value

    backend = decide("backend", *choose_backend(hwr.backend, hw))
    device = {"cuda": "cuda", "mps": "mps"}.get(backend, "cpu")
    precision = decide("precision", *choose_precision(hwr.precision, backend, hw))
    world_size = decide("world_size", 1, f"the {backend} backend runs one training process")

    effective = recipe.train.effective_batch_size
    if hwr.micro_batch_size == "auto":
        cap = CPU_MAX_MICRO_BATCH if backend == "cpu" else GPU_DEFAULT_MICRO_BATCH
        micro = _largest_pow2_divisor(effective // world_size, cap) if effective % world_size == 0 else 1
        why = (f"largest power of two <= {cap} that divides the effective batch {effective}"
               + (" (a CPU has no device memory to fit; beyond this only padding grows)" if backend == "cpu"
                  else " (default for one GPU; no memory estimate is made in this version)"))
        decide("micro_batch_size", micro, why)
    else:
        micro = hwr.micro_batch_size
        if micro < 1 or effective % (micro * world_size):
            raise PlanError(f"hardware.micro_batch_size={micro} does not divide train.effective_batch_size={effective} "
                            f"over {world_size} process(es). Fix: pick a divisor of {effective // world_size}, or 'auto'.")
        decide("micro_batch_size", micro, "requested by the recipe (hardware.micro_batch_size)")
    accumulation = decide("gradient_accumulation_steps", effective // (micro * world_size),
                          f"effective batch {effective} = micro-batch {micro} x accumulation {effective // (micro * world_size)} x {world_size} process(es)")

    if hwr.gradient_checkpointing == "auto":
        checkpointing = decide("gradient_checkpointing", False,
                               "off: recomputing activations costs ~30% speed and memory is not the limit here"
                               if backend == "cpu" else "off: no memory estimate calls for it in this version")
    else:
        checkpointing = decide("gradient_checkpointing", hwr.gradient_checkpointing, "requested by the recipe")

    if hwr.threads == "auto":
        threads = decide("threads", hw.cpu_cores, f"one torch thread per available CPU core ({hw.cpu_cores})")
    else:
        threads = decide("threads", hwr.threads, "requested by the recipe (hardware.threads)")

    if recipe.data.max_length == "auto":
        length, why = get_task(recipe.data.task).DEFAULT_MAX_LENGTH
        max_length = decide("max_length", length, f"default for {recipe.data.task}: {why}")
    else:
        max_length = decide("max_length", recipe.data.max_length, "requested by the recipe (data.max_length)")

    trust = decide("trust_remote_code", recipe.model.trust_remote_code,
                   "set in the recipe: the model repository's Python code will run" if recipe.model.trust_remote_code
                   else "off (default): no code from the model repository runs")

    return Plan(recipe=recipe, hardware=hw, backend=backend, device=device, precision=precision, world_size=world_size,
                micro_batch_size=micro, gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing,
                threads=threads, max_length=max_length, trust_remote_code=trust, decisions=tuple(decisions))
