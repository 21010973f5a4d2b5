"""Signals in every phase of a run, and run.json that tells how the worker really ended."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.signals import oom_kills, pid_alive, worker_end
from tests.conftest import ROOT, run_cli

# Evaluation long enough (a few seconds on the tiny model) to be caught in the middle.
LONG_EVAL = ["eval.size=200", "eval.max_new_tokens=64", "eval.stop_on_repetition=false", "eval.batch_size=4"]


def _start(recipe, *args):
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", str(recipe), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for_phase(out: Path, phase: str, proc, timeout=300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list(out.iterdir()) if out.exists() else []
        if runs and _status(runs[0]).get("phase") == phase:
            return runs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"phase {phase} never seen")


@pytest.mark.parametrize("phase, args, resume_says", [
    ("loading", [], "starts the run from the beginning"),
    ("base evaluation", LONG_EVAL, "evaluates the base model again"),
    ("training", ["train.max_steps=200", "train.save_steps=1000", "eval.compare_base=false"], "continues from checkpoint-"),
    ("final evaluation", [*LONG_EVAL, "eval.compare_base=false"], "evaluates the saved adapter again, without training"),
])
def test_sigterm_stops_each_phase_with_a_true_status_and_143(tiny_recipe, tmp_path, phase, args, resume_says):
    out = tmp_path / "outputs"
    proc = _start(tiny_recipe, *args)
    run_dir = _wait_for_phase(out, phase, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 30  # promptly: the evaluation is not finished first
    assert proc.returncode == 143, stderr[-2000:]
    status = _status(run_dir)
    assert (status["status"], status["phase"], status["signal"], status["exit_code"]) == ("interrupted", phase, "SIGTERM", 143)
    assert resume_says in status["resume"] and "sftlaunch resume" in stdout
    assert not (run_dir / "eval.json").exists()
    if phase == "training":  # stopped after a step, with that step's checkpoint (save_steps is far away)
        assert 0 < status["step"] < 200 and (run_dir / "checkpoints" / f"checkpoint-{status['step']}").is_dir()

    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = _status(run_dir)
    assert final["status"] == "completed" and final["phase"] is None
    if phase == "final evaluation":  # training was done: the saved adapter is evaluated, not trained again
        assert "evaluating the saved adapter" in resumed.stdout and "resuming from" not in resumed.stdout
    if phase == "training":  # the resumed run went on from the checkpoint of the step it stopped at
        assert f"resuming from {run_dir / 'checkpoints'}/checkpoint-{status['step']}" in resumed.stdout
    steps = 200 if phase == "training" else 4
    assert json.loads((run_dir / "eval.json").read_text())["train"]["steps"] == steps


def test_a_sigterm_held_across_the_exec_into_the_final_evaluation_stops_it_there(tiny_recipe, tmp_path):
    # On one CPU process the worker replaces itself with the final evaluation's process (launcher.job): it blocks
    # SIGINT/SIGTERM first, so one that lands in that window waits, and the new process stops on it as soon as its
    # handlers are in place, instead of dying of the signal's default action or never seeing it.
    assert run_cli(str(tiny_recipe)).returncode == 0
    run_dir = next((tmp_path / "outputs").iterdir())
    hand_over = ("import os, signal, sys\nfrom launcher.signals import hold_stop_signals\nhold_stop_signals()\n"
                 "os.kill(os.getpid(), signal.SIGTERM)\n"
                 f"os.execv(sys.executable, [sys.executable, '-m', 'launcher.worker', {str(run_dir)!r}, '--final-evaluation'])")
    proc = subprocess.run([sys.executable, "-c", hand_over], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    status = _status(run_dir)
    assert (status["status"], status["phase"], status["signal"]) == ("interrupted", "final evaluation", "SIGTERM")
    assert "evaluates the saved adapter again, without training" in status["resume"]


def test_sigkill_of_the_worker_is_recorded_by_the_launcher_with_137(tiny_recipe, tmp_path):
    out = tmp_path / "outputs"
    proc = _start(tiny_recipe, "train.max_steps=400", "train.save_steps=200", "eval.compare_base=false")
    run_dir = _wait_for_phase(out, "training", proc)
    os.kill(_status(run_dir)["worker_pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 137, stderr[-2000:]  # 128 + 9, not Python's 247 for a returncode of -9
    status = _status(run_dir)
    assert status["status"] in ("killed", "out_of_memory") and status["signal"] == "SIGKILL" and status["exit_code"] == 137
    assert status["phase"] == "training"  # where it died
    assert "out-of-memory killer" in status["error"]


def test_resume_refuses_a_run_whose_worker_is_alive(tiny_recipe, tmp_path):
    out = tmp_path / "outputs"
    proc = _start(tiny_recipe, "train.max_steps=400", "train.save_steps=200", "eval.compare_base=false")
    try:
        run_dir = _wait_for_phase(out, "training", proc)
        second = run_cli("resume", str(run_dir))
        assert second.returncode == 2
        assert "still running" in second.stderr and f"pid {_status(run_dir)['worker_pid']}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert _status(run_dir)["status"] == "interrupted"


def test_worker_end_names_the_signal_and_the_conventional_exit_code():
    assert worker_end(-15, 0, 0) == {"status": "killed", "signal": "SIGTERM", "exit_code": 143,
                                     "error": "the worker was killed by SIGTERM before it could record its end"}
    killed = worker_end(-9, 3, 3)
    assert (killed["status"], killed["exit_code"]) == ("killed", 137) and "dmesg" in killed["error"]
    assert worker_end(-9, 3, 4)["status"] == "out_of_memory"  # the cgroup's kill count rose while it ran
    assert worker_end(-9, None, None)["status"] == "killed"  # unknown count: no claim either way
    crashed = worker_end(1, None, None)
    assert (crashed["status"], crashed["exit_code"]) == ("failed", 1)


def test_oom_kill_count_is_read_from_cgroup_v2_and_v1_and_is_none_when_unreadable(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "user.slice/job").mkdir(parents=True)
    (v2 / "user.slice/job/memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n")
    (tmp_path / "cgroup-v2").write_text("0::/user.slice/job\n")
    assert oom_kills(tmp_path / "cgroup-v2", v2) == 2

    v1 = tmp_path / "v1"
    (v1 / "memory/docker/abc").mkdir(parents=True)
    (v1 / "memory/docker/abc/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    (tmp_path / "cgroup-v1").write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert oom_kills(tmp_path / "cgroup-v1", v1) == 5

    assert oom_kills(tmp_path / "cgroup-v2", tmp_path / "nowhere") is None  # no memory.events to read
    assert oom_kills(tmp_path / "no-such-file", v2) is None  # not Linux, or no /proc


def test_pid_alive_checks_the_command_line_not_just_the_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # launcher.worker"])
    try:
        deadline = time.time() + 10  # /proc/PID/cmdline is empty for an instant after the start
        while not pid_alive(proc.pid, "launcher.worker") and time.time() < deadline:
            time.sleep(0.01)
        assert pid_alive(proc.pid, "launcher.worker")
        assert not pid_alive(proc.pid, "sftlaunch")  # a reused pid of another program is not our worker
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid, "launcher.worker")
    assert not pid_alive(None, "launcher.worker")


@pytest.mark.parametrize("name, content", [("plan.json", "{not json"), ("run.json", "[1, 2")])
def test_resume_and_eval_of_a_corrupt_run_directory_say_which_file(tiny_recipe, tmp_path, name, content):
    run = run_cli(str(tiny_recipe), "train.max_steps=1", "eval.limit=2", "eval.compare_base=false")
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = next((tmp_path / "outputs").iterdir())
    (run_dir / "run.json").write_text(json.dumps({"status": "interrupted"}))
    (run_dir / name).write_text(content)
    for args in (["resume", str(run_dir)], ["eval", str(run_dir)]):
        result = run_cli(*args)
        if name == "run.json" and args[0] == "eval":  # eval reads the plan and adapter only
            assert result.returncode == 0, result.stderr[-2000:]
            continue
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert name in result.stderr and "Fix:" in result.stderr and "Traceback" not in result.stderr
