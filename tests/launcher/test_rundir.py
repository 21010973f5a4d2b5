import ast
import json
import math
from pathlib import Path

import pytest

from launcher.errors import PlanError
from launcher.rundir import RunDir
from tests.conftest import ROOT


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


def test_checkpoints_are_listed_in_step_order_without_the_staging_folder_and_parsed_in_one_place(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.last_checkpoint() is None
    for name in ("checkpoint-10", "checkpoint-9", RunDir.STAGING, "checkpoint-x", "notes"):
        (run_dir.checkpoints / name).mkdir(parents=True)
    assert run_dir.last_checkpoint() == run_dir.checkpoints / "checkpoint-10"  # 10 after 9: by number, not by name
    assert RunDir.checkpoint_step(run_dir.last_checkpoint()) == 10
    assert RunDir.checkpoint_name(7) == "checkpoint-7" and RunDir.checkpoint_step(RunDir.checkpoint_name(7)) == 7
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        RunDir.checkpoint_step(run_dir.checkpoints / RunDir.STAGING)


def _spelled_names(path: Path) -> list[tuple[int, str]]:
    """String constants of a module (f-string pieces included), docstrings left out: prose may name files."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_rundir_spells_a_run_directory_name():
    names = {value for key, value in vars(RunDir).items() if key.isupper() and isinstance(value, str)}
    assert {"plan.json", "metrics.jsonl", "training.png", "mlruns", RunDir.STAGING} <= names
    # File names (with a dot) are looked for anywhere in a string; folder names that are also ordinary words
    # (adapter, model, tensorboard and wandb are tracker names too) only as a whole string.
    anywhere = {n for n in names if "." in n} | {"checkpoint-"}
    whole = {"checkpoints", "plots", "mlruns"}
    offenders = []
    for path in sorted((ROOT / "launcher").rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for line, text in _spelled_names(path):
            if text in whole or any(n in text for n in anywhere):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert offenders == []
