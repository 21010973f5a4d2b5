"""Peak training memory per device, estimated from a model's config alone (no weights downloaded).

Written by hand: accelerate's `estimate-memory` counts weights only, and DeepSpeed's estimators ignore
activations and the logits buffer, which dominate LoRA fine-tuning of small models with large vocabularies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 2**30

# Shapes of models people fine-tune most, from their config.json, so that `sftlaunch plan` can size a
# run for a model it has not downloaded. A local directory or a reachable Hub id is read directly.
KNOWN_SHAPES = {
    # name: hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings, config's model_type
    "embedded:smollm2-135m-instruct": (576, 30, 9, 3, 1536, 49152, True, "llama"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (576, 30, 9, 3, 1536, 49152, True, "llama"),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (960, 32, 15, 5, 2560, 49152, True, "llama"),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (2048, 24, 32, 32, 8192, 49152, True, "llama"),
    "Qwen/Qwen2.5-0.5B-Instruct": (896, 24, 14, 2, 4864, 151936, True, "qwen2"),
    "Qwen/Qwen2.5-1.5B-Instruct": (1536, 28, 12, 2, 8960, 151936, True, "qwen2"),
    "Qwen/Qwen2.5-7B-Instruct": (3584, 28, 28, 4, 18944, 152064, False, "qwen2"),
    "Qwen/Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False, "qwen2"),  # the base model: the same config shape
    "meta-llama/Llama-3.2-1B-Instruct": (2048, 16, 32, 8, 8192, 128256, True, "llama"),
    "meta-llama/Llama-3.2-3B-Instruct": (3072, 28, 24, 8, 8192, 128256, True, "llama"),
    "meta-llama/Llama-3.1-8B-Instruct": (4096, 32, 32, 8, 14336, 128256, False, "llama"),
}

# Bytes kept for backward per token per layer, per hidden and per intermediate unit, without gradient
# checkpointing: the inputs of the LoRA-wrapped projections, norm inputs and statistics, q/k/v/output of
# attention (k/v repeated to all heads), the MLP's gate/up/act products; under autocast both the fp32 and
# the half-precision copy of several of them. Fitted to the live-tensor peaks (torch profiler) of two
# shapes, the tiny test Llama (hidden 64, intermediate 128) and SmolLM2-135M (576, 1536), where the peak
# grows exactly linearly in tokens per micro-batch (same peak at 32 x 128, 16 x 256, 64 x 64 and 8 x 512:
# CPU attention keeps no seq^2 matrix) and checked on a third shape fitted on neither
# (benchmarks/memory_estimate.py prints all three).
ACT_BYTES = {"half": (35.6, 4.25), "fp32": (46.1, 8.9)}
# Logits, at the loss's backward (its peak): transformers upcasts the logits to fp32 for the loss, whose
# log-softmax output (4 bytes) is kept, and backward holds the incoming gradient (4) and the one it
# produces (4) at once; the model-dtype logits themselves are freed by then.
LOGITS_BYTES_PER_ELEMENT = 12
# The trained-positions loss (launcher/loss.py) holds one chunk of positions' logits at a time: the chunk's
# fp32 logits (4 bytes), turned in place into the gradient of the loss with respect to them, their copy in the
# compute dtype for the products with lm_head (2 or 4) and the compute dtype's product output before its upcast
# (2 or 4): 12 is the fp32 bound.
ADAM_BYTES_PER_PARAM = 16  # fp32 LoRA weight, fp32 gradient, two fp32 Adam moments
# Attention's probabilities, kept for backward, when the CPU runs attention as plain products: a batch of samples
# of different lengths has a padding mask, and torch's CPU scaled_dot_product_attention takes its math path for
# it (its flash kernel is for masks it can build itself), which holds micro-batch x heads x length^2 scores per
# layer. The fit above used samples of one length, with no mask, and missed it: GSM8K's first batch (16 samples
# padded to 543 tokens) peaked at 18.35 GiB resident against 11.12 planned. 4 bytes per score (fp32
# probabilities) closes that gap: 30 layers x 16 x 9 heads x 543^2 x 4 = 4.7 GiB of tensors, 6.6 GiB resident.
# GPUs' memory-efficient kernels take the mask without the square matrix.
ATTENTION_SCORE_BYTES = 4
# A 4-bit NF4 weight with double quantization (model.quantize=4bit): half a byte, plus its block's absmax
# quantized to 8 bits (one per 64 weights) and one fp32 scale per 256 of those blocks (bitsandbytes'
# defaults, transformers BitsAndBytesConfig bnb_4bit_use_double_quant; QLoRA paper, section 3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# On CPU the process's resident set exceeds its live tensors: glibc keeps freed blocks in its heaps (every
# tensor below its 32 MiB mmap ceiling comes from there) and reuses them only for requests that fit.
# Resident peak / live-tensor peak measured on SmolLM2-135M from 1024 to 8192 tokens per micro-batch:
# bf16 1.24-1.56, fp32 1.52-1.97, varying by up to 20% between runs of the same case
# (benchmarks/memory_estimate.py). GPU allocators' caching is left to the plan's memory fraction, as
# torch.cuda.max_memory_allocated leaves it out too. Models whose tensors are a few MiB do not follow
# this: their resident set is mostly oneDNN's generated kernels and heap slack (README, "Measured").
CPU_RESIDENT_FACTOR = {"half": 1.4, "fp32": 1.75}
# The evaluation's working set still carries that factor. A LoRA training step's slack does not follow its kept
# tensors but the transient activations each layer's forward and backward allocate and free, which gradient
# checkpointing does not remove (the recompute allocates them again) and which the large single allocations (the
# weights, a padded batch's attention probabilities, the logits) do not add to. Slack (resident peak minus live-tensor
# peak) / the layers' activation bytes without checkpointing (ACT_BYTES x tokens x layers), SmolLM2-135M, fresh
# processes (benchmarks/memory_estimate.py): without checkpointing bf16 0.63-0.70 from 1,024 to 8,192 tokens per
# micro-batch (fp32 base and logits everywhere, or bf16 base and trained positions' logits), fp32 0.89-0.91; with
# checkpointing about 0.8 of that and noisier between runs: bf16 0.46-0.49 (fp32 base) and 0.39-0.68 (bf16 base,
# 16 x 128, eight runs), fp32 0.79-0.84 (16 x 128). A share of the tensors (the factor above) put the checkpointed
# step's slack at a fifth of the activations: real runs with checkpointing peaked at 1.37-1.56x the plan.
CPU_SLACK_PER_ACTIVATION_BYTE = {"half": 0.65, "fp32": 0.9}
CPU_CHECKPOINTED_SLACK_SHARE = 0.8
# Full fine-tuning is dominated by large tensors that live for the whole run (every weight's gradient and
# Adam moments, above glibc's mmap threshold, so returned whole): resident / live-tensor peak measured
# 1.10 (bf16), 1.13 (fp32), 1.17 (bf16 + checkpointing) on SmolLM2-135M at 8 x 128 tokens
# (benchmarks/memory_estimate.py --method full).
CPU_RESIDENT_FACTOR_FULL = 1.15
# The libraries' own resident set before any model loads (Python, torch, transformers, peft and the launcher
# imported: 0.39 GiB measured on Linux, torch 2.13 CPU build). Not part of the estimates above (fitted above that
# baseline), but part of what a run's process peaks at, which launcher.phases measures.
CPU_RUNTIME_GIB = 0.4
# What a process that trained still holds when an evaluation after training starts, after the optimizer, gradients
# and trainer are freed and the heap is trimmed (launcher.job.release_heap): blocks glibc cannot return from the
# middle of its heaps, the libraries' caches, the data. Measured as the final evaluation's starting resident set less
# CPU_RUNTIME_GIB and the weights it starts with (benchmarks/time_estimate.py's cases and the quick start, a 2-core
# Intel Xeon with AMX and a 2-core AMD EPYC with avx512_bf16). In half precision it grows with the micro-batches
# trained, each padded to its own length (oneDNN keeps generated kernels per new shape, up to the 128 entries the CPU
# backend allows it): 0.34-0.38 GiB after 12, 0.37-0.41 after 16 (GSM8K, planned at 17.5 GiB for training: not a
# share of training's estimate, as it was taken before), 0.55-0.58 after 48, 0.67 after 189 (the quick start, two
# runs on two CPUs); DeepSpeed's processes 0.58-0.61 after 8. fp32: 0.19-0.20 after 12 (not measured longer).
CPU_RETAINED_GIB = {"half": 0.3, "fp32": 0.2}
CPU_RETAINED_PER_MICRO_BATCH_GIB = {"half": 0.0075, "fp32": 0.0}
CPU_RETAINED_GROWTH_CAP_GIB = 0.4


def cpu_retained_gib(precision: str, micro_batches: float | None) -> float:
    """What a CPU process holds after training `micro_batches` micro-batches in `precision` (None: not predicted)."""
    kind = "half" if precision in ("bf16", "fp16") else "fp32"
    growth = CPU_RETAINED_PER_MICRO_BATCH_GIB[kind] * (micro_batches or 0)
    return CPU_RETAINED_GIB[kind] + min(CPU_RETAINED_GROWTH_CAP_GIB, growth)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    model_type: str = ""  # config.json's model_type ("llama", "qwen2", ...); "" when not known

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear projections: what 4-bit quantization stores as NF4 (embeddings,
        norms and lm_head are left in the base dtype: transformers' get_modules_to_not_convert keeps the output
        embeddings, and bitsandbytes replaces nn.Linear only)."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate)

    def _projections(self, targets) -> list[tuple[int, int]]:
        """(in, out) features of each decoder layer's linear projections named by model.lora.target_modules."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return [dims[n] for n in (dims if targets == "all-linear" else [t for t in targets if t in dims])]

    def lora_params(self, rank: int, targets) -> int:
        return self.layers * rank * sum(a + b for a, b in self._projections(targets))

    def lora_target_params(self, targets) -> int:
        """Weights of the linear layers LoRA adapts (model.lora.target_modules): what merging the adapter writes."""
        return self.layers * sum(a * b for a, b in self._projections(targets))


def shape_from_config(config: dict) -> ModelShape:
    heads = config["num_attention_heads"]
    return ModelShape(hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                      kv_heads=config.get("num_key_value_heads") or heads, intermediate=config["intermediate_size"],
                      vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
                      model_type=str(config.get("model_type") or ""))


def find_shape(model_name: str) -> tuple[ModelShape | None, str]:
    """The model's shape and where it came from, without loading weights (a Hub id: config.json only)."""
    if model_name in KNOWN_SHAPES:
        return ModelShape(*KNOWN_SHAPES[model_name]), "known shape of " + model_name
    path = Path(model_name).expanduser()
    if (path / "config.json").is_file():
        try:
            return shape_from_config(json.loads((path / "config.json").read_text())), f"{path}/config.json"
        except (KeyError, ValueError, TypeError):
            return None, f"{path}/config.json has no decoder shape"
    if model_name.startswith(("embedded:", ".", "/", "~")) or model_name.endswith(".gguf"):
        return None, "no config.json to read"
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(model_name, "config.json")
        return shape_from_config(json.loads(Path(local).read_text())), f"config.json of {model_name} from the Hub"
    except Exception as exc:  # offline, gated, missing: the plan says it could not size the model
        return None, f"config.json of {model_name} not reachable ({type(exc).__name__})"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    lora_states: float
    activations: float
    logits: float
    allocator: float  # CPU only: resident memory the allocator holds beyond live tensors
    total: float
    method: str = "lora"  # lora_states holds the adapter's states (lora) or every weight's gradient and Adam state (full)

    @property
    def tensors(self) -> float:
        """Peak bytes of live tensors: what torch.cuda.max_memory_allocated (or the CPU profiler) measures."""
        return self.total - self.allocator

    def gib(self) -> dict:
        return {k: round(v / GiB, 2) for k, v in asdict(self).items() if k != "method"}

    def describe(self) -> str:
        g = self.gib()
        states = "LoRA/grads/Adam" if self.method == "lora" else "grads/Adam"
        text = (f"{g['total']} GiB = weights {g['weights']} + {states} {g['lora_states']} + "
                f"activations {g['activations']} + logits {g['logits']}")
        return text + (f" + CPU allocator {g['allocator']}" if self.allocator else "")


def quantized_weight_bytes(shape: ModelShape, base_dtype: str) -> float:
    """Bytes of a 4-bit base: NF4 linear layers, the rest (embeddings, norms, lm_head) in base_dtype."""
    rest = 2.0 if base_dtype in ("bf16", "fp16") else 4.0
    return shape.linear_params * NF4_BYTES_PER_PARAM + (shape.params - shape.linear_params) * rest


def estimate_memory(shape: ModelShape, *, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                    lora_rank: int, lora_targets, zero_stage: int = 0, world_size: int = 1,
                    offload: bool = False, device: str = "cuda", method: str = "lora", base_dtype: str = "fp32",
                    trained_logits: bool = False, quantize: str = "none", padded: bool = True) -> MemoryEstimate:
    """Peak bytes on one device for one micro-batch step of LoRA or full training (on CPU: of the resident set).

    base_dtype: the dtype the (frozen, LoRA) base is loaded in. trained_logits: the loss computes logits at
    trained positions only, a chunk of positions at a time (launcher/loss.py), instead of the whole block.
    quantize "4bit": the base's linear layers are NF4 (QLoRA), computed in base_dtype.
    """
    half = precision in ("bf16", "fp16")
    kind = "half" if half else "fp32"
    # Weights stay fp32 (never half precision under the optimizer). Autocast casts each weight to half
    # precision and the matmul keeps that copy for its backward; with checkpointing only the output
    # projection's copy (vocab x hidden) outlives the forward pass.
    if quantize == "4bit":
        # bitsandbytes dequantizes one layer's weight to the compute dtype for each product and keeps only the
        # 4-bit weight for backward (bitsandbytes/autograd MatMul4Bit): one transient, the largest projection.
        compute = 2.0 if base_dtype in ("bf16", "fp16") else 4.0
        weights = quantized_weight_bytes(shape, base_dtype) + compute * shape.hidden * shape.intermediate
        if half and base_dtype == "fp32":
            weights += 2.0 * shape.vocab * shape.hidden  # autocast's half copy of the fp32 lm_head
    elif base_dtype in ("bf16", "fp16") and not zero_stage:
        # A half-precision frozen base: 2 bytes per weight, and autocast finds nothing to cast (the LoRA
        # weights' casts are counted nowhere: they are r/hidden of the layers' size).
        weights = shape.params * 2.0
    elif zero_stage and half:
        # DeepSpeed casts the module to half precision itself; trainable weights keep fp32 masters in
        # its optimizer (counted with the LoRA states below).
        weights = shape.params * 2.0
    elif half:
        weights = shape.params * 4.0 + 2.0 * (shape.vocab * shape.hidden if checkpointing else shape.params)
    else:
        weights = shape.params * 4.0
    # No loading transient: a checkpoint stored in fp32 is memory-mapped (its pages become resident as the
    # forward pass touches them, and are the weights counted above), and a half-precision one is converted
    # and unmapped before training allocates anything (measured: +0.13 GiB resident right after loading
    # SmolLM2's 0.5 GiB fp32 checkpoint).
    if zero_stage == 3:
        # Parameter offload leaves about two layers' worth on the device (the one computing and the prefetch).
        weights = weights * 2 / shape.layers if offload else weights / world_size
    if method == "full":
        lora = _full_states(shape.params, half and zero_stage > 0, zero_stage, world_size, offload)
    else:
        lora = shape.lora_params(lora_rank, lora_targets) * ADAM_BYTES_PER_PARAM
        if zero_stage >= 2:
            lora = lora / world_size
        if offload:
            lora = 0.0
    tokens = micro_batch * seq_len
    per_hidden, per_intermediate = ACT_BYTES[kind]
    per_layer = tokens * (per_hidden * shape.hidden + per_intermediate * shape.intermediate)
    transients = shape.layers * per_layer  # what a step allocates and frees, checkpointed or not (the CPU's slack)
    if trained_logits:
        from launcher.loss import chunk_positions

        logits = min(tokens, chunk_positions(shape.vocab)) * shape.vocab * LOGITS_BYTES_PER_ELEMENT
    else:
        logits = tokens * shape.vocab * LOGITS_BYTES_PER_ELEMENT
    if padded and device in ("cpu", "mps"):  # batches of one length (no padding mask) take the flash kernel
        per_layer += micro_batch * shape.heads * seq_len**2 * ATTENTION_SCORE_BYTES
    if checkpointing:
        # Only each layer's input is kept: the residual stream, fp32 even under autocast (fp32 embeddings plus
        # half-precision sublayer outputs promote to fp32). The peak is at the loss's backward, or, for a
        # small vocabulary, while one layer's activations are recomputed.
        activations = shape.layers * tokens * 4 * shape.hidden + max(0.0, per_layer - logits)
    else:
        activations = shape.layers * per_layer
    tensors = weights + lora + activations + logits
    if device != "cpu":
        allocator = 0.0
    elif method == "full":
        allocator = tensors * (CPU_RESIDENT_FACTOR_FULL - 1)
    else:
        allocator = transients * CPU_SLACK_PER_ACTIVATION_BYTE[kind] * (CPU_CHECKPOINTED_SLACK_SHARE if checkpointing else 1.0)
    return MemoryEstimate(weights, lora, activations, logits, allocator, tensors + allocator, method)


def _full_states(params: int, deepspeed_half: bool, zero_stage: int, world_size: int, offload: bool) -> float:
    """Gradients and Adam state of every weight, beyond the weights themselves (counted above).

    Without DeepSpeed (or DeepSpeed in fp32): an fp32 gradient (4 bytes) and two fp32 moments (8) per
    weight, the fp32 weights being the master copy. DeepSpeed in half precision (the ZeRO paper's 16 bytes
    per parameter): half-precision gradients (2) and fp32 master weights plus moments (12). ZeRO-1 shards
    the optimizer state, ZeRO-2 the gradients too (ZeRO-3's weights are divided above); offload moves the
    optimizer state to CPU memory.
    """
    grads, optimizer = (2.0, 12.0) if deepspeed_half else (4.0, 8.0)
    grads, optimizer = grads * params, optimizer * params
    if zero_stage >= 1:
        optimizer /= world_size
    if zero_stage >= 2:
        grads /= world_size
    if offload:
        optimizer = 0.0
    return grads + optimizer


@dataclass(frozen=True)
class EvalMemoryEstimate:
    """Peak bytes of the evaluation's generation on its one device."""

    training_weights: float  # one process: the fp32 weights training used, alive beside the evaluation's copy
    eval_weights: float  # the weights generation runs on, in the evaluation's precision
    kv_cache: float
    activations: float  # the prompts' forward pass (one layer at a time) and the last position's logits
    allocator: float
    total: float
    loss_pass: float = 0.0  # the held-out loss's forward pass (launcher.item_loss), before generation: the larger counts
    merged_weights: float = 0.0  # the adapted weights copied to merge the adapter into (eval_merge), where shared
    generates: bool = True  # False: the held-out loss alone (a chat evaluation without eval.metrics)

    @property
    def working(self) -> float:
        """What the evaluation allocates beyond the weights at its peak: generation or the loss pass."""
        return max(self.kv_cache + self.activations, self.loss_pass)

    def describe(self) -> str:
        g = {k: round(v / GiB, 2) for k, v in asdict(self).items()}
        text = f"{g['total']} GiB = "
        text += f"training weights {g['training_weights']} + " if self.training_weights else ""
        text += f"evaluation weights {g['eval_weights']} + " if self.eval_weights else ""
        text += f"merged copy of the adapted weights {g['merged_weights']} + " if self.merged_weights else ""
        if not self.generates:
            text += f"held-out loss pass {g['loss_pass']} (no generation)"
        elif self.loss_pass > self.kv_cache + self.activations:
            text += f"held-out loss pass {g['loss_pass']} (more than generation's KV cache {g['kv_cache']} + activations {g['activations']})"
        else:
            text += f"KV cache {g['kv_cache']} + activations {g['activations']}"
        return text + (f" + CPU allocator {g['allocator']}" if self.allocator else "")


def estimate_eval_memory(shape: ModelShape, *, eval_precision: str, training_precision: str, batch: int, prompt_len: int,
                         new_tokens: int, reloaded: bool, device: str, base_dtype: str = "fp32",
                         quantize: str = "none", merged_params: int = 0, generates: bool = True) -> EvalMemoryEstimate:
    """The evaluation's peak: generation on `batch` prompts of up to `prompt_len` tokens plus `new_tokens`.

    One process evaluates the model it trained: its fp32 weights stay, and under mixed precision generation
    runs on a half-precision copy beside them (launcher.evaluate.inference_weights, cast weight by weight).
    Under DeepSpeed (`reloaded`) the engine is freed and the model is loaded again in the evaluation's
    precision alone. A base trained in the evaluation's precision (base_dtype) is shared by the copy: only
    the LoRA weights are cast, which is counted nowhere; so is a 4-bit base (quantize), whose evaluation
    precision is its compute dtype. Merging the adapter for generation (`merged_params`: the adapted weights)
    writes into the copy's weights: free where the copy casts them anyway (an fp32 base evaluated in half
    precision) or into a model reloaded for the evaluation alone, a copy of those weights where it would share
    them with training. `generates` False: an evaluation by held-out loss alone (launcher.timing.evaluation_generates),
    which holds no KV cache and runs no prompt pass beyond the loss's.
    """
    eval_bytes = 2.0 if eval_precision in ("bf16", "fp16") else 4.0
    if quantize == "4bit":  # generation runs on the 4-bit base it trained with (its weights cannot be cast)
        training, weights = quantized_weight_bytes(shape, base_dtype), 0.0
    elif reloaded:
        training, weights = 0.0, shape.params * eval_bytes
    else:
        training = shape.params * (4.0 if base_dtype == "fp32" else 2.0)
        weights = 0.0 if eval_bytes == 4.0 or base_dtype == eval_precision else shape.params * eval_bytes
    # Reloaded for the evaluation alone, the model is merged in place (launcher.job.load_for_final_evaluation).
    shared = quantize != "4bit" and not reloaded and not weights
    merged = merged_params * eval_bytes if shared else 0.0
    head_dim = shape.hidden // shape.heads
    positions = prompt_len + new_tokens
    kv_cache = 2 * shape.layers * batch * positions * shape.kv_heads * head_dim * eval_bytes
    # The prompts' forward pass holds one layer's hidden states and MLP intermediates; the last position's
    # logits come out in the model's dtype and are upcast to fp32 for the choice of the next token.
    activations = batch * prompt_len * (4 * shape.hidden + 3 * shape.intermediate) * eval_bytes
    activations += batch * shape.vocab * (eval_bytes + 8)
    if not generates:
        kv_cache = activations = 0.0
    # The held-out loss (launcher.item_loss) runs first, a batch of up to 2^25 logits at a time: the logits in the
    # model's dtype, their fp32 copy at the trained positions and its log-softmax.
    from launcher.item_loss import tokens_per_batch

    loss_pass = tokens_per_batch(shape.vocab) * shape.vocab * (eval_bytes + 8)
    working = max(kv_cache + activations, loss_pass)
    tensors = training + weights + merged + working
    kind = "half" if training_precision in ("bf16", "fp16") else "fp32"
    # The CPU allocator's slack comes from the many short-lived tensors of each decoding step; the weights are
    # large single allocations (mmap'd by glibc and returned whole), so only the rest carries the factor.
    allocator = working * (CPU_RESIDENT_FACTOR[kind] - 1) if device == "cpu" else 0.0
    return EvalMemoryEstimate(training, weights, kv_cache, activations, allocator, tensors + allocator, loss_pass, merged,
                              generates)
