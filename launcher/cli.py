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


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--backend", help="Override the automatic backend choice (cpu, cuda, mps).")
def run(recipe, overrides, backend):
    """Plan, train and evaluate RECIPE (overrides: key.path=value)."""
    try:
        plan = _plan(recipe, overrides, None, backend)
        from backends import BACKENDS
        from launcher.rundir import create_run_dir, write_status
        from launcher.runner import run as run_spec

        click.echo(render_plan(plan))
        run_dir = create_run_dir(plan, recipe)
        click.echo(f"run directory: {run_dir}")
        write_status(run_dir, "starting", recipe=str(recipe), overrides=list(overrides))
        code = run_spec(BACKENDS[plan.backend].build(plan, run_dir), run_dir)
    except SftlaunchError as exc:
        _fail(exc)
    if code != 0:
        click.echo(f"error: the {plan.backend} worker exited with code {code}; see {run_dir}/run.json", err=True)
        sys.exit(code)
    results = json.loads((run_dir / "eval.json").read_text())
    click.echo(_comparison(results))
    click.echo(f"adapter, metrics and predictions: {run_dir}")


def _comparison(results: dict) -> str:
    rows = [("base", results.get("base")), ("trained", results["trained"])]
    lines = [f"{'model':<8} {'accuracy':>9} {'answer_rate':>12} {'n':>5}"]
    for name, m in rows:
        if m:
            lines.append(f"{name:<8} {m['accuracy']:>9.3f} {m['answer_rate']:>12.3f} {m['n']:>5}")
            for group, g in m.get("groups", {}).items():
                lines.append(f"  {group:<22} {g['accuracy']:.3f} {g['answer_rate']:>8.3f} {g['n']:>5}")
    return "\n".join(lines)


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
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="JSON array of [question, answer] pairs.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N items.")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write one JSON line per item here.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of the metrics.")
def eval_cmd(target, overrides, data_file, limit, predictions, as_json):
    """Evaluate a run directory's adapter, or a recipe's base model."""
    try:
        from launcher.evaluate import evaluate_target

        metrics = evaluate_target(target, overrides, data_file, limit, predictions)
    except SftlaunchError as exc:
        _fail(exc)
    from launcher.evaluate import format_metrics

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
