"""The prepared GPU check must not rot where no GPU is: its --dry-run runs the same steps on the CPU."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["dry_run"] is True and list(checks) == ["env", "cuda-bf16", "cuda-fp16", "pinned-gpu", "oom-backoff", "deepspeed"]
    assert checks["env"]["ok"] and checks["env"]["gpus"] == []
    assert checks["cuda-bf16"]["ok"] and checks["cuda-bf16"]["backend"] == "cpu"  # the same steps, on the CPU
    assert checks["oom-backoff"]["ok"] is None and "needs a GPU" in checks["oom-backoff"]["skipped"]
    assert checks["deepspeed"]["ok"] is None and checks["cuda-fp16"]["ok"] is None
    assert (tmp_path / "gpu_check.log").read_text().count("$ ") == 2  # sftlaunch env, and the one CPU training
