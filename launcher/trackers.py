"""Experiment trackers (train.report_to): where each one writes, and the environment that makes it so.

transformers' integrations do the reporting (TensorBoardCallback, WandbCallback, MLflowCallback, each on
the main process only); this module only points them at the run directory and keeps W&B off the network
unless asked: a run without network access must not fail because a tracker wanted to upload.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

from launcher.errors import ConfigError, Problem
from launcher.rundir import RunDir

# tracker -> importable modules (any one will do) and the pip extra that installs it
PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow")}


def active(report_to: list[str]) -> list[str]:
    return [t for t in report_to if t != "none"]


def check_installed(report_to: list[str]) -> None:
    """A missing tracker package is an error before the run starts, naming the extra that installs it."""
    problems = []
    for tracker in active(report_to):
        modules, extra = PACKAGES[tracker]
        if not any(importlib.util.find_spec(m) for m in modules):
            problems.append(Problem("train.report_to", f"{tracker} is not installed", f"pip install 'sftlaunch[{extra}]'",
                                    got=tracker))
    if problems:
        raise ConfigError(problems)


def wandb_mode(env: Mapping[str, str]) -> str:
    return env.get("WANDB_MODE") or "offline"


def environment(report_to: list[str], run_dir: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables the worker sets before the Trainer is built. The user's own settings win where they exist;
    secrets (WANDB_API_KEY) are never set, read or written here: W&B reads its key from the environment."""
    out: dict[str, str] = {}
    trackers = active(report_to)
    if "tensorboard" in trackers:
        out["TENSORBOARD_LOGGING_DIR"] = str(RunDir(run_dir).tensorboard)
    if "wandb" in trackers:
        out["WANDB_MODE"] = wandb_mode(env)
        out["WANDB_DIR"] = env.get("WANDB_DIR") or run_dir  # W&B makes its own wandb/ folder inside
        out["WANDB_PROJECT"] = env.get("WANDB_PROJECT") or "sftlaunch"
    if "mlflow" in trackers:
        out["MLFLOW_TRACKING_URI"] = env.get("MLFLOW_TRACKING_URI") or "file:" + str(RunDir(os.path.abspath(run_dir)).mlruns)
        out["MLFLOW_EXPERIMENT_NAME"] = env.get("MLFLOW_EXPERIMENT_NAME") or "sftlaunch"
    return out


def describe(report_to: list[str], env: Mapping[str, str] = os.environ) -> str:
    """The plan's reason for train.report_to: where each tracker writes."""
    trackers = active(report_to)
    if not trackers:
        return f"no tracker (train.report_to); {RunDir.METRICS} and {RunDir.PLOTS}/ in the run directory"
    where = []
    for t in trackers:
        if t == "tensorboard":
            where.append(f"tensorboard: event files in RUN_DIR/{RunDir.TENSORBOARD} (tensorboard --logdir RUN_DIR/{RunDir.TENSORBOARD})")
        elif t == "wandb":
            mode = wandb_mode(env)
            where.append(f"wandb: {mode} (WANDB_MODE {'from the environment' if env.get('WANDB_MODE') else 'unset: offline, `wandb sync` uploads later'}), "
                         f"project {env.get('WANDB_PROJECT') or 'sftlaunch'}, files in {env.get('WANDB_DIR') or 'RUN_DIR'}/{RunDir.WANDB}")
        else:
            where.append(f"mlflow: {env.get('MLFLOW_TRACKING_URI') or 'file:RUN_DIR/' + RunDir.MLRUNS}")
    return "; ".join(where) + "; rank 0 reports"
