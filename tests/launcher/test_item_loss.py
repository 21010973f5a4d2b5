"""Held-out loss per item: the model's own mean NLL of the trained-on tokens, batched without changing it."""

import pytest

from launcher.chat_data import to_example


def test_item_loss_is_the_models_own_loss_of_the_labelled_tokens_batched_or_not(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.chat_encode import encode
    from launcher.item_loss import item_losses

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [to_example("prompt_completion", {"prompt": f"{i} ft in m?" + " please" * i, "completion": f"{i * 0.3048:g} m"},
                       f"f:{i}") for i in range(1, 6)]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in encode(rows, tok, "assistant")]
    batched = item_losses(model, tok, features, device="cpu")
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.item()
                 for f in features]
    assert batched == pytest.approx(alone, rel=1e-4)
    assert len({round(x, 4) for x in batched}) == 5  # one loss per item, not the batch's mean


def test_evaluation_without_metrics_measures_the_loss_only_and_compares_it(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import evaluate as ev
    from launcher.recipe import validate_recipe
    from launcher.tasks import task_for

    recipe = validate_recipe({"model": {"name": str(tiny_model)}, "data": {"task": "chat", "path": "x.jsonl"}})
    task = task_for(recipe)
    assert not task.generates
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [to_example("messages", {"messages": [{"role": "user", "content": f"{i} ft in m?"},
                                                 {"role": "assistant", "content": f"{i * 0.3048:g}"}]}, f"f:{i}")
            for i in range(1, 9)]
    result, records = ev.evaluate(model, tok, task, rows, prompt_format="plain", batch_size=4, max_new_tokens=8, device="cpu")
    assert result["n"] == 8 and "accuracy" not in result and result["loss"] > 0
    assert all(r["generated"] is None and r["loss"] > 0 for r in records)
    better = [{**r, "loss": r["loss"] / 2} for r in records]
    c = ev.compare(records, better)
    assert c["loss_p_value"] == pytest.approx(2 / 2**8) and "mcnemar_p_value" not in c
    assert ev.format_comparison(c).splitlines()[1].startswith("held-out loss")
