"""Where a LoRA training step's time goes, on this machine, for each way of computing it, in one run.

Trains the embedded SmolLM2-135M-Instruct with the worker's own pieces (the plan, load_model, PEFT LoRA r16 on
all linear layers, the launcher's Trainer) on GSM8K training samples from the bundled copy, micro-batch 4, in
each configuration given (frozen base dtype : logits path):

    fp32:all      the base in fp32 under autocast, logits and loss at every position (before issue 23)
    bf16:all      only the half-precision base
    fp32:trained  only the loss from logits at trained positions, chunked
    bf16:trained  both (what the planner chooses on a bf16 CPU)

For each: one warm-up step, --steps timed steps (tokens/s: non-padding tokens over wall time), then two steps
under torch.profiler, whose CPU op time is split into matmuls, attention, casts/copies, loss, optimizer and
other ops, and the rest of the wall time (Python, data, Trainer) as "outside ops". It also measures this
machine's torch matmul peak (2048 x 2048 x 2048, bf16 and fp32) with the same threads, and prints each
configuration's model FLOP rate as a share of it (4 x parameters FLOPs per token: forward 2N, backward to the
activations 2N; LoRA trains no base weight, so no weight gradients; attention's own FLOPs are left out).

    .venv/bin/python benchmarks/train_profile.py [--configs fp32:all,bf16:all,fp32:trained,bf16:trained] [--steps 8]

Timings on a machine shared with other processes are contended: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "embedded:smollm2-135m-instruct"
CATEGORIES = ("matmuls", "attention", "casts/copies", "loss", "optimizer", "other ops", "outside ops")
MATMUL = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_addmm_activation|mkldnn_\w+|_mkldnn\w*)$")
CAST = re.compile(r"^aten::(to|_to_copy|copy_|clone|contiguous|type_as|_copy_from|_copy_from_and_resize)$")
LOSS_OPS = re.compile(r"log_softmax|nll_loss|cross_entropy|logsumexp|LinearCrossEntropy|LogSoftmaxBackward|NllLossBackward")


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    marks = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(marks) or 'no avx2'})"


def matmul_peak(dtype, size: int = 2048, reps: int = 8) -> float:
    """TFLOP/s of torch.mm on size^3 in dtype, best of reps after a warm-up."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def category(event) -> str:
    """The category of one profiler event's own (self) time: the optimizer's whole step first, then by the op."""
    parent, loss_scope = event, False
    while parent is not None:
        if parent.name.startswith("Optimizer.") or "zero_grad" in parent.name:
            return "optimizer"
        loss_scope = loss_scope or bool(LOSS_OPS.search(parent.name))
        parent = parent.cpu_parent
    name = event.name
    if MATMUL.match(name):
        return "matmuls"  # lm_head's products included, also where the loss computes them
    if "scaled_dot_product" in name or "attention" in name.lower():
        return "attention"
    if CAST.match(name):
        return "casts/copies"
    if loss_scope:
        return "loss"
    return "other ops"


def breakdown(prof, wall: float) -> dict[str, float]:
    """Seconds per category over the profiled steps; "outside ops" is the wall time no op accounts for."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.device_type.name != "CPU":
            continue
        seconds[category(event)] += event.self_cpu_time_total / 1e6
    seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
    return seconds


def run_config(config: str, args, path: str, tokenizer, features, hardware) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainerCallback, set_seed

    from launcher.job import keep_trainable_fp32, training_arguments
    from launcher.memory import find_shape
    from launcher.models import load_model
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe
    from launcher.rundir import RunDir
    from launcher.trainer import StopRequest, build_trainer

    base_dtype, logits = config.split(":")
    warm, timed, profiled = 1, args.steps, 2
    recipe = validate_recipe({
        "model": {"name": MODEL, "base_dtype": base_dtype, "lora": {"rank": 16, "alpha": 32}},
        "data": {"task": "gsm8k", "max_length": 512},
        "train": {"max_steps": warm + timed + profiled, "effective_batch_size": args.micro, "learning_rate": 1e-4,
                  "warmup": 0, "logging_steps": 1, "save_steps": 10_000, "seed": 0},
        "hardware": {"micro_batch_size": args.micro, "precision": args.precision, "threads": args.threads or "auto"}})
    plan = make_plan(recipe, hardware, *find_shape(MODEL))
    # The logits path is the planner's to choose; the benchmark sets it to compare both on one model.
    plan = plan.model_copy(update={"loss_logits": logits})
    torch.set_num_threads(plan.threads)
    set_seed(0)
    model = get_peft_model(load_model(path, dtype=plan.base_dtype),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    keep_trainable_fp32(model)
    tokens: list[int] = []
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(rows):
        batch = pad(rows)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    marks: dict[str, float] = {}
    losses: list[float] = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warm:
                marks["timed"] = time.perf_counter()
            if state.global_step == warm + timed:
                marks["timed_end"] = time.perf_counter()
                prof.start()
                marks["profiled"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == warm + timed + profiled:
                marks["profiled_end"] = time.perf_counter()
                prof.stop()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(precision=plan.precision, keep_checkpoints=1, max_bad_steps=0, zero_loss_steps=0,
                                max_time=None, stop=StopRequest(), loss_logits=plan.loss_logits, model=model,
                                args=training_arguments(plan, RunDir(Path(tmp))), train_dataset=features,
                                data_collator=collate, callbacks=[Clock()])
        trainer.train()
    wall = marks["timed_end"] - marks["timed"]
    # Batches are drawn one step ahead at most: the timed steps' batches are those after the warm-up's.
    timed_tokens = sum(tokens[warm:warm + timed])
    return {"config": config, "base_dtype": plan.base_dtype, "precision": plan.precision,
            "tokens_per_s": timed_tokens / wall, "step_s": wall / timed, "tokens": timed_tokens,
            "breakdown": breakdown(prof, marks["profiled_end"] - marks["profiled"]),
            "params": sum(p.numel() for p in model.parameters() if not p.requires_grad), "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="fp32:all,bf16:trained",
                        help="comma-separated base_dtype:logits (logits: all or trained); the first is the reference")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size")
    parser.add_argument("--precision", default="auto", help="hardware.precision (auto: the plan's choice here)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: the plan's, all cores); fewer where other jobs hold cores: more threads "
                             "than free cores make every parallel op wait for a descheduled thread")
    args = parser.parse_args()

    import torch

    from launcher.data import encode_for_training
    from launcher.hardware import detect
    from launcher.models import load_tokenizer, resolve_model
    from launcher.recipe import validate_recipe
    from launcher.tasks import task_for
    from launcher.tasks.gsm8k import BUNDLED

    hardware = detect()
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    recipe = validate_recipe({"model": {"name": MODEL}, "data": {"task": "gsm8k", "path": str(BUNDLED), "max_length": 512}})
    from launcher.data import build_examples

    train, _ = build_examples(recipe)
    samples = (1 + args.steps + 2) * args.micro
    features, _ = encode_for_training(recipe, task_for(recipe), train[:samples], tokenizer, 512)
    threads = args.threads or hardware.cpu_cores
    torch.set_num_threads(threads)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"CPU: {cpu_name()}; {threads} threads; torch {torch.__version__}")
    print(f"matmul peak 2048^3: bf16 {peaks['bf16']:.2f} TFLOP/s, fp32 {peaks['fp32']:.2f} TFLOP/s")
    print(f"LoRA r16 all-linear, {MODEL}, GSM8K samples, micro-batch {args.micro}, {args.steps} timed steps + 2 profiled\n")

    results = []
    for config in args.configs.split(","):
        t0 = time.time()
        results.append(run_config(config.strip(), args, path, tokenizer, features, hardware))
        print(f"  {config}: {time.time() - t0:.0f} s", flush=True)

    ref = results[0]
    head = f"{'configuration':<14}{'precision':>10}{'tokens/s':>9}{'x ' + ref['config']:>15}{'s/step':>8}{'TFLOP/s':>9}{'% of peak':>10}"
    print("\n" + head)
    for r in results:
        flops = 4 * r["params"] * r["tokens_per_s"] / 1e12
        print(f"{r['config']:<14}{r['precision']:>10}{r['tokens_per_s']:>9.0f}{r['tokens_per_s'] / ref['tokens_per_s']:>15.2f}"
              f"{r['step_s']:>8.2f}{flops:>9.3f}{100 * flops / peaks[r['precision']]:>9.1f}%")
    print("(% of peak: of the matmul peak in the precision the step computes in)")
    print("\nwhere a step's time goes (share of the profiled steps' wall time; seconds per step in brackets)")
    print(f"{'configuration':<14}" + "".join(f"{c:>17}" for c in CATEGORIES))
    for r in results:
        total = sum(r["breakdown"].values())
        cells = "".join(f"{100 * s / total:>9.0f}% ({s / 2:4.2f})" for s in r["breakdown"].values())
        print(f"{r['config']:<14}{cells}")
    print("\nloss per step (same samples, same seed):")
    for r in results:
        print(f"{r['config']:<14}" + " ".join(f"{x:.4f}" for x in r["losses"]))
    print("\nloss: the cross-entropy's own work (its lm_head products count as matmuls); outside ops: Python, data, Trainer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
