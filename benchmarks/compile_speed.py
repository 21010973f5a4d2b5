"""Does train.compile pay on this machine? Compiled against eager LoRA training steps, alternating, in one process.

The embedded SmolLM2-135M-Instruct with the plan's choices here (base dtype, precision, logits at trained
positions), PEFT LoRA r16 on all linear layers, GSM8K training samples from the bundled copy, micro-batch 4
(varying lengths, as dynamic padding gives them). The decoder blocks are compiled in place as the worker does
(launcher/compile.py); then each step runs twice on the same micro-batch, once compiled and once eager (the
compile undone), in alternating order, so a machine shared with other processes slows both alike. Prints the
compile time (the first compiled step less an eager one), each mode's median step, the ratio, and how many
steps a run needs before the compile time is paid back.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python benchmarks/compile_speed.py [--steps 8] [--micro 4]

(a fresh inductor cache: a second run finds the compiled kernels on disk, and its compile time is not a user's first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "embedded:smollm2-135m-instruct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed step pairs (compiled and eager)")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from benchmarks.train_profile import cpu_name
    from launcher.compile import compile_blocks, uncompile
    from launcher.data import build_examples, encode_for_training
    from launcher.hardware import detect
    from launcher.job import keep_trainable_fp32
    from launcher.loss import trained_positions_loss
    from launcher.memory import find_shape
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe
    from launcher.tasks import task_for
    from launcher.tasks.gsm8k import BUNDLED

    hardware = detect()
    recipe = validate_recipe({"model": {"name": MODEL, "lora": {"rank": 16, "alpha": 32}},
                              "data": {"task": "gsm8k", "path": str(BUNDLED), "max_length": 512},
                              "train": {"effective_batch_size": args.micro},
                              "hardware": {"micro_batch_size": args.micro, "gradient_checkpointing": False}})
    plan = make_plan(recipe, hardware, *find_shape(MODEL))
    torch.set_num_threads(plan.threads)
    torch.manual_seed(0)
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "right"
    train, _ = build_examples(recipe)
    features, _ = encode_for_training(recipe, task_for(recipe), train[:(args.steps + 1) * args.micro], tokenizer, 512)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batches = [pad([features[i] for i in range(s * args.micro, (s + 1) * args.micro)]) for s in range(args.steps + 1)]

    model = get_peft_model(load_model(path, dtype=plan.base_dtype),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    keep_trainable_fp32(model)
    model.config.use_cache = False  # as the worker trains: a KV cache would key each block's graph on its layer_idx
    model.train()
    head = model.get_output_embeddings()
    autocast = plan.precision == "bf16"

    def step(batch) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if plan.loss_logits == "trained":
                loss = trained_positions_loss(model, head, dict(batch))
            else:
                loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)  # no optimizer step: both modes see the same weights
        return time.perf_counter() - start

    print(f"CPU: {cpu_name()}; {plan.threads} threads; torch {torch.__version__}")
    print(f"LoRA r16 all-linear, {MODEL}, base {plan.base_dtype}, precision {plan.precision}, logits {plan.loss_logits}, "
          f"micro-batch {args.micro}, GSM8K samples\n")
    eager_first = step(batches[0])
    blocks = compile_blocks(model)
    compiled_first = step(batches[0])
    compile_seconds = compiled_first - eager_first
    print(f"{len(blocks)} decoder blocks compiled: first compiled step {compiled_first:.1f} s, eager {eager_first:.1f} s "
          f"-> compile {compile_seconds:.1f} s")
    times = {"eager": [], "compiled": []}
    for i, batch in enumerate(batches[1:]):
        order = ("compiled", "eager") if i % 2 == 0 else ("eager", "compiled")
        for mode in order:
            if mode == "eager":
                uncompile(blocks)
            else:
                compile_blocks(model)
            times[mode].append(step(batch))
        print(f"  step {i + 1}: {int(batch['attention_mask'].sum())} tokens; compiled {times['compiled'][-1]:.2f} s, "
              f"eager {times['eager'][-1]:.2f} s", flush=True)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"\nmedian step: eager {eager:.2f} s, compiled {compiled:.2f} s; compiled/eager speed {eager / compiled:.2f}x "
          f"(all {len(batches) - 1} steps together: {sum(times['eager']) / sum(times['compiled']):.2f}x)")
    saved = eager - compiled
    if saved > 0:
        print(f"the compile pays back after {compile_seconds / saved:.0f} steps of micro-batch {args.micro}")
    else:
        print("compiled steps are not faster here: the compile never pays back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
