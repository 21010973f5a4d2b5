"""The `sftlaunch` command line. Heavy libraries (torch, transformers) load only inside commands that need them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from launcher.errors import SftlaunchError


class _DefaultRun(click.Group):
    """`sftlaunch RECIPE ...` is `sftlaunch run RECIPE ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _fail(exc: SftlaunchError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _hardware(profile: str | None):
    from launcher.hardware import detect, load_profile

    return load_profile(profile) if profile else detect()


def _plan(recipe_path: str, overrides, profile: str | None, backend: str | None):
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    if backend:
        overrides = [*overrides, f"hardware.backend={backend}"]
    recipe = load_recipe(recipe_path, overrides)
    hw = _hardware(profile)
    plan = make_plan(recipe, hw)
    from backends import BACKENDS

    problems = BACKENDS[plan.backend].check(plan, hw)
    if problems:
        from launcher.errors import PlanError

        raise PlanError(f"backend {plan.backend} cannot run this plan: " + "; ".join(problems))
    return plan


def render_plan(plan) -> str:
    lines = [f"plan for {plan.recipe.model.name} on {plan.hardware.name} hardware:"]
    width = max(len(d.field) for d in plan.decisions)
    for d in plan.decisions:
        lines.append(f"  {d.field:<{width}} = {str(d.value):<6}  # {d.reason}")
    return "\n".join(lines)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sftlaunch")
def main():
    """Fine-tune a model with LoRA from a YAML recipe, with settings decided from the hardware.

    \b
    sftlaunch RECIPE [key.path=value ...]     plan, train and evaluate (same as `sftlaunch run`)
    sftlaunch plan RECIPE [--hardware NAME]   show every decision and its reason, without training
    """


SMOKE_STEPS, SMOKE_ITEMS = 10, 10


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--backend", help="Override the automatic backend choice (cpu, cuda, mps).")
@click.option("--smoke", is_flag=True, help=f"Check a set-up in a minute: at most {SMOKE_STEPS} steps, {SMOKE_ITEMS} eval items.")
def run(recipe, overrides, backend, smoke):
    """Plan, train and evaluate RECIPE (overrides: key.path=value)."""
    try:
        if smoke:
            overrides = _smoke_overrides(recipe, overrides)
        plan = _plan(recipe, overrides, None, backend)
        from launcher.rundir import create_run_dir, write_status

        click.echo(render_plan(plan))
        run_dir = create_run_dir(plan, recipe, suffix="-smoke" if smoke else "")
        click.echo(f"run directory: {run_dir}" + ("  (smoke run)" if smoke else ""))
        write_status(run_dir, "starting", recipe=str(recipe), overrides=list(overrides), smoke=smoke)
    except SftlaunchError as exc:
        _fail(exc)
    _launch(plan, run_dir, resume=False)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def resume(run_dir):
    """Continue an interrupted run from its last checkpoint, with the same plan and data order."""
    from launcher.errors import PlanError
    from launcher.hardware import detect
    from launcher.plan import Plan

    path = Path(run_dir)
    if not (path / "plan.json").is_file():
        _fail(PlanError(f"{run_dir} is not a run directory (no plan.json). Fix: pass outputs/<run>."))
    plan = Plan.model_validate_json((path / "plan.json").read_text())
    status = json.loads((path / "run.json").read_text()).get("status") if (path / "run.json").exists() else None
    if status == "completed":
        _fail(PlanError(f"{run_dir} already completed; nothing to resume."))
    from backends import BACKENDS

    problems = BACKENDS[plan.backend].check(plan, detect())
    if problems:
        _fail(PlanError(f"this machine cannot resume a {plan.backend} run: " + "; ".join(problems)))
    click.echo(render_plan(plan))
    _launch(plan, path, resume=True)


def _launch(plan, run_dir: Path, resume: bool) -> None:
    from backends import BACKENDS
    from launcher.evaluate import format_comparison, format_metrics
    from launcher.runner import run as run_spec

    code = run_spec(BACKENDS[plan.backend].build(plan, run_dir, resume=resume), run_dir)
    if code != 0:
        click.echo(f"error: the {plan.backend} worker exited with code {code}; see {run_dir}/run.json", err=True)
        sys.exit(code)
    comparison = run_dir / "comparison.json"
    if comparison.exists():
        click.echo(format_comparison(json.loads(comparison.read_text())))
    else:
        click.echo(format_metrics("trained", json.loads((run_dir / "eval.json").read_text())["trained"]))
    click.echo(f"adapter, metrics and predictions: {run_dir}")


def _smoke_overrides(recipe_path, overrides) -> list[str]:
    """Cap steps and evaluation items (keeping a recipe's smaller values)."""
    from launcher.recipe import load_recipe

    r = load_recipe(recipe_path, overrides)
    steps = min(SMOKE_STEPS, r.train.max_steps or SMOKE_STEPS)
    items = min(SMOKE_ITEMS, r.eval.limit or SMOKE_ITEMS)
    return [*overrides, f"train.max_steps={steps}", f"eval.limit={items}"]


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--hardware", "profile", help="A hardware profile (shipped name or YAML file) instead of this machine.")
@click.option("--backend", help="Override the automatic backend choice.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(recipe, overrides, profile, backend, as_json):
    """Print the resolved plan and the reason for every automatic decision, without training."""
    try:
        p = _plan(recipe, overrides, profile, backend)
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(json.dumps(p.summary(), indent=2) if as_json else render_plan(p))


@main.command(name="eval")
@click.argument("target", type=click.Path(exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="Items to evaluate: a JSON array of [question, answer] (unit conversion) or a JSONL file (GSM8K).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N items.")
@click.option("--all", "all_items", is_flag=True, help="The whole held-out/test split (ignore eval.limit).")
@click.option("--compare", is_flag=False, flag_value="base", default=None, metavar="[BASE]",
              help="Also evaluate a base model on the same items: the run's own base model, or the model given.")
@click.option("--generations", type=click.Path(dir_okay=False, exists=True), help='Score generations made elsewhere: JSONL of {"generated": TEXT} per item, in order.')
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write one JSON line per item here.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of the metrics.")
def eval_cmd(target, overrides, data_file, limit, all_items, compare, generations, predictions, as_json):
    """Evaluate a run directory's adapter, or a recipe's base model."""
    try:
        from launcher.eval_target import EvalRequest, run_eval

        out = run_eval(EvalRequest(target, tuple(overrides), data_file, limit, all_items, compare, generations, predictions))
    except SftlaunchError as exc:
        _fail(exc)
    from launcher.evaluate import format_comparison, format_metrics

    metrics = out["result"]
    if "comparison" in out:
        click.echo(format_comparison(out["comparison"]))
    else:
        click.echo(format_metrics("result", metrics))
    if as_json:
        click.echo(json.dumps({k: metrics[k] for k in ("accuracy", "answer_rate", "n")}))


@main.command()
def env():
    """Show the detected hardware and library versions."""
    from launcher.hardware import detect
    from launcher.rundir import library_versions

    click.echo(json.dumps({"hardware": detect().model_dump(mode="json"), "versions": library_versions()}, indent=2))


@main.command()
def schema():
    """Print the recipe's JSON Schema (every key with its description)."""
    from launcher.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


if __name__ == "__main__":
    main()
