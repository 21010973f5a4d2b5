"""`sftlaunch slurm --submit` against a real SLURM (slurmctld + slurmd on this machine, one node, two DeepSpeed
processes over gloo): a job that completes, and a job warned mid-training that checkpoints, requeues itself,
resumes by itself and ends with the same steps and weights as the uninterrupted one."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests import slurm_cluster
from tests.conftest import fault_env, run_cli, write_tiny_recipe

STEPS = 24
ARGS = ["hardware.backend=deepspeed", "hardware.zero_stage=2", "hardware.precision=fp32", "eval.compare_base=false",
        "eval.limit=3", f"train.max_steps={STEPS}", "train.save_steps=1000"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.why_not_available()
    if why:
        pytest.skip(f"no SLURM cluster can run here: {why} (CI runs as root and installs slurm-wlm and munge)")
    c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def _submit(cluster, recipe: Path, out: Path, *extra: str) -> tuple[str, Path]:
    result = run_cli("slurm", str(recipe), *ARGS, f"output.dir={out}", *extra, "--nodes", "1", "--gpus-per-node", "0",
                     "--submit", env=cluster.env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job = re.search(r"submitted batch job (\d+)", result.stdout).group(1)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return job, run_dir


def _wait(cluster, job: str, until, timeout: float, what: str) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = cluster.job(job)
        if until(info):
            return info
        if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job}: {what} not reached: {info}")


def _log(run_dir: Path, job: str) -> str:
    # Two ranks write progress bars into one log: a multi-byte character can be cut by the other's write.
    return (run_dir / f"slurm-{job}.out").read_text(errors="replace")


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def completed(cluster, tmp_path_factory, tiny_model):
    """One uninterrupted job: the run every test below compares with."""
    out = tmp_path_factory.mktemp("slurm-runs")
    recipe = _recipe(tmp_path_factory.mktemp("recipe"), tiny_model)
    job, run_dir = _submit(cluster, recipe, out / "plain")
    info = _wait(cluster, job, lambda i: i["JobState"] == "COMPLETED", 300, "COMPLETED")
    return job, run_dir, info, recipe, out


def _recipe(folder: Path, tiny_model: Path) -> Path:
    return write_tiny_recipe(folder / "tiny.yaml", tiny_model, train_size=8)


def test_a_submitted_job_completes_and_run_json_names_the_job_and_its_nodes(cluster, completed):
    job, run_dir, info, _, out = completed
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "completed", _log(run_dir, job)[-3000:]
    assert status["slurm"]["job_id"] == job and status["slurm"]["nodes"] == info["NodeList"]
    assert status["slurm"]["restarts"] == 0 and status["slurm"]["srun_exit_code"] == 0
    assert json.loads((run_dir / "eval.json").read_text())["train"]["steps"] == STEPS
    log = _log(run_dir, job)
    assert f"rendezvous {info['NodeList']}:" in log and "world_size                  = 2" in log
    listed = run_cli("runs", str(out / "plain"))
    assert listed.returncode == 0 and f"slurm {job}" in listed.stdout and info["NodeList"] in listed.stdout


def test_warned_job_checkpoints_requeues_resumes_by_itself_with_the_same_steps_and_weights(cluster, completed):
    _, plain_dir, _, recipe, out = completed
    job, run_dir = _submit(cluster, recipe, out / "warned")
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + 300
    while not (metrics.exists() and any(json.loads(line).get("step", 0) >= 3 for line in metrics.read_text().splitlines())):
        assert time.monotonic() < end and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(run_dir, job)[-3000:]
        time.sleep(0.3)
    # What SLURM does `--signal=B:USR1@300` before the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The job requeues itself; SLURM holds it until the old start's credential expires (cred_expire: 120 s by default,
    # 10 s in the test cluster), then starts the same script again by itself.
    _wait(cluster, job, lambda i: i["Restarts"] == "1", 300, "the requeue")
    _wait(cluster, job, lambda i: i["JobState"] == "COMPLETED", 300, "COMPLETED after the requeue")

    log = _log(run_dir, job)  # both starts append to it
    assert "USR1 received: checkpointing at the next step" in log and f"requeueing job {job}" in log
    stopped_at = int(re.search(r"SIGTERM: stopped during training; resume continues from checkpoint-(\d+)", log).group(1))
    assert 3 <= stopped_at < STEPS
    assert f"resuming from {run_dir / 'checkpoints'}/checkpoint-{stopped_at} (step {stopped_at})" in log
    assert log.index(f"requeueing job {job}") < log.index("resuming from")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "completed" and status["slurm"]["job_id"] == job and status["slurm"]["restarts"] == 1
    resumed, plain = (json.loads((d / "eval.json").read_text())["train"] for d in (run_dir, plain_dir))
    assert resumed["steps"] == plain["steps"] == STEPS
    assert resumed["final_loss"] == pytest.approx(plain["final_loss"], rel=0.02)  # the resume tests' tolerance
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
              for d in (run_dir, plain_dir)]
    assert sorted(losses[0]) == list(range(1, STEPS + 1))
    # One optimizer step per epoch (train_size 8 = effective batch 8), so the stop falls on an epoch boundary, where a
    # resumed run draws the same batches: every step's loss is the uninterrupted run's. (Inside an epoch the rest of
    # that epoch gets other batches: transformers' LengthGroupedSampler draws its order from the global random state
    # when the epoch's iterator starts; README "Measured" gives the differences.)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = _adapter(run_dir), _adapter(plain_dir)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"stopped at step {stopped_at} of {STEPS}; largest adapter weight difference {diff:.3g}")
    for k in a:  # the full fine-tuning test's tolerance for runs that must agree
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, diff)


def test_a_partition_slurm_rejects_is_an_error_with_the_fix(cluster, tiny_recipe, tmp_path):
    result = run_cli("slurm", str(tiny_recipe), "hardware.backend=deepspeed", "--nodes", "1", "--gpus-per-node", "0",
                     "--partition", "nosuch", "--submit", env=cluster.env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sbatch refused" in result.stderr and "Invalid partition name specified" in result.stderr
    assert "Fix: pick a partition `sinfo -s` lists, with --partition" in result.stderr
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "prepared"  # kept, not queued


def test_a_job_that_fails_on_a_node_leaves_run_json_naming_the_node_and_why(cluster, tiny_recipe, tmp_path):
    # Rank 1's loss becomes NaN at step 2: the guard stops every rank with exit 3, and the job fails (no requeue).
    result = run_cli("slurm", str(tiny_recipe), *ARGS, "--nodes", "1", "--gpus-per-node", "0", "--submit",
                     env={**cluster.env, **fault_env(nan_at_step=2, fault_rank=1)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job = re.search(r"submitted batch job (\d+)", result.stdout).group(1)
    (run_dir,) = (tmp_path / "outputs").iterdir()
    info = _wait(cluster, job, lambda i: i["JobState"] == "FAILED", 300, "FAILED")
    assert info["Restarts"] == "0" and info["ExitCode"] == "3:0"
    status = json.loads((run_dir / "run.json").read_text())
    assert (status["status"], status["exit_code"], status["node"], status["host"]) == ("failed", 3, 0, info["NodeList"])
    assert status["error"].startswith(f"rank {status['rank']} (node 0, {info['NodeList']}): ")
    assert "the loss is nan on rank 1" in status["error"] and status["slurm"]["job_id"] == job
