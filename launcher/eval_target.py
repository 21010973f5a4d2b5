"""`sftlaunch eval`: evaluate a run directory's trained model or a recipe's base model, or score given generations."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from launcher import evaluate as ev
from launcher.errors import ConfigError, Problem, writing
from launcher.jsonl import write_jsonl
from launcher.recipe import Recipe
from launcher.trained import load_trained, output_word

if TYPE_CHECKING:
    from launcher.rundir import RunDir


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
    force: bool = False  # --predictions may replace an existing file (never one of a run directory's own)


def _target_recipe(target: str, overrides) -> tuple[Recipe, RunDir | None]:
    from launcher.recipe import load_recipe, merge_overrides, validate_recipe
    from launcher.rundir import RunDir

    if not Path(target).is_dir():
        return load_recipe(target, overrides), None
    run_dir = RunDir(target)
    if not run_dir.has_plan():
        raise ConfigError([Problem("TARGET", f"not a run directory (no {RunDir.PLAN})", "pass a run directory or a recipe", got=target)])
    recipe = run_dir.read_plan().recipe
    if overrides:
        data = recipe.model_dump(mode="json")
        try:
            merge_overrides(data, overrides)
            recipe = validate_recipe(data, str(run_dir.file(RunDir.PLAN)))
        except RecursionError:
            raise ConfigError([Problem("overrides", "nested too deeply to read", "an override sets one value, e.g. eval.limit=50")]) from None
    return recipe, run_dir


def _items(recipe: Recipe, req: EvalRequest, plan):
    from launcher.data import limit_eval
    from launcher.tasks import task_for

    task = task_for(recipe)
    if req.data_file:
        items = task.load_file(req.data_file)
    else:
        for d in plan.decisions:
            if d.field == "data_source" and plan.data_path:
                print(f"data: {d.reason}", flush=True)
        items = task.eval_examples(recipe, plan.data_path)  # the training split is not needed
        if not req.all_items:
            items = limit_eval(items, recipe)
    if req.limit:
        items = items[: req.limit]
    return task, items


def _check_request(req: EvalRequest, run_dir) -> None:
    """Mistakes in the request, found before any model loads or generates (minutes on a real evaluation)."""
    problems = []
    if req.predictions:
        from launcher.rundir import RunDir

        target = Path(req.predictions).expanduser()
        folder = target.resolve().parent
        if RunDir(folder).has_plan() and RunDir(folder).own_file(target):
            problems.append(Problem("--predictions", f"names {target.name}, a file of the run directory {folder}; sftlaunch "
                                    "never writes over a run's own results", "write it elsewhere", got=req.predictions))
        elif target.exists() and not req.force:
            problems.append(Problem("--predictions", "the file exists", "choose a new file, or add --force to replace it",
                                    got=req.predictions))
        if not folder.is_dir():
            problems.append(Problem("--predictions", f"its folder {folder} does not exist", "create it first, or choose another path",
                                    got=req.predictions))
        elif not os.access(folder, os.W_OK):
            problems.append(Problem("--predictions", f"its folder {folder} is not writable", "choose another path", got=req.predictions))
    if req.generations and req.compare:
        problems.append(Problem("--compare", "cannot compare when scoring given generations", "drop one of them"))
    if req.compare == "base" and run_dir is None:
        problems.append(Problem("--compare", "a recipe's target already is its base model", "pass a run directory, or --compare MODEL"))
    method = run_dir.read_plan().recipe.model.method if run_dir is not None else "lora"
    if run_dir is not None and not req.generations and not run_dir.has_output(method):
        problems.append(Problem("TARGET", f"the run has no trained {output_word(method)} in "
                                f"{run_dir.output(method)}", "evaluate a finished run (or `sftlaunch resume` it)", got=req.target))
    if problems:
        raise ConfigError(problems)


def run_eval(req: EvalRequest) -> dict:
    """Metrics of the target (and of the comparison model); writes predictions and comparison.json."""
    from launcher.hardware import detect
    from launcher.memory import find_shape
    from launcher.plan import make_eval_plan

    recipe, run_dir = _target_recipe(req.target, req.overrides)
    _check_request(req, run_dir)
    # Device and precision as training would choose them on this machine, for one evaluating process.
    plan = make_eval_plan(recipe, detect(), find_shape(recipe.model.name)[0])
    task, items = _items(recipe, req, plan)
    if req.generations:
        result, records = ev.score(task, items, ev.read_generations(req.generations))
        if req.predictions:
            with writing(req.predictions, "--predictions"):
                write_jsonl(req.predictions, records)
        return {"result": result}

    from launcher.models import load_model, load_tokenizer, resolve_model

    import torch

    torch.set_num_threads(plan.threads)
    kwargs = ev.settings(recipe, plan)
    model_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_path, plan.trust_remote_code)
    full = run_dir is not None and recipe.model.method == "full"
    if run_dir is None:  # a recipe: its base model
        model = load_model(model_path, plan.trust_remote_code).to(plan.device)
    else:
        model = load_trained(run_dir, recipe.model.method, model_path, device=plan.device, dtype="fp32",
                             trust_remote_code=plan.trust_remote_code)

    out: dict = {}
    t0 = time.time()
    out["result"], records = ev.evaluate(model, tokenizer, task, items, label="evaluating", **kwargs)
    out["result"]["seconds"] = round(time.time() - t0, 1)
    if req.predictions:
        with writing(req.predictions, "--predictions"):
            write_jsonl(req.predictions, records)
    if req.compare:
        if req.compare == "base" and not full:
            with model.disable_adapter():
                base_metrics, base_records = ev.evaluate(model, tokenizer, task, items, label="evaluating base", **kwargs)
        else:
            other_path = model_path if req.compare == "base" else resolve_model(req.compare)
            other = load_model(other_path, plan.trust_remote_code).to(plan.device)
            other_tokenizer = load_tokenizer(other_path, plan.trust_remote_code)  # another model, its own vocabulary
            base_metrics, base_records = ev.evaluate(other, other_tokenizer, task, items, label="evaluating base", **kwargs)
        comparison = ev.compare(base_records, records)
        comparison["base_model"] = recipe.model.name if req.compare == "base" else req.compare
        if "decoding" in out["result"]:
            comparison["decoding"] = ev.shared_decoding(base_metrics, out["result"])
        out["comparison"] = comparison
        if run_dir is not None:
            out["comparison_file"] = str(run_dir.write_eval_comparison(comparison))
    return out
