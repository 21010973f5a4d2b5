"""The worker entry point (`python -m launcher.worker RUN_DIR`): whatever ends it, run.json says so."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_a_folder_without_a_plan_fails_with_the_fix_and_run_json_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher.worker", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "RANK": "0", "WORLD_SIZE": "1"})
    assert result.returncode == 2, result.stderr
    assert f"error: {tmp_path} is not a run directory (no plan.json). Fix: pass outputs/<run>." in result.stderr
    status = json.loads((tmp_path / "run.json").read_text())
    assert (status["status"], status["exit_code"]) == ("failed", 2) and "no plan.json" in status["error"]


def test_a_rank_other_than_0_leaves_the_run_json_to_rank_0(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher.worker", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "RANK": "1", "WORLD_SIZE": "2"})
    assert result.returncode == 2 and "no plan.json" in result.stderr
    assert not (tmp_path / "run.json").exists()
