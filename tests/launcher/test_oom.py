"""The out-of-memory back-off as a user meets it: the real CLI, a worker whose micro-batches above N fail."""

import json
import os
from pathlib import Path

import pytest

from launcher.oom import back_off
from tests.conftest import run_cli

FAULT = Path(__file__).parent / "oom_fault"  # its sitecustomize.py injects the error into every Python process


def _oom_above(rows: int) -> dict:
    return {"OOM_ABOVE_MICRO_BATCH": str(rows), "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT), os.environ.get("PYTHONPATH")]))}


def test_out_of_memory_halves_the_micro_batch_and_resumes(tiny_recipe, tmp_path):
    # Any micro-batch above 2 raises CUDA's out-of-memory error.
    result = run_cli(str(tiny_recipe), "train.save_steps=1", "eval.compare_base=false", "eval.limit=2", env=_oom_above(2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retrying from the last checkpoint with micro-batch 4 x accumulation 2" in result.stdout
    assert "retrying from the last checkpoint with micro-batch 2 x accumulation 4" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    backoff = [json.loads(line) for line in (run_dir / "oom_backoff.jsonl").read_text().splitlines()]
    assert [(b["from_micro_batch"], b["to_micro_batch"]) for b in backoff] == [(8, 4), (4, 2)]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"]) == (2, 4)
    assert json.loads((run_dir / "eval.json").read_text())["train"]["steps"] == 4


def test_out_of_memory_at_micro_batch_one_gives_up_clearly(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "eval.compare_base=false", env=_oom_above(0))
    assert result.returncode == 1
    assert "out of memory at micro-batch 1" in result.stderr and "data.max_length" in result.stderr
    assert "Traceback" not in result.stderr


def test_back_off_halves_the_micro_batch_keeps_the_effective_batch_and_records_why(tmp_path):
    from launcher.hardware import load_profile
    from launcher.oom import OutOfMemoryError
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe
    from launcher.rundir import RunDir
    from tests.conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["hardware.micro_batch_size=2"])
    plan = make_plan(recipe, load_profile("cpu-2core"))
    run_dir = RunDir(tmp_path)
    run_dir.write_status("out_of_memory", error="CUDA out of memory")
    smaller = back_off(plan, run_dir)
    assert (smaller.micro_batch_size, smaller.gradient_accumulation_steps) == (1, plan.gradient_accumulation_steps * 2)
    assert run_dir.read_plan() == smaller and "halved after out-of-memory at micro-batch 2" in smaller.decision("micro_batch_size").reason
    (line,) = (tmp_path / "oom_backoff.jsonl").read_text().splitlines()
    assert json.loads(line)["error"] == "CUDA out of memory"
    with pytest.raises(OutOfMemoryError, match="out of memory at micro-batch 1 .* Fix: lower data.max_length"):
        back_off(smaller, run_dir)
