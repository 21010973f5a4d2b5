"""The run directory: the one module that names its files and reads and writes them.

Every file a run leaves is listed in RunDir, its writer beside its reader, so the layout is written down
once (the README's "Outputs" lists the same files). Files another process may read while they change
(plan.json, run.json) are replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import ConfigError, PlanError, Problem, StorageError
from launcher.jsonl import append_jsonl, write_jsonl
from launcher.recipe import recipe_to_yaml
from launcher.signals import pid_alive, shell_exit_code, worker_end

if TYPE_CHECKING:  # read_plan imports it when it runs: plan imports trackers, whose folders are named here
    from launcher.plan import Plan

# checkpoints/checkpoint-N: Trainer's name for the checkpoint after optimizer step N.
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    # Inputs, written by the launcher before any worker starts.
    RECIPE, PLAN, HARDWARE = "recipe.yaml", "plan.json", "hardware.json"
    # Written by the backend's launch spec (LaunchSpec.files), read by the worker.
    DS_CONFIG = "ds_config.json"
    # The run's state and what the worker produces.
    STATUS, VERSIONS, PREFLIGHT, METRICS = "run.json", "versions.json", "preflight.json", "metrics.jsonl"
    EVAL, EVAL_BASE, COMPARISON = "eval.json", "eval-base.json", "comparison.json"
    PREDICTIONS, PREDICTIONS_BASE = "predictions.jsonl", "predictions-base.jsonl"
    ADAPTER, CHECKPOINTS, OOM_BACKOFF = "adapter", "checkpoints", "oom_backoff.jsonl"
    MODEL = "model"  # model.method=full: the complete trained model (instead of adapter/)
    RANKS = "ranks"  # distributed runs: ranks/rank-N.json, how each worker process ended
    EVALUATIONS = "evaluations"  # `sftlaunch eval RUN --compare`: comparison-STAMP.json, one per evaluation
    PLOTS, TRAINING_PLOT, COMPARISON_PLOT = "plots", "training.png", "comparison.png"  # drawn by launcher.plots
    # Where the trackers (train.report_to) write, pointed there by launcher.trackers; W&B names its wandb/ itself.
    TENSORBOARD, WANDB, MLRUNS = "tensorboard", "wandb", "mlruns"
    # `sftlaunch slurm`: the batch script, and a folder for its per-start files (launcher pids, each node's exit code).
    SLURM_SCRIPT, SLURM_STATE = "slurm.sbatch", "slurm"
    SLURM_LOG = "slurm-%j.out"  # sbatch --output's pattern (%j: the job id); slurm_log(job) names one job's log
    # Under checkpoints/: a checkpoint is written here whole, then renamed to checkpoint-N (launcher.trainer).
    STAGING = ".staging"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- inputs -------------------------------------------------------------------------------------
    def write_inputs(self, plan: Plan) -> None:
        self.file(self.RECIPE).write_text(recipe_to_yaml(plan.recipe))
        self.write_plan(plan)
        self.file(self.HARDWARE).write_text(plan.hardware.model_dump_json(indent=2))

    def write_plan(self, plan: Plan) -> None:
        _atomic_write(self.file(self.PLAN), plan.model_dump_json(indent=2))

    def has_plan(self) -> bool:
        return self.file(self.PLAN).is_file()

    def read_plan(self) -> Plan:
        from pydantic import ValidationError

        from launcher.plan import Plan

        if not self.has_plan():
            raise PlanError(f"{self.path} is not a run directory (no {self.PLAN}). Fix: pass outputs/<run>.")
        try:
            return Plan.model_validate_json(self.file(self.PLAN).read_text())
        except (ValidationError, ValueError, OSError) as exc:
            raise PlanError(f"{self.file(self.PLAN)} is unreadable or not a plan ({_first_line(exc)}); it was written by "
                            "sftlaunch and edited or cut short since. Fix: start a new run from the recipe "
                            f"({self.file(self.RECIPE)}).") from None

    # -- state --------------------------------------------------------------------------------------
    def status(self) -> dict:
        path = self.file(self.STATUS)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise PlanError(f"{path} is unreadable ({_first_line(exc)}). Fix: delete it to let `sftlaunch resume` "
                            "continue from the last checkpoint, or start a new run.") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path} holds {type(data).__name__}, not a run's status. Fix: delete it, or start a new run.")
        return data

    def write_status(self, status: str, **extra) -> None:
        """run.json: the run's state, rewritten atomically at each change."""
        data = self.status()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data.setdefault("started", now)
        data.update(status=status, updated=now, **extra)
        _atomic_write(self.file(self.STATUS), json.dumps(data, indent=2))

    def record_training(self, record: dict) -> None:
        """The training summary, once the adapter is saved: a resumed run that finds both only evaluates."""
        self.write_status("running", train=record)

    def training_done(self) -> dict | None:
        record = self.status().get("train")
        return record if isinstance(record, dict) and (self.has_adapter() or self.has_model()) else None

    def record_worker_end(self, returncode: int, oom_before: int | None, oom_after: int | None) -> int:
        """The worker has exited: if it could not say how (killed), say it; return the exit code the user sees."""
        state = self.status()
        if state.get("status") in ("starting", "running"):
            end = worker_end(returncode, oom_before, oom_after)
            self.write_status(end.pop("status"), **end)
            return end["exit_code"]
        if state.get("status") == "interrupted" and isinstance(state.get("exit_code"), int):
            return state["exit_code"]  # 143 for SIGTERM, whatever torchrun made of the worker's exit
        return shell_exit_code(returncode)

    # -- distributed ends ---------------------------------------------------------------------------
    # torchrun reports any failed worker as its own exit 1 (torch.distributed.elastic: ChildFailedError), so a
    # rank's 75 (out of memory), 3 (health guard) or 2 never reached the launcher: each rank writes its end here.
    def write_rank_end(self, rank: int, record: dict) -> None:
        folder = self.file(self.RANKS)
        folder.mkdir(exist_ok=True)
        _atomic_write(folder / f"rank-{rank}.json", json.dumps({"rank": rank, **record}, indent=2))

    def rank_ends(self) -> list[dict]:
        folder = self.file(self.RANKS)
        ends = []
        for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (ValueError, OSError):
                continue  # a rank killed while writing: torchrun's code and run.json still say it failed
            if isinstance(record, dict) and isinstance(record.get("exit_code"), int):
                ends.append(record)
        return ends

    def clear_rank_ends(self) -> None:
        shutil.rmtree(self.file(self.RANKS), ignore_errors=True)

    def record_rank_ends(self, returncode: int, write: bool) -> int | None:
        """After torchrun: the exit code of the rank that failed first, recorded in run.json (when `write`, on
        node 0) with its rank; a signal's 130/143 when the ranks were stopped; None when no rank recorded its
        end (killed outright, or all well).

        When one rank fails, torchrun stops the others with SIGTERM, so their ends (143, or an error from a
        collective whose peer is gone) follow from the first failure: the earliest end that is not a signal's
        is the cause.
        """
        if returncode == 0:
            return None
        ends = self.rank_ends()
        failed = [e for e in ends if e["exit_code"] not in (0, 130, 143)]
        if not failed:  # stopped by a signal (on node 0, run.json says so already), or killed without a word
            stopped = [e["exit_code"] for e in ends if e["exit_code"] in (130, 143)]
            return stopped[0] if stopped else None
        first = min(failed, key=lambda e: (e.get("time", ""), e["rank"]))
        if write:
            fields = {k: v for k, v in first.items() if k not in ("rank", "status", "time")}
            error = first.get("error") or f"rank {first['rank']} exited with code {first['exit_code']}"
            where = f" (node {first['node']}, {first['host']})" if "node" in first and "host" in first else ""
            self.write_status(first.get("status", "failed"), **{**fields, "rank": first["rank"],
                                                                   "error": f"rank {first['rank']}{where}: {error}"})
        return first["exit_code"]

    def live_process(self) -> str | None:
        """'worker pid N' / 'launcher pid N' if this run is still being run by a live process, else None."""
        state = self.status()
        if state.get("status") not in ("starting", "running"):
            return None
        if pid_alive(state.get("worker_pid"), "launcher.worker"):
            return f"worker pid {state['worker_pid']}"
        if pid_alive(state.get("launcher_pid"), "sftlaunch", "launcher.cli"):
            return f"launcher pid {state['launcher_pid']}"
        return None

    def write_versions(self) -> None:
        self.file(self.VERSIONS).write_text(json.dumps(library_versions(), indent=2))

    def write_preflight(self, report: dict) -> None:
        self.file(self.PREFLIGHT).write_text(json.dumps(report, indent=2))

    def append_oom_backoff(self, record: dict) -> None:
        append_jsonl(self.file(self.OOM_BACKOFF), record)

    # -- training -----------------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one record per logged step, appended by the trainer's callback as it happens."""
        return self.file(self.METRICS)

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics, record)

    def read_metrics(self) -> list[dict]:
        return self.read_metrics_counted()[0]

    def read_metrics_counted(self) -> tuple[list[dict], int]:
        """The logged steps, and how many lines could not be read: a kill -9 or a full disk leaves the last line
        cut short, and a hand edit may break any; the readable steps are still the run's."""
        if not self.metrics.exists():
            return [], 0
        records, bad = [], 0
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                records.append(record)
            else:
                bad += 1
        return records, bad

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint (those steps are trained again), and unreadable lines."""
        if self.metrics.exists():
            keep = [r for r in self.read_metrics() if r.get("step", 0) <= step]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.read_metrics() if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        return losses[-1] if losses else None

    @property
    def checkpoints(self) -> Path:
        return self.file(self.CHECKPOINTS)

    def last_checkpoint(self) -> Path | None:
        found = complete_checkpoints(self.checkpoints)
        return Path(found[-1]) if found else None

    @staticmethod
    def checkpoint_name(step: int) -> str:
        return f"checkpoint-{step}"

    @staticmethod
    def checkpoint_step(path: str | Path) -> int:
        """The optimizer step a checkpoint folder was saved at (the N of checkpoint-N)."""
        m = CHECKPOINT.match(Path(path).name)
        if m is None:
            raise ValueError(f"{path} is not a checkpoint folder (checkpoint-N)")
        return int(m.group(1))

    @property
    def adapter(self) -> Path:
        return self.file(self.ADAPTER)

    def has_adapter(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file()

    @property
    def model(self) -> Path:
        return self.file(self.MODEL)

    def has_model(self) -> bool:
        return (self.model / "config.json").is_file()

    def output(self, method: str) -> Path:
        """What training leaves: the adapter (method lora) or the complete model (method full)."""
        return self.model if method == "full" else self.adapter

    def has_output(self, method: str) -> bool:
        return self.has_model() if method == "full" else self.has_adapter()

    def slurm_log(self, job: str) -> Path:
        return self.file(self.SLURM_LOG.replace("%j", str(job)))

    @property
    def ds_config(self) -> Path:
        return self.file(self.DS_CONFIG)

    # -- trackers and plots -------------------------------------------------------------------------
    @property
    def tensorboard(self) -> Path:
        return self.file(self.TENSORBOARD)

    @property
    def mlruns(self) -> Path:
        return self.file(self.MLRUNS)

    @property
    def plots(self) -> Path:
        return self.file(self.PLOTS)

    @property
    def training_plot(self) -> Path:
        return self.plots / self.TRAINING_PLOT

    @property
    def comparison_plot(self) -> Path:
        return self.plots / self.COMPARISON_PLOT

    # -- evaluation ---------------------------------------------------------------------------------
    def write_base_eval(self, metrics: dict, records: list[dict]) -> None:
        """The base model's result: written once, so a resumed run does not evaluate the base again."""
        write_jsonl(self.file(self.PREDICTIONS_BASE), records)
        self.file(self.EVAL_BASE).write_text(json.dumps(metrics, indent=2))

    def read_base_eval(self) -> tuple[dict, list[dict]] | None:
        if not (self.file(self.EVAL_BASE).exists() and self.file(self.PREDICTIONS_BASE).exists()):
            return None
        records = [json.loads(line) for line in self.file(self.PREDICTIONS_BASE).read_text().splitlines()]
        return json.loads(self.file(self.EVAL_BASE).read_text()), records

    def write_predictions(self, records: list[dict]) -> None:
        write_jsonl(self.file(self.PREDICTIONS), records)

    def write_eval(self, results: dict) -> None:
        self.file(self.EVAL).write_text(json.dumps(results, indent=2))

    def read_eval(self) -> dict | None:
        return _read_json_object(self.file(self.EVAL))

    def write_comparison(self, comparison: dict) -> None:
        self.file(self.COMPARISON).write_text(json.dumps(comparison, indent=2))

    def write_eval_comparison(self, comparison: dict) -> Path:
        """`sftlaunch eval RUN --compare`: a new file under evaluations/ each time, never the run's own comparison."""
        folder = self.file(self.EVALUATIONS)
        folder.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = folder / f"comparison-{stamp}{f'-{n}' if n else ''}.json"
            try:
                with open(path, "x", encoding="utf-8") as f:  # claimed exclusively: two evaluations never share one
                    f.write(json.dumps(comparison, indent=2))
                return path
            except FileExistsError:
                continue
        raise StorageError(f"cannot name a new comparison file in {folder}. Fix: clear out old ones.")

    def own_file(self, path: str | Path) -> bool:
        """Whether path is one of the files (or folders) this run directory's layout names."""
        path = Path(path).expanduser().resolve()
        if path.parent != self.path.resolve():
            return False
        names = {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str)}
        return path.name in names

    def read_comparison(self) -> dict | None:
        return _read_json_object(self.file(self.COMPARISON))


def _read_json_object(path: Path) -> dict | None:
    """A results file's object, or None when it is missing, cut short or edited into something else: results
    are read to show them, and a broken file shows as none (the run's status and metrics still stand)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (ValueError, OSError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def complete_checkpoints(folder: str | Path) -> list[str]:
    """Complete checkpoints in a checkpoints folder, oldest first (the staging folder is never listed)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def create_run_dir(plan: Plan, recipe_path: str | Path, suffix: str = "", explicit: str | None = None) -> RunDir:
    out = plan.recipe.output
    if explicit:
        # Multi-node: every node names the same directory; all write the same plan.
        run_dir = Path(explicit)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError([Problem("--run-dir", f"cannot create {run_dir}: {exc.strerror}", "choose a writable folder")]) from None
    else:
        # A recipe file's stem may hold anything; keep the run name to safe characters.
        # No leading "-": a run directory named "-rf-<stamp>" reads as options to `resume` and `plot`.
        name = out.name or re.sub(r"[^A-Za-z0-9._-]+", "_", Path(recipe_path).stem).strip("._-") or "run"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            Path(out.dir).mkdir(parents=True, exist_ok=True)
            run_dir = _claim(Path(out.dir), f"{name}-{stamp}{suffix}")
        except OSError as exc:
            raise ConfigError([Problem("output.dir", f"cannot create a run directory there: {exc.strerror or exc}",
                                       "choose a writable folder with free space", got=out.dir)]) from None
    rd = RunDir(run_dir)
    try:
        rd.write_inputs(plan)
    except OSError as exc:  # e.g. a full disk: never leave a half-made run directory (a 0-byte recipe.yaml)
        if not explicit:  # a folder we made; an explicit one may be shared by other nodes
            shutil.rmtree(run_dir, ignore_errors=True)
        raise StorageError(f"cannot write the run's inputs into {run_dir}: {exc.strerror or exc}"
                           + ("" if explicit else "; the directory was removed")
                           + f". Fix: free space there, or choose another {'--run-dir' if explicit else 'output.dir'}.") from None
    return rd


def _claim(folder: Path, base: str) -> Path:
    """Make folder/base, or base-2, base-3...: mkdir is the claim, so two runs started in the same second
    (or on a slow shared filesystem) never share a directory, and the loser takes the next name."""
    for n in range(1, 10_000):
        candidate = folder / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"10,000 run directories named {base}")


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
