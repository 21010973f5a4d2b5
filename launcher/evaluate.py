"""Batched greedy generation and scoring: accuracy and answer_rate, per item and per group."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from launcher.data import format_prompt
from launcher.tasks import unit_conversion as uc
from launcher.tasks.unit_conversion import Example


def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device: str,
             precision: str = "fp32", label: str = "generating") -> list[str]:
    """Greedy continuations of each prompt, batched with left padding and the KV cache."""
    import torch
    from rich.progress import Progress

    # Left padding: every row's last prompt token sits at the same position, where generation starts.
    tokenizer.padding_side = "left"
    # Longest prompts first, so batches hold similar lengths and little padding; order restored below.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: dict[int, str] = {}
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.eval()
    with Progress(transient=True) as progress, torch.inference_mode():
        task = progress.add_task(label, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
            progress.advance(task, len(idx))
    tokenizer.padding_side = "right"
    return [outputs[i] for i in range(len(prompts))]


def score(examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
    """Metrics over all items and per group, and one prediction record per item."""
    records = []
    for ex, text in zip(examples, generated, strict=True):
        value = uc.parse_answer(text)
        records.append({"question": ex.question, "reference": ex.reference, "generated": text, "parsed": value,
                        "correct": uc.is_correct(value, ex.reference), "group": ex.group})
    return metrics(records), records


def metrics(records: list[dict]) -> dict:
    def summary(rows: list[dict]) -> dict:
        n = len(rows)
        return {"accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
                "answer_rate": sum(r["parsed"] is not None for r in rows) / n if n else 0.0, "n": n}

    out = summary(records)
    groups = defaultdict(list)
    for r in records:
        groups[r["group"]].append(r)
    if len(groups) > 1:
        out["groups"] = {g: summary(rows) for g, rows in sorted(groups.items())}
    return out


def evaluate(model, tokenizer, examples: list[Example], *, prompt_format: str, batch_size: int, max_new_tokens: int,
             device: str, precision: str = "fp32", label: str = "evaluating") -> tuple[dict, list[dict]]:
    prompts = [format_prompt(ex.question, tokenizer, prompt_format) for ex in examples]
    generated = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         device=device, precision=precision, label=label)
    return score(examples, generated)


def write_predictions(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def format_metrics(name: str, m: dict) -> str:
    line = f"{name:>8}: accuracy {m['accuracy']:.3f}  answer_rate {m['answer_rate']:.3f}  (n={m['n']})"
    for group, g in m.get("groups", {}).items():
        line += f"\n{'':>10}{group}: accuracy {g['accuracy']:.3f}  answer_rate {g['answer_rate']:.3f}  (n={g['n']})"
    return line


def evaluate_target(target: str, overrides, data_file: str | None, limit: int | None, predictions: str | None) -> dict:
    """`sftlaunch eval`: TARGET is a run directory (base model + its adapter) or a recipe (base model only)."""
    from launcher.data import build_examples, load_pairs_file
    from launcher.errors import ConfigError, Problem
    from launcher.hardware import detect
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.plan import Plan, make_plan
    from launcher.recipe import load_recipe, merge_overrides, validate_recipe

    path = Path(target)
    adapter = None
    if path.is_dir():
        if not (path / "plan.json").is_file():
            raise ConfigError([Problem("TARGET", "not a run directory (no plan.json)", "pass a run directory or a recipe", got=target)])
        recipe = Plan.model_validate_json((path / "plan.json").read_text()).recipe
        if overrides:
            data = recipe.model_dump(mode="json")
            merge_overrides(data, overrides)
            recipe = validate_recipe(data, str(path / "plan.json"))
        adapter = path / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError([Problem("TARGET", f"the run has no trained adapter in {adapter}", "evaluate a finished run", got=target)])
    else:
        recipe = load_recipe(path, overrides)
    # Decide device and precision the same way training would on this machine.
    plan = make_plan(recipe, detect())
    examples = load_pairs_file(data_file, recipe.data.target_style) if data_file else build_examples(recipe)[1]
    if limit:
        examples = examples[:limit]

    import torch

    torch.set_num_threads(plan.threads)
    model_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_path, plan.trust_remote_code)
    model = load_model(model_path, plan.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(plan.device)
    result, records = evaluate(model, tokenizer, examples, prompt_format=recipe.data.prompt_format,
                               batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
                               device=plan.device, precision=plan.precision)
    if predictions:
        write_predictions(predictions, records)
    return result
