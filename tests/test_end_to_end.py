"""The real CLI, in fresh processes, on a tiny model built in the test and on the embedded SmolLM2."""

import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

RUN_FILES = {"comparison.json", "recipe.yaml", "plan.json", "hardware.json", "versions.json", "run.json", "preflight.json", "metrics.jsonl",
             "eval.json", "predictions.jsonl", "predictions-base.jsonl", "adapter"}


def _only_run_dir(out: Path) -> Path:
    (run_dir,) = list(out.iterdir())
    return run_dir


def test_train_and_evaluate_tiny_model_end_to_end(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision" in result.stdout and "# " in result.stdout  # the plan with reasons is printed
    assert "pre-flight: 48 samples" in result.stdout
    assert "Setting accelerator" not in result.stdout + result.stderr  # DeepSpeed, installed but unused, stays quiet

    run_dir = _only_run_dir(tmp_path / "outputs")
    assert run_dir.name.startswith("tiny-")
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}

    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["backend"] == "cpu" and plan["recipe"]["train"]["max_steps"] == 4
    assert {d["field"] for d in plan["decisions"]} >= {"backend", "precision", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "threads"}
    assert "learning_rate: 0.001" in (run_dir / "recipe.yaml").read_text()
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "completed"
    assert json.loads((run_dir / "versions.json").read_text())["transformers"].startswith("5.")
    # Every phase's measured seconds and peak memory beside the plan's prediction (launcher.timing, launcher.phases).
    predicted = plan["predicted_seconds"]
    assert predicted["total"] == pytest.approx(sum(predicted[k] for k in ("loading", "base_eval", "training", "final_eval")), abs=0.2)
    for phase in ("loading", "base_eval", "training", "final_eval"):
        measured = status["phases"][phase]
        assert measured["seconds"] > 0 and measured["predicted_seconds"] == predicted[phase] > 0
        assert measured["time_ratio"] == pytest.approx(measured["seconds"] / measured["predicted_seconds"], abs=0.01)
        assert measured["peak_memory_gib"] > 0.1  # the process's resident set: at least the libraries' own
    for phase in ("base_eval", "training", "final_eval"):
        measured = status["phases"][phase]
        assert measured["predicted_memory_gib"] == plan["predicted_memory_gib"][phase]
        assert measured["memory_ratio"] == pytest.approx(measured["peak_memory_gib"] / measured["predicted_memory_gib"], abs=0.01)
    assert json.loads((run_dir / "eval.json").read_text())["phases"] == status["phases"]
    # One CPU process: the final evaluation ran in a fresh process (plan.final_eval_fresh), which started with nothing
    # of training's memory, under the same process id the launcher waited on.
    final = status["phases"]["final_eval"]
    assert plan["final_eval_fresh"] and final["fresh_process"] is True
    assert "final evaluation: in a fresh process" in result.stdout
    assert final["start_memory_gib"] < status["phases"]["training"]["start_memory_gib"] / 2
    listed = run_cli("runs", str(tmp_path / "outputs"))
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[-6:] == ["time", "vs", "plan", "memory", "vs", "plan"]
    assert all(cell.endswith("x") and float(cell[:-1]) > 0 for cell in listed.stdout.splitlines()[1].split()[-2:])

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(m["grad_norm"]) and math.isfinite(m["loss"]) and m["loss"] > 0 for m in steps)
    assert all("learning_rate" in m for m in steps)
    # Training progress: tokens seen (padding excluded), tokens/s and the ETA from the measured rate.
    assert all(m["num_input_tokens_seen"] > 0 and m["train_tokens_per_second"] > 0 for m in steps)
    assert [m["num_input_tokens_seen"] for m in steps] == sorted({m["num_input_tokens_seen"] for m in steps})
    assert steps[-1]["eta_seconds"] == 0 and all(m["eta_seconds"] > 0 for m in steps[:-1])
    # The training phase's peak so far at every logged step: never falling, ending at the phase's recorded peak.
    peaks = [m["peak_memory_gib"] for m in steps]
    assert peaks == sorted(peaks) and peaks[0] > 0.1
    assert peaks[-1] <= status["phases"]["training"]["peak_memory_gib"]

    from launcher.evaluate import format_metrics

    ev = json.loads((run_dir / "eval.json").read_text())
    for name, file in (("base", "predictions-base.jsonl"), ("trained", "predictions.jsonl")):
        assert ev[name]["n"] == 12 and 0 <= ev[name]["accuracy"] <= ev[name]["answer_rate"] <= 1
        assert set(ev[name]["groups"]) == {"seen_phrasing", "unseen_phrasing"}
        # What the user read is what was recorded, and the recorded accuracy is that of the predictions.
        assert format_metrics(name, ev[name]) in result.stdout
        preds = [json.loads(line) for line in (run_dir / file).read_text().splitlines()]
        assert len(preds) == 12 and set(preds[0]) >= {"question", "reference", "generated", "parsed", "correct"}
        assert sum(p["correct"] for p in preds) == round(ev[name]["accuracy"] * 12)

    # The adapter loads with plain PEFT, and training moved it: LoRA's B matrices start at zero.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan_model = plan["recipe"]["model"]["name"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan_model), str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)

    # `sftlaunch eval RUN_DIR` on a data file of [question, answer] pairs.
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([["Convert 2 km to m.", 2000], ["How many feet are in 1 yard?", 3], ["1 h in min", "60"]]))
    pred_file = tmp_path / "p.jsonl"
    result = run_cli("eval", str(run_dir), "--data", str(data), "--limit", "2", "--predictions", str(pred_file), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    # loss: the held-out loss of the items; how it decoded; why answers were wrong
    assert last["n"] == 2 and set(last) == {"accuracy", "answer_rate", "loss", "n", "decoding", "error_kinds"}
    assert last["decoding"] == {"method": "greedy", "max_new_tokens": 16, "stop_on_repetition": True, "calculator": False}
    assert sum(last["error_kinds"].values()) == 2
    assert len(pred_file.read_text().splitlines()) == 2


def test_unreachable_hub_model_names_the_embedded_alternative(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "model.name=Qwen/Qwen2.5-0.5B-Instruct", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "embedded:smollm2-135m-instruct" in result.stderr
    assert "Traceback" not in result.stderr and "Qwen/Qwen2.5-0.5B-Instruct" in result.stderr
    # Refused by the launcher before a run directory exists (it used to be found by the worker, in a run directory).
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").iterdir())


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


def test_time_budget_stops_saves_and_still_evaluates(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "train.max_steps=100000", "train.max_time=3s", "eval.limit=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget train.max_time=3s ran out" in result.stdout
    run_dir = _only_run_dir(tmp_path / "outputs")
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["train"]["cut_by_time_budget"] is True and 1 <= ev["train"]["steps"] < 100000
    assert ev["trained"]["n"] == 3
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_smoke_run_is_capped_and_marked(tiny_recipe, tmp_path):
    result = run_cli("run", str(tiny_recipe), "--smoke", "train.max_steps=1000", "eval.size=30")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = _only_run_dir(tmp_path / "outputs")
    assert run_dir.name.endswith("-smoke")
    assert json.loads((run_dir / "run.json").read_text())["smoke"] is True
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["train"]["steps"] == 10 and ev["trained"]["n"] == 10


def test_comparison_counts_are_consistent(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "right only here" in result.stdout
    run_dir = _only_run_dir(tmp_path / "outputs")
    c = json.loads((run_dir / "comparison.json").read_text())
    base = [json.loads(line) for line in (run_dir / "predictions-base.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert c["only_base_correct"] == sum(b["correct"] and not t["correct"] for b, t in zip(base, trained))
    assert c["both_correct"] + c["only_trained_correct"] == round(c["trained"]["accuracy"] * c["n"])
    own = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # `eval --compare` on the run directory recomputes it on the same items, into a new file: it replaced the run's
    # own comparison.json (150 items) with one of --limit items.
    result = run_cli("eval", str(run_dir), "--compare", "--limit", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = (run_dir / "evaluations").iterdir()
    assert f"comparison written to {written}" in result.stdout
    again = json.loads(written.read_text())
    assert again["n"] == 4 and again["base_model"] == c["base_model"]
    # --predictions never writes over a run's own files, and replaces another file only with --force.
    refused = run_cli("eval", str(run_dir), "--limit", "1", "--predictions", str(run_dir / "predictions.jsonl"), "--force")
    assert refused.returncode == 2 and "never writes over a run's own results" in refused.stderr
    taken = tmp_path / "mine.jsonl"
    taken.write_text("keep\n")
    refused = run_cli("eval", str(run_dir), "--limit", "1", "--predictions", str(taken))
    assert refused.returncode == 2 and "--force" in refused.stderr and taken.read_text() == "keep\n"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == own
    forced = run_cli("eval", str(run_dir), "--limit", "1", "--predictions", str(taken), "--force")
    assert forced.returncode == 0 and len(taken.read_text().splitlines()) == 1


def test_scoring_gsm8k_reference_solutions_gives_accuracy_one(tmp_path):
    from launcher.tasks.gsm8k import BUNDLED as gsm8k
    rows = [json.loads(line) for line in (gsm8k / "test.jsonl").read_text().splitlines()]
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"generated": r["answer"]}) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    result = run_cli("eval", str(ROOT / "recipes" / "gsm8k.yaml"), f"data.path={gsm8k}", "--all",
                     "--generations", str(gens), "--predictions", str(preds), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "accuracy": 1.0, "answer_rate": 1.0, "n": 1319,
        "error_kinds": {"correct": 1319, "no_answer": 0, "wrong_arithmetic": 0, "wrong_expressions": 0, "wrong_unannotated": 0}}
    assert len(preds.read_text().splitlines()) == 1319
    gens.write_text(json.dumps({"generated": "#### 1"}) + "\n")
    result = run_cli("eval", str(ROOT / "recipes" / "gsm8k.yaml"), f"data.path={gsm8k}", "--all", "--generations", str(gens))
    assert result.returncode == 2 and "1 generations for 1319 items" in result.stderr


def test_calculator_writes_results_for_base_and_trained_alike(tiny_recipe, tiny_calculator_model, tmp_path):
    result = run_cli(str(tiny_recipe), f"model.name={tiny_calculator_model}", "data.calculator_annotations=true",
                     "eval.calculator=true", "eval.max_new_tokens=48", "eval.size=24", "eval.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = _only_run_dir(tmp_path / "outputs")
    ev = json.loads((run_dir / "eval.json").read_text())
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["decoding"]["calculator"] is True
    assert ev["base"]["decoding"] == ev["trained"]["decoding"] == comparison["decoding"]
    for name, file in (("base", "predictions-base.jsonl"), ("trained", "predictions.jsonl")):
        preds = [json.loads(line) for line in (run_dir / file).read_text().splitlines()]
        used = [p for p in preds if p["calculator"]["calls"]]
        assert used, name  # the model writes `<<EXPR=` and the calculator answered some
        assert ev[name]["calculator_calls"] == sum(p["calculator"]["calls"] for p in preds)
        for p in used:  # the marked text is the generated text with the calculator's spans in marks
            assert "\u27e6" in p["calculator"]["marked"]
            assert p["calculator"]["marked"].replace("\u27e6", "").replace("\u27e7", "") == p["generated"]
        assert sum(ev[name]["error_kinds"].values()) == 24 == sum(1 for p in preds if p["error_kind"])


def test_gsm8k_recipe_trains_a_tiny_model_offline_on_the_bundled_copy(tiny_recipe, tmp_path):
    # No data.path and no Hub (HF_HUB_OFFLINE=1 in conftest): the plan says it uses the bundled copy.
    result = run_cli(str(tiny_recipe), "data.task=gsm8k", "data.max_samples=16",
                     "data.max_length=auto", "eval.limit=4", "eval.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_length                  = 512" in result.stdout
    assert "data_source                 = bundled" in result.stdout and "Hugging Face Hub is not reachable" in result.stdout
    run_dir = _only_run_dir(tmp_path / "outputs")
    assert json.loads((run_dir / "preflight.json").read_text())["samples"] == 16
    assert json.loads((run_dir / "comparison.json").read_text())["n"] == 4


def test_hub_model_in_gsm8k_recipe_offline_names_the_embedded_model(tmp_path):
    result = run_cli(str(ROOT / "recipes" / "gsm8k.yaml"), f"output.dir={tmp_path}", 
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "embedded:smollm2-135m-instruct" in result.stderr and "Traceback" not in result.stderr
