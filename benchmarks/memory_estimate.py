"""Estimated vs measured peak training memory on this CPU: the tiny test Llama, the embedded SmolLM2-135M,
and a third shape that launcher/memory.py was not fitted on.

Two measurements per case, each in a fresh process, against launcher.memory.estimate_memory for the same
shape and batch:
- tensors: the peak of live torch tensors over a LoRA training step (the torch profiler's allocation
  events, plus the parameters and optimizer state alive before it) - the quantity
  torch.cuda.max_memory_allocated reports on a GPU, and what the estimate's tensor part models;
- resident: the peak resident set (VmHWM, reset after the imports and a library warm-up) over loading the
  model and three LoRA steps, minus the resident set before loading - what the OOM killer sees, and what
  the estimate's CPU total (tensors + allocator) models.
Prints one line per case with both ratios estimate/measured; the target is within 25% (0.75-1.25).

    .venv/bin/python benchmarks/memory_estimate.py [--quick] [--method lora|full] [--base bf16] [--logits trained]
                                                   [--save measured.json]
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
mode = sys.argv[6]
method = sys.argv[7] if len(sys.argv) > 7 else "lora"  # full: every weight trains, no adapter
base_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[8] if len(sys.argv) > 8 else "fp32"]
trained_logits = len(sys.argv) > 9 and sys.argv[9] == "trained"  # the loss from logits at trained positions (launcher/loss.py)


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def train(model, steps, micro, seq, profile_last=False):
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    # from_pretrained returns the model in eval mode, where transformers skips checkpointing; Trainer calls
    # train() itself, so the benchmark must too or the "checkpointed" cases measure no checkpointing at all.
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if trained_logits:
                from launcher.loss import trained_positions_loss

                loss = trained_positions_loss(model, model.get_output_embeddings(), {"input_ids": ids, "labels": ids})
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(); opt.zero_grad()

    for _ in range(steps - profile_last):
        step()
    if profile_last:  # the optimizer state exists from the first step on, as in every later one
        from torch.profiler import ProfilerActivity, profile

        alive = sum(t.numel() * t.element_size() for t in model.parameters())
        alive += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        live = peak = 0
        events = prof.profiler.kineto_results.events()
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            live += nbytes
            peak = max(peak, live)
        return alive + peak


if mode == "tensors":
    print(json.dumps({"measured": train(AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype), 2, micro, seq,
                                        profile_last=True)}))
    sys.exit()


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
train(AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype), 3, micro, seq)
print(json.dumps({"measured": status("VmHWM") - base, "runtime": base - before_warmup}))
'''


def run_case(path: str, micro: int, seq: int, precision: str, ckpt: bool, mode: str = "resident",
             method: str = "lora", base_dtype: str = "fp32", logits: str = "all") -> dict:
    """mode "resident": {"measured": peak resident bytes above the baseline, "runtime": bytes of the library
    warm-up before it}; mode "tensors": {"measured": peak bytes of live tensors}. method: lora or full.
    base_dtype: the dtype the base loads in; logits: all (the model's own loss) or trained (launcher/loss.py)."""
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(micro), str(seq), precision, "1" if ckpt else "0", mode,
                          method, base_dtype, logits], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(path: str, micro: int, seq: int, precision: str, ckpt: bool, mode: str = "resident", method: str = "lora",
            base_dtype: str = "fp32", logits: str = "all") -> int:
    return run_case(path, micro, seq, precision, ckpt, mode, method, base_dtype, logits)["measured"]


def build_heldout_model(path: Path) -> Path:
    """A Llama shape launcher/memory.py was not fitted on: hidden 128, intermediate 448, 3 layers, 8 heads
    over 2 key/value heads, a 3000-entry vocabulary. Random weights; memory does not depend on them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=3000, hidden_size=128, intermediate_size=448, num_hidden_layers=3,
                                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(path)
    return path


def main() -> None:
    from launcher.memory import estimate_memory, find_shape
    from launcher.models import resolve_model
    from tests.conftest import build_tiny_model

    quick = "--quick" in sys.argv
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else "lora"
    # --base bf16: the bf16 cases load the frozen base in bf16 (fp32 training keeps an fp32 base);
    # --logits trained: the loss from logits at trained positions (launcher/loss.py). Both as the planner chooses.
    half_base = sys.argv[sys.argv.index("--base") + 1] if "--base" in sys.argv else "fp32"
    logits = sys.argv[sys.argv.index("--logits") + 1] if "--logits" in sys.argv else "all"
    print(f"method: {method}; base in bf16 cases: {half_base}; logits: {logits}")
    tmp = Path(tempfile.mkdtemp())
    tiny = ("tiny (hidden 64, 2 layers)", str(build_tiny_model(tmp / "tiny")))
    heldout = ("held out (hidden 128, 3 layers)", str(build_heldout_model(tmp / "heldout")))
    smol = ("SmolLM2-135M", str(resolve_model("embedded:smollm2-135m-instruct")))
    cases = [(tiny, 8, 128)] + ([] if quick else [(tiny, 32, 128), (heldout, 16, 128)]) + [(smol, 8, 128)]
    if not quick:
        cases += [(smol, 32, 128), (smol, 8, 512), (smol, 16, 512)]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"{'model':<32}{'micro':>6}{'seq':>5}{'prec':>5}{'ckpt':>6} | {'tensors: est':>12}{'measured':>10}{'ratio':>6} | "
          f"{'resident: est':>13}{'measured':>10}{'ratio':>6}   (MiB)")
    rows = []
    for (name, path), micro, seq in cases:
        shape, _ = find_shape(path if name.startswith(("tiny", "held")) else "embedded:smollm2-135m-instruct")
        for precision, ckpt in (("bf16", False), ("fp32", False), ("bf16", True)):
            base = half_base if precision == "bf16" else "fp32"
            est = estimate_memory(shape, micro_batch=micro, seq_len=seq, precision=precision, checkpointing=ckpt,
                                  lora_rank=8, lora_targets="all-linear", device="cpu", method=method, base_dtype=base,
                                  trained_logits=logits == "trained", padded=False)  # its batches have one length
            row = f"{name:<32}{micro:>6}{seq:>5}{precision:>5}{str(ckpt):>6} | {est.tensors / 2**20:>12.1f}"
            if est.total > 0.7 * ram:  # would push this machine into swap or the OOM killer: say so, do not run it
                print(f"{row}   skipped: resident estimate {est.total / 2**30:.1f} GiB is above 70% of this machine's "
                      f"{ram / 2**30:.0f} GiB", flush=True)
                continue
            tensors = measure(path, micro, seq, precision, ckpt, "tensors", method, base, logits)
            resident = run_case(path, micro, seq, precision, ckpt, method=method, base_dtype=base, logits=logits)
            rows.append({"model": name, "micro": micro, "seq": seq, "precision": precision, "checkpointing": ckpt,
                         "estimate_tensors": est.tensors, "estimate_resident": est.total, "tensors": tensors,
                         "resident": resident["measured"], "runtime": resident["runtime"]})
            print(f"{row}{tensors / 2**20:>10.1f}{est.tensors / tensors:>6.2f} | {est.total / 2**20:>13.1f}"
                  f"{resident['measured'] / 2**20:>10.1f}{est.total / resident['measured']:>6.2f}", flush=True)
    if "--save" in sys.argv:  # raw numbers, for recalibrating launcher/memory.py
        Path(sys.argv[sys.argv.index("--save") + 1]).write_text(json.dumps(rows, indent=1))
    runtime = [r["runtime"] / 2**20 for r in rows]
    for what in ("tensors", "resident"):
        for group in ("tiny", "held", "SmolLM2"):
            ratios = [r[f"estimate_{what}"] / r[what] for r in rows if r["model"].startswith(group)]
            if ratios:
                inside = sum(0.75 <= x <= 1.25 for x in ratios)
                print(f"{what:>8}, {group:<8}: {inside} of {len(ratios)} cases within 25%, ratios {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"library warm-up before each resident baseline (not counted): {min(runtime):.0f}-{max(runtime):.0f} MiB")


if __name__ == "__main__":
    main()
