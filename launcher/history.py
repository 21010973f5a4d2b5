"""`sftlaunch runs [DIR]`: one line per run directory, newest first, read from each run's own files."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from launcher.errors import PlanError, SftlaunchError
from launcher.rundir import RunDir

COLUMNS = ("name", "status", "recipe", "model", "backend", "precision", "steps", "final_loss", "accuracy", "duration", "job",
           "time_vs_plan", "memory_vs_plan")


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def summary(run_dir: RunDir) -> dict:
    """What a person asks of a past run. Fields the run never reached are None; unreadable files say so, and a
    file edited into the wrong shape costs that run's row its details, never the listing."""
    try:
        return _summary(run_dir)
    except (TypeError, ValueError, AttributeError, KeyError, OSError) as exc:
        row = dict.fromkeys(COLUMNS)
        row.update(name=run_dir.path.name, path=str(run_dir.path), phase=None, base_accuracy=None, trained_accuracy=None,
                   started=None, seconds=None, time_vs_plan=None, memory_vs_plan=None,
                   status=f"unreadable ({type(exc).__name__}: {str(exc)[:80]}; see {RunDir.STATUS} and {RunDir.EVAL})")
        return row


def _summary(run_dir: RunDir) -> dict:
    row: dict = {"name": run_dir.path.name, "path": str(run_dir.path)}
    try:
        status = run_dir.status()
    except SftlaunchError:
        status = {"status": f"unreadable {RunDir.STATUS}"}
    try:
        plan = run_dir.read_plan()
    except SftlaunchError:
        plan = None
    results = run_dir.read_eval() or {}
    train = results.get("train") or status.get("train") or {}
    base = (results.get("base") or status.get("base") or {}).get("accuracy")
    trained = (results.get("trained") or status.get("trained") or {}).get("accuracy")
    row.update(
        status=status.get("status", "unknown"),
        phase=status.get("phase"),
        recipe=Path(status["recipe"]).name if status.get("recipe") else None,
        model=plan.recipe.model.name if plan else None,
        backend=plan.backend if plan else None,
        precision=plan.precision if plan else None,
        steps=train.get("steps") if train else _last_step(run_dir),
        final_loss=train.get("final_loss") if train else run_dir.last_loss(),
        base_accuracy=base,
        trained_accuracy=trained,
        started=status.get("started"),
        seconds=_seconds_between(status.get("started"), status.get("updated")),
        job=_job(status.get("slurm")),
        **_against_plan(results.get("phases") or status.get("phases") or {}),
    )
    return row


def _job(slurm) -> str | None:
    """The SLURM job that runs or ran it ("slurm 42 on node[1-2]"), from run.json's `slurm` record."""
    if not isinstance(slurm, dict) or not slurm.get("job_id"):
        return None
    nodes = slurm.get("nodes")
    return f"slurm {slurm['job_id']}" + (f" on {nodes}" if isinstance(nodes, str) and nodes else "")


def _against_plan(phases: dict) -> dict:
    """Measured / predicted: the phases' summed seconds, and the highest peak memory against the highest predicted."""
    timed = [p for p in phases.values() if isinstance(p, dict) and p.get("predicted_seconds")]
    sized = [p for p in phases.values() if isinstance(p, dict) and p.get("predicted_memory_gib") and "peak_memory_gib" in p]
    time_ratio = (sum(p["seconds"] for p in timed) / sum(p["predicted_seconds"] for p in timed)) if timed else None
    memory_ratio = (max(p["peak_memory_gib"] for p in sized) / max(p["predicted_memory_gib"] for p in sized)) if sized else None
    return {"time_vs_plan": None if time_ratio is None else round(time_ratio, 2),
            "memory_vs_plan": None if memory_ratio is None else round(memory_ratio, 2)}


def _last_step(run_dir: RunDir) -> int | None:
    steps = [r["step"] for r in run_dir.read_metrics() if "loss" in r and "step" in r]
    return steps[-1] if steps else None


def list_runs(folder: str | Path) -> list[dict]:
    """Every run directory (a folder with plan.json) directly under folder, newest first."""
    folder = Path(folder)
    if not folder.is_dir():  # a user mistake (exit 2), not a bug
        raise PlanError(f"{folder} is not a folder. Fix: pass the output.dir of your runs (default: outputs).")
    runs = [summary(RunDir(p)) for p in folder.iterdir() if p.is_dir() and RunDir(p).has_plan()]
    # Newest first: when the run started, else when its plan was written.
    return sorted(runs, key=lambda r: r["started"] or _mtime(Path(r["path"])), reverse=True)


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp((path / RunDir.PLAN).stat().st_mtime).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _number(value, spec: str) -> str:
    """A number as the table shows it; '-' for none, '?' for a value edited into something else."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _cell(row: dict, column: str) -> str:
    if column == "accuracy":
        b, t = row["base_accuracy"], row["trained_accuracy"]
        if b is None and t is None:
            return "-"
        return f"{_number(b, '.3f')} -> {_number(t, '.3f')}"
    if column == "final_loss":
        return _number(row["final_loss"], ".4f")
    if column == "duration":
        return _duration(row["seconds"])
    if column in ("time_vs_plan", "memory_vs_plan"):
        return "-" if row.get(column) is None else f"{_number(row[column], '.2f')}x"
    if column == "status" and row["status"] in ("interrupted", "running") and row.get("phase"):
        return f"{row['status']} ({row['phase']})"
    value = row.get(column)
    return "-" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    header = {c: c.replace("_", " ") for c in COLUMNS}
    cells = [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(header[c]), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(header[c].ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# Run folders read for measured answer lengths, newest first: enough for the runs a person repeats, few enough that
# a plan stays fast over a large output folder.
ANSWER_RUNS_READ = 50


def measured_answers(recipe) -> dict[str, dict] | None:
    """How many decoding steps the evaluations of the newest earlier run with the same evaluation took, per model, for
    the plan's evaluation time (launcher.timing): {"base": ..., "trained": ...}, each {"decode_steps", "batches",
    "run", "mean"}; None when no earlier run in output.dir has them. Greedy decoding makes the base model's exact for the same
    model, data and eval settings; the trained model's are taken from a run of the same recipe (output aside), a
    guide rather than a certainty (its training may differ).
    """
    import json

    folder = Path(recipe.output.dir)
    if not folder.is_dir():
        return None
    want = recipe.model_dump(mode="json")
    same_eval = lambda r: (r.get("model", {}).get("name") == want["model"]["name"] and r.get("data") == want["data"]
                           and r.get("eval") == want["eval"])
    same_recipe = lambda r: {k: v for k, v in r.items() if k != "output"} == {k: v for k, v in want.items() if k != "output"}
    found: dict[str, dict] = {}
    try:
        evals = sorted((p / RunDir.EVAL for p in folder.iterdir() if (p / RunDir.EVAL).is_file()),
                       key=lambda f: f.stat().st_mtime, reverse=True)[:ANSWER_RUNS_READ]
    except OSError:
        return None
    for path in evals:
        results = RunDir(path.parent).read_eval()
        try:  # the plan's recipe as written, not RunDir.read_plan's validated Plan: a plan stays fast over 50 runs
            ran = json.loads((path.parent / RunDir.PLAN).read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(results, dict) or not isinstance(ran, dict) or not same_eval(ran):
            continue
        for which in ("base", "trained"):
            model = results.get(which)
            lengths = model.get("answer_tokens") if isinstance(model, dict) else None
            if which in found or not isinstance(lengths, dict) or (which == "trained" and not same_recipe(ran)):
                continue
            if isinstance(lengths.get("decode_steps"), int) and isinstance(lengths.get("batches"), int):
                found[which] = {"decode_steps": lengths["decode_steps"], "batches": lengths["batches"],
                                "run": path.parent.name}
                if isinstance(lengths.get("mean"), (int, float)):
                    found[which]["mean"] = lengths["mean"]
        if len(found) == 2:
            break
    return found or None
