"""`sftlaunch slurm`: the batch script for two profiles (exact text), the checks of its flags, the end of a job as
run.json records it, and the command itself without a scheduler (nothing submitted, under a second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import ClusterError, ConfigError
from launcher.hardware import load_profile
from launcher.memory import find_shape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from launcher.rundir import RunDir
from launcher.slurm import SlurmRequest, check_request, job_end, node_hardware, sbatch_script, shared_storage_problem, submit
from tests.conftest import ROOT, run_cli

GOLDEN = Path(__file__).parent / "golden"
CASES = {  # profile -> the request; the expected scripts are in tests/launcher/golden/
    "a100-80gb-x8": SlurmRequest(nodes=2, gpus_per_node=8, partition="gpu", time="04:00:00", account="lab42"),
    "cpu-2core": SlurmRequest(nodes=1, gpus_per_node=0),
}


def _plan(profile: str, req: SlurmRequest, overrides=()):
    recipe = load_recipe(str(ROOT / "recipes" / "gsm8k.yaml"), list(overrides))
    hw = node_hardware(load_profile(profile), req, from_profile=True)
    return make_plan(recipe, hw, *find_shape(recipe.model.name))


@pytest.mark.parametrize("profile", sorted(CASES))
def test_the_batch_script_for_a_profile_is_exactly_the_reviewed_one(profile):
    req = CASES[profile]
    overrides = () if profile.startswith("a100") else ("hardware.backend=deepspeed",)
    plan = _plan(profile, req, overrides)
    script = sbatch_script(plan, Path("/shared/runs/gsm8k-1"), req, launcher=("/opt/venv/bin/python", "-m", "launcher.cli"))
    assert script == (GOLDEN / f"slurm-{profile}.sbatch").read_text()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # the shell parses it


def test_the_script_asks_for_what_the_plan_needs():
    req = CASES["a100-80gb-x8"]
    plan = _plan("a100-80gb-x8", req)
    assert (plan.nodes, plan.processes_per_node, plan.world_size) == (2, 8, 16)
    lines = sbatch_script(plan, Path("/shared/r"), req).splitlines()
    for wanted in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                   "#SBATCH --time=04:00:00", "#SBATCH --account=lab42", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                   "#SBATCH --output=/shared/r/slurm-%j.out", 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                   '  scontrol requeue "$SLURM_JOB_ID" && exit 0'):
        assert wanted in lines, wanted
    cpu = sbatch_script(_plan("cpu-2core", CASES["cpu-2core"]), Path("/r"), CASES["cpu-2core"])
    assert "--gpus-per-node" not in cpu and "--partition" not in cpu and "--time" not in cpu


def test_gpu_counts_the_profile_lacks_and_bad_flags_are_errors_that_name_the_flag_and_the_fix():
    with pytest.raises(ConfigError, match=r"--gpus-per-node: the profile a100-80gb-x8 has 8 GPU\(s\) per node \(got 16\)\. Fix: --gpus-per-node 8 or fewer"):
        node_hardware(load_profile("a100-80gb-x8"), SlurmRequest(nodes=1, gpus_per_node=16), from_profile=True)
    with pytest.raises(ConfigError, match=r"this machine has 0 GPU\(s\) per node \(got 4\)\. Fix: --hardware PROFILE"):
        node_hardware(load_profile("cpu-2core"), SlurmRequest(nodes=1, gpus_per_node=4), from_profile=False)
    with pytest.raises(ConfigError) as bad:
        check_request(SlurmRequest(nodes=0, gpus_per_node=-1, time="4h", partition="gpu; rm -rf /"))
    text = str(bad.value)
    assert "--nodes: a job needs at least one node (got 0). Fix: --nodes 1 or more" in text
    assert "--gpus-per-node: cannot be negative" in text and "--time: not a SLURM time limit (got '4h')" in text
    assert "--partition: not a SLURM name" in text
    check_request(SlurmRequest(nodes=2, gpus_per_node=8, time="1-12:00:00", partition="gpu-a100"))  # valid ones pass


def test_a_run_directory_local_to_one_machine_is_refused_for_several_nodes():
    mounts = "/dev/sda1 / ext4 rw 0 0\nnfs:/export /shared nfs4 rw 0 0\ntmpfs /scratch tmpfs rw 0 0\n"
    assert "under /tmp" in shared_storage_problem(Path("/tmp/runs"), 2, mounts)
    assert "under /dev/shm" in shared_storage_problem(Path("/dev/shm/x"), 2, mounts)
    assert "on a tmpfs mount (/scratch)" in shared_storage_problem(Path("/scratch/runs"), 2, mounts)
    assert shared_storage_problem(Path("/shared/runs"), 2, mounts) is None
    assert shared_storage_problem(Path("/tmp/runs"), 1, mounts) is None  # one node: any folder will do


def _run_dir(tmp_path, status: dict) -> RunDir:
    rd = RunDir(tmp_path / "run")
    (rd.path / RunDir.SLURM_STATE).mkdir(parents=True)
    rd.file(RunDir.STATUS).write_text(json.dumps(status))
    return rd


def test_job_end_requeues_only_a_run_that_checkpointed_on_the_warning(tmp_path):
    rd = _run_dir(tmp_path, {"status": "interrupted", "phase": "training", "step": 7, "slurm": {"job_id": "5", "nodes": "n[1-2]"}})
    assert job_end(rd.path, "5", 143, "USR1") == "requeue"
    assert rd.status()["slurm"] == {"job_id": "5", "nodes": "n[1-2]", "srun_exit_code": 143, "requeued": True}
    rd = _run_dir(tmp_path / "b", {"status": "completed"})
    assert job_end(rd.path, "6", 0, "") == "done" and rd.status()["status"] == "completed"


def test_a_job_that_failed_on_one_node_leaves_run_json_naming_the_node_and_why(tmp_path):
    # Node 1 failed on its own (exit 2); srun's --kill-on-bad-exit then stopped node 0 (143).
    rd = _run_dir(tmp_path, {"status": "interrupted", "slurm": {"job_id": "9"}})
    (rd.path / "slurm" / "exit-9-node-0").write_text("143 gpu-a\n")
    (rd.path / "slurm" / "exit-9-node-1").write_text("2 gpu-b\n")
    (rd.path / "slurm" / "exit-8-node-1").write_text("1 old-start\n")  # another job's start: not this one
    assert job_end(rd.path, "9", 2, "") == "done"
    state = rd.status()
    assert (state["status"], state["node"], state["host"], state["exit_code"]) == ("failed", 1, "gpu-b", 2)
    assert state["error"] == f"node 1 (gpu-b): sftlaunch exited with code 2; its error is in {rd.path / 'slurm-9.out'}"
    # A rank that recorded its own error keeps it; the node is added.
    rd = _run_dir(tmp_path / "c", {"status": "failed", "rank": 9, "error": "rank 9 (node 1, gpu-b): loss is nan"})
    (rd.path / "slurm" / "exit-3-node-1").write_text("3 gpu-b\n")
    job_end(rd.path, "3", 3, "")
    assert (rd.status()["error"], rd.status()["node"]) == ("rank 9 (node 1, gpu-b): loss is nan", 1)
    # Nothing recorded by any node (the step was killed outright): run.json still says it failed.
    rd = _run_dir(tmp_path / "d", {"status": "running"})
    job_end(rd.path, "4", 137, "")
    assert rd.status()["status"] == "failed" and "before any node recorded its end" in rd.status()["error"]


def test_submit_without_sbatch_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match=r"sbatch is not on PATH.*Fix: run `sftlaunch slurm \.\.\. --submit` on the cluster's login node"):
        submit(tmp_path / "slurm.sbatch")


def test_slurm_without_submit_writes_and_shows_the_script_submits_nothing_and_takes_under_a_second(tiny_recipe, tmp_path):
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}  # sbatch or not, nothing may be submitted
    args = ("slurm", str(tiny_recipe), "hardware.backend=deepspeed", "--nodes", "1", "--gpus-per-node", "0", "--hardware", "cpu-2core")
    seconds = []
    for _ in range(3):  # the fastest of three: the command's own cost, not a busy machine's
        t0 = time.perf_counter()
        result = run_cli(*args, env=env)
        seconds.append(time.perf_counter() - t0)
        assert result.returncode == 0, result.stderr
    assert min(seconds) < 1.0, seconds
    runs = sorted((tmp_path / "outputs").iterdir())
    assert len(runs) == 3
    script = runs[0] / "slurm.sbatch"
    assert "world_size                  = 2" in result.stdout and "#SBATCH --requeue" in result.stdout
    assert f"not submitted. Submit with: sbatch {runs[-1] / 'slurm.sbatch'}" in result.stdout
    status = json.loads((runs[0] / "run.json").read_text())
    assert status["status"] == "prepared" and status["slurm"]["script"] == str(script) and "job_id" not in status["slurm"]
    assert json.loads((runs[0] / "plan.json").read_text())["world_size"] == 2


def test_slurm_command_refusals_name_the_flag_and_write_nothing(tiny_recipe, tmp_path):
    base = ("slurm", str(tiny_recipe), "hardware.backend=deepspeed", "--hardware", "cpu-2core")
    zero = run_cli(*base, "--nodes", "0", "--gpus-per-node", "0")
    assert zero.returncode == 2 and "--nodes: a job needs at least one node (got 0)" in zero.stderr
    too_many = run_cli(*base, "--nodes", "1", "--gpus-per-node", "8")
    assert too_many.returncode == 2 and "the profile cpu-2core has 0 GPU(s) per node (got 8)" in too_many.stderr
    local = run_cli(*base, "--nodes", "2", "--gpus-per-node", "0", "--run-dir", "/tmp/sftlaunch-not-shared")
    assert local.returncode == 2 and "--run-dir: /tmp/sftlaunch-not-shared is under /tmp" in local.stderr
    assert "Fix: --run-dir on storage every node mounts" in local.stderr
    one_node_backend = run_cli("slurm", str(tiny_recipe), "hardware.backend=cpu", "--nodes", "2", "--gpus-per-node", "0",
                               "--hardware", "cpu-2core", "--run-dir", str(ROOT / ".never-made"))
    assert one_node_backend.returncode == 2 and "the plan runs the cpu backend, which uses one node" in one_node_backend.stderr
    no_sbatch = run_cli(*base, "--nodes", "1", "--gpus-per-node", "0", "--submit", env={"PATH": os.path.dirname(sys.executable)})
    assert no_sbatch.returncode == 2 and "sbatch is not on PATH" in no_sbatch.stderr
    assert all("Traceback" not in r.stderr for r in (zero, too_many, local, one_node_backend, no_sbatch))
    assert not (ROOT / ".never-made").exists() and not Path("/tmp/sftlaunch-not-shared").exists()
    (prepared,) = (tmp_path / "outputs").iterdir()  # only the --submit refusal got as far as writing the script
    assert json.loads((prepared / "run.json").read_text())["status"] == "prepared"
    again = run_cli(*base, "--nodes", "1", "--gpus-per-node", "0", "--run-dir", str(prepared))
    assert again.returncode == 2 and f"--run-dir {prepared} already holds a run (prepared)" in again.stderr
