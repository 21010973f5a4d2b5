"""Peak of live torch tensors (profiler) vs peak resident set, for one LoRA step of the tiny test model.

Why the estimator misses the tiny model's resident-set peak (benchmarks/memory_estimate.py): its tensors
are a few MiB, and the process's resident set is mostly allocator-held memory (glibc keeps freed blocks
below its mmap threshold in its heaps). This prints both numbers next to the estimate.

    .venv/bin/python benchmarks/tensor_peak.py [--micro 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from benchmarks.memory_estimate import measure
    from launcher.memory import estimate_memory, find_shape
    from tests.conftest import build_tiny_model

    torch.set_num_threads(2)
    path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    shape, _ = find_shape(str(path))
    print(f"tiny model, micro {args.micro} x {args.seq} tokens, LoRA r=8 on all linear layers")
    for precision in ("bf16", "fp32"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (args.micro, args.seq))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        step()  # optimizer state exists from here on, as in every later step
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        live = peak = 0
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"):
            live += nbytes
            peak = max(peak, live)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        est = estimate_memory(shape, micro_batch=args.micro, seq_len=args.seq, precision=precision, checkpointing=False,
                              lora_rank=8, lora_targets="all-linear", device="cpu").total
        rss = measure(str(path), args.micro, args.seq, precision, False)
        print(f"{precision}: estimate {est / 2**20:.1f} MiB | live tensors: weights {weights / 2**20:.1f} MiB + step peak "
              f"{peak / 2**20:.1f} MiB | resident-set peak {rss / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
