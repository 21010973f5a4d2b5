"""`sftlaunch export`: the merged model loads with plain transformers and generates what base + adapter do."""

import json

import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture
def trained_run(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "train.max_steps=6", "train.learning_rate=5e-3", "eval.compare_base=false", "eval.limit=4")
    assert result.returncode == 0, result.stderr[-2000:]
    return next((tmp_path / "outputs").iterdir())


def test_merged_export_generates_the_same_greedy_tokens_as_base_plus_adapter(trained_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data import format_prompt
    from launcher.rundir import RunDir
    from launcher.tasks import get_task

    out = tmp_path / "merged"
    result = run_cli("export", str(trained_run), str(out), "--merge", "--check", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["dtype"], info["merged_in"], info["generations_equal"], info["check_items"]) == ("fp32", "fp32", 10, 10)

    # Checked here independently of the export's own check: token ids, 10 evaluation items, fp32.
    plan = RunDir(trained_run).read_plan()
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [format_prompt(ex.question, tok, plan.recipe.data.prompt_format)
               for ex in get_task(plan.recipe.data.task).examples(plan.recipe, plan.data_path)[1][:10]]
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no PEFT, no sftlaunch
    base = AutoModelForCausalLM.from_pretrained(plan.recipe.model.name, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(RunDir(trained_run).adapter))
    assert merged.dtype == torch.float32 and all(torch.isfinite(p).all() for p in merged.parameters())
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            assert torch.equal(merged.generate(**ids, **kwargs), adapted.generate(**ids, **kwargs))
    # The adapter did change the model (else the test would prove nothing).
    with torch.inference_mode(), adapted.disable_adapter():
        plain = adapted(**tok(prompts[0], return_tensors="pt")).logits
    assert not torch.allclose(plain, merged(**tok(prompts[0], return_tensors="pt")).logits)


def test_export_never_overwrites_and_copies_the_adapter_without_merge(trained_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    refused = run_cli("export", str(trained_run), str(taken), "--merge")
    assert refused.returncode == 2 and "never overwrites" in refused.stderr and (taken / "keep.txt").read_text() == "mine"
    adapter = run_cli("export", str(trained_run), str(tmp_path / "adapter"))
    assert adapter.returncode == 0, adapter.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "export.json").read_text())["kind"] == "adapter"


def test_a_broken_adapter_is_never_exported_or_scored_as_fine(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = trained_run / "adapter" / "adapter_model.safetensors"
    original = load_file(weights)

    # Weights far beyond fp16's range: finite in fp32, inf once cast to fp16.
    save_file({k: (torch.full_like(v, 1e6) if "lora_B" in k else v) for k, v in original.items()}, weights)
    huge = run_cli("export", str(trained_run), str(tmp_path / "fp16"), "--merge", "--dtype", "fp16", "--check", "1")
    assert huge.returncode == 3 and "the merged model cast to fp16 has" in huge.stderr and "--dtype bf16 or fp32" in huge.stderr
    assert not (tmp_path / "fp16").exists()

    # NaN adapter weights: export wrote a model with NaN tensors and eval scored 0.000, both with exit 0.
    save_file({k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in original.items()}, weights)
    export = run_cli("export", str(trained_run), str(tmp_path / "merged"), "--merge", "--check", "1")
    assert export.returncode == 3 and "non-finite tensors of" in export.stderr and "Traceback" not in export.stderr
    assert not (tmp_path / "merged").exists()
    before = sorted(p.name for p in trained_run.iterdir())
    scored = run_cli("eval", str(trained_run), "--limit", "2")
    assert scored.returncode == 3 and "non-finite tensors of" in scored.stderr
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_unwritable_or_impossible_outputs_exit_74_naming_the_path(trained_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    # Under a file: refused before the merge (minutes on a real model), not a NotADirectoryError traceback.
    under_file = run_cli("export", str(trained_run), str(a_file / "out"), "--merge")
    assert under_file.returncode == 74 and str(a_file) in under_file.stderr and "Fix:" in under_file.stderr
    assert "Traceback" not in under_file.stderr
    # A place nothing can be written (procfs refuses even root): the copy fails, with the path and the fix.
    proc = run_cli("export", str(trained_run), "/proc/sftlaunch-export-test")
    assert proc.returncode == 74 and "/proc/sftlaunch-export-test" in proc.stderr and "Traceback" not in proc.stderr
    predictions = run_cli("eval", str(trained_run), "--limit", "1", "--predictions", "/proc/sftlaunch-predictions.jsonl")
    assert predictions.returncode == 74 and "--predictions" in predictions.stderr and "Traceback" not in predictions.stderr
