"""make_plan(recipe, hardware) -> Plan: every automatic choice, each with the reason it was made.

Pure: no probing, no imports of torch. Tests build fake HardwareInfo (a T4, an M2, 8xA100) and check
the plan directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from launcher import trackers
from launcher.errors import PlanError
from launcher.hardware import HardwareInfo
from launcher.memory import (ADAM_BYTES_PER_PARAM, CPU_RUNTIME_GIB, LOGITS_BYTES_PER_ELEMENT, GiB,
                             MemoryEstimate, ModelShape, cpu_retained_gib, estimate_eval_memory, estimate_memory,
                             quantized_weight_bytes)
from launcher.recipe import Recipe
from launcher.tasks import get_task
from launcher.timing import DataSize, budget_advice, decode_steps_per_batch, evaluation_generates, predict_time

# Beyond this, a bigger micro-batch on a CPU only adds padding: rows of one batch are padded to its
# longest sample, and a CPU gains little from wider matrix products.
CPU_MAX_MICRO_BATCH = 32
GPU_MAX_MICRO_BATCH = 64
# With no model shape to estimate from, a GPU micro-batch this small fits models up to ~1B parameters
# with LoRA at 512 tokens on 16 GB.
GPU_DEFAULT_MICRO_BATCH = 4
# PyTorch's MPS allocator limits allocations to HIGH x Metal's recommendedMaxWorkingSetSize (not x RAM) and
# requires LOW <= HIGH (aten/src/ATen/mps/MPSAllocator.mm, init_allocator / setLowWatermarkRatio; defaults
# 1.7 and 1.4 on unified memory, docs "MPS Environment Variables"). The default 1.7 lets a run swap the whole
# machine before it raises; 1.0 stops at the working set Metal recommends for the GPU. Setting HIGH alone
# below 1.4 fails every run at its first allocation ("invalid low watermark ratio 1.4", kohya-ss/sd-scripts#603),
# so launcher/backends/mps.py sets both, keeping the default LOW/HIGH proportion.
MPS_HIGH_WATERMARK_RATIO = 1.0
MPS_LOW_WATERMARK_RATIO = round(MPS_HIGH_WATERMARK_RATIO * 1.4 / 1.7, 3)


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
    eval_precision: str
    nodes: int
    processes_per_node: int
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    threads: int
    max_length: int
    zero_stage: int
    offload: bool
    memory_estimate_gib: float | None
    device_memory_gib: float
    trust_remote_code: bool
    # Defaults are what plans written before these fields existed did, so their runs resume unchanged.
    base_dtype: str = "fp32"  # the dtype the frozen base weights are loaded in (fp32 under the optimizer for full)
    quantize: str = "none"  # "4bit": the base's linear layers as NF4 (QLoRA), computed in base_dtype
    loss_logits: str = "all"  # "trained": logits only at trained positions, chunked (launcher/loss.py)
    compile: bool = False  # torch.compile of the decoder blocks for training (launcher/compile.py)
    lora_dropout: str = "torch"  # "half_draw": LoRA's dropout masks with half the random draws (launcher/dropout.py)
    eval_merge: bool = False  # the final evaluation generates with the adapter merged into its copy of the weights
    final_eval_fresh: bool = False  # the final evaluation runs in a fresh process (launcher.job.hand_over_final_evaluation)
    data_path: str | None = None  # the training/evaluation data the worker reads (None: generated, or the Hub)
    # The time prediction per phase (launcher.timing) and the memory predicted per phase, in GiB; what the
    # run measures is recorded beside them (launcher.phases). None: not predicted (the reason is a decision).
    predicted_seconds: dict[str, float] | None = None
    predicted_memory_gib: dict[str, float] | None = None
    data_size: DataSize | None = None
    decisions: tuple[Decision, ...]

    def decision(self, field: str) -> Decision:
        return next(d for d in self.decisions if d.field == field)

    def summary(self) -> dict:
        """The JSON view `sftlaunch plan --json` prints."""
        keys = ("backend", "device", "precision", "base_dtype", "quantize", "loss_logits", "compile", "lora_dropout", "eval_precision", "eval_merge", "final_eval_fresh", "world_size", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "threads", "max_length", "nodes", "processes_per_node", "zero_stage", "offload",
                "memory_estimate_gib", "device_memory_gib", "trust_remote_code", "predicted_seconds", "predicted_memory_gib")
        out = {k: getattr(self, k) for k in keys}
        out["effective_batch_size"] = self.recipe.train.effective_batch_size
        out["hardware"] = self.hardware.name
        out["decisions"] = [d.model_dump(mode="json") for d in self.decisions]
        return out


def _recorder() -> tuple[list[Decision], Callable[[str, Any, str], Any]]:
    """A list of decisions, and `decide(field, value, reason) -> value` that records one in it."""
    decisions: list[Decision] = []

    def decide(field: str, value: Any, reason: str) -> Any:
        decisions.append(Decision(field=field, value=value, reason=reason))
        return value

    return decisions, decide


def _device(backend: str, hw: HardwareInfo) -> str:
    """The torch device a backend's processes run on: DeepSpeed's are GPUs when there are any, else CPUs."""
    if backend in ("cuda", "mps"):
        return backend
    return "cuda" if backend == "deepspeed" and hw.gpus else "cpu"


def choose_backend(requested: str, hw: HardwareInfo) -> tuple[str, str]:
    """The backend to run on, and why. Raises PlanError if the hardware cannot run the request."""
    n = len(hw.gpus)
    if requested == "auto":
        if n * hw.nodes > 1:
            return "deepspeed", f"{n * hw.nodes} CUDA GPUs on {hw.nodes} node(s): DeepSpeed data parallel with ZeRO sharding"
        if n == 1:
            return "cuda", f"one CUDA GPU ({hw.gpus[0].name}, {hw.gpus[0].memory_gb:.0f} GB): one process through accelerate"
        if hw.mps:
            return "mps", "Apple-silicon GPU (MPS), no CUDA GPU"
        return "cpu", "no CUDA GPU and no Apple-silicon GPU: training runs on the CPU"
    if requested == "cuda" and n == 0:
        raise PlanError("hardware.backend=cuda, but no CUDA GPU was detected. Fix: hardware.backend=auto (or cpu).")
    if requested == "mps" and not hw.mps:
        raise PlanError("hardware.backend=mps, but this is not an Apple-silicon Mac. Fix: hardware.backend=auto.")
    if requested == "deepspeed" and hw.mps and n == 0:
        raise PlanError("hardware.backend=deepspeed does not run on Apple silicon. Fix: hardware.backend=mps (or auto).")
    if requested == "cuda" and n > 1:
        return "cuda", f"requested by the recipe (hardware.backend): one process on GPU 0 of {n}"
    return requested, "requested by the recipe (hardware.backend)"


def choose_precision(requested: str, backend: str, hw: HardwareInfo) -> tuple[str, str]:
    """The precision policy as one table: (precision, reason), or PlanError for an impossible request."""
    if backend in ("cuda", "deepspeed") and hw.gpus:
        cc = min(g.compute_capability for g in hw.gpus)
        has_bf16 = cc >= (8, 0)
        if requested == "auto":
            if has_bf16:
                return "bf16", f"compute capability {cc[0]}.{cc[1]} >= 8.0 has native bf16: bf16 autocast, fp32 master weights"
            return "fp16", (f"compute capability {cc[0]}.{cc[1]} < 8.0 has no bf16: fp16 autocast with a loss scaler; "
                            "trained weights stay fp32 under the optimizer (fp16 weights under Adam give grad_norm: nan)")
        if requested == "bf16" and not has_bf16:
            raise PlanError(f"hardware.precision=bf16, but {hw.gpus[0].name} (compute capability {cc[0]}.{cc[1]}) has no bf16. "
                            "Fix: hardware.precision=fp16 (or auto).")
        return requested, "requested by the recipe (hardware.precision)"
    if backend == "mps":
        if requested in ("auto", "fp32"):
            return "fp32", ("MPS: fp32, because mixed-precision training on MPS is not reliable across macOS/torch "
                            "versions (bf16 autocast needs macOS 14+, fp16 has no loss scaler there)")
        raise PlanError(f"hardware.precision={requested} is not supported for training on MPS. Fix: hardware.precision=fp32 (or auto).")
    # CPU (one process, or DeepSpeed processes over gloo)
    if requested == "fp16":
        raise PlanError("hardware.precision=fp16 needs a CUDA GPU; CPUs have no fp16 training path. Fix: hardware.precision=bf16 or fp32.")
    if requested == "auto":
        if hw.cpu_bf16:
            return "bf16", ("CPU has native bf16 (avx512_bf16/AMX): bf16 autocast, measured 1.2x-2.4x faster than fp32 "
                            "here with similar loss; trained weights stay fp32 under the optimizer")
        return "fp32", "CPU has no native bf16 instructions: emulated bf16 would be slower than fp32"
    if requested == "bf16" and not hw.cpu_bf16:
        return "bf16", "requested by the recipe; this CPU has no native bf16, so it is emulated and may be slower than fp32"
    return requested, "requested by the recipe (hardware.precision)"


def choose_base_dtype(requested: str, method: str, backend: str, precision: str, model_type: str = "") -> tuple[str, str]:
    """The dtype the frozen base weights load in, and why; PlanError for a request that cannot be honoured."""
    key = f"model.base_dtype={requested}"
    if method == "full":  # the recipe refuses a half-precision request with method full
        return "fp32", "full fine-tuning trains every weight: fp32 master weights under Adam (half-precision weights lose small updates to rounding)"
    if backend == "deepspeed":
        if requested in ("bf16", "fp16"):
            raise PlanError(f"{key}: DeepSpeed casts the module to the plan's precision itself and keeps fp32 masters "
                            "of the trainable weights in its optimizer, so the base is loaded fp32. Fix: model.base_dtype=auto.")
        return "fp32", (f"DeepSpeed holds the module in {precision} itself" if precision != "fp32" else "DeepSpeed in fp32") + \
            ": loaded fp32 and handed to the engine"
    if requested == "fp16":
        if precision != "fp16":
            raise PlanError(f"{key} needs fp16 mixed precision (its loss scaler), and the plan trains in {precision}. "
                            "Fix: hardware.precision=fp16 on a CUDA GPU, or model.base_dtype=auto.")
        if model_type in FP16_OVERFLOW_MODEL_TYPES:
            raise PlanError(f"{key}: {model_type} models overflow fp16 (NaN or '!!!!' output, transformers#33294). "
                            "Fix: model.base_dtype=auto (fp32), or a GPU with bf16.")
        return "fp16", ("requested by the recipe (model.base_dtype): 2 bytes per frozen weight, no autocast copy; the "
                        "LoRA weights, their gradients and Adam state stay fp32, under fp16 autocast with a loss scaler")
    if requested == "bf16":
        if precision != "bf16":
            raise PlanError(f"{key} needs bf16 mixed precision, and the plan trains in {precision}. Fix: "
                            "hardware.precision=bf16 where the hardware has it, or model.base_dtype=auto.")
        return "bf16", ("requested by the recipe (model.base_dtype): 2 bytes per frozen weight, no autocast copy; the "
                        "LoRA weights, their gradients and Adam state stay fp32")
    if requested == "fp32":
        return "fp32", "requested by the recipe (model.base_dtype)"
    if precision == "bf16":
        return "bf16", ("the plan trains in bf16 and LoRA never updates the base: loaded in bf16, 2 bytes per frozen weight "
                        "and no autocast re-cast of every weight at every forward; the LoRA weights, their gradients and "
                        "Adam state stay fp32")
    if precision == "fp16":
        return "fp32", ("fp16 autocast: the base stays fp32 (an fp16 base only on request, model.base_dtype=fp16: fp16's "
                        "narrow range makes it a risk to opt into)")
    return "fp32", "the plan trains in fp32"


def choose_quantize(requested: str, backend: str, base_dtype: str) -> tuple[str, str]:
    """Whether the base is stored in 4 bits (QLoRA), and why; PlanError where bitsandbytes cannot run it here."""
    key = f"model.quantize={requested}"
    if requested == "none":
        return "none", "requested by the recipe (model.quantize)"
    if backend == "deepspeed":
        # ZeRO shards and casts the module's parameters itself; bitsandbytes' 4-bit parameters are neither.
        raise PlanError(f"{key}: 4-bit QLoRA runs in one process, not under DeepSpeed (hardware.backend=deepspeed, chosen "
                        "for several GPUs). Fix: hardware.backend=cuda (one GPU: 4-bit is for fitting a model on one), "
                        "or model.quantize=none (a bf16 base sharded by ZeRO).")
    if backend == "mps":
        # bitsandbytes 0.50 registers MPS 4-bit ops, but as pure-PyTorch fallbacks (bitsandbytes/backends/mps/ops.py)
        # that no sftlaunch test has run; the MPS backend trains fp32 and gains nothing it can be shown to keep.
        raise PlanError(f"{key}: 4-bit QLoRA has not been run on Apple silicon (MPS) by sftlaunch. Fix: model.quantize=none, "
                        "or a CUDA GPU.")
    where = ("CUDA kernels" if backend == "cuda" else
             "its CPU backend, for memory rather than speed: each product dequantizes a weight first")
    return "4bit", (f"requested by the recipe: QLoRA. The base's linear layers are stored as NF4 with double quantization "
                    f"(about 0.52 bytes per weight) and computed in {base_dtype}; embeddings, norms and lm_head stay "
                    f"{base_dtype}; the LoRA weights, their gradients and Adam state stay fp32 (bitsandbytes, {where})")


# Model families whose causal-LM forward ends in lm_head(final hidden states), nothing after it (no logit
# soft-capping or scaling), so the loss can take the head's input at trained positions (launcher/loss.py).
TRAINED_LOGITS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def trained_logits_blocker(recipe: Recipe, backend: str, zero_stage: int, shape: ModelShape | None) -> str | None:
    """Why the loss must compute logits at every position (the model's own loss), or None when it need not."""
    targets = recipe.model.lora.target_modules
    if shape is None or shape.model_type not in TRAINED_LOGITS_MODEL_TYPES:
        kind = shape.model_type if shape is not None and shape.model_type else "unknown"
        return (f"model type {kind} is not one whose logits are only lm_head(hidden states) "
                f"({', '.join(TRAINED_LOGITS_MODEL_TYPES)}): the model's own loss at every position")
    if backend == "deepspeed" and zero_stage == 3:
        return "ZeRO-3 partitions lm_head's weight outside the model's forward: the model's own loss at every position"
    if recipe.model.method == "lora" and not isinstance(targets, str) and "lm_head" in targets:
        return "LoRA on lm_head: the model's own loss at every position"
    if recipe.model.method == "lora" and isinstance(targets, str) and targets != "all-linear":
        return "model.lora.target_modules is a regular expression that may match lm_head: the model's own loss at every position"
    return None


# Model families whose activations overflow fp16 in inference: Qwen2/Qwen2.5 (1.5B, 7B) generate "!!!!" or NaN
# in fp16 (QwenLM/Qwen2.5 issues; huggingface/transformers#33294). Evaluating them in fp16 would make the
# collapse check blame the learning rate for what is an overflow.
FP16_OVERFLOW_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def choose_eval_precision(precision: str, shape: ModelShape | None) -> tuple[str, str]:
    """The precision of the evaluation's weights copy, and why."""
    model_type = shape.model_type if shape is not None else ""
    if precision == "fp16" and model_type in FP16_OVERFLOW_MODEL_TYPES:
        return "fp32", (f"{model_type} models overflow fp16 in generation (NaN or '!!!!' output, transformers#33294): "
                        "evaluated in fp32, which the GPU without bf16 has")
    if precision in ("bf16", "fp16"):
        return precision, (f"generation runs on a {precision} copy of the weights: no optimizer needs fp32 masters there, and "
                           "skipping autocast's per-step weight casts made it 1.5x faster on a 2-core CPU (SmolLM2, batch 32)")
    return "fp32", f"same as training ({precision})"


def choose_data_source(recipe: Recipe, hw: HardwareInfo) -> tuple[str | None, str | None]:
    """(the data path the worker reads, why) for a Hub dataset that ships bundled; (data.path, None) otherwise."""
    from launcher.tasks import gsm8k

    d = recipe.data
    if d.task == "chat":  # reads data.path (one or several files) or its Hub dataset itself
        return None, None
    if d.task != "gsm8k" or d.path:
        return d.path, None
    hub = f"{d.dataset}" + (f" ({d.dataset_config})" if d.dataset_config else "")
    if hw.hub_reachable is not False:
        return None, (f"Hub dataset {hub} through `datasets`" +
                      (" (Hub reachability is not probed for a hardware profile)" if hw.hub_reachable is None else ""))
    if (d.dataset, d.dataset_config) != gsm8k.HUB_DATASET:
        raise PlanError(f"data.dataset={d.dataset}: the Hugging Face Hub is not reachable from this machine, and only "
                        f"{gsm8k.HUB_DATASET[0]} ({gsm8k.HUB_DATASET[1]}) ships with sftlaunch. Fix: set data.path to a local "
                        "copy (a folder with train.jsonl and test.jsonl), or run where the Hub is reachable.")
    return str(gsm8k.BUNDLED), (f"the Hugging Face Hub is not reachable from this machine (HF_HUB_OFFLINE or no connection): "
                                f"the bundled copy of {hub} shipped with sftlaunch (MIT licence, checksums checked on load)")


def _largest_pow2_divisor(n: int, cap: int) -> int:
    m = 1
    while m * 2 <= cap and n % (m * 2) == 0:
        m *= 2
    return m


def _device_memory_gib(backend: str, hw: HardwareInfo) -> tuple[float, str]:
    if backend in ("cuda", "deepspeed") and hw.gpus:
        g = min(hw.gpus, key=lambda g: g.memory_gb)
        return g.memory_gb, f"{g.memory_gb:.1f} GiB on {g.name}"
    if backend == "mps":
        working_set, source = mps_working_set(hw)
        return (working_set * MPS_HIGH_WATERMARK_RATIO,
                f"PyTorch's MPS limit {MPS_HIGH_WATERMARK_RATIO:g} x Metal's recommended working set {working_set:.2f} GiB ({source})")
    return hw.ram_gb, f"{hw.ram_gb:.0f} GB of RAM"


def mps_working_set(hw: HardwareInfo) -> tuple[float, str]:
    """Metal's recommendedMaxWorkingSetSize in GiB and where the figure comes from."""
    if hw.mps_working_set_gb:
        return hw.mps_working_set_gb, "reported by Metal" if hw.name == "detected" else f"recorded in profile {hw.name}"
    # Not reported (a profile without it, or torch could not say): Metal recommends about two thirds of RAM on
    # Macs up to 36 GB and three quarters above (recommendedMaxWorkingSetSize as reported on M1/M2/M3 machines).
    share = 2 / 3 if hw.ram_gb <= 36 else 3 / 4
    return hw.ram_gb * share, f"not reported: estimated as {share:.0%} of {hw.ram_gb:.0f} GB RAM"


def runnable_here(plan: Plan, hw: HardwareInfo) -> list[str]:
    """Why this machine cannot run a plan (made here, or earlier elsewhere and now resumed), or [] when it can.

    The one place this is decided: backends build launch commands and do not judge the hardware.
    """
    import importlib.util

    problems = []
    if plan.device == "cuda" and len(hw.gpus) < plan.processes_per_node:
        problems.append(f"the plan needs {plan.processes_per_node} CUDA GPU(s) per node, this node has {len(hw.gpus)} "
                        "(start a new run here instead of resuming: hardware.backend=auto)")
    if plan.device == "mps" and not hw.mps:
        problems.append("the plan runs on an Apple-silicon GPU (MPS), and this machine has none (start a new run here: hardware.backend=auto)")
    if plan.quantize == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("model.quantize=4bit needs bitsandbytes, which is not installed here (pip install 'sftlaunch[qlora]')")
    if plan.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 for a pure-Python install)")
    elif plan.backend == "deepspeed" and plan.device == "cpu":
        from launcher.hardware import cxx_compiler, deepspeed_cpu_op_to_build

        folder = deepspeed_cpu_op_to_build()
        if folder is not None and cxx_compiler() is None:
            problems.append(f"DeepSpeed on a CPU builds its shared-memory op ({folder.name}) as the run starts, with a C++ "
                            f"compiler, and none was found ($CXX, else c++; slim container images have none). Fix: "
                            "install one (apt-get install g++), or hardware.backend=cpu for one process")
    return problems


class EvalPlan(BaseModel):
    """What `sftlaunch eval` needs: one process on one device. Training-only constraints (processes
    dividing the batch, memory for optimizer state) do not apply, so evaluation never fails on them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device: str
    eval_precision: str
    threads: int
    trust_remote_code: bool
    data_path: str | None = None
    eval_merge: bool = False
    decisions: tuple[Decision, ...]


def make_eval_plan(recipe: Recipe, hw: HardwareInfo, shape: ModelShape | None = None) -> EvalPlan:
    """Device and precision decided as training would on this machine, for a single evaluating process."""
    decisions, decide = _recorder()
    backend, why = choose_backend(recipe.hardware.backend, hw)
    if backend == "deepspeed":  # evaluation is one process: the first GPU, or the CPU
        backend, why = ("cuda", "evaluation runs one process, on GPU 0") if hw.gpus else ("cpu", "evaluation runs one process, on the CPU")
    device = decide("device", _device(backend, hw), why)
    precision, why = choose_precision(recipe.hardware.precision, backend, hw)
    eval_precision, eval_why = choose_eval_precision(precision, shape)
    decide("eval_precision", eval_precision, f"as training would use here ({why}); {eval_why}")
    threads = recipe.hardware.threads if recipe.hardware.threads != "auto" else hw.cpu_cores
    decide("threads", threads, "requested by the recipe (hardware.threads)" if recipe.hardware.threads != "auto"
           else f"all {hw.cpu_cores} CPU cores: one process")
    data_path, data_why = choose_data_source(recipe, hw)
    if data_why:
        decide("data_source", "bundled" if data_path else "hub", data_why)
    merge = _merges_adapter(recipe)
    if merge:  # `sftlaunch eval` loads the base in fp32: a half-precision evaluation copies every weight anyway
        if eval_precision != "fp32":
            cost = "costs no memory (the copy casts those weights anyway)"
        else:
            cost = "costs a copy of the adapted weights in fp32" + (
                f" ({_eval_merge_params(recipe, shape) * 4 / GiB:.2f} GiB)" if shape else "")
        decide("eval_merge", True, "a run's adapter is merged into the evaluation's copy of the weights it adapts, so "
               f"generation runs plain layers ({EVAL_MERGE_MEASURED}); {cost}")
    return EvalPlan(device=device, eval_precision=eval_precision, threads=threads, data_path=data_path,
                    trust_remote_code=recipe.model.trust_remote_code, eval_merge=merge, decisions=tuple(decisions))


def _processes(hwr, backend: str, hw: HardwareInfo, decide) -> tuple[int, int]:
    """Nodes and training processes per node: one per GPU under DeepSpeed, else one."""
    nodes = hw.nodes if backend == "deepspeed" else 1
    if backend != "deepspeed":
        if hwr.processes not in ("auto", 1):
            raise PlanError(f"hardware.processes={hwr.processes} needs hardware.backend=deepspeed (the {backend} backend runs one process). "
                            "Fix: hardware.backend=deepspeed, or remove hardware.processes.")
        per_node = 1
        decide("world_size", 1, f"the {backend} backend runs one training process")
    else:
        available = len(hw.gpus) if hw.gpus else None
        if hwr.processes == "auto":
            per_node = available or 2
            why = (f"one process per GPU ({per_node} per node x {nodes} node(s))" if available else
                   "no GPU: 2 CPU processes over gloo (exercises the distributed path; slower than one process)")
        else:
            per_node = hwr.processes
            if available and per_node > available:
                raise PlanError(f"hardware.processes={per_node}, but each node has {available} GPUs. Fix: hardware.processes<={available} or auto.")
            why = "requested by the recipe (hardware.processes)"
        decide("world_size", per_node * nodes, why)
    return nodes, per_node


def _decide_memory_layout(recipe: Recipe, hw: HardwareInfo, backend: str, device: str, precision: str, base_dtype: str,
                          shape: ModelShape | None, shape_source: str, per_rank: int, max_length: int,
                          world_size: int, decide) -> MemoryFit:
    """Micro-batch, accumulation, checkpointing, ZeRO stage and offload from the memory estimate, each decided
    with its reason; PlanError with the numbers when even the smallest layout does not fit."""
    hwr, effective = recipe.hardware, recipe.train.effective_batch_size
    mem_gib, mem_why = _device_memory_gib(backend, hw)
    budget = mem_gib * hwr.memory_fraction
    fit = _fit_memory(recipe, backend, device, precision, base_dtype, shape, per_rank, max_length, world_size, budget)
    micro, checkpointing, stage, offload, estimate, ckpt_why = fit
    if estimate is not None and estimate.total / GiB > budget:
        asked = hwr.micro_batch_size != "auto"
        raise PlanError(
            f"{recipe.model.name} does not fit: {estimate.describe()} per device at micro-batch {micro}"
            + (" (hardware.micro_batch_size)" if asked else "") + (" with gradient checkpointing" if checkpointing else "")
            + (f", ZeRO-{stage}" + (" and CPU offload" if offload else "") + f" over {world_size} processes" if backend == "deepspeed" else "")
            + f", but only {budget:.1f} GiB is usable ({hwr.memory_fraction:.0%} of {mem_why}). Fix: "
            + (f"lower hardware.micro_batch_size (now {micro}) or set it to auto, " if asked else "")
            + ("use model.method=lora (full fine-tuning keeps a gradient and Adam state for every weight), " if recipe.model.method == "full" else "")
            + ("model.quantize=4bit (QLoRA: about 0.52 bytes per base weight), " if recipe.model.method == "lora"
               and recipe.model.quantize == "none" and backend in ("cuda", "cpu") else "")
            + f"lower data.max_length (now {max_length}), use a smaller model, or more GPUs with hardware.backend=deepspeed.")
    where = f"{budget:.1f} GiB usable ({hwr.memory_fraction:.0%} of {mem_why})"
    if estimate is None:
        reason_tail = f"model shape unknown ({shape_source or 'no config'}): memory not estimated"
    else:
        reason_tail = f"estimated peak {estimate.describe()} fits {where}"

    if hwr.micro_batch_size != "auto":
        if per_rank % micro:
            raise PlanError(f"hardware.micro_batch_size={micro} does not divide train.effective_batch_size={effective} "
                            f"over {world_size} process(es). Fix: pick a divisor of {per_rank}, or 'auto'.")
        decide("micro_batch_size", micro, f"requested by the recipe (hardware.micro_batch_size); {reason_tail}")
    elif estimate is None:
        decide("micro_batch_size", micro, f"largest power of two <= {_cap(backend)} dividing {per_rank} samples per process; {reason_tail}")
    else:
        decide("micro_batch_size", micro, f"largest power of two <= {_cap(backend)} dividing {per_rank} samples per process "
               f"whose {reason_tail}")
    decide("gradient_accumulation_steps", per_rank // micro,
                          f"effective batch {effective} = micro-batch {micro} x accumulation {per_rank // micro} x {world_size} process(es)")
    if hwr.gradient_checkpointing != "auto":
        decide("gradient_checkpointing", checkpointing, "requested by the recipe (hardware.gradient_checkpointing)")
    elif checkpointing:
        decide("gradient_checkpointing", True, ckpt_why)
    else:
        decide("gradient_checkpointing", False, "off: the activations fit" + ("" if estimate else " (not estimated)")
               + "; recomputing them would cost ~30% speed")
    if backend == "deepspeed":
        decide("zero_stage", stage, "requested by the recipe (hardware.zero_stage)" if hwr.zero_stage != "auto" else
               ("ZeRO-2: shards gradients and optimizer state; the model fits each device" if stage == 2 else
                "ZeRO-3: stage 2 does not fit a device, so parameters are sharded too"))
        decide("offload", offload, "requested by the recipe (hardware.offload)" if hwr.offload != "auto" else
               ("optimizer state and parameters go to CPU memory: even ZeRO-3 does not fit" if offload else "off: not needed to fit"))
    decide("memory_estimate_gib", None if estimate is None else round(estimate.total / GiB, 2),
           reason_tail if estimate is None else f"{estimate.describe()}; {where}")
    return fit


def make_plan(recipe: Recipe, hw: HardwareInfo, shape: ModelShape | None = None, shape_source: str = "",
              data: DataSize | str | None = None) -> Plan:
    """Decide backend, precision, processes, batch layout, memory settings and threads, and predict the time.

    `shape` is the model's architecture (from its config.json, launcher.memory.find_shape); without it the
    memory planner cannot size the batch and says so. `data` is the training data's size
    (launcher.data.measure_size), or why it is not known: the time prediction needs it.
    """
    hwr = recipe.hardware
    decisions, decide = _recorder()
    backend = decide("backend", *choose_backend(hwr.backend, hw))
    device = _device(backend, hw)
    precision = decide("precision", *choose_precision(hwr.precision, backend, hw))
    base_dtype, base_why = choose_base_dtype(recipe.model.base_dtype, recipe.model.method, backend, precision,
                                             shape.model_type if shape is not None else "")
    quantize, quantize_why = choose_quantize(recipe.model.quantize, backend, base_dtype)
    if quantize == "4bit":
        decide("eval_precision", base_dtype, f"the 4-bit base is evaluated as it trained (NF4 weights cannot be cast): "
               f"products in {base_dtype}, the LoRA weights cast to it")
        eval_precision = base_dtype
    else:
        eval_precision = decide("eval_precision", *choose_eval_precision(precision, shape))
    decide("base_dtype", base_dtype, base_why)
    if quantize != "none":
        decide("quantize", quantize, quantize_why)

    nodes, per_node = _processes(hwr, backend, hw, decide)
    world_size = per_node * nodes

    effective = recipe.train.effective_batch_size
    if effective % world_size:
        raise PlanError(f"train.effective_batch_size={effective} is not divisible by the {world_size} training processes. "
                        f"Fix: use a multiple of {world_size} (e.g. {world_size * max(1, round(effective / world_size))}).")
    per_rank = effective // world_size

    if recipe.data.max_length == "auto":
        task = get_task(recipe.data.task)
        length, why = (getattr(task, "ANNOTATED_MAX_LENGTH", task.DEFAULT_MAX_LENGTH) if recipe.data.calculator_annotations
                       else task.DEFAULT_MAX_LENGTH)
        max_length = decide("max_length", length, f"default for {recipe.data.task}: {why}")
    else:
        max_length = decide("max_length", recipe.data.max_length, "requested by the recipe (data.max_length)")

    if recipe.data.task == "chat":
        from launcher.tasks.chat import plan_decisions

        for field, value, reason in plan_decisions(recipe):
            decide(field, value, reason)

    fit = _decide_memory_layout(recipe, hw, backend, device, precision, base_dtype, shape, shape_source, per_rank,
                                max_length, world_size, decide)
    micro, checkpointing, stage, offload = fit.micro, fit.checkpointing, fit.zero_stage, fit.offload
    loss_logits = _decide_loss_logits(recipe, backend, fit, shape, max_length, decide)
    accumulation = per_rank // micro
    mem_gib = _device_memory_gib(backend, hw)[0]

    if hwr.threads == "auto":
        cores = max(1, hw.cpu_cores // per_node)
        threads = decide("threads", cores, f"available CPU cores ({hw.cpu_cores}) / {per_node} process(es) per node")
    else:
        threads = decide("threads", hwr.threads, "requested by the recipe (hardware.threads)")

    fresh = _decide_final_eval_process(recipe, device, world_size, decide)
    eval_merge = _decide_eval_memory(recipe, shape, eval_precision, precision, base_dtype, backend, device, max_length,
                                     mem_gib, decide, fresh)
    if device == "cuda":
        _decide_host_memory(recipe, shape, hw, per_node, world_size, stage, offload, base_dtype, decide)

    data_path, data_why = choose_data_source(recipe, hw)
    if data_why:
        decide("data_source", "bundled" if data_path else "hub", data_why)

    _check_learning_rate(recipe, decide)
    compiled = False

    def with_compile(prediction):
        """Decide train.compile from the eager prediction; the prediction with the compile counted."""
        nonlocal compiled
        compiled, prediction = _decide_compile(recipe, hw, backend, device, precision, quantize, prediction, decide)
        return prediction

    # The training's peak as the run will reach it: micro-batches padded to the data's longest sample.
    peak = None if fit.estimate is None else _training_estimate(
        recipe, backend, device, precision, base_dtype, shape, fit.micro, fit.checkpointing, fit.zero_stage,
        fit.offload, world_size, padded_length(data, max_length))
    predicted = _decide_time(recipe, hw, shape, data, backend, device, precision, eval_precision, base_dtype, fit,
                             loss_logits, accumulation, world_size, nodes, threads, decide, with_compile, peak, fresh)
    memory = _phase_memory(recipe, shape, data, eval_precision, precision, base_dtype, backend, device, max_length,
                           world_size, eval_merge, predicted.parts.get("micro_batches") if predicted else None, peak,
                           fresh)
    lora_dropout = _decide_lora_dropout(recipe, device, compiled, decide)

    trust = decide("trust_remote_code", recipe.model.trust_remote_code,
                   "set in the recipe: the model repository's Python code will run" if recipe.model.trust_remote_code
                   else "off (default): no code from the model repository runs")
    decide("report_to", ",".join(recipe.train.report_to), trackers.describe(recipe.train.report_to))

    return Plan(recipe=recipe, hardware=hw, backend=backend, device=device, precision=precision, eval_precision=eval_precision, nodes=nodes,
                processes_per_node=per_node, world_size=world_size, micro_batch_size=micro,
                gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing, threads=threads,
                max_length=max_length, zero_stage=stage, offload=offload, base_dtype=base_dtype, quantize=quantize,
                loss_logits=loss_logits, compile=compiled, lora_dropout=lora_dropout, eval_merge=eval_merge,
                final_eval_fresh=fresh,
                memory_estimate_gib=None if fit.estimate is None else round(fit.estimate.total / GiB, 2),
                device_memory_gib=round(mem_gib, 1), trust_remote_code=trust, data_path=data_path,
                predicted_seconds=predicted.seconds() if predicted else None, predicted_memory_gib=memory,
                data_size=data if isinstance(data, DataSize) else None, decisions=tuple(decisions))


def _phase_memory(recipe: Recipe, shape: ModelShape | None, data, eval_precision: str, precision: str,
                  base_dtype: str, backend: str, device: str, max_length: int, world_size: int,
                  eval_merge: bool, micro_batches: float | None, peak: MemoryEstimate | None,
                  fresh: bool = False) -> dict | None:
    """The peak memory each phase is predicted to reach on its device, as launcher.phases measures it: on CPU the
    process's resident set, which adds the libraries' own (CPU_RUNTIME_GIB) to the estimates, and to an evaluation
    that runs after training what the process still holds from it (launcher.memory.cpu_retained_gib: more after more
    micro-batches of new shapes, up to a cap).

    The evaluations are sized for what they will generate, not for the limits eval_memory_gib checks the fit
    against: batches of the items there are (eval.limit), padded to the longest evaluation prompt, generating as
    many steps as the time model expects (launcher.timing.decode_steps_per_batch). Sized for the limits, the
    predictions were 1.5-1.9x the measured peaks in 5 of the 16 evaluations of benchmarks/time_estimate.py's cases.
    A final evaluation in a fresh process (`fresh`) holds nothing of training: its model loaded in the evaluation's
    precision alone, as a reloaded one.

    Training is sized the same way (`peak`): its micro-batches are padded to their longest sample, so the peak comes
    from the data's longest (counted by the pre-flight: padded_length), not data.max_length, which the fit is checked
    against. Sized for data.max_length, the chat recipe's training (256 tokens, its longest sample 185) was predicted
    at 1.39x its measured peak."""
    if peak is None:
        return None
    cpu = device == "cpu"
    runtime = CPU_RUNTIME_GIB if cpu else 0.0
    retained = cpu_retained_gib(precision, micro_batches) if cpu else 0.0
    sized = isinstance(data, DataSize)
    memory = {"training": round(peak.total / GiB + runtime, 2)}
    if shape is None:
        return memory
    ev = recipe.eval
    batch = min(ev.batch_size, data.eval_items) if sized and data.eval_items else ev.batch_size
    prompt = data.eval_prompt_tokens_max if sized and data.eval_prompt_tokens_max else max_length

    def gib(which: str, merged: int, reloaded: bool = backend == "deepspeed") -> float:
        steps = decode_steps_per_batch(data, which, ev.batch_size, ev.max_new_tokens) if sized else ev.max_new_tokens
        est = estimate_eval_memory(shape, eval_precision=eval_precision, training_precision=precision, batch=batch,
                                   prompt_len=prompt, new_tokens=round(steps), reloaded=reloaded,
                                   device=device, base_dtype=base_dtype, quantize=recipe.model.quantize,
                                   merged_params=merged, generates=evaluation_generates(recipe))
        return est.total / GiB

    merged = _eval_merge_params(recipe, shape) if eval_merge else 0
    if fresh:
        memory["final_eval"] = round(gib("trained", merged, reloaded=True) + runtime, 2)
    else:
        memory["final_eval"] = round(gib("trained", merged) + runtime + retained, 2)
    if ev.compare_base:
        # Several processes evaluate the base after training, on the base reloaded for the evaluation (launcher.job).
        memory["base_eval"] = round(gib("base", 0) + runtime + (retained if world_size > 1 else 0.0), 2)
    return memory


def _decide_time(recipe: Recipe, hw: HardwareInfo, shape: ModelShape | None, data, backend: str, device: str,
                 precision: str, eval_precision: str, base_dtype: str, fit: MemoryFit, loss_logits: str,
                 accumulation: int, world_size: int, nodes: int, threads: int, decide, with_compile,
                 peak: MemoryEstimate | None, fresh: bool = False):
    """The predicted time of each phase (launcher.timing) as a decision, and what a time budget will cut.
    `with_compile(prediction or None)` decides train.compile from the eager prediction and returns it with the
    compile counted; it is called once, on every path."""
    if shape is None:
        with_compile(None)
        decide("predicted_time", None, "model shape unknown: time not predicted")
        return None
    if not isinstance(data, DataSize):
        with_compile(None)
        decide("predicted_time", None, f"time not predicted: {data or 'the data was not measured'}")
        return None
    t, lora = recipe.train, recipe.model.lora
    op_build = None
    if backend == "deepspeed" and device == "cpu" and hw.name == "detected":
        from launcher.hardware import deepspeed_cpu_op_to_build

        folder = deepspeed_cpu_op_to_build()
        op_build = str(folder) if folder else None

    def predict(size: DataSize, epochs: float):
        return predict_time(
            shape, size, device=device, precision=precision, eval_precision=eval_precision, tflops=hw.matmul_tflops,
            bandwidth_gbs=hw.memory_bandwidth_gbs, method=recipe.model.method, lora_rank=lora.rank,
            lora_targets=lora.target_modules, checkpointing=fit.checkpointing, trained_logits=loss_logits == "trained",
            micro_batch=fit.micro, accumulation=accumulation, world_size=world_size, nodes=nodes, threads=threads,
            cpu_cores=hw.cpu_cores, epochs=epochs, max_steps=t.max_steps, zero_stage=fit.zero_stage,
            eval_batch=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
            compare_base=recipe.eval.compare_base, base_dtype=base_dtype, quantized=recipe.model.quantize == "4bit",
            memory_gib=None if peak is None else peak.total / GiB, elementwise_gops=hw.elementwise_gops,
            fresh_final_eval=fresh, op_build=op_build, generates=evaluation_generates(recipe))

    def training_for(samples: int, epochs: float) -> float:
        share = samples / data.samples
        smaller = data.model_copy(update={"samples": samples, "tokens": round(data.tokens * share),
                                          "trainable_tokens": round(data.trainable_tokens * share)})
        return predict(smaller, epochs).training

    eager = predict(data, t.epochs)
    if isinstance(eager, str):
        with_compile(None)
        decide("predicted_time", None, f"time not predicted: {eager}")
        return None
    prediction = with_compile(eager)
    compile_note = ""
    if prediction.training != eager.training:
        compile_note = (f"; compiled (train.compile): training ~{prediction.training / 60:.1f} min with the compile, "
                        f"instead of ~{eager.training / 60:.1f} min eager")
    decide("predicted_time", f"{prediction.total / 60:.1f} min", prediction.reason + compile_note
           + (f"; rates: {hw.rates_source}" if hw.rates_source else ""))
    if t.max_time_seconds:
        advice = budget_advice(prediction, data, t.max_time_seconds, str(t.max_time), t.epochs, training_for)
        if advice:
            decide("time_budget", advice[1], advice[0])
        else:
            decide("time_budget", None, f"train.max_time={t.max_time} covers the predicted training "
                   f"({prediction.training / 60:.1f} min)")
    return prediction


# Learning rates beyond these are far outside what works for the method: measured on the embedded SmolLM2-135M,
# full fine-tuning at 2e-3 (the unit-conversion recipe's LoRA rate) collapsed the model in two steps
# ("answer>answer>..."); LoRA at 1.0 diverged (loss 1.76 -> 21 in five steps). Warned, not refused: the guard stops
# a run that diverges, and a user may know better.
LEARNING_RATE_CEILING = {"full": 1e-4, "lora": 1e-2}


def _check_learning_rate(recipe: Recipe, decide) -> None:
    method, lr = recipe.model.method, recipe.train.learning_rate
    ceiling = LEARNING_RATE_CEILING[method]
    if lr > ceiling:
        decide("learning_rate", lr, f"warning: train.learning_rate={lr:g} is far above what works for {method} fine-tuning "
               f"(<= {ceiling:g}; full fine-tuning of the embedded model at 2e-3 collapsed in two steps). Fix: "
               + ("1e-5 to 5e-5 for full fine-tuning (a LoRA rate is 10-100x higher)" if method == "full"
                  else "1e-4 to 3e-3 for LoRA"))


def _decide_host_memory(recipe: Recipe, shape: ModelShape | None, hw: HardwareInfo, per_node: int, world_size: int,
                        zero_stage: int, offload: bool, base_dtype: str, decide) -> None:
    """Host RAM of one node while its GPU processes load the model: each loads the fp32 weights in its own
    memory before they move to its GPU (a half-precision checkpoint is converted, so the pages are private), so
    8 processes load 8 copies, except under ZeRO-3, where zero.Init gives each its shard; offloaded optimizer
    state lives there for the whole run."""
    if shape is None:
        return
    weight_bytes = 4.0 if base_dtype == "fp32" else 2.0  # a half base is loaded straight in its dtype
    per_process = shape.params * weight_bytes / (world_size if zero_stage == 3 else 1)
    if recipe.model.quantize == "4bit":  # quantized tensor by tensor as it loads: the host holds the 4-bit model
        per_process = quantized_weight_bytes(shape, base_dtype)
    states = 0.0
    if offload:
        per_weight = 12.0 if recipe.model.method == "full" else 0.0
        states = (shape.params * per_weight + shape.lora_params(recipe.model.lora.rank, recipe.model.lora.target_modules)
                  * ADAM_BYTES_PER_PARAM) / world_size * per_node
    need = (per_node * per_process + states) / GiB
    budget = hw.ram_gb * recipe.hardware.memory_fraction
    kind = f"4-bit (linear layers) and {base_dtype}" if recipe.model.quantize == "4bit" else base_dtype
    parts = f"{per_node} process(es) x {per_process / GiB:.2f} GiB of {kind} weights while loading" + (
        " (ZeRO-3: each its shard)" if zero_stage == 3 else "") + (f" + {states / GiB:.2f} GiB of offloaded optimizer state" if states else "")
    if need > budget:
        raise PlanError(f"loading {recipe.model.name} needs {need:.1f} GiB of host RAM on each node ({parts}), but "
                        f"{budget:.1f} GiB is usable ({recipe.hardware.memory_fraction:.0%} of {hw.ram_gb:.0f} GB). Fix: "
                        "hardware.zero_stage=3 (each process loads only its shard), fewer processes per node "
                        "(hardware.processes), or a machine with more RAM.")
    decide("host_memory_gib", round(need, 2), f"{parts}; fits {budget:.1f} GiB of host RAM")


# Generation with the adapter merged against unmerged (benchmarks/eval_lora_merge.py): where it was measured.
# Adapters of the 12-step unit-conversion and 16-step GSM8K runs of benchmarks/time_estimate.py, 50 quick-start items.
EVAL_MERGE_MEASURED = ("decoding steps 1.26-1.44x faster merged on a 2-core AMD EPYC with avx512_bf16, as fast as the "
                       "base model's: benchmarks/eval_lora_merge.py")


def _merges_adapter(recipe: Recipe) -> bool:
    """Whether the evaluation could merge a trained adapter: not for full fine-tuning (none), nor for a 4-bit base
    (PEFT's merge would re-quantize the sum)."""
    return recipe.model.method == "lora" and recipe.model.quantize != "4bit"


def _eval_merge_params(recipe: Recipe, shape: ModelShape) -> int:
    """The weights merging a LoRA adapter for evaluation writes (launcher.evaluate.inference_weights), 0 where none
    is merged (_merges_adapter). A target_modules regular expression counts every decoder linear layer (an upper
    bound)."""
    lora = recipe.model.lora
    if not _merges_adapter(recipe):
        return 0
    named = isinstance(lora.target_modules, list) or lora.target_modules == "all-linear"
    return shape.lora_target_params(lora.target_modules) if named else shape.linear_params


def _decide_final_eval_process(recipe: Recipe, device: str, world_size: int, decide) -> bool:
    """Whether the final evaluation runs in a fresh process (launcher.job.hand_over_final_evaluation), and why."""
    if device != "cpu" or world_size > 1:
        decide("final_eval_process", "same", "several processes: the main one reloads the model for the evaluation "
               "alone, after the engine is freed" if world_size > 1 else
               f"on {device} the evaluation's memory is the device's, from which training's is freed")
        return False
    if recipe.model.quantize == "4bit":
        decide("final_eval_process", "same", "the adapter is evaluated on the 4-bit base it trained with, as it is")
        return False
    decide("final_eval_process", "fresh", "after saving, the worker replaces itself with a fresh process that loads the "
           "trained model in the evaluation's precision alone: on CPU, training's freed heap (kept by the C library) "
           "made the final evaluation fault pages back in, 1.42 GiB above its start for GSM8K against 0.50 in a process "
           "of its own; costs one more model load (seconds)")
    return True


def _decide_eval_memory(recipe: Recipe, shape: ModelShape | None, eval_precision: str, precision: str, base_dtype: str,
                        backend: str, device: str, max_length: int, mem_gib: float, decide, fresh: bool = False) -> bool:
    """The evaluation's peak on its device, decided before training: a run that trains and then cannot evaluate
    has spent its time for nothing (the out-of-memory back-off halves the training batch, which cannot help).
    True when the trained adapter is merged for the evaluation (eval_merge), which that peak counts. With the final
    evaluation in a fresh process (`fresh`) the merge is in place, and the peak checked is the base evaluation's
    (in the training process, on the base as training loads it), which is the larger."""
    if shape is None:
        decide("eval_memory_gib", None, "model shape unknown: the evaluation's memory is not estimated")
        if _merges_adapter(recipe):
            decide("eval_merge", False, "the adapter stays unmerged while generating: with the model's shape unknown, "
                   "the memory a merged copy of its adapted weights takes cannot be checked")
        return False
    ev, budget = recipe.eval, mem_gib * recipe.hardware.memory_fraction
    merged = 0 if fresh else _eval_merge_params(recipe, shape)

    def estimate(batch: int):
        return estimate_eval_memory(shape, eval_precision=eval_precision, training_precision=precision, batch=batch,
                                    prompt_len=max_length, new_tokens=ev.max_new_tokens,
                                    reloaded=backend == "deepspeed" or (fresh and not ev.compare_base), device=device,
                                    base_dtype=base_dtype, quantize=recipe.model.quantize, merged_params=merged,
                                    generates=evaluation_generates(recipe))

    est = estimate(ev.batch_size)
    if fresh and _merges_adapter(recipe):
        decide("eval_merge", True, "the trained adapter is merged into the model the final evaluation loads, so "
               "generation runs plain layers: PEFT's unmerged LoRA layers add their own products and Python at every "
               f"layer and decoding step ({EVAL_MERGE_MEASURED}); costs no memory (merged in place: that process loads "
               "the model for the evaluation alone); the saved adapter is unchanged")
    elif merged:
        cost = est.merged_weights / GiB
        if est.total / GiB <= budget:
            decide("eval_merge", True, "the trained adapter is merged into the evaluation's copy of the weights it "
                   "adapts (PEFT's merge_and_unload on that copy), so generation runs plain layers: PEFT's unmerged LoRA "
                   f"layers add their own products and Python at every layer and decoding step ({EVAL_MERGE_MEASURED}); "
                   "the saved adapter and the weights training used are unchanged"
                   + (f"; costs {cost:.2f} GiB while evaluating (a copy of the adapted weights, which the evaluation "
                      "would otherwise share with training)" if cost else
                      "; costs no memory (merged in place into the model reloaded for the evaluation)" if backend == "deepspeed"
                      else "; costs no memory (the evaluation's copy casts those weights anyway)"))
        else:
            decide("eval_merge", False, f"the adapter stays unmerged while generating (slower decoding steps): a merged "
                   f"copy of the adapted weights ({cost:.2f} GiB) would not fit {budget:.1f} GiB usable")
            merged = 0
            est = estimate(ev.batch_size)
    where = f"{budget:.1f} GiB usable"
    how = ("generation runs on the 4-bit base it trained with" if recipe.model.quantize == "4bit" else
           "the engine is freed and the model reloaded in " + eval_precision if backend == "deepspeed" else
           f"generation shares the {base_dtype} base but for the adapted weights, copied to merge the adapter into"
           if base_dtype == eval_precision != "fp32" and merged else
           f"generation shares the {base_dtype} base, only the LoRA weights are cast" if base_dtype == eval_precision != "fp32" else
           f"a {eval_precision} copy beside the trained fp32 weights" if eval_precision != "fp32" else
           "generation runs on the trained fp32 weights")
    if fresh:
        how = (f"the base evaluation: {how}; the final one, in a fresh process on the trained model loaded in "
               f"{eval_precision} alone, needs no more" if ev.compare_base else
               f"in a fresh process, the trained model loaded in {eval_precision} alone")
    one = estimate(1)
    if one.total / GiB > budget:
        raise PlanError(f"{recipe.model.name} would train here but cannot be evaluated: even one prompt needs "
                        f"{one.describe()} ({how}), and only {where} on the evaluating device. Fix: a GPU with "
                        "more memory, or a smaller model.")
    if est.total / GiB > budget:
        # Prompts as long as data.max_length are the upper bound; real prompts are usually far shorter, so this
        # warns instead of refusing, and names what fits even for the longest.
        fits = next(b for b in range(ev.batch_size - 1, 0, -1) if estimate(b).total / GiB <= budget)
        decide("eval_memory_gib", round(est.total / GiB, 2),
               f"warning: prompts as long as data.max_length ({max_length} tokens) would need {est.describe()} at "
               f"eval.batch_size={ev.batch_size}, more than {where}; eval.batch_size={fits} fits even then (an "
               "out-of-memory while evaluating stops with that fix, and `sftlaunch resume` evaluates without training again)")
        return bool(merged) or (fresh and _merges_adapter(recipe))
    sized_for = (f"eval.batch_size={ev.batch_size}, {max_length}+{ev.max_new_tokens} tokens" if est.generates else
                 "the held-out loss alone: eval.metrics is empty, nothing is generated")
    decide("eval_memory_gib", round(est.total / GiB, 2), f"{est.describe()} at {sized_for} ({how}); fits {where}")
    return bool(merged) or (fresh and _merges_adapter(recipe))


def _decide_loss_logits(recipe: Recipe, backend: str, fit: MemoryFit, shape: ModelShape | None, max_length: int,
                        decide) -> str:
    """Whether the loss computes logits only at trained positions, chunked (launcher/loss.py), and why."""
    from launcher.loss import chunk_positions

    blocker = trained_logits_blocker(recipe, backend, fit.zero_stage, shape)
    if blocker:
        return decide("loss_logits", "all", blocker)
    saved = ""
    if fit.estimate is not None:
        whole = fit.micro * max_length * shape.vocab * LOGITS_BYTES_PER_ELEMENT / GiB
        saved = f"; logits memory {fit.estimate.logits / GiB:.2f} GiB instead of {whole:.2f} GiB for every position at once"
    return decide("loss_logits", "trained",
                  "logits only at trained positions (labels != -100: the prompt's and the padding's are never used by "
                  f"the loss), lm_head and cross-entropy {chunk_positions(shape.vocab)} positions at a time, so the "
                  f"micro-batch x sequence x vocab block is never held whole{saved}")


def _decide_lora_dropout(recipe: Recipe, device: str, compiled: bool, decide) -> str:
    """How LoRA's input dropout draws its masks (launcher/dropout.py), and why; no decision where nothing drops."""
    from launcher.dropout import described, drawable, drawn_probability

    p = recipe.model.lora.dropout
    if recipe.model.method != "lora" or p == 0:
        return "torch"
    if device != "cpu":
        return decide("lora_dropout", "torch", f"model.lora.dropout={p:g} with torch's dropout: its {device} generator "
                      "draws the masks in parallel")
    if compiled:
        return decide("lora_dropout", "torch", f"model.lora.dropout={p:g} with torch's dropout: the compiled blocks "
                      "draw it with inductor's generator, fused into the block")
    if not drawable(p):
        return decide("lora_dropout", "torch", f"model.lora.dropout={p:g} with torch's dropout: p rounds to "
                      f"{drawn_probability(p):g} in steps of 2^-15, so the faster draw would change it")
    return decide("lora_dropout", "half_draw",
                  f"model.lora.dropout={p:g} drawn from one random 31-bit integer per two elements, 15 bits each (drop "
                  f"probability {described(p)}): torch's CPU dropout draws one "
                  "Bernoulli sample per element: 3.79 against 1.71 ms for an 8 x 170 x 576 bf16 input, and an eager "
                  "micro-step of 8 x 170 tokens 1.19x faster with this, on a 2-core Xeon with AMX")


def _cap(backend: str) -> int:
    return CPU_MAX_MICRO_BATCH if backend == "cpu" else GPU_MAX_MICRO_BATCH


class MemoryFit(NamedTuple):
    """A memory layout the planner can choose: micro-batch, checkpointing, ZeRO stage, offload, its estimate."""

    micro: int
    checkpointing: bool
    zero_stage: int
    offload: bool
    estimate: MemoryEstimate | None
    why: str = ""  # why checkpointing is on, when the planner turned it on


def _training_estimate(recipe: Recipe, backend: str, device: str, precision: str, base_dtype: str, shape: ModelShape,
                       micro: int, checkpointing: bool, stage: int, offload: bool, world_size: int,
                       seq_len: int) -> MemoryEstimate:
    """launcher.memory.estimate_memory for one layout, micro-batches padded to `seq_len` tokens."""
    lora = recipe.model.lora
    return estimate_memory(shape, micro_batch=micro, seq_len=seq_len, precision=precision, checkpointing=checkpointing,
                           lora_rank=lora.rank, lora_targets=lora.target_modules, zero_stage=stage,
                           world_size=world_size, offload=offload, device=device, method=recipe.model.method,
                           base_dtype=base_dtype, quantize=recipe.model.quantize,
                           trained_logits=trained_logits_blocker(recipe, backend, stage, shape) is None)


def padded_length(data, max_length: int) -> int:
    """The longest a micro-batch is padded to: the data's longest sample as the pre-flight counted it (at most
    data.max_length), or data.max_length where the count did not keep it."""
    longest = data.sample_tokens_max if isinstance(data, DataSize) and data.sample_tokens_max else max_length
    return min(longest, max_length)


def training_peak_gib(plan: Plan, shape: ModelShape) -> float | None:
    """A written plan's training peak on its device at the data's longest sample (launcher.timing.predict_for_plan:
    the first step's first touch of memory), as make_plan predicted it; None where memory was not estimated."""
    if plan.memory_estimate_gib is None:
        return None
    return _training_estimate(plan.recipe, plan.backend, plan.device, plan.precision, plan.base_dtype, shape,
                              plan.micro_batch_size, plan.gradient_checkpointing, plan.zero_stage, plan.offload,
                              plan.world_size, padded_length(plan.data_size, plan.max_length)).total / GiB


def _fit_memory(recipe: Recipe, backend: str, device: str, precision: str, base_dtype: str, shape: ModelShape | None,
                per_rank: int, max_length: int, world_size: int, budget_gib: float) -> MemoryFit:
    """The first layout, in order of speed, that fits.

    Order: ZeRO-2 before ZeRO-3 before offload; within each, the largest micro-batch without
    checkpointing (recompute costs ~30%), unless checkpointing is what buys a micro-batch of at least 4.
    If nothing fits, the smallest layout is returned with its estimate, and the caller reports it.
    """
    hwr = recipe.hardware
    fixed_micro = None if hwr.micro_batch_size == "auto" else hwr.micro_batch_size
    if shape is None:
        micro = fixed_micro or _largest_pow2_divisor(per_rank, CPU_MAX_MICRO_BATCH if backend == "cpu" else GPU_DEFAULT_MICRO_BATCH)
        ckpt = hwr.gradient_checkpointing if hwr.gradient_checkpointing != "auto" else False
        stage = 2 if hwr.zero_stage == "auto" else hwr.zero_stage
        offload = hwr.offload if hwr.offload != "auto" else False
        return MemoryFit(micro, ckpt, stage if backend == "deepspeed" else 0, offload if backend == "deepspeed" else False, None)
    ckpts = [False, True] if hwr.gradient_checkpointing == "auto" else [hwr.gradient_checkpointing]
    if backend == "deepspeed":
        stages = [2, 3] if hwr.zero_stage == "auto" else [hwr.zero_stage]
        offloads = [False, True] if hwr.offload == "auto" else [hwr.offload]
        layouts = [(s, o) for o in offloads for s in stages if not (o and s == 2 and 3 in stages)]
    else:
        layouts = [(0, False)]
    cap = _cap(backend)
    micros = [fixed_micro] if fixed_micro else sorted({_largest_pow2_divisor(per_rank, c) for c in (1, 2, 4, 8, 16, 32, 64) if c <= cap}, reverse=True)
    # Below this micro-batch a GPU idles; recomputing activations to reach it is the better trade.
    enough = min(4, micros[0])

    def largest_fit(stage, offload, ckpt) -> tuple[MemoryFit | None, MemoryEstimate]:
        """The largest micro-batch that fits this layout (None if none does), and the last estimate made."""
        for micro in micros:
            est = _training_estimate(recipe, backend, device, precision, base_dtype, shape, micro, ckpt, stage, offload,
                                     world_size, max_length)
            if est.total / GiB <= budget_gib:
                return MemoryFit(micro, ckpt, stage, offload, est), est
        return None, est

    smallest = None
    for stage, offload in layouts:
        found = [largest_fit(stage, offload, c) for c in ckpts]
        fits = [fit for fit, _ in found if fit is not None]
        for fit, est in found:
            if fit is None:
                smallest = MemoryFit(micros[-1], ckpts[-1], stage, offload, est)
        if not fits:
            continue
        plain = next((f for f in fits if not f.checkpointing), None)
        if plain and plain.micro >= enough:
            return plain
        best = max(fits, key=lambda f: (f.micro, not f.checkpointing))
        if not best.checkpointing:
            return best
        if plain:
            why = (f"on: without it the largest micro-batch that fits is {plain.micro} (estimated {plain.estimate.total / GiB:.2f} GiB), "
                   f"with it {best.micro} ({best.estimate.total / GiB:.2f} GiB); below {enough} samples per step the device idles, "
                   "which costs more than the ~30% of recomputation")
        else:
            why = (f"on: without it even micro-batch {micros[-1]} does not fit (estimated {found[0][1].total / GiB:.2f} GiB); "
                   "costs ~30% more compute")
        return best._replace(why=why)
    return smallest


# Compiled against eager LoRA training steps (launcher/compile.py), measured by benchmarks/compile_speed.py: the
# speed ratio, the compile's seconds, and where. A (device, precision) not listed has not been measured.
COMPILE_MEASURED: dict[tuple[str, str], tuple[float, float, str]] = {
    # TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) benchmarks/compile_speed.py --steps 8: eager 6.37 s against compiled 5.75 s
    # median per step (1.18x over all 8 steps together), compile 59.0 s with an empty inductor cache.
    ("cpu", "fp32"): (1.11, 59.0, "a 2-core AMD EPYC with AVX2 only (SmolLM2-135M, LoRA r16 on all linear layers, "
                                  "GSM8K micro-batches of 4)"),
    # The same command under bf16 autocast with a bf16 base and logits at trained positions (what the plan picks
    # there): eager 2.15 s against compiled 1.73 s median per step (1.44x over all 8 steps), compile 64.8 s.
    ("cpu", "bf16"): (1.24, 64.8, "a 2-core AMD EPYC with avx512_bf16, no AMX (SmolLM2-135M, bf16 base, LoRA r16 on "
                                  "all linear layers, GSM8K micro-batches of 4)"),
}


def _cpp_compiler() -> str | None:
    import os
    import shutil
    import sys

    return shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))


def _decide_compile(recipe: Recipe, hw: HardwareInfo, backend: str, device: str, precision: str, quantize: str,
                    prediction, decide):
    """Whether the decoder blocks are compiled for training, and why, and the time prediction with the compile
    counted where it was measured (training at the measured speed-up plus the compile); PlanError for a request
    that cannot run."""
    requested = recipe.train.compile
    blocker = None
    if backend == "deepspeed":
        blocker = ("DeepSpeed wraps the model in its engine, which compiles through its own engine.compile(); "
                   "sftlaunch compiles one process's model only")
    elif backend == "mps":
        blocker = "inductor's Apple-GPU (MPS) code generation is a prototype in torch 2.x, not run here"
    elif quantize == "4bit":
        blocker = "bitsandbytes' 4-bit layers have not been run compiled by sftlaunch"
    elif device == "cpu" and hw.name == "detected" and not _cpp_compiler():
        # torch._inductor.cpp_builder.get_cpp_compiler: $CXX, else g++ (clang++ on macOS), checked with --version.
        blocker = ("inductor's CPU code needs a C++ compiler and none was found on this machine ($CXX, else g++ or "
                   "clang++; slim container images have none: apt-get install g++)")
    measured = COMPILE_MEASURED.get((device, precision))

    def counted(on: bool, reason: str):
        decide("compile", on, reason)
        if not (on and measured and prediction is not None):
            return on, prediction
        speed, seconds, _ = measured
        return on, prediction.model_copy(update={"training": prediction.training / speed + seconds})

    if requested is False:
        return counted(False, "requested by the recipe (train.compile)")
    if requested is True:
        if blocker:
            raise PlanError(f"train.compile=true: {blocker}. Fix: train.compile=auto (or false).")
        return counted(True, "requested by the recipe (train.compile): the decoder blocks are compiled in place (inductor, "
                       "dynamic shapes) in a warm-up step before training, whose time is measured and shown"
                       + ("" if measured else f"; the predicted time assumes eager steps (not measured compiled on {device} "
                          f"in {precision})"))
    if blocker:
        return counted(False, f"off: {blocker}")
    if measured is None:
        return counted(False, f"off: compiled training steps have not been measured faster on {device} in "
                      f"{precision} (benchmarks/compile_speed.py measures it; train.compile=true to try)")
    speed, seconds, where = measured
    if speed <= 1.0:
        return counted(False, f"off: compiled steps measured {speed:.2f}x the speed of eager ones on {where}")
    if prediction is None:
        return counted(False, f"off: the training time is not predicted, so whether the compile (~{seconds:.0f} s "
                      f"on {where}) pays back is not known")
    budget = recipe.train.max_time_seconds
    if budget and budget < prediction.training:
        # train.max_time stops the run before its data is done: compiling pays only if the budget's compiled steps
        # (after the compile) outnumber its eager ones, budget > compile x speed / (speed - 1).
        worth = seconds * speed / (speed - 1)
        if budget <= worth:
            return counted(False, f"off: train.max_time={recipe.train.max_time} stops training first, and at "
                          f"{speed:.2f}x (measured on {where}) a ~{seconds:.0f} s compile pays back only in budgets over "
                          f"{worth:.0f} s")
    saved = prediction.training * (1 - 1 / speed)
    if saved <= seconds:
        return counted(False, f"off: at {speed:.2f}x (measured on {where}) the predicted "
                      f"{prediction.training / 60:.1f} min of training would save {saved:.0f} s, less than the compile's "
                      f"~{seconds:.0f} s")
    return counted(True, f"compiled steps measured {speed:.2f}x the speed of eager ones on {where}: saves "
                  f"~{saved / 60:.1f} min of the predicted {prediction.training / 60:.1f} min of training after a "
                  f"~{seconds:.0f} s compile")
