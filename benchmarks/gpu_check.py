"""The prepared GPU check: one command for the day a CUDA GPU is at hand (no network needed there).

    python benchmarks/gpu_check.py [--out DIR] [--keep]   # with a CUDA GPU: about 7.5 minutes on one H100/H200 (estimated)
    python benchmarks/gpu_check.py --dry-run               # anywhere: the same steps on the CPU, tiny shapes

It writes DIR/report.json (one entry per check: ok, the check's own wall seconds, what was seen) and
DIR/gpu_check.log (every command's output), and exits 1 if any check failed. Its work folder (models, run
directories: gigabytes on a GPU) is a temporary folder deleted at the end; --keep keeps it (report.json's "work").
Every model is built in code (the tiny test Llama, trained to be a language model first, by tests/conftest.py:
pytest must be importable; a Qwen2.5-0.5B-shaped model with random weights), so nothing is downloaded. The
checks are the paths no development machine can run (README "Tested on"):

- env: `sftlaunch env` detects the GPU(s), and a GPU named by UUID in CUDA_VISIBLE_DEVICES is found;
- cuda-bf16 / cuda-fp16: the cuda backend end to end on the tiny model, bf16 where the GPU has it and fp16
  as a T4 trains (GradScaler: its overflow steps must be notes, not a stop), both finishing with finite loss;
- pinned-gpu: with CUDA_VISIBLE_DEVICES set to the last GPU, the worker runs on that GPU;
- oom-backoff: a real CUDA out-of-memory (another process holds all but 3 GiB of the GPU, which the plan
  cannot know) halves the micro-batch, resumes and finishes;
- deepspeed: ZeRO-2 and ZeRO-3 on one GPU, when DeepSpeed is installed (carried as a wheel);
- qlora: model.quantize=4bit on the tiny model (bitsandbytes' CUDA kernels; its wheel, 41 MiB, can be carried),
  learning (held-out loss below the base's) and finite; in the dry run on bitsandbytes' CPU backend;
- throughput: Qwen2.5-0.5B's shape (launcher.memory's table: hidden 896, 24 layers, vocabulary 151,936; random
  weights in bf16; a byte-level BPE with Qwen2's split trained on GSM8K's text in seconds, for the tokens per
  sample) trained through the CLI with recipes/gsm8k.yaml (LoRA) and recipes/gsm8k-full.yaml (full), 20 steps each
  (3 in the dry run) on exactly the samples the plan counted: per mode the steady tokens/s, the FLOPs per token
  launcher.timing predicts for the plan, MFU against the plan's matrix rate (and the datasheet's on H100/H200),
  training's peak memory (torch.cuda.max_memory_allocated) and seconds against the plan's predictions, tokens per
  sample planned and encoded. Each run's plan.json, eval.json, metrics.jsonl and run.json stay in
  DIR/throughput-lora/ and DIR/throughput-full/;
- generation: batched greedy generation on the same model in a child process, at the GSM8K recipe's evaluation
  batch (32) and max_new_tokens (320, every row writing all of them): items/s and new tokens/s, prefill and the
  decoding step, against launcher.timing's evaluation model.

GPU time (estimated from the steps, never measured): the first seven checks about 5 minutes (DeepSpeed's two runs
about 1.5 of them, skipped without DeepSpeed); throughput about 2 minutes (the model built on the CPU ~20 s, then
each run ~45-60 s, mostly two processes' imports, loading and saving: 20 steps of 16 or 32 GSM8K samples are
seconds); generation about 30 s (imports, loading, 320 decoding steps of ~20 ms). About 7.5 minutes in all (6
without DeepSpeed), under the 8-minute target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.memory import KNOWN_SHAPES, ModelShape, find_shape  # noqa: E402  (pure: no torch)


HOG = ("import time, torch; free, total = torch.cuda.mem_get_info(); "
       "x = torch.empty(max(0, free - 3 * 2**30), dtype=torch.uint8, device='cuda'); "
       "print('holding', x.numel(), flush=True); time.sleep(3600)")

# The shape the throughput and generation checks measure: Qwen2.5-0.5B-Instruct's (the GSM8K recipes' model), taken
# from the planner's own table (its config.json), built with random weights. The dry run's is tiny.
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
DRY_SHAPE = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=0, tied=True, model_type="qwen2")
# Qwen2's pre-tokenizer split (its tokenizer.json): digits one at a time, words with their leading space. A byte-level
# BPE with it, trained on GSM8K's training text, stands in for Qwen2.5's tokenizer (no Hub): its ids are all below
# the model's vocabulary, so the logits still cost Qwen2.5's 151,936 columns.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TOKENIZER_VOCAB = 8192
# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets (without sparsity), for MFU as papers quote it; the
# plan's own rate is the probe's measured square product, which is below these.
DATASHEET_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0}

# Batched greedy generation, timed in a child process of its own (the parent never initialises CUDA). Every row
# writes exactly max_new_tokens (min_new_tokens: random weights would otherwise stop at an early EOS).
GENERATE = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from launcher.data import format_prompt
a = json.loads(open(sys.argv[1]).read())
device, n = a["device"], a["max_new_tokens"]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a["precision"]]
tok = AutoTokenizer.from_pretrained(a["model"])
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype).to(device).eval()
batch = tok([format_prompt(q, tok, "plain") for q in a["questions"]], return_tensors="pt", padding=True).to(device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
def timed(new):
    sync(); t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
    sync()
    return time.perf_counter() - t, out.shape[1] - batch["input_ids"].shape[1]
timed(4)  # warm-up: kernels chosen, allocator grown
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
prefill, _ = timed(1)
seconds, new = timed(n)
print(json.dumps({"rows": batch["input_ids"].shape[0], "prompt_tokens_padded": batch["input_ids"].shape[1],
                  "prompt_tokens_mean": round(batch["attention_mask"].sum().item() / batch["input_ids"].shape[0], 1),
                  "new_tokens": new, "generate_seconds": seconds, "prefill_seconds": prefill,
                  "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check", help="folder for report.json and gpu_check.log")
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny shapes (seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (models, run directories) instead of deleting it")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Checker(out, dry_run=args.dry_run)
    try:
        check.run_all()
    finally:  # the models and run directories can be gigabytes: gone unless asked for
        check.log.close()
        if args.keep:
            check.report["work"] = str(check.work)
        else:
            shutil.rmtree(check.work)
    (out / "report.json").write_text(json.dumps(check.report, indent=2))
    print(json.dumps(check.report, indent=2))
    return 0 if all(c["ok"] is not False for c in check.report["checks"]) else 1


class Checker:
    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.report: dict = {"dry_run": dry_run, "checks": []}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def sftlaunch(self, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "launcher.cli", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**self.env, **(env or {})},
                                timeout=timeout)
        self.log.write(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}\nexit {result.returncode}\n\n")
        self.log.flush()
        return result

    def record(self, name: str, fn) -> None:
        start = time.monotonic()
        try:
            seen = fn()
            ok = None if "skipped" in seen else True
        except Exception as exc:  # one failed check must not hide the others: it is recorded and the run goes on
            seen, ok = {"error": f"{type(exc).__name__}: {exc}"}, False
        entry = {"name": name, "ok": ok, "seconds": round(time.monotonic() - start, 1), **seen}
        self.report["checks"].append(entry)
        print(f"{name}: {'skipped' if ok is None else 'ok' if ok else 'FAILED'} {json.dumps(seen)[:300]}", flush=True)

    def run_all(self) -> None:
        self.record("env", self.check_env)
        gpus = self.report["checks"][0].get("gpus", [])
        self.model = self.tiny_model()
        self.record("cuda-bf16", lambda: self.train("bf16", gpus))
        self.record("cuda-fp16", lambda: self.train("fp16", gpus))
        self.record("pinned-gpu", lambda: self.pinned(gpus))
        self.record("oom-backoff", lambda: self.oom(gpus))
        self.record("deepspeed", lambda: self.deepspeed(gpus))
        self.record("qlora", lambda: self.qlora(gpus))
        self.record("throughput", lambda: self.throughput(gpus))
        self.record("generation", lambda: self.generation(gpus))

    def check_env(self) -> dict:
        result = self.sftlaunch("env")
        assert result.returncode == 0, result.stderr[-500:]
        hardware = json.loads(result.stdout)["hardware"]
        seen = {"gpus": hardware["gpus"], "versions": json.loads(result.stdout)["versions"]}
        if hardware["gpus"] and hardware["gpus"][0].get("uuid"):
            by_uuid = self.sftlaunch("env", env={"CUDA_VISIBLE_DEVICES": hardware["gpus"][0]["uuid"]})
            found = json.loads(by_uuid.stdout)["hardware"]["gpus"]
            assert [g["index"] for g in found] == [hardware["gpus"][0]["index"]], found
            seen["uuid_detected"] = True
        return seen

    def tiny_model(self) -> Path:
        from tests.conftest import build_tiny_model

        return build_tiny_model(self.work / "tiny")

    def recipe(self, name: str, extra: str = "") -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(f"""model:
  name: {self.model}
  lora: {{rank: 4, alpha: 8}}
data:
  train_size: 64
  max_length: 96
train:
  max_steps: {4 if self.dry_run else 40}
  effective_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
  save_steps: 2
eval:
  size: 12
  batch_size: 6
  max_new_tokens: 16
output:
  dir: {self.work / 'outputs' / name}
{extra}""")
        return path

    def run_dir(self, name: str) -> Path:
        (found,) = [p for p in (self.work / "outputs" / name).iterdir() if p.is_dir()]
        return found

    def finished_run(self, name: str, *overrides: str) -> tuple[dict, dict, list]:
        """Train the recipe `name` with overrides: its plan, eval.json and logged losses, every loss finite."""
        result = self.sftlaunch(str(self.recipe(name)), *overrides)
        assert result.returncode == 0, result.stderr[-1500:]
        run_dir = self.run_dir(name)
        plan = json.loads((run_dir / "plan.json").read_text())
        evaluation = json.loads((run_dir / "eval.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert losses and all(loss == loss and abs(loss) != float("inf") for loss in losses), losses
        return plan, evaluation, losses

    def train(self, precision: str, gpus: list) -> dict:
        if not gpus and not self.dry_run:
            return {"skipped": "no CUDA GPU detected"}
        if self.dry_run and precision != "bf16":
            return {"skipped": "dry run: one training on the CPU shows the steps work"}
        name = f"train-{precision}"
        overrides = [] if self.dry_run else [f"hardware.precision={precision}"]
        if precision == "bf16" and gpus and min(tuple(g["compute_capability"]) for g in gpus) < (8, 0):
            return {"skipped": "compute capability < 8.0 has no bf16"}
        plan, evaluation, losses = self.finished_run(name, *overrides)
        return {"backend": plan["backend"], "precision": plan["precision"], "eval_precision": plan["eval_precision"],
                "first_loss": losses[0], "last_loss": losses[-1], "overflow_steps": evaluation["train"].get("loss_scaler_overflow_steps"),
                "trained_accuracy": evaluation["trained"]["accuracy"], "train_seconds": evaluation["train"]["seconds"],
                # Each phase's seconds and peak memory (on a GPU: torch.cuda.max_memory_allocated and reserved) beside
                # the plan's predictions: the memory and time models' first comparison on a GPU.
                "phases": evaluation["phases"]}

    def pinned(self, gpus: list) -> dict:
        if len(gpus) < 2:
            return {"skipped": "needs 2 GPUs to tell a pinned GPU from GPU 0"}
        last = gpus[-1]
        probe = ("import torch, os; print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.get_device_properties(0).uuid)")
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                env={**self.env, "CUDA_VISIBLE_DEVICES": str(last["index"]), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        assert result.returncode == 0, result.stderr[-500:]
        assert last["uuid"].removeprefix("GPU-") in result.stdout, (last, result.stdout)
        return {"pinned": last["index"], "seen": result.stdout.strip()}

    def oom(self, gpus: list) -> dict:
        if not gpus:
            return {"skipped": "a real CUDA out-of-memory needs a GPU"}
        name = "oom"
        # The plan sizes the batch from the GPU's total memory; another process holds all but 3 GiB of it, so a
        # micro-batch of 4096 rows (about 2.5 GB of logits and activations for the tiny model) that the plan accepts
        # meets a real CUDA out-of-memory, and the back-off halves it until it fits.
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True, env=self.env)
        try:
            assert hog.stdout.readline().startswith("holding"), "the memory-holding process did not start"
            rows = 4096
            result = self.sftlaunch(str(self.recipe(name)), f"data.train_size={rows}", f"train.effective_batch_size={rows}",
                                    f"hardware.micro_batch_size={rows}", "hardware.gradient_checkpointing=false",
                                    "train.max_steps=1", "eval.compare_base=false", timeout=900)
        finally:
            hog.kill()
        run_dir = self.run_dir(name)
        backoff = run_dir / "oom_backoff.jsonl"
        halvings = backoff.read_text().splitlines() if backoff.exists() else []
        status = json.loads((run_dir / "run.json").read_text()).get("status")
        assert result.returncode == 0 and halvings and status == "completed", (result.returncode, status, result.stderr[-800:])
        return {"halvings": len(halvings), "final_micro_batch": json.loads(halvings[-1])["to_micro_batch"], "status": status}

    def deepspeed(self, gpus: list) -> dict:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return {"skipped": "DeepSpeed is not installed"}
        if not gpus:
            return {"skipped": "no CUDA GPU detected (DeepSpeed on CPU: tests/test_distributed.py)"}
        seen = {}
        for stage in (2, 3):
            name = f"zero{stage}"
            extra = [] if gpus else ["eval.compare_base=false"]
            result = self.sftlaunch(str(self.recipe(name)), "hardware.backend=deepspeed", f"hardware.zero_stage={stage}",
                                    *(["hardware.processes=1"] if gpus else []), *extra)
            assert result.returncode == 0, result.stderr[-1500:]
            seen[f"zero{stage}_steps"] = json.loads((self.run_dir(name) / "eval.json").read_text())["train"]["steps"]
        return seen

    def qlora(self, gpus: list) -> dict:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not installed (pip install 'sftlaunch[qlora]', or carry its wheel)"}
        if not gpus and not self.dry_run:
            return {"skipped": "no CUDA GPU detected"}
        name = "qlora"
        plan, evaluation, losses = self.finished_run(name, "model.quantize=4bit", "train.learning_rate=1e-2")
        assert plan["quantize"] == "4bit"
        assert evaluation["trained"]["loss"] < evaluation["base"]["loss"], (evaluation["base"]["loss"], evaluation["trained"]["loss"])
        return {"backend": plan["backend"], "precision": plan["precision"], "base_dtype": plan["base_dtype"],
                "first_loss": losses[0], "last_loss": losses[-1], "heldout_loss_base": evaluation["base"]["loss"],
                "heldout_loss_trained": evaluation["trained"]["loss"], "train_seconds": evaluation["train"]["seconds"]}

    def qwen_model(self) -> Path:
        """Qwen2.5-0.5B's shape with random weights, saved in bf16 (tiny in the dry run), and an offline tokenizer."""
        if getattr(self, "_qwen", None):
            return self._qwen
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        path = self.work / "qwen2.5-0.5b-shape"
        tokenizer = gsm8k_tokenizer()
        shape = DRY_SHAPE if self.dry_run else ModelShape(*KNOWN_SHAPES[QWEN])
        vocab = shape.vocab or len(tokenizer)
        assert vocab >= len(tokenizer), (vocab, len(tokenizer))
        config = Qwen2Config(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                             max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        self.qwen_shape = replace(shape, vocab=vocab)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        # What the launcher will load (AutoTokenizer makes a Qwen2Tokenizer of it, with the same split)
        loaded = AutoTokenizer.from_pretrained(path)
        assert loaded.eos_token == "<|im_end|>" and len(loaded) <= vocab, (loaded.eos_token, len(loaded))
        self._qwen = path
        return path

    def throughput(self, gpus: list) -> dict:
        """Tokens/s, MFU, peak memory and time against the plan's predictions: LoRA and full fine-tuning of GSM8K."""
        if not gpus and not self.dry_run:
            return {"skipped": "no CUDA GPU detected"}
        model = self.qwen_model()
        shape, source = find_shape(str(model))  # what the plan reads: the built model's config.json
        assert shape == self.qwen_shape, (shape, self.qwen_shape)
        seen = {"model": {"shape": {k: getattr(shape, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate",
                                                                     "vocab", "tied", "model_type")},
                          "params": shape.params, "shape_source": source, "tokenizer_vocab": TOKENIZER_VOCAB,
                          "weights": "random, saved in bf16"}}
        for mode, recipe in (("lora", "gsm8k.yaml"), ("full", "gsm8k-full.yaml")):
            seen[mode] = self.measure_training(mode, ROOT / "recipes" / recipe, model, shape, gpus)
        return seen

    def measure_training(self, mode: str, recipe: Path, model: Path, shape: ModelShape, gpus: list) -> dict:
        import yaml

        from launcher.plan import Plan
        from launcher.timing import flops_per_token, predict_for_plan

        name = f"throughput-{mode}"
        steps = 3 if self.dry_run else 20
        batch = yaml.safe_load(recipe.read_text())["train"]["effective_batch_size"]  # 16 LoRA, 32 full
        # One epoch of exactly `steps` optimizer steps: the plan's data size is then the very samples trained on. Trainer
        # writes a checkpoint at the last step (full fine-tuning's: weights and Adam state, ~6 GB at this shape): inside
        # the training phase's seconds, after the last step's log, so outside the steady tokens/s.
        result = self.sftlaunch(str(recipe), f"model.name={model}", f"train.max_steps={steps}",
                                f"data.max_samples={steps * batch}",
                                # Random weights write degenerate text and start at a loss of about ln(vocabulary):
                                # the guard's collapse and divergence rules are not what this check is about.
                                "train.logging_steps=1", "train.guard.collapse=false",
                                "train.guard.divergence=false",
                                "eval.compare_base=false", f"eval.limit={4 if self.dry_run else 32}",
                                f"eval.max_new_tokens={8 if self.dry_run else 64}",
                                f"output.dir={self.work / 'outputs' / name}", timeout=900)
        assert result.returncode == 0, result.stderr[-1500:]
        run_dir = self.run_dir(name)
        plan = Plan.model_validate_json((run_dir / "plan.json").read_text())
        evaluation = json.loads((run_dir / "eval.json").read_text())
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # The evidence beside report.json (the work folder with the models is deleted)
        keep = self.out / name
        keep.mkdir(exist_ok=True)
        for file in ("plan.json", "eval.json", "metrics.jsonl", "run.json"):
            shutil.copy(run_dir / file, keep / file)
        shutil.copy(model / "config.json", keep / "config.json")

        prediction = predict_for_plan(plan, shape)
        assert not isinstance(prediction, str), prediction
        # The same inputs as the plan's own prediction: re-derived, it gives the plan's predicted seconds (to their
        # 0.1 s: plan.json keeps the memory estimate rounded, which the CPU's start-up term multiplies; rounded again
        # below because 4.0 - 3.9 is 0.10000000000000009 in floating point)
        again = prediction.seconds()
        assert again.keys() == plan.predicted_seconds.keys() and all(
            round(abs(again[k] - plan.predicted_seconds[k]), 6) <= 0.1 for k in again), (again, plan.predicted_seconds)
        data = plan.data_size
        mean_len = data.tokens / data.samples
        parts = flops_per_token(shape, method=plan.recipe.model.method, lora_rank=plan.recipe.model.lora.rank,
                                lora_targets=plan.recipe.model.lora.target_modules, seq_len=mean_len,
                                trained_share=data.trainable_tokens / data.tokens,
                                trained_logits=plan.loss_logits == "trained", checkpointing=plan.gradient_checkpointing)
        assert parts["total"] == prediction.flops_per_token, (parts["total"], prediction.flops_per_token)
        model_flops = parts["total"] - parts["recompute"]  # MFU counts the model's FLOPs, not checkpointing's recompute

        # Steady state: the first quarter of the steps (at least one: CUDA's and the allocator's first touches, the
        # longest batch first) left out; the rest from the Trainer's own counters at each logged step.
        per_step = [r for r in logged if "loss" in r and "train_runtime" in r]
        assert len(per_step) == steps, [r.get("step") for r in per_step]
        skip = max(1, steps // 4)
        first, last = per_step[skip - 1], per_step[-1]
        steady = (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (last["train_runtime"] - first["train_runtime"])
        rate = plan.hardware.matmul_tflops[plan.precision] * (min(1.0, plan.threads / plan.hardware.cpu_cores)
                                                              if plan.device == "cpu" else 1.0)
        efficiency = (prediction.sustained_gflops / 1e3) / rate
        predicted_rate = prediction.tokens / (prediction.training - prediction.parts["start_s"])
        samples_seen = steps * batch
        training = evaluation["phases"]["training"]
        entry = {
            "backend": plan.backend, "device": plan.device, "precision": plan.precision, "base_dtype": plan.base_dtype,
            "micro_batch": plan.micro_batch_size, "accumulation": plan.gradient_accumulation_steps,
            "checkpointing": plan.gradient_checkpointing, "loss_logits": plan.loss_logits, "steps": len(per_step),
            "tokens_per_s": round(steady, 1),
            "tokens_per_s_how": (f"steps {skip + 1}-{steps} of {steps}: non-padding tokens seen (Trainer's num_input_tokens_seen) "
                                 f"between step {skip} and step {steps} / train_runtime between them"),
            "tokens_per_s_whole_run": last["train_tokens_per_second"],
            "predicted_tokens_per_s": round(predicted_rate, 1),
            "flops_per_token": prediction.flops_per_token,
            "flops_per_token_how": "launcher.timing.predict_for_plan on the run's plan.json (it reproduces the plan's predicted seconds to 0.1 s)"
                                   + (f"; includes the checkpointing recompute {parts['recompute']:.4g}" if parts["recompute"] else ""),
            "peak_tflops": rate, "peak_tflops_source": f"plan: hardware.matmul_tflops[{plan.precision}], {plan.hardware.rates_source}",
            "plan_matmul_efficiency": round(efficiency, 3),
            "mfu": round(steady * model_flops / (rate * 1e12), 4),
            **self.datasheet_mfu(gpus, plan.precision, steady * model_flops),
            "train_seconds": evaluation["train"]["seconds"],
            "training_seconds": training["seconds"], "predicted_training_seconds": training.get("predicted_seconds"),
            "time_ratio": training.get("time_ratio"),
            "peak_memory_gib": training.get("peak_memory_gib"), "memory_measure": training.get("memory_measure"),
            "reserved_memory_gib": training.get("reserved_memory_gib"),
            "predicted_memory_gib": training.get("predicted_memory_gib"), "memory_ratio": training.get("memory_ratio"),
            "tokens_per_sample_planned": round(mean_len, 1),
            "tokens_per_sample_encoded": round(last["num_input_tokens_seen"] / samples_seen, 1),
            "tokens_planned": prediction.tokens, "tokens_seen": last["num_input_tokens_seen"],
            "phases": evaluation["phases"],
        }
        assert entry["tokens_per_s"] > 0 and entry["memory_ratio"], entry
        return entry

    @staticmethod
    def datasheet_mfu(gpus: list, precision: str, flops_per_s: float) -> dict:
        if not gpus or precision not in ("bf16", "fp16"):
            return {}
        peak = next((v for k, v in DATASHEET_TFLOPS.items() if k in gpus[0]["name"]), None)
        if peak is None:
            return {}
        return {"mfu_datasheet": round(flops_per_s / (peak * 1e12), 4), "datasheet_tflops": peak}

    def generation(self, gpus: list) -> dict:
        """Batched greedy generation at the throughput check's shape: items/s and new tokens/s, against the plan's."""
        if not gpus and not self.dry_run:
            return {"skipped": "no CUDA GPU detected"}
        from launcher.plan import Plan
        from launcher.tasks.gsm8k import BUNDLED, load_file
        from launcher.timing import DataSize, predict_time

        model = self.qwen_model()
        lora = self.out / "throughput-lora" / "plan.json"
        assert lora.exists(), "the throughput check's LoRA run wrote no plan"
        plan = Plan.model_validate_json(lora.read_text())
        import yaml

        evaluation = yaml.safe_load((ROOT / "recipes" / "gsm8k.yaml").read_text())["eval"]  # batch 32, 320 new tokens
        batch, new_tokens = evaluation["batch_size"], (8 if self.dry_run else evaluation["max_new_tokens"])
        questions = [ex.question for ex in load_file(BUNDLED / "test.jsonl")[:batch]]
        args = self.work / "generate.json"
        args.write_text(json.dumps({"model": str(model), "device": plan.device, "precision": plan.eval_precision,
                                    "max_new_tokens": new_tokens, "questions": questions}))
        cmd = [sys.executable, "-c", GENERATE, str(args)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=self.env, timeout=600)
        self.log.write(f"$ {sys.executable} -c GENERATE {args}\n{result.stdout}\n{result.stderr}\nexit {result.returncode}\n\n")
        self.log.flush()
        assert result.returncode == 0, result.stderr[-1500:]
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["new_tokens"] == new_tokens and got["rows"] == batch, got
        seconds = got["generate_seconds"]
        # launcher.timing's evaluation model for this one batch (its prefill, decoding steps and the loss pass
        # over the prompts; it takes half the rows as still generating, here all of them are)
        size = DataSize(samples=1, tokens=1, trainable_tokens=0, answer_tokens_max=new_tokens, eval_items=batch,
                        eval_prompt_tokens=round(got["prompt_tokens_mean"]), source="gpu_check generation")
        r = plan.recipe
        predicted = predict_time(
            find_shape(str(model))[0], size, device=plan.device, precision=plan.precision, eval_precision=plan.eval_precision,
            tflops=plan.hardware.matmul_tflops, bandwidth_gbs=plan.hardware.memory_bandwidth_gbs, method=r.model.method,
            lora_rank=r.model.lora.rank, lora_targets=r.model.lora.target_modules, checkpointing=False, trained_logits=True,
            micro_batch=1, accumulation=1, world_size=1, nodes=1, threads=plan.threads, cpu_cores=plan.hardware.cpu_cores,
            epochs=1, max_steps=1, zero_stage=0, eval_batch=batch, max_new_tokens=new_tokens, compare_base=False,
            base_dtype=plan.base_dtype, elementwise_gops=plan.hardware.elementwise_gops)
        return {"device": plan.device, "precision": plan.eval_precision, "batch": batch, "max_new_tokens": new_tokens,
                "prompt_tokens_mean": got["prompt_tokens_mean"], "prompt_tokens_padded": got["prompt_tokens_padded"],
                "generate_seconds": round(seconds, 3), "items_per_s": round(batch / seconds, 2),
                "new_tokens_per_s": round(batch * new_tokens / seconds, 1),
                "prefill_seconds": round(got["prefill_seconds"], 4),
                "decode_step_ms": round((seconds - got["prefill_seconds"]) / (new_tokens - 1) * 1e3, 2),
                "peak_memory_gib": got["peak_memory_gib"],
                "predicted_seconds": None if isinstance(predicted, str) else round(predicted.trained_eval, 3),
                "time_ratio": None if isinstance(predicted, str) else round(seconds / predicted.trained_eval, 2),
                "how": "one batch of the first GSM8K test questions, greedy, min_new_tokens = max_new_tokens, after a "
                       "warm-up generation; a child process with transformers' generate (not the launcher's evaluation loop)"}


def gsm8k_tokenizer():
    """A byte-level BPE with Qwen2's split, trained on GSM8K's training text in seconds, with Qwen2.5's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from launcher.tasks.gsm8k import BUNDLED

    rows = [json.loads(line) for line in (BUNDLED / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f"{r['question']}\n{r['answer']}" for r in rows), trainer)
    # As Qwen2.5-Instruct: <|im_end|> ends a turn (EOS), <|endoftext|> pads
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


if __name__ == "__main__":
    sys.exit(main())
