"""Estimated vs measured peak training memory on this CPU, for a tiny Llama and the embedded SmolLM2.

Each case runs in a fresh process: the peak resident set (VmHWM, reset after the imports) over loading the
model and three LoRA training steps, minus the resident set before loading, against
launcher.memory.estimate_memory for the same shape and batch.
Prints one line per case with the ratio estimate/measured; the target is within 25% (0.75-1.25).

    .venv/bin/python benchmarks/memory_estimate.py [--quick] [--save measured.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r'''
import gc, json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
path, micro, seq, precision, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def train(model, steps, micro, seq):
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    # from_pretrained returns the model in eval mode, where transformers skips checkpointing; Trainer calls
    # train() itself, so the benchmark must too or the "checkpointed" cases measure no checkpointing at all.
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(); opt.zero_grad()


# The library runtime is the process's baseline, not the model's memory (as a GPU's CUDA context is not
# in torch.cuda.max_memory_allocated): one step of a 1-layer, width-8 Llama first loads transformers' and
# PEFT's lazily imported modules, autocast and oneDNN, and autograd's thread. Its cost is printed too.
before_warmup = status("VmRSS")
warm = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
train(warm, 1, 1, 4)
del warm
gc.collect()
# The imports pass through a higher transient peak than small runs ever reach: reset the kernel's
# high-water mark (Linux: "5" to clear_refs) so that the peak measured is that of loading and training.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
train(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 3, micro, seq)
print(json.dumps({"measured": status("VmHWM") - base, "runtime": base - before_warmup}))
'''


def run_case(path: str, micro: int, seq: int, precision: str, ckpt: bool) -> dict:
    """{"measured": peak bytes above the baseline, "runtime": bytes of the library warm-up before it}."""
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(micro), str(seq), precision, "1" if ckpt else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(path: str, micro: int, seq: int, precision: str, ckpt: bool) -> int:
    return run_case(path, micro, seq, precision, ckpt)["measured"]


def main() -> None:
    from launcher.memory import estimate_memory, find_shape
    from launcher.models import resolve_model
    from tests.conftest import build_tiny_model

    quick = "--quick" in sys.argv
    tiny = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    embedded = resolve_model("embedded:smollm2-135m-instruct")
    cases = [("tiny (2 layers, hidden 64)", tiny, 8, 128)]
    if not quick:
        cases += [("tiny (2 layers, hidden 64)", tiny, 32, 128)]
    cases += [("SmolLM2-135M", embedded, 8, 128)]
    if not quick:
        cases += [("SmolLM2-135M", embedded, 16, 128), ("SmolLM2-135M", embedded, 32, 128), ("SmolLM2-135M", embedded, 8, 512),
                  ("SmolLM2-135M", embedded, 16, 512)]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"{'model':<28}{'micro':>6}{'seq':>6}{'prec':>6}{'ckpt':>6}{'estimate GiB':>14}{'measured GiB':>14}{'ratio':>7}")
    rows = []
    for name, path, micro, seq in cases:
        shape, _ = find_shape(path if name.startswith("tiny") else "embedded:smollm2-135m-instruct")
        for precision, ckpt in (("bf16", False), ("fp32", False), ("bf16", True)):
            est = estimate_memory(shape, micro_batch=micro, seq_len=seq, precision=precision, checkpointing=ckpt,
                                  lora_rank=8, lora_targets="all-linear", device="cpu").total
            row = f"{name:<28}{micro:>6}{seq:>6}{precision:>6}{str(ckpt):>6}{est / 2**30:>14.3f}"
            if est > 0.7 * ram:  # would push this machine into swap or the OOM killer: say so, do not run it
                print(f"{row}{'skipped':>14}   (estimate above 70% of this machine's {ram / 2**30:.0f} GiB)", flush=True)
                continue
            result = run_case(path, micro, seq, precision, ckpt)
            got = result["measured"]
            rows.append({"model": name, "micro": micro, "seq": seq, "precision": precision, "checkpointing": ckpt,
                         "estimate": est, "measured": got, "runtime": result["runtime"]})
            print(f"{row}{got / 2**30:>14.3f}{est / got:>7.2f}", flush=True)
    ratios = [r["estimate"] / r["measured"] for r in rows]
    inside = sum(0.75 <= r <= 1.25 for r in ratios)
    runtime = [r["runtime"] / 2**20 for r in rows]
    if "--save" in sys.argv:  # raw numbers, for recalibrating launcher/memory.py
        Path(sys.argv[sys.argv.index("--save") + 1]).write_text(json.dumps(rows, indent=1))
    print(f"{inside} of {len(ratios)} cases within 25% (ratio 0.75-1.25); ratios {min(ratios):.2f}-{max(ratios):.2f}; "
          f"library warm-up before each baseline (not counted): {min(runtime):.0f}-{max(runtime):.0f} MiB")


if __name__ == "__main__":
    main()
