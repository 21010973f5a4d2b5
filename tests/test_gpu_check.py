"""The prepared GPU check must not rot where no GPU is: its --dry-run runs the same steps on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys

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
                                                          "qlora"]
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
    # sftlaunch env, the one CPU training, and the QLoRA one where bitsandbytes is installed
    assert (tmp_path / "gpu_check.log").read_text().count("$ ") == 2 + qlora
