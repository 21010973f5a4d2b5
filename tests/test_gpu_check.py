"""The prepared GPU check must not rot where no GPU is: its --dry-run runs the same steps on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from launcher.memory import shape_from_config
from launcher.plan import Plan
from launcher.timing import predict_for_plan
from tests.conftest import ROOT


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    temp = tmp_path / "temp"  # where the check makes its work folder (tempfile honours TMPDIR)
    temp.mkdir()
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["dry_run"] is True and list(checks) == ["env", "cuda-bf16", "cuda-fp16", "pinned-gpu", "oom-backoff", "deepspeed",
                                                          "qlora", "throughput", "generation"]
    assert checks["env"]["ok"] and checks["env"]["gpus"] == []
    assert checks["cuda-bf16"]["ok"] and checks["cuda-bf16"]["backend"] == "cpu"  # the same steps, on the CPU
    # The check's own wall seconds are not overwritten by the training's (which is part of them)
    assert 0 < checks["cuda-bf16"]["train_seconds"] < checks["cuda-bf16"]["seconds"]
    assert "work" not in report and not list(temp.glob("gpu_check-*"))  # the work folder is deleted (no --keep)
    training = checks["cuda-bf16"]["phases"]["training"]  # measured beside predicted (on a GPU: max_memory_allocated)
    assert training["peak_memory_gib"] > 0 and training["predicted_memory_gib"] > 0 and training["predicted_seconds"] > 0
    assert checks["oom-backoff"]["ok"] is None and "needs a GPU" in checks["oom-backoff"]["skipped"]
    assert checks["deepspeed"]["ok"] is None and checks["cuda-fp16"]["ok"] is None
    qlora = importlib.util.find_spec("bitsandbytes") is not None
    if qlora:  # bitsandbytes' CPU backend runs the 4-bit path in the dry run
        assert checks["qlora"]["ok"] and checks["qlora"]["backend"] == "cpu"
        assert checks["qlora"]["heldout_loss_trained"] < checks["qlora"]["heldout_loss_base"]
    else:
        assert checks["qlora"]["ok"] is None and "sftlaunch[qlora]" in checks["qlora"]["skipped"]
    throughput = checks["throughput"]
    assert throughput["ok"] and throughput["model"]["shape"]["model_type"] == "qwen2"
    for mode in ("lora", "full"):
        seen, kept = throughput[mode], tmp_path / f"throughput-{mode}"
        assert seen["backend"] == "cpu" and seen["steps"] == 3
        assert seen["tokens_per_s"] > 0 and 0 < seen["mfu"] < 1 and seen["memory_ratio"] > 0, seen
        # FLOPs per token: what launcher.timing predicts for the run's own plan (kept beside the report)
        plan = Plan.model_validate_json((kept / "plan.json").read_text())
        assert plan.recipe.model.method == mode
        shape = shape_from_config(json.loads((kept / "config.json").read_text()))
        assert seen["flops_per_token"] == predict_for_plan(plan, shape).flops_per_token > 0
        # One epoch of exactly the samples the plan counted: the plan's tokens per sample are the encoded ones
        assert seen["tokens_per_sample_encoded"] == seen["tokens_per_sample_planned"] > 0
    generation = checks["generation"]
    assert generation["ok"] and generation["batch"] == 32 and generation["items_per_s"] > 0
    assert generation["new_tokens_per_s"] == pytest.approx(generation["items_per_s"] * generation["max_new_tokens"], rel=0.01)
    # sftlaunch env, the one CPU training, the QLoRA one where bitsandbytes is installed, the two throughput runs and the
    # generation's child process
    assert (tmp_path / "gpu_check.log").read_text().count("$ ") == 5 + qlora
