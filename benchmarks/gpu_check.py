"""The prepared GPU check: one command for the day a CUDA GPU is at hand (no network needed there).

    python benchmarks/gpu_check.py [--out DIR]        # on a machine with a CUDA GPU, about 5 minutes
    python benchmarks/gpu_check.py --dry-run          # anywhere: the same steps on the CPU, tiny, seconds

It writes DIR/report.json (one entry per check: ok, the check's own wall seconds, what was seen) and
DIR/gpu_check.log (every command's output), and exits 1 if any check failed. Its work folder (models, run
directories: gigabytes on a GPU) is a temporary folder deleted at the end; --keep keeps it (report.json's "work"). Every model is built in code (the tiny test Llama,
trained to be a language model first, by tests/conftest.py: pytest must be importable), so nothing is
downloaded. The checks are the paths no development
machine can run (README "Tested on"):

- env: `sftlaunch env` detects the GPU(s), and a GPU named by UUID in CUDA_VISIBLE_DEVICES is found;
- cuda-bf16 / cuda-fp16: the cuda backend end to end on the tiny model, bf16 where the GPU has it and fp16
  as a T4 trains (GradScaler: its overflow steps must be notes, not a stop), both finishing with finite loss;
- pinned-gpu: with CUDA_VISIBLE_DEVICES set to the last GPU, the worker runs on that GPU;
- oom-backoff: a real CUDA out-of-memory (another process holds all but 3 GiB of the GPU, which the plan
  cannot know) halves the micro-batch, resumes and finishes;
- deepspeed: ZeRO-2 and ZeRO-3 on one GPU, when DeepSpeed is installed (carried as a wheel);
- qlora: model.quantize=4bit on the tiny model (bitsandbytes' CUDA kernels; its wheel, 41 MiB, can be carried),
  learning (held-out loss below the base's) and finite; in the dry run on bitsandbytes' CPU backend.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


HOG = ("import time, torch; free, total = torch.cuda.mem_get_info(); "
       "x = torch.empty(max(0, free - 3 * 2**30), dtype=torch.uint8, device='cuda'); "
       "print('holding', x.numel(), flush=True); time.sleep(3600)")


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


if __name__ == "__main__":
    sys.exit(main())
