"""The run directory: created by the launcher with the resolved recipe, plan and hardware."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from launcher.errors import ConfigError, Problem
from launcher.plan import Plan
from launcher.recipe import recipe_to_yaml


def create_run_dir(plan: Plan, recipe_path: str | Path, suffix: str = "", explicit: str | None = None) -> Path:
    out = plan.recipe.output
    if explicit:
        # Multi-node: every node names the same directory; all write the same plan.
        run_dir = Path(explicit)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError([Problem("--run-dir", f"cannot create {run_dir}: {exc.strerror}", "choose a writable folder")]) from None
        _write_inputs(plan, run_dir)
        return run_dir
    # A recipe file's stem may hold anything; keep the run name to safe characters.
    name = out.name or re.sub(r"[^A-Za-z0-9._-]+", "_", Path(recipe_path).stem).strip("._") or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out.dir) / f"{name}-{stamp}{suffix}"
    n = 1
    while run_dir.exists():  # two runs in the same second get distinct directories
        n += 1
        run_dir = Path(out.dir) / f"{name}-{stamp}{suffix}-{n}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError([Problem("output.dir", f"cannot create the run directory {run_dir}: {exc.strerror}",
                                   "choose a writable folder", got=out.dir)]) from None
    _write_inputs(plan, run_dir)
    return run_dir


def _write_inputs(plan: Plan, run_dir: Path) -> None:
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(plan.recipe))
    write_plan(plan, run_dir)
    (run_dir / "hardware.json").write_text(plan.hardware.model_dump_json(indent=2))


def write_plan(plan: Plan, run_dir: Path) -> None:
    tmp = run_dir / f"plan.json.tmp{os.getpid()}"
    tmp.write_text(plan.model_dump_json(indent=2))
    tmp.replace(run_dir / "plan.json")


def write_status(run_dir: Path, status: str, **extra) -> None:
    """run.json: the run's state, rewritten atomically at each change."""
    path = Path(run_dir) / "run.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(status=status, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    import platform

    names = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "pydantic", "click", "sftlaunch")
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out
