import json
import math

import pytest

from launcher.errors import PlanError
from launcher.rundir import RunDir


def test_status_updates_merge_and_leave_no_temporary_file(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.write_status("starting", recipe="r.yaml")
    run_dir.write_status("running", worker_pid=7)
    status = json.loads((tmp_path / RunDir.STATUS).read_text())
    assert (status["status"], status["recipe"], status["worker_pid"]) == ("running", "r.yaml", 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunDir.STATUS]


def test_a_folder_without_a_plan_is_not_a_run_directory(tmp_path):
    with pytest.raises(PlanError, match=r"is not a run directory \(no plan.json\). Fix: pass outputs/<run>"):
        RunDir(tmp_path).read_plan()


def test_resume_drops_metrics_after_the_checkpoint_and_the_last_loss_skips_non_finite(tmp_path):
    run_dir = RunDir(tmp_path)
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": math.nan}, {"step": 4, "loss": 1.0}]
    run_dir.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_dir.last_loss() == 1.0
    run_dir.truncate_metrics(3)
    assert [r["step"] for r in run_dir.read_metrics()] == [1, 2, 3]
    assert run_dir.last_loss() == 1.5  # the NaN of step 3 is not a loss to report
