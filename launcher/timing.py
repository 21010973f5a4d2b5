"""How long a run will take, from the model's shape, the data's tokens and the machine's measured rates.

Pure (no torch): the plan calls predict_time() with what it already knows. Written by hand: no library
predicts a fine-tuning run's time before it starts (Trainer and accelerate show an ETA once steps run).

Training: FLOPs per token (the layers' matrix products forward and backward, attention's sequence term, the
logits, LoRA's own products, the recompute of checkpointing) divided by the device's measured matrix rate x an
efficiency; plus the elementwise work (norms, activations, residual adds, casts, attention's softmax), taken as
element operations in proportion to the activation elements the memory model counts and to attention's scores,
divided by the CPU's measured elementwise rate (on a GPU: passes over the activation bytes at its bandwidth);
plus a fixed cost per micro-batch (Python, the data collator, the optimizer step's share).
Evaluation: greedy generation, one decoding step per new token for each batch until its longest answer ends;
a step costs the larger of reading every weight once (bandwidth-bound at small batches) and the batch's
matrix products (compute-bound at large ones), plus a fixed cost per step.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from launcher.memory import ACT_BYTES, ModelShape

# Fitted by benchmarks/time_estimate.py on a 2-core Intel Xeon with AMX and avx512_bf16 (the README's "Measured"
# shows each case and how far it lands), from the steady steps of LoRA runs in bf16 and fp32, a micro-batch of 4
# against 16, full fine-tuning, DeepSpeed over gloo, and GSM8K's samples twice as long as unit conversion's:
# - the model's products run at 0.9 of the probe's product rate (bf16 measured at 2048: the model's own shapes ran at
#   1.0-1.2x that there; fp32 at 1024, flat at every shape) - held, not fitted: fitted freely with the rest it came
#   out at 1.6, which fp32 products measured flat at the probe's rate cannot be;
# - the rest of a step (norms, activations, casts, residual adds, attention's mask and softmax) is counted in
#   element operations and divided by the probe's measured elementwise rate in the run's precision (an MLP's
#   copy, SiLU, mul and add, in place and cache-sized): so many operations per activation element the memory model
#   counts - 22 in bf16, 9 in fp32: a half-precision step also casts to and from fp32 (autocast, the norms' and
#   softmax's fp32 insides) - and 145 per attention score (heads x padded length per token and layer: a padded
#   batch takes the CPU's plain-products attention, its mask, softmax and their backward). Not the copy bandwidth,
#   as before: the two development CPUs measured the same 1.6-2.2 ms per token for this part of a bf16 LoRA step
#   while their 256 MiB copies ran at 80 and 35 GB/s (the bandwidth model predicted the Xeon 0.53-0.76x too slow);
# - a micro-batch costs 0.1 s of Python, collation and the loss's bookkeeping on top (fitted on an EPYC; held);
# - each optimizer step passes over every trainable weight's state (AdamW, clipping, the health guard's finiteness
#   checks, the gradients' fresh allocation): 70 element operations per trainable weight at the fp32 elementwise
#   rate (AdamW alone measured 2.2 ns per weight there, 14 operations; nothing to speak of for LoRA's 2.4M weights);
# - the phase starts with the trainer's set-up (2 s) and the first step's first touch of the run's memory (the
#   first batch is the longest: transformers' length-grouped sampler puts it first): 1.6 s per GiB of the
#   predicted peak, at the data's longest sample (GSM8K's first step took 39 s, the next ones 7.8 s).
# GPUs: not fitted (no GPU run yet): typical figures for small models, stated as such in the plan's reason; their
# elementwise work is bound by memory bandwidth (passes over the activation bytes).
CPU = {
    "matmul_efficiency": 0.9,
    "elementwise_ops_per_element": {"half": 22.0, "fp32": 9.0},
    "attention_ops_per_score": 145.0,
    "micro_batch_seconds": 0.1,
    "optimizer_ops_per_param": 70.0,
    "start_seconds": 2.0,
    "first_touch_seconds_per_gib": 1.6,
    "decode_step_seconds": 0.1,  # fixed cost per generation step of a batch (Python, the logits processors, cache)
    # DeepSpeed's CPU shared-memory op built on the first DeepSpeed run of a machine and install
    # (launcher.hardware.deepspeed_cpu_op_to_build): the loading phase took 29.8 s against 5.0 s with the op built
    # (2-core Xeon with AMX; its two C++ files compiled in 24 s side by side); first DeepSpeed runs on a 2-core EPYC
    # loaded in 42.8 s.
    "deepspeed_op_build_seconds": 25.0,
}
GPU = {"matmul_efficiency": 0.35, "elementwise_passes": 6.0, "attention_bytes_per_score": 0.0, "micro_batch_seconds": 0.03,
       "optimizer_bytes_per_param": 32.0, "start_seconds": 5.0, "first_touch_seconds_per_gib": 0.0, "decode_step_seconds": 0.015}
# Gradient exchange between processes per optimizer step: gloo over loopback between CPU processes, NCCL between
# GPUs of one node (NVLink/PCIe), between nodes (InfiniBand/Ethernet). GB/s of bus bandwidth.
COMM_GBS = {"cpu": 1.0, "gpu_node": 100.0, "gpu_nodes": 12.0}


class DataSize(BaseModel):
    """What the training data will produce: counted by the pre-flight when the tokenizer is at hand, else estimated."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    samples: int
    tokens: int  # all tokens of all samples, prompts included
    trainable_tokens: int  # tokens the loss trains on (answers and EOS)
    answer_tokens_max: int  # the longest answer: how long a trained model's longest generation runs
    eval_items: int
    eval_prompt_tokens: int  # mean prompt length of the evaluation items
    source: str
    # The longest evaluation prompt: a generation batch is padded to its longest prompt, which sizes its KV cache.
    # None in a count cached before it was kept: the plan then sizes the evaluation's memory for data.max_length.
    eval_prompt_tokens_max: int | None = None
    # Answer lengths an earlier run of the same evaluation measured (launcher.history.measured_answers), per model
    # ("base", "trained"): {"decode_steps", "batches", "run"} and "mean" (tokens per answer) where it was recorded;
    # None: not known, the evaluation's reference answers are used (eval_answer_tokens).
    measured_answers: dict[str, dict] | None = None
    # The evaluation items' reference answers in tokens (+ EOS), in the evaluation's generation order
    # (launcher.data.batch_order). None in a count cached before they were kept: the training answers' longest is used.
    eval_answer_tokens: list[int] | None = None
    # The longest training sample in tokens, at most data.max_length: micro-batches are padded to their longest
    # sample, so the training's peak comes from the one that holds it. None in a count cached before it was kept.
    sample_tokens_max: int | None = None


class TimePrediction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    training: float
    base_eval: float
    trained_eval: float
    loading: float
    flops_per_token: float
    tokens: int  # tokens the training steps process
    samples_seen: int  # samples the training steps see (epochs included)
    steps: int
    sustained_gflops: float
    reason: str
    # The raw terms the efficiencies multiply (benchmarks/time_estimate.py fits the constants to them):
    # matmul seconds at the full probed rate, seconds of one elementwise pass, micro-batches, decoding steps.
    parts: dict[str, float] = {}

    @property
    def total(self) -> float:
        return self.loading + self.base_eval + self.training + self.trained_eval

    def seconds(self) -> dict:
        return {"loading": round(self.loading, 1), "base_eval": round(self.base_eval, 1), "training": round(self.training, 1),
                "final_eval": round(self.trained_eval, 1), "total": round(self.total, 1)}


def flops_per_token(shape: ModelShape, *, method: str, lora_rank: int, lora_targets, seq_len: float, trained_share: float,
                    trained_logits: bool, checkpointing: bool) -> dict:
    """Training FLOPs per token of the sequence, by part (a multiply-add is 2 FLOPs).

    seq_len: the mean length of a padded sample (attention's term); trained_share: the share of tokens the loss
    trains on (with trained_logits, the only positions whose logits are computed).
    """
    h, layers, i = shape.hidden, shape.layers, shape.intermediate
    kv = shape.kv_heads * (h // shape.heads)
    linear = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    # Scores and weighted values: 2 x (2 x attended positions x hidden) per layer, a causal mask attending to
    # seq_len / 2 positions on average.
    attention = layers * 4 * (seq_len / 2) * h
    logits = 2 * h * shape.vocab * (trained_share if trained_logits else 1.0)
    lora = 2 * shape.lora_params(lora_rank, lora_targets) if method == "lora" else 0.0
    forward = linear + attention + logits + lora
    if method == "full":  # gradients for the inputs and for every weight: twice the forward's products
        backward = 2 * (linear + logits) + 2 * attention
    else:  # frozen weights: gradients for the inputs only; LoRA's own weights get both
        backward = linear + logits + 2 * attention + 2 * lora
    recompute = (linear + attention + lora) if checkpointing else 0.0
    return {"linear": linear, "attention": attention, "logits": logits, "lora": lora, "forward": forward,
            "backward": backward, "recompute": recompute, "total": forward + backward + recompute}


def activation_bytes_per_token(shape: ModelShape, precision: str) -> float:
    """Activation bytes the memory model counts per token (launcher.memory.ACT_BYTES), all layers."""
    per_hidden, per_intermediate = ACT_BYTES["half" if precision in ("bf16", "fp16") else "fp32"]
    return shape.layers * (per_hidden * shape.hidden + per_intermediate * shape.intermediate)


def activation_elements_per_token(shape: ModelShape) -> float:
    """Activation elements per token, all layers: the half-precision bytes the memory model counts, halved (the same
    tensors in either precision; fp32's extra bytes are its own copies, not more elements to compute)."""
    return activation_bytes_per_token(shape, "bf16") / 2


def _constants(device: str) -> dict:
    return CPU if device == "cpu" else GPU


def _eval_batches(data: DataSize, eval_batch: int) -> int:
    return math.ceil(data.eval_items / max(1, eval_batch)) if data.eval_items else 0


def _measured_answers(data: DataSize, eval_batch: int) -> dict:
    """Answer lengths an earlier run measured, per model, where it evaluated the same items in the same batches."""
    batches = _eval_batches(data, eval_batch)
    return {k: m for k, m in (data.measured_answers or {}).items() if m.get("batches") == batches}


# Rows a batch still holds after their answer ended: generation drops finished rows every DROP_FINISHED_EVERY (16)
# decoding steps (launcher.evaluate._generate_batch), so a row stays half of that longer on average.
ROW_LINGER_STEPS = 8


def answer_batches(data: DataSize, which: str, eval_batch: int, max_new_tokens: int) -> tuple[list[tuple[int, float, float]], str]:
    """Each evaluation batch of `which` model ("base" or "trained") as (rows, decoding steps, row-steps: the rows
    the steps carry, summed), and where the answer lengths come from:
    - an earlier run's measured answers (launcher.history.measured_answers), exact for the base model under greedy
      decoding: its mean steps per batch, and rows that stay until their mean answer ends;
    - else the evaluation items' reference answers: a batch decodes until its longest reference ends, each row until
      its own does - how a model trained on the data answers; the base model, not trained on them, is assumed to
      answer as long (a first run cannot know better);
    - else (a size counted before the references were kept) the training answers' longest in every batch, half the
      rows generating.
    Every length at most eval.max_new_tokens."""
    n, b = data.eval_items, max(1, eval_batch)
    sizes = [min(b, n - k) for k in range(0, n, b)]
    m = _measured_answers(data, eval_batch).get(which)
    if m:
        steps = m["decode_steps"] / max(1, m["batches"])
        per_row = min(steps, m["mean"] + 1 + ROW_LINGER_STEPS) if isinstance(m.get("mean"), (int, float)) else steps / 2
        return ([(rows, steps, max(steps, rows * per_row)) for rows in sizes],
                f"{m['decode_steps']} decoding steps over {m['batches']} batch{'es' if m['batches'] != 1 else ''}, "
                f"measured in {m['run']}")
    refs = data.eval_answer_tokens
    if refs and len(refs) == n:
        out, start = [], 0
        for rows in sizes:
            lengths = [min(max_new_tokens, t) for t in refs[start:start + rows]]
            start += rows
            steps = max(lengths)
            out.append((rows, float(steps), float(sum(min(steps, t + ROW_LINGER_STEPS) for t in lengths))))
        mean = sum(min(max_new_tokens, t) for t in refs) / n
        return out, (f"answers as long as the {n} references, {mean:.0f} tokens on average"
                     + (", assumed for the base model too" if which == "base" else ""))
    steps = float(min(max_new_tokens, data.answer_tokens_max))
    return ([(rows, steps, max(steps, rows / 2 * steps)) for rows in sizes],
            f"answers up to {round(steps)} tokens, the training answers' longest"
            + (", assumed for the base model too" if which == "base" else ""))


def decode_steps_per_batch(data: DataSize, which: str, eval_batch: int, max_new_tokens: int) -> float:
    """Decoding steps of the evaluation batch of `which` model ("base" or "trained") that decodes longest, which
    sizes the evaluation memory's KV cache: from answer_batches, as the time model's steps are (an earlier run's
    measured mean steps per batch where known, else the longest reference answer, else the training answers'
    longest), at most eval.max_new_tokens."""
    batches, _ = answer_batches(data, which, eval_batch, max_new_tokens)
    return max((steps for _, steps, _ in batches), default=float(min(max_new_tokens, data.answer_tokens_max)))


def predict_time(shape: ModelShape, data: DataSize, *, device: str, precision: str, eval_precision: str,
                 tflops: dict | None, bandwidth_gbs: float | None, method: str, lora_rank: int, lora_targets,
                 checkpointing: bool, trained_logits: bool, micro_batch: int, accumulation: int, world_size: int,
                 nodes: int, threads: int, cpu_cores: int, epochs: float, max_steps: int | None, zero_stage: int,
                 eval_batch: int, max_new_tokens: int, compare_base: bool, base_dtype: str,
                 quantized: bool = False, memory_gib: float | None = None,
                 elementwise_gops: dict | None = None, fresh_final_eval: bool = False,
                 op_build: str | None = None, generates: bool = True) -> TimePrediction | str:
    """The predicted seconds of each phase, or why time cannot be predicted.

    elementwise_gops: the CPU's elementwise rate per precision in G elements/s (the probe's, or a CPU profile's);
    a CPU's time is not predicted without it (GPUs use bandwidth_gbs for that part). fresh_final_eval: the final
    evaluation runs in a fresh process (Plan.final_eval_fresh), which starts the libraries and loads the trained model
    in eval_precision first. memory_gib: the training's predicted peak, micro-batches padded to the data's longest
    sample (launcher.plan.padded_length), which the first step touches. op_build: the folder where DeepSpeed's CPU op will be built as the run starts
    (launcher.hardware.deepspeed_cpu_op_to_build), counted in the loading. generates: whether the evaluation generates
    answers (evaluation_generates), or only takes the held-out loss."""
    if not tflops or precision not in tflops or not bandwidth_gbs:
        return f"no {precision} matrix rate for this hardware (a profile without matmul_tflops, or the probe did not run)"
    if device == "cpu" and (not elementwise_gops or precision not in elementwise_gops or "fp32" not in elementwise_gops):
        return (f"no {precision} elementwise rate for this CPU (elementwise_gops: a profile without it, or a probe "
                "cached by an older sftlaunch; fix: add elementwise_gops to the profile)")
    c = _constants(device)
    rate = tflops[precision] * 1e12
    if device == "cpu":  # the probe used every core; each of the plan's processes has `threads` of them
        rate *= min(1.0, threads / max(1, cpu_cores))
        element_rate = {k: v * 1e9 * min(1.0, threads / max(1, cpu_cores)) for k, v in elementwise_gops.items()}
        bandwidth = bandwidth_gbs * 1e9 * min(1.0, world_size * threads / max(1, cpu_cores)) / max(1, world_size)
    else:
        bandwidth = bandwidth_gbs * 1e9
    effective = micro_batch * accumulation * world_size
    steps_per_epoch = max(1, math.ceil(data.samples / effective))
    steps = max_steps if max_steps else max(1, math.ceil(steps_per_epoch * epochs))
    samples_seen = steps * effective
    if not max_steps:  # the last, partial step of each epoch: the samples there are, not a full batch
        samples_seen = min(samples_seen, round(data.samples * epochs))
    mean_len = data.tokens / max(1, data.samples)
    tokens = round(samples_seen * mean_len)
    share = data.trainable_tokens / max(1, data.tokens)
    f = flops_per_token(shape, method=method, lora_rank=lora_rank, lora_targets=lora_targets, seq_len=mean_len,
                        trained_share=share, trained_logits=trained_logits, checkpointing=checkpointing)
    per_process_tokens = tokens / world_size
    matmul_s = per_process_tokens * f["total"] / (rate * c["matmul_efficiency"])
    # Checkpointing recomputes the forward's elementwise work too: about a third of a step's.
    recompute = 4 / 3 if checkpointing else 1.0
    scores = shape.layers * shape.heads * mean_len  # attention scores per token, all layers
    trainable = shape.params if method == "full" else shape.lora_params(lora_rank, lora_targets)
    updated = steps * trainable / (world_size if zero_stage else 1)  # weights each process's optimizer updates
    if device == "cpu":  # seconds of one operation per element, per score, per updated weight: the fit's units
        pass_s = per_process_tokens * activation_elements_per_token(shape) / element_rate[precision] * recompute
        score_s = per_process_tokens * scores / element_rate[precision] * recompute
        ops = c["elementwise_ops_per_element"]["half" if precision in ("bf16", "fp16") else "fp32"]
        elementwise_s = pass_s * ops + score_s * c["attention_ops_per_score"]
        optimizer_unit_s = updated / element_rate["fp32"]
        optimizer_s = optimizer_unit_s * c["optimizer_ops_per_param"]
    else:  # a GPU's elementwise work is bound by its memory bandwidth: passes over the activation bytes
        pass_s = per_process_tokens * activation_bytes_per_token(shape, precision) / bandwidth * recompute
        score_s = per_process_tokens * scores / bandwidth * recompute
        elementwise_s = pass_s * c["elementwise_passes"] + score_s * c["attention_bytes_per_score"]
        optimizer_unit_s = updated / bandwidth
        optimizer_s = optimizer_unit_s * c["optimizer_bytes_per_param"]
    start_s = c["start_seconds"] + c["first_touch_seconds_per_gib"] * (memory_gib or 0.0)
    fixed_s = steps * accumulation * c["micro_batch_seconds"] + start_s
    dequantize_s = 0.0
    if quantized:
        # 4-bit weights are dequantized before each product (bitsandbytes): every layer weight read (0.5 byte) and
        # written in the compute dtype (2 bytes) in the forward, the backward and checkpointing's recompute.
        layer_weights = f["linear"] / 2
        passes = 3 if checkpointing else 2
        dequantize_s = steps * accumulation * passes * layer_weights * 2.5 / bandwidth
    comm_s = 0.0
    if world_size > 1:
        per_step = trainable * (2 if precision in ("bf16", "fp16") else 4) * 2  # a ring all-reduce moves ~2x the gradients
        if zero_stage == 3:
            per_step += shape.params * 2 * 2 * accumulation  # parameters gathered for the forward and the backward
        link = COMM_GBS["cpu" if device == "cpu" else ("gpu_nodes" if nodes > 1 else "gpu_node")] * 1e9
        comm_s = steps * per_step / link
    training = matmul_s + elementwise_s + fixed_s + optimizer_s + comm_s + dequantize_s

    lengths: dict[str, str] = {}

    def evaluation(which: str) -> tuple[float, int]:
        rate_eval = tflops.get(eval_precision, tflops[precision]) * 1e12 * (min(1.0, threads / max(1, cpu_cores)) if device == "cpu" else 1.0)
        weight_bytes = shape.params * (2 if eval_precision in ("bf16", "fp16") else 4)
        batches, lengths[which] = answer_batches(data, which, eval_batch, max_new_tokens)
        if not generates:
            batches, lengths[which] = [], "no generation (eval.metrics is empty): the held-out loss only"
        seconds, decode_steps = 0.0, 0
        for rows, steps, row_steps in batches:
            prefill = rows * data.eval_prompt_tokens * 2 * shape.params / (rate_eval * c["matmul_efficiency"])
            # Rows leave the batch as their answers end: a step carries the rows still there on average.
            active = max(1.0, row_steps / max(1.0, steps))
            step = max(weight_bytes / (bandwidth_gbs * 1e9), active * 2 * shape.params / (rate_eval * c["matmul_efficiency"]))
            seconds += prefill + steps * (step + c["decode_step_seconds"])
            decode_steps += round(steps)
        # The evaluation's loss: one forward pass over every item (prompt and reference answer, of the mean length).
        mean_answer = data.trainable_tokens / max(1, data.samples)
        seconds += data.eval_items * (data.eval_prompt_tokens + mean_answer) * 2 * shape.params / (rate_eval * c["matmul_efficiency"])
        return seconds, decode_steps

    trained_eval, decode_steps = evaluation("trained")
    base_eval, base_steps = evaluation("base") if compare_base else (0.0, 0)

    # Loading: reading the weights (a few seconds for small models; bandwidth-bound for large ones from a page cache).
    loading = 5.0 + shape.params * (4 if base_dtype == "fp32" else 2) / 1e9
    build_s = CPU["deepspeed_op_build_seconds"] if op_build and device == "cpu" else 0.0
    loading += build_s
    reload = 5.0 + shape.params * (4 if eval_precision == "fp32" else 2) / 1e9 if fresh_final_eval else 0.0
    trained_eval += reload
    sustained = rate * c["matmul_efficiency"]
    fitted = "fitted on CPUs" if device == "cpu" else "not fitted on a GPU yet: typical figures"
    reason = (f"training ~{_minutes(training)} = {_k(tokens)} tokens x {f['total'] / 1e9:.2f} GFLOP/token / "
              f"{sustained / 1e9 * (world_size if device != 'cpu' else 1):.0f} GFLOP/s sustained "
              f"({c['matmul_efficiency']:.0%} of {tflops[precision]:g} TFLOP/s {precision}"
              + (f", {world_size} processes" if world_size > 1 else "") + f") = {_minutes(matmul_s)}, "
              f"+ elementwise {_minutes(elementwise_s)}"
              + (f" (at {elementwise_gops[precision]:g} G elements/s {precision})" if device == "cpu" else "")
              + f" + {steps * accumulation} micro-batches x "
              f"{c['micro_batch_seconds']:g} s + optimizer {_minutes(optimizer_s)} + start {_minutes(start_s)}"
              + (f" + gradient exchange {_minutes(comm_s)}" if comm_s else "")
              + (f" + dequantizing the 4-bit weights {_minutes(dequantize_s)} (not measured)" if quantized else "")
              + f" ({steps} steps, {samples_seen} samples seen); "
              + (f"base evaluation ~{_minutes(base_eval)} ({lengths['base']}); " if compare_base else "")
              + f"trained evaluation ~{_minutes(trained_eval)} ({data.eval_items} items, {lengths['trained']}"
              + (f", after a fresh process's loading ~{_minutes(reload)}" if reload else "") + "); "
              f"loading ~{_minutes(loading)}"
              + (f" (DeepSpeed builds its CPU shared-memory op first, once: ~{_minutes(build_s)}, in {op_build})"
                 if build_s else "")
              + f"; efficiencies {fitted}; tokens: {data.source}")
    return TimePrediction(training=training, base_eval=base_eval, trained_eval=trained_eval, loading=loading,
                          flops_per_token=f["total"], tokens=tokens, samples_seen=samples_seen, steps=steps,
                          sustained_gflops=sustained / 1e9, reason=reason,
                          parts={"matmul_full_rate_s": matmul_s * c["matmul_efficiency"],
                                 "elementwise_pass_s": pass_s, "attention_score_s": score_s,
                                 "optimizer_unit_s": optimizer_unit_s,
                                 "micro_batches": steps * accumulation, "comm_s": comm_s + dequantize_s,
                                 "optimizer_s": optimizer_s, "start_s": start_s,
                                 "eval_decode_steps": decode_steps, "base_eval_decode_steps": base_steps,
                                 "eval_fixed_s": decode_steps * c["decode_step_seconds"],
                                 "base_eval_fixed_s": base_steps * c["decode_step_seconds"]})


def evaluation_generates(recipe) -> bool:
    """Whether the evaluation generates answers: the chat task without eval.metrics is evaluated by its held-out loss
    alone (launcher.tasks.chat.ChatTask.generates)."""
    return recipe.data.task != "chat" or bool(recipe.eval.metrics)


def predict_for_plan(plan, shape: ModelShape) -> TimePrediction | str:
    """predict_time with a written plan's own inputs (benchmarks re-derive the parts of a run's prediction)."""
    from launcher.plan import training_peak_gib

    r = plan.recipe
    if plan.data_size is None:
        return "the plan has no data size"
    return predict_time(
        shape, plan.data_size, device=plan.device, precision=plan.precision, eval_precision=plan.eval_precision,
        tflops=plan.hardware.matmul_tflops, bandwidth_gbs=plan.hardware.memory_bandwidth_gbs, method=r.model.method,
        lora_rank=r.model.lora.rank, lora_targets=r.model.lora.target_modules, checkpointing=plan.gradient_checkpointing,
        trained_logits=plan.loss_logits == "trained", micro_batch=plan.micro_batch_size,
        accumulation=plan.gradient_accumulation_steps, world_size=plan.world_size, nodes=plan.nodes, threads=plan.threads,
        cpu_cores=plan.hardware.cpu_cores, epochs=r.train.epochs, max_steps=r.train.max_steps, zero_stage=plan.zero_stage,
        eval_batch=r.eval.batch_size, max_new_tokens=r.eval.max_new_tokens, compare_base=r.eval.compare_base,
        base_dtype=plan.base_dtype, quantized=plan.quantize == "4bit", memory_gib=training_peak_gib(plan, shape),
        elementwise_gops=plan.hardware.elementwise_gops, fresh_final_eval=plan.final_eval_fresh,
        generates=evaluation_generates(r))


def budget_advice(prediction: TimePrediction, data: DataSize, max_time: float, label: str, epochs: float,
                  training_for) -> tuple[str, dict] | None:
    """When train.max_time cuts the predicted training short: what it will see and what would fit, else None.

    training_for(samples, epochs) -> predicted training seconds: the same prediction for less data or fewer epochs
    (steps round up, so the share of the budget is only where the search starts)."""
    if prediction.training <= max_time:
        return None
    share = max_time / prediction.training
    seen = int(prediction.samples_seen * share)
    samples = max(1, int(data.samples * share))
    while samples > 1 and training_for(samples, epochs) > max_time:
        samples = max(1, int(samples * 0.97))
    fits_epochs = round(epochs * share, 2)
    while fits_epochs > 0.01 and training_for(data.samples, fits_epochs) > max_time:
        fits_epochs = round(min(fits_epochs * 0.97, fits_epochs - 0.01), 2)  # 0.03 x 0.97 rounds back to 0.03
    text = (f"warning: train.max_time={label} is shorter than the predicted training ({_minutes(prediction.training)}): "
            f"it will see about {seen} of {prediction.samples_seen} samples ({share:.0%}"
            + (f" of {epochs:g} epochs" if epochs != 1 else " of the epoch") + f"). To finish within it: data.max_samples={samples}"
            + (f" or train.epochs={fits_epochs:g}" if fits_epochs > 0.01 else "") + ", or a longer train.max_time")
    return text, {"samples_seen": seen, "of": prediction.samples_seen, "max_samples_that_fit": samples,
                  "epochs_that_fit": fits_epochs}


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _k(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)
