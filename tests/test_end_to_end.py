"""The real CLI, in fresh processes, on a tiny model built in the test and on the embedded SmolLM2."""

import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

RUN_FILES = {"recipe.yaml", "plan.json", "hardware.json", "versions.json", "run.json", "preflight.json", "metrics.jsonl",
             "eval.json", "predictions.jsonl", "predictions-base.jsonl", "adapter"}


def _only_run_dir(out: Path) -> Path:
    (run_dir,) = list(out.iterdir())
    return run_dir


def test_train_and_evaluate_tiny_model_end_to_end(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision" in result.stdout and "# " in result.stdout  # the plan with reasons is printed
    assert "pre-flight: 48 samples" in result.stdout
    assert "trained" in result.stdout and "answer_rate" in result.stdout

    run_dir = _only_run_dir(tmp_path / "outputs")
    assert run_dir.name.startswith("tiny-")
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}

    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["backend"] == "cpu" and plan["recipe"]["train"]["max_steps"] == 4
    assert {d["field"] for d in plan["decisions"]} >= {"backend", "precision", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "threads"}
    assert "learning_rate: 0.001" in (run_dir / "recipe.yaml").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "versions.json").read_text())["transformers"].startswith("5.")

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(m["grad_norm"]) and math.isfinite(m["loss"]) and m["loss"] > 0 for m in steps)
    assert all("learning_rate" in m for m in steps)

    ev = json.loads((run_dir / "eval.json").read_text())
    for name in ("base", "trained"):
        assert ev[name]["n"] == 12 and 0 <= ev[name]["accuracy"] <= ev[name]["answer_rate"] <= 1
        assert set(ev[name]["groups"]) == {"seen_phrasing", "unseen_phrasing"}
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12
    assert set(preds[0]) >= {"question", "reference", "generated", "parsed", "correct"}

    # The adapter loads with plain PEFT.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan_model = plan["recipe"]["model"]["name"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan_model), str(run_dir / "adapter"))
    assert any("lora_" in n for n, _ in model.named_parameters())

    # `sftlaunch eval RUN_DIR` on a data file of [question, answer] pairs.
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([["Convert 2 km to m.", 2000], ["How many feet are in 1 yard?", 3], ["1 h in min", "60"]]))
    pred_file = tmp_path / "p.jsonl"
    result = run_cli("eval", str(run_dir), "--data", str(data), "--limit", "2", "--predictions", str(pred_file), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["n"] == 2 and set(last) == {"accuracy", "answer_rate", "n"}
    assert len(pred_file.read_text().splitlines()) == 2


def test_eval_of_a_recipe_uses_the_base_model(tiny_recipe):
    result = run_cli("eval", str(tiny_recipe), "--limit", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 3


def test_unreachable_hub_model_names_the_embedded_alternative(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "model.name=Qwen/Qwen2.5-0.5B-Instruct", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "embedded:smollm2-135m-instruct" in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = _only_run_dir(tmp_path / "outputs")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and "Qwen/Qwen2.5-0.5B-Instruct" in status["error"]


def test_plan_json_for_a_profile():
    result = run_cli("plan", str(ROOT / "recipes" / "unit-conversion.yaml"), "--hardware", "a10g-24gb", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["backend"], data["precision"], data["world_size"]) == ("cuda", "bf16", 1)
    assert data["micro_batch_size"] * data["gradient_accumulation_steps"] == 16


@pytest.mark.slow
def test_short_run_on_the_embedded_model(tmp_path):
    """The real pretrained SmolLM2-135M-Instruct: a few LoRA steps, evaluated on a few held-out items."""
    result = run_cli(str(ROOT / "recipes" / "unit-conversion.yaml"), "data.train_size=32", "train.max_steps=2",
                     "train.logging_steps=1", "eval.size=6", f"output.dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = _only_run_dir(tmp_path)
    ev = json.loads((run_dir / "eval.json").read_text())
    # The base model never writes the <answer> tag with a plain prompt (ENVIRONMENT.md): answer_rate 0.
    assert ev["base"]["answer_rate"] == 0.0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["grad_norm"]) for s in steps if "grad_norm" in s)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
