"""Batched evaluation vs one-at-a-time generation on the same GSM8K questions with the embedded model.

Both paths use launcher.evaluate.generate (greedy, KV cache, stop at EOS); the batched one uses left
padding and length-sorted batches. Prints the time of each and the speed-up ratio (target: >= 4x on a
2-core CPU), and checks that both produce the same parsed answers on most items.

    .venv/bin/python benchmarks/eval_batching.py [--n 64] [--max-new-tokens 96] [--batch-size 32] [--data DIR]
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
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default=str(ROOT / "launcher" / "tasks" / "data" / "gsm8k"))
    args = ap.parse_args()

    import torch

    from launcher.data import format_prompt
    from launcher.evaluate import generate
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.tasks import gsm8k

    torch.set_num_threads(2)
    path = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(path), load_model(path)
    items = gsm8k.load_file(Path(args.data) / "test.jsonl")[: args.n]
    prompts = [format_prompt(ex.question, tokenizer, "plain") for ex in items]
    # As evaluation runs it under mixed precision (launcher.evaluate.inference_weights): a bf16 copy.
    model = model.to(torch.bfloat16)
    kw = dict(max_new_tokens=args.max_new_tokens, device="cpu")

    t0 = time.perf_counter()
    one = [generate(model, tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched_out = generate(model, tokenizer, prompts, batch_size=args.batch_size, **kw)
    batched = time.perf_counter() - t0
    same = sum(gsm8k.parse_answer(a) == gsm8k.parse_answer(b) for a, b in zip(one, batched_out))
    print(f"{args.n} GSM8K questions, max_new_tokens={args.max_new_tokens}, bf16 weights, {torch.get_num_threads()} threads")
    print(f"one at a time: {sequential:.1f} s   batched (batch {args.batch_size}): {batched:.1f} s   "
          f"speed-up: {sequential / batched:.2f}x   same parsed answer: {same}/{args.n}")


if __name__ == "__main__":
    main()
