"""Generation with a LoRA adapter kept beside the weights (PEFT's forward per layer) against the adapter merged
into an evaluation copy of the weights, on the same unit-conversion questions, with the embedded SmolLM2-135M.

Prints the seconds per decoding step of the base model, the unmerged adapter and the merged one (prefill
included, same prompts, same batch), their ratio, each one's accuracy and how many answers agree, in one process.

    .venv/bin/python benchmarks/eval_lora_merge.py [--adapter RUN_DIR/adapter] [--n 50] [--max-new-tokens 128]

Without --adapter, a fresh LoRA r16 on all linear layers with B drawn at std 0.02 (PEFT starts B at zero, which
would leave the model unchanged and the answers identical by construction).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", help="a run's adapter folder (default: a random LoRA r16 on all linear layers)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from launcher.data import build_examples, format_prompt
    from launcher.evaluate import answer_lengths, generations, inference_weights, score
    from launcher.hardware import _cpu_model
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.recipe import load_recipe
    from launcher.tasks import get_task

    torch.set_num_threads(2)
    torch.manual_seed(0)
    path = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    base = load_model(path, dtype="bf16")  # the plan's bf16 base under LoRA (model.base_dtype auto)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    else:
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained LoRA weights are fp32 (launcher.job.keep_trainable_fp32)
    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml")  # the quick start's items and decoding
    examples = build_examples(recipe)[1][: args.n]
    prompts = [format_prompt(ex.question, tokenizer, recipe.data.prompt_format) for ex in examples]
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device="cpu",
              calculator=recipe.eval.calculator, stop_on_repetition=recipe.eval.stop_on_repetition)

    def timed(weights):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generations(weights, tokenizer, prompts, **kw)
            best = min(best, time.perf_counter() - t0)
        steps = answer_lengths(out, prompts, args.batch_size)["decode_steps"]
        return best, steps, [g.text for g in out]

    with inference_weights(model, "bf16") as w:
        unmerged = timed(w)
    with inference_weights(model, "bf16", merge=True) as w:
        merged = timed(w)
    with model.disable_adapter():
        with inference_weights(model, "bf16") as w:
            plain = timed(w)
    print(f"{_cpu_model()}, {torch.get_num_threads()} threads; {args.n} unit-conversion questions, batch "
          f"{args.batch_size}, up to {args.max_new_tokens} new tokens, bf16 weights, best of {args.repeats}")
    task = get_task(recipe.data.task)
    for name, (s, steps, texts) in (("base (no adapter)", plain), ("adapter unmerged", unmerged), ("adapter merged", merged)):
        accuracy = score(task, examples, texts)[0]["accuracy"]
        print(f"{name:20s} {s:6.2f} s  {steps:4d} decoding steps  {s / steps * 1000:6.1f} ms/step  accuracy {accuracy:.3f}")
    same = sum(a == b for a, b in zip(unmerged[2], merged[2]))
    print(f"merged / unmerged time: {merged[0] / unmerged[0]:.2f}x (per step "
          f"{merged[0] / merged[1] / (unmerged[0] / unmerged[1]):.2f}x); identical answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
