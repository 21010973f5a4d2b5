"""The out-of-memory back-off as a user meets it: the real CLI, a worker whose micro-batches above N fail."""

import json

import pytest

from launcher.oom import back_off
from tests.conftest import ROOT, fault_env, run_cli


def _oom_above(rows: int) -> dict:
    return fault_env(oom_above_micro_batch=rows)


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
    assert result.returncode == 75  # the README's exit code for out of memory (it was 1, which means a bug)
    assert "out of memory at micro-batch 1" in result.stderr and "data.max_length" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    status = json.loads((run_dir / "run.json").read_text())
    assert (status["status"], status["phase"], status["exit_code"]) == ("out_of_memory", "training", 75)


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


def _plan():
    from launcher.hardware import load_profile
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    return make_plan(load_recipe(ROOT / "recipes" / "unit-conversion.yaml", []), load_profile("t4-16gb"))


@pytest.mark.parametrize("phase", ["base evaluation", "final evaluation"])
def test_out_of_memory_while_evaluating_does_not_halve_the_training_batch(phase):
    # Halving the micro-batch and resuming re-ran the same evaluation into the same out-of-memory until micro-batch 1.
    from launcher.oom import EXIT_OUT_OF_MEMORY, OutOfMemoryError, no_back_off

    plan = _plan()
    with pytest.raises(OutOfMemoryError) as err:
        no_back_off(plan, {"phase": phase, "error": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    text = str(err.value)
    assert f"during {phase}" in text and f"eval.batch_size (now {plan.recipe.eval.batch_size})" in text
    assert err.value.exit_code == EXIT_OUT_OF_MEMORY == 75


def test_out_of_memory_while_loading_names_other_fixes_and_training_backs_off():
    from launcher.errors import SftlaunchError
    from launcher.oom import no_back_off

    with pytest.raises(SftlaunchError, match="during loading.*ZeRO-3"):
        no_back_off(_plan(), {"phase": "loading", "error": "CUDA out of memory"})
    assert no_back_off(_plan(), {"phase": "training"}) is None
