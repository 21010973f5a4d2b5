"""The worker entry point (`python -m launcher.worker RUN_DIR`): whatever ends it, run.json says so."""

import json
import signal
import subprocess
import sys

import pytest

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


@pytest.fixture
def in_process_worker(tmp_path, monkeypatch):
    """The worker's main() in this process, with `Run` replaced by the test's own (no plan, no model): what the
    worker makes of a signal that library code wrapped or swallowed. The process's handlers are put back after."""
    import launcher.job
    from launcher.process import Process
    from launcher.rundir import RunDir
    from launcher.worker import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(RunDir, "read_plan", lambda self: None)
    monkeypatch.setattr(RunDir, "write_versions", lambda self: None)

    def run(fake_run) -> tuple[int, dict]:
        monkeypatch.setattr(launcher.job, "Run", fake_run)
        code = main([str(tmp_path)], Process())
        return code, json.loads((tmp_path / "run.json").read_text())

    yield run
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_a_sigterm_that_python_wraps_while_an_import_defines_a_class_still_ends_the_run_interrupted(in_process_worker):
    # Python 3.11 turns an exception raised in a descriptor's __set_name__ into a RuntimeError; a SIGTERM that lands
    # while transformers' modules are being imported (the loading phase) once ended a run as "failed".
    class ImportsALibrary:
        def __init__(self, *args):
            pass

        def __call__(self):
            class Field:
                def __set_name__(self, owner, name):
                    signal.raise_signal(signal.SIGTERM)

            class Config:
                field = Field()

    code, status = in_process_worker(ImportsALibrary)
    assert code == 143
    assert (status["status"], status["phase"], status["signal"], status["exit_code"]) == ("interrupted", "loading",
                                                                                            "SIGTERM", 143)
    assert "starts the run from the beginning" in status["resume"]


def test_a_sigterm_that_library_code_swallowed_still_ends_the_run_interrupted(in_process_worker):
    class SwallowsIt:
        def __init__(self, plan, run_dir, process, resume, signals, *rest):
            pass

        def __call__(self):
            try:
                signal.raise_signal(signal.SIGTERM)
            except BaseException:  # a bare `except:` in a library
                pass
            return {"trained": {}, "train": {}}

    code, status = in_process_worker(SwallowsIt)
    assert code == 143
    assert (status["status"], status["phase"], status["signal"]) == ("interrupted", "loading", "SIGTERM")
