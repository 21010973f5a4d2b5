"""`sftlaunch eval`: a recipe's base model or a run's trained model; mistakes found before any model loads."""

import json

import pytest

from launcher.errors import ConfigError
from launcher.eval_target import EvalRequest, run_eval
from launcher.hardware import HardwareInfo
from launcher.plan import make_plan
from launcher.recipe import validate_recipe
from launcher.rundir import RunDir
from tests.conftest import run_cli


def test_eval_of_a_recipe_uses_the_base_model(tiny_recipe):
    result = run_cli("eval", str(tiny_recipe), "--limit", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 3


@pytest.mark.parametrize("method, missing", [("lora", "adapter"), ("full", "model")])
def test_a_run_without_its_trained_output_and_other_mistakes_are_reported_together_before_loading(tmp_path, method, missing):
    recipe = validate_recipe({"model": {"name": "embedded:smollm2-135m-instruct", "method": method}})
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.write_plan(make_plan(recipe, HardwareInfo(cpu_cores=2, ram_gb=16, cpu_bf16=False)))
    req = EvalRequest(target=str(run_dir), compare="base", generations=str(tmp_path / "g.jsonl"),
                      predictions=str(tmp_path / "no-folder" / "p.jsonl"))
    with pytest.raises(ConfigError) as exc:
        run_eval(req)
    keys = {p.key: p.message for p in exc.value.problems}
    assert set(keys) == {"--predictions", "--compare"}  # scoring given generations needs no trained output
    with pytest.raises(ConfigError, match=f"TARGET: the run has no trained {missing} in {run_dir.path / missing}"):
        run_eval(EvalRequest(target=str(run_dir)))
