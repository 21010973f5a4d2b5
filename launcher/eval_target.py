"""`sftlaunch eval`: evaluate a run directory's adapter or a recipe's base model, or score given generations."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from launcher import evaluate as ev
from launcher.errors import ConfigError, Problem
from launcher.recipe import Recipe


@dataclass(frozen=True)
class EvalRequest:
    target: str
    overrides: tuple[str, ...] = ()
    data_file: str | None = None
    limit: int | None = None
    all_items: bool = False
    compare: str | None = None  # "base": the target's base model; else another model reference
    generations: str | None = None
    predictions: str | None = None


def _target_recipe(target: str, overrides) -> tuple[Recipe, Path | None]:
    from launcher.plan import Plan
    from launcher.recipe import load_recipe, merge_overrides, validate_recipe

    path = Path(target)
    if not path.is_dir():
        return load_recipe(path, overrides), None
    if not (path / "plan.json").is_file():
        raise ConfigError([Problem("TARGET", "not a run directory (no plan.json)", "pass a run directory or a recipe", got=target)])
    recipe = Plan.model_validate_json((path / "plan.json").read_text()).recipe
    if overrides:
        data = recipe.model_dump(mode="json")
        merge_overrides(data, overrides)
        recipe = validate_recipe(data, str(path / "plan.json"))
    return recipe, path


def _items(recipe: Recipe, req: EvalRequest):
    from launcher.tasks import get_task

    task = get_task(recipe.data.task)
    if req.data_file:
        items = task.load_file(req.data_file)
    else:
        from launcher.hardware import detect
        from launcher.plan import choose_data_source

        data_path, why = choose_data_source(recipe, detect())
        if why and data_path:
            print(f"data: {why}", flush=True)
        items = task.examples(recipe, data_path)[1]
        if recipe.eval.limit and not req.all_items:
            items = items[: recipe.eval.limit]
    if req.limit:
        items = items[: req.limit]
    return task, items


def run_eval(req: EvalRequest) -> dict:
    """Metrics of the target (and of the comparison model); writes predictions and comparison.json."""
    recipe, run_dir = _target_recipe(req.target, req.overrides)
    task, items = _items(recipe, req)
    if req.generations:
        if req.compare:
            raise ConfigError([Problem("--compare", "cannot compare when scoring given generations", "drop one of them")])
        result, records = ev.score(task, items, ev.read_generations(req.generations))
        if req.predictions:
            ev.write_predictions(req.predictions, records)
        return {"result": result}

    from launcher.hardware import detect
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.plan import make_plan

    import torch

    # Device and precision are decided as training would decide them on this machine.
    plan = make_plan(recipe, detect())
    torch.set_num_threads(plan.threads)
    kwargs = ev.settings(recipe, plan)
    model_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_path, plan.trust_remote_code)
    model = load_model(model_path, plan.trust_remote_code)
    adapter = None
    if run_dir is not None:
        adapter = run_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError([Problem("TARGET", f"the run has no trained adapter in {adapter}", "evaluate a finished run", got=req.target)])
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(plan.device)

    out: dict = {}
    t0 = time.time()
    out["result"], records = ev.evaluate(model, tokenizer, task, items, label="evaluating", **kwargs)
    out["result"]["seconds"] = round(time.time() - t0, 1)
    if req.predictions:
        ev.write_predictions(req.predictions, records)
    if req.compare:
        if req.compare == "base":
            if adapter is None:
                raise ConfigError([Problem("--compare", "a recipe's target already is its base model", "pass a run directory, or --compare MODEL")])
            with model.disable_adapter():
                base_metrics, base_records = ev.evaluate(model, tokenizer, task, items, label="evaluating base", **kwargs)
        else:
            other_path = resolve_model(req.compare)
            other = load_model(other_path, plan.trust_remote_code).to(plan.device)
            other_tokenizer = load_tokenizer(other_path, plan.trust_remote_code)  # another model, its own vocabulary
            base_metrics, base_records = ev.evaluate(other, other_tokenizer, task, items, label="evaluating base", **kwargs)
        comparison = ev.compare(base_records, records)
        comparison["base_model"] = recipe.model.name if req.compare == "base" else req.compare
        out["comparison"] = comparison
        if run_dir is not None:
            (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    return out
