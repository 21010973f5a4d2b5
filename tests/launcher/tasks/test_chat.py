"""The chat task through the real command: a tiny run end to end, and bad input stopped before a model loads."""

import json
import os

import pytest

from tests.conftest import ROOT, run_cli

SHIPPED = ROOT / "recipes" / "data" / "unit-conversion-chat.jsonl"
CONV = [{"role": "user", "content": "3 ft in m?"}, {"role": "assistant", "content": "0.9144"}]


def recipe(tmp_path, model, data, extra: str = "") -> str:  # the path of a written recipe
    path = tmp_path / "chat.yaml"
    path.write_text(f"""\
model:
  name: {model}
  lora: {{rank: 4, alpha: 8}}
data:
  task: chat
  path: {data}
  eval_fraction: 0.2
  max_length: 240
train:
  max_steps: 6
  effective_batch_size: 8
  learning_rate: 1.0e-2
  logging_steps: 1
eval:
  batch_size: 12
  max_new_tokens: 24
  metrics: [numeric]
output:
  dir: {tmp_path / 'outputs'}
{extra}""")
    return str(path)


def test_a_conversational_file_trains_an_adapter_that_lowers_the_held_out_loss(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SHIPPED.read_text().splitlines(keepends=True)[:120]))
    result = run_cli(recipe(tmp_path, tiny_model, data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "format messages (detected from the keys of its first row" in result.stderr
    (run,) = (tmp_path / "outputs").iterdir()
    comparison = json.loads((run / "comparison.json").read_text())
    assert comparison["loss_trained"] < comparison["loss_base"] and comparison["loss_p_value"] < 0.01
    assert comparison["loss_n"] == comparison["n"] == 23  # rows whose content hash is in the first fifth
    assert set(comparison["metrics"]) == {"numeric"} and "mcnemar_p_value" in comparison["metrics"]["numeric"]
    assert "held-out loss" in result.stdout and "Wilcoxon signed-rank p" in result.stdout
    preflight = json.loads((run / "preflight.json").read_text())
    roles = preflight["tokens_by_role"]
    assert roles["system"]["trained"] == roles["user"]["trained"] == 0 and roles["assistant"]["trained"] > 0
    assert preflight["formats"][0]["format"] == "messages" and preflight["split"]["eval_rows"] == 23

    # The adapter loads with plain PEFT, on a plain transformers model, and changes its output.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    batch = tok(tok.apply_chat_template([CONV], tokenize=False), return_tensors="pt", add_special_tokens=False)
    before = base(**batch).logits
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert not torch.allclose(model(**batch).logits, before)


def test_sftlaunch_eval_scores_a_chat_file_with_metrics_given_on_the_command_line(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} ft in m?", "completion": f"{i * 0.3048:g}"}) + "\n"
                            for i in range(1, 9)))
    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps({"generated": f"it is {i * 0.3048:g}" if i < 7 else "no idea"}) + "\n"
                            for i in range(1, 9)))
    result = run_cli("eval", recipe(tmp_path, tiny_model, data), "--data", str(data), "--metrics", "numeric,contains",
                     "--generations", str(gens), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"accuracy": 0.75, "answer_rate": 0.75, "n": 8}


BAD = [
    ("empty.jsonl", b"", "empty.jsonl: the file holds no rows. Fix: add rows"),
    ("d.jsonl", json.dumps({"messages": CONV[:1]}).encode() + b"\n", "d.jsonl:1: messages: has no assistant turn"),
    ("d.jsonl", b'{"messages": [{"role": "user", "content": "\xff"}]}\n', "d.jsonl:1: line: not UTF-8"),
    ("d.jsonl", json.dumps({"messages": [{"role": "narrator", "content": "x"}]}).encode() + b"\n",
     "d.jsonl:1: messages[0].role: unknown role 'narrator'"),
]


@pytest.mark.parametrize("name, content, message", BAD)
def test_bad_data_stops_the_run_with_exit_2_before_a_model_loads_and_makes_no_run_directory(tmp_path, tiny_model, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    result = run_cli(recipe(tmp_path, tiny_model, data))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_judge_that_does_not_import_stops_before_a_model_loads(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(40)))
    path = recipe(tmp_path, tiny_model, data)
    text = open(path).read().replace("metrics: [numeric]", "metrics: [judge]\n  judge: not_a_module.anywhere:check")
    open(path, "w").write(text)
    result = run_cli(path)
    assert result.returncode == 2
    assert "eval.judge=not_a_module.anywhere:check: cannot import not_a_module.anywhere" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_judge_that_raises_is_exit_2_naming_the_item(tmp_path, tiny_model):
    (tmp_path / "judges_raise.py").write_text("def check(reply, reference, row):\n    raise KeyError('grade')\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1 ft in m?", "completion": "0.3048"}) + "\n")
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"generated": "0.3"}) + "\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("eval", recipe(tmp_path, tiny_model, data), "--data", str(data), "eval.metrics=[judge]",
                     "eval.judge=judges_raise:check", "--generations", str(gens), env=env)
    assert result.returncode == 2
    assert f"eval.judge=judges_raise:check raised KeyError: 'grade' on {data}:1. Fix:" in result.stderr


def test_recipe_keys_of_the_chat_task_are_refused_for_other_tasks(tmp_path, tiny_recipe):
    result = run_cli("plan", str(tiny_recipe), "data.train_on=all", "eval.metrics=[exact]")
    assert result.returncode == 2
    assert "data.train_on set, but only data.task=chat reads it" in result.stderr


def _task_and_rows(tmp_path, on_truncation):
    from launcher.chat_data import to_example
    from launcher.recipe import validate_recipe
    from launcher.tasks import task_for

    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long " * 40}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe({"model": {"name": "x"}, "data": {"task": "chat", "path": str(data), "eval_fraction": 0.5,
                                                               "on_truncation": on_truncation}})
    return task_for(recipe), [to_example("messages", r, f"{data}:{i}") for i, r in enumerate(rows, 1)]


def test_a_conversation_whose_reply_would_be_cut_follows_on_truncation(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from launcher.errors import DataError

    tok = AutoTokenizer.from_pretrained(tiny_model)
    task, rows = _task_and_rows(tmp_path, "error")
    with pytest.raises(DataError, match=r"1 of 2 samples would lose trained tokens at data.max_length=40 \(the first is "
                                        r".*d.jsonl:2\). Fix: raise data.max_length to \d+, or set data.on_truncation=drop"):
        task.encode(rows, tok, 40)
    task, rows = _task_and_rows(tmp_path, "drop")
    features, report = task.encode(rows, tok, 40)
    assert len(features) == 1 and report.as_dict()["dropped_for_truncation"] == 1
    assert report.as_dict()["tokens_by_role"]["assistant"]["trained"] == len(tok("short", add_special_tokens=False)["input_ids"]) + 1


def test_plan_says_each_files_format_and_the_chat_decisions(tmp_path, tiny_model):
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(30)))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "Domain text."}) + "\n")
    path = recipe(tmp_path, tiny_model, f"[{alpaca}, {text}]")
    text_of_recipe = open(path).read()
    open(path, "w").write(text_of_recipe.replace("metrics: [numeric]", "metrics: []"))
    result = run_cli("plan", path, "data.train_on=last_assistant")
    assert result.returncode == 0, result.stderr
    assert f"data: {alpaca}: 30 rows, format alpaca (detected from the keys of its first row (instruction, output" in result.stderr
    assert f"data: {text}: 1 rows, format text" in result.stderr
    assert "train_on" in result.stdout and "loss on the last assistant turn only (data.train_on)" in result.stdout
    assert "eval_split" in result.stdout and "eval_metrics                = loss " in result.stdout
