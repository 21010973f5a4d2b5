"""The run directory: created by the launcher with the resolved recipe, plan and hardware."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from launcher.plan import Plan
from launcher.recipe import recipe_to_yaml


def create_run_dir(plan: Plan, recipe_path: str | Path) -> Path:
    out = plan.recipe.output
    name = out.name or Path(recipe_path).stem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out.dir) / f"{name}-{stamp}"
    n = 1
    while run_dir.exists():  # two runs in the same second get distinct directories
        n += 1
        run_dir = Path(out.dir) / f"{name}-{stamp}-{n}"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(plan.recipe))
    (run_dir / "plan.json").write_text(plan.model_dump_json(indent=2))
    (run_dir / "hardware.json").write_text(plan.hardware.model_dump_json(indent=2))
    return run_dir


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
