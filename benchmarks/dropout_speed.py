"""LoRA's input dropout on CPU: torch's against launcher/dropout.py's HalfDrawDropout, in one run.

Two measurements, both alternating the two dropouts so that the machine's drift hits both alike:
1. the op alone, forward and forward + backward, on bf16 inputs of the shapes a GSM8K micro-batch of 8 gives
   SmolLM2-135M's adapted layers (hidden 576, MLP 1536);
2. an eager training micro-step (forward and backward under bf16 autocast, bf16 base) of the embedded SmolLM2-135M
   with LoRA r16 on all linear layers at model.lora.dropout (0.05, the GSM8K recipe's), on random token ids.
Prints the medians and their ratios, and the drop fraction each draws (p and p rounded to 2^-15).

    .venv/bin/python benchmarks/dropout_speed.py [--p 0.05] [--batch 8] [--length 170] [--steps 5]

Run it alone on the machine; name the CPU beside the numbers (printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, reps: int) -> float:
    fn()
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=170)
    parser.add_argument("--steps", type=int, default=5, help="timed training micro-steps per dropout")
    args = parser.parse_args()

    import torch
    from torch import nn

    from benchmarks.train_profile import cpu_name
    from launcher.dropout import HalfDrawDropout, drawn_probability, use_half_draw_dropout

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; p = {args.p} "
          f"(half draw: {drawn_probability(args.p):.6f})")
    ops = {"torch": nn.Dropout(args.p), "half draw": HalfDrawDropout(args.p)}
    ones = torch.ones(4_000_000, dtype=torch.bfloat16)
    for name, op in ops.items():
        print(f"  {name:9s} drops {float((op(ones) == 0).float().mean()):.5f} of 4M elements")
    print(f"\n{'input (bf16)':<18}{'torch ms':>10}{'half ms':>10}{'ratio':>7}{'fwd+bwd torch':>15}{'half':>7}{'ratio':>7}")
    for width in (576, 1536):
        x = torch.randn(args.batch, args.length, width, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        fwd, both = {}, {}
        for _ in range(3):  # alternate
            for name, op in ops.items():
                fwd.setdefault(name, []).append(timed(lambda: op(x), 10))
                both.setdefault(name, []).append(timed(lambda: op(x).backward(grad), 10))
        f = {k: statistics.median(v) * 1e3 for k, v in fwd.items()}
        b = {k: statistics.median(v) * 1e3 for k, v in both.items()}
        print(f"{str(tuple(x.shape)):<18}{f['torch']:>10.2f}{f['half draw']:>10.2f}{f['torch'] / f['half draw']:>6.2f}x"
              f"{b['torch']:>15.2f}{b['half draw']:>7.2f}{b['torch'] / b['half draw']:>6.2f}x")

    from peft import LoraConfig, get_peft_model

    from launcher.job import keep_trainable_fp32
    from launcher.models import load_model, resolve_model

    path = resolve_model("embedded:smollm2-135m-instruct")
    models = {}
    for name in ops:
        model = get_peft_model(load_model(path, dtype="bf16"), LoraConfig(r=16, lora_alpha=32, lora_dropout=args.p,
                                                                        target_modules="all-linear", task_type="CAUSAL_LM"))
        keep_trainable_fp32(model)
        if name == "half draw":
            print(f"\nHalfDrawDropout in {use_half_draw_dropout(model)} LoRA layers")
        models[name] = model.train()
    ids = torch.randint(0, 49_000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = {name: [] for name in models}
    for name, model in models.items():
        step(model)  # warm-up
    for _ in range(args.steps):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model)
            seconds[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"training micro-step ({args.batch} x {args.length} tokens), median of {args.steps}: torch {med['torch']:.2f} s, "
          f"half draw {med['half draw']:.2f} s: {med['torch'] / med['half draw']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
