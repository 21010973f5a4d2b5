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
    # name: hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings
    "embedded:smollm2-135m-instruct": (576, 30, 9, 3, 1536, 49152, True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (576, 30, 9, 3, 1536, 49152, True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (960, 32, 15, 5, 2560, 49152, True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (2048, 24, 32, 32, 8192, 49152, True),
    "Qwen/Qwen2.5-0.5B-Instruct": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": (3584, 28, 28, 4, 18944, 152064, False),
    "meta-llama/Llama-3.2-1B-Instruct": (2048, 16, 32, 8, 8192, 128256, True),
    "meta-llama/Llama-3.2-3B-Instruct": (3072, 28, 24, 8, 8192, 128256, True),
    "meta-llama/Llama-3.1-8B-Instruct": (4096, 32, 32, 8, 14336, 128256, False),
}

# Tensors kept for backward per token per layer, in units of (hidden, intermediate) activations: the
# inputs of the 7 LoRA-wrapped projections, norms, attention output, the MLP's gate/up/act products,
# and the fp32 residual stream and norm statistics autocast keeps. Calibrated on CPU against measured
# peaks of SmolLM2-135M at 1024-8192 tokens per micro-batch: the peak grows by 2.07 MB per token in bf16
# and 3.6-3.8 MB in fp32 over a 6 (bf16) / 4 (fp32) bytes-per-parameter intercept, which is logits at
# 12 bytes per vocabulary entry plus these terms (benchmarks/memory_estimate.py prints the ratios).
ACT_HIDDEN_TERMS, ACT_INTERMEDIATE_TERMS = 21, 8
# Logits, at the loss's backward (its peak): transformers upcasts the logits to fp32 for the loss, whose
# log-softmax output (4 bytes) is kept, and backward holds the incoming gradient (4) and the one it
# produces (4) at once; the model-dtype logits themselves are freed by then.
LOGITS_BYTES_PER_ELEMENT = 12
ADAM_BYTES_PER_PARAM = 16  # fp32 LoRA weight, fp32 gradient, two fp32 Adam moments
CPU_CKPT_ATTENTION_BYTES = 3  # see estimate_memory: measured on CPU with gradient checkpointing


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def lora_params(self, rank: int, targets) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        dims = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h,
                "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
        names = dims if targets == "all-linear" else [t for t in targets if t in dims]
        return self.layers * rank * sum(dims[n] for n in names)


def shape_from_config(config: dict) -> ModelShape:
    heads = config["num_attention_heads"]
    return ModelShape(hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                      kv_heads=config.get("num_key_value_heads") or heads, intermediate=config["intermediate_size"],
                      vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)))


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
    total: float

    def gib(self) -> dict:
        return {k: round(v / GiB, 2) for k, v in asdict(self).items()}

    def describe(self) -> str:
        g = self.gib()
        return (f"{g['total']} GiB = weights {g['weights']} + LoRA/grads/Adam {g['lora_states']} + "
                f"activations {g['activations']} + logits {g['logits']}")


def estimate_memory(shape: ModelShape, *, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                    lora_rank: int, lora_targets, zero_stage: int = 0, world_size: int = 1,
                    offload: bool = False, device: str = "cuda") -> MemoryEstimate:
    """Peak bytes on one device for one micro-batch step of LoRA training."""
    half = precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    # Weights stay fp32 (never half precision under the optimizer); autocast keeps a half copy of each
    # weight it casts during the forward pass.
    if zero_stage and half:
        # DeepSpeed casts the module to half precision itself; trainable weights keep fp32 masters in
        # its optimizer (counted with the LoRA states below).
        weights = shape.params * 2.0
    else:
        weights = shape.params * (4.0 + (2 if half else 0))
    # No loading transient: a checkpoint stored in fp32 is memory-mapped (its pages become resident as the
    # forward pass touches them, and are the weights counted above), and a half-precision one is converted
    # and unmapped before training allocates anything (measured: +0.13 GiB resident right after loading
    # SmolLM2's 0.5 GiB fp32 checkpoint; the training peaks fit 6 bytes per parameter under bf16).
    if zero_stage == 3:
        # Parameter offload leaves about two layers' worth on the device (the one computing and the prefetch).
        weights = weights * 2 / shape.layers if offload else weights / world_size
    lora = shape.lora_params(lora_rank, lora_targets) * ADAM_BYTES_PER_PARAM
    if zero_stage >= 2:
        lora = lora / world_size
    if offload:
        lora = 0.0
    tokens = micro_batch * seq_len
    per_layer = tokens * act_bytes * (ACT_HIDDEN_TERMS * shape.hidden + ACT_INTERMEDIATE_TERMS * shape.intermediate)
    if checkpointing:
        # Only each layer's input is kept: the residual stream, fp32 even under autocast (fp32 embeddings plus
        # half-precision sublayer outputs promote to fp32); one layer's activations exist again during its
        # recomputation.
        activations = shape.layers * tokens * 4 * shape.hidden + per_layer
        if device == "cpu":
            # Measured, cause not pinned down: checkpointed training on CPU holds a further ~3 bytes per
            # attention-matrix entry per layer (heads x seq^2 x layers per sample), which is what made peaks at
            # 512 tokens 45% above this estimate without the term (SmolLM2, 1024-8192 tokens, fit within 5%).
            activations += CPU_CKPT_ATTENTION_BYTES * micro_batch * shape.layers * shape.heads * seq_len**2
    else:
        activations = shape.layers * per_layer
    logits = tokens * shape.vocab * LOGITS_BYTES_PER_ELEMENT
    total = weights + lora + activations + logits
    return MemoryEstimate(weights, lora, activations, logits, total)
