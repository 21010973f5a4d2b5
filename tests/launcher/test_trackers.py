"""Trackers: where each writes, W&B offline unless asked, a missing package named with its pip extra."""

import importlib.util

import pytest

from launcher import trackers
from launcher.errors import ConfigError
from tests.conftest import ROOT, run_cli


def test_trackers_write_into_the_run_directory_and_wandb_stays_offline_without_being_asked():
    env = trackers.environment(["tensorboard", "wandb", "mlflow"], "/runs/r1", env={})
    assert env == {"TENSORBOARD_LOGGING_DIR": "/runs/r1/tensorboard", "WANDB_MODE": "offline", "WANDB_DIR": "/runs/r1",
                   "WANDB_PROJECT": "sftlaunch", "MLFLOW_TRACKING_URI": "file:/runs/r1/mlruns", "MLFLOW_EXPERIMENT_NAME": "sftlaunch"}
    # A key alone does not send anything over the network; the user's own settings win.
    mine = trackers.environment(["wandb"], "/runs/r1", env={"WANDB_API_KEY": "k", "WANDB_MODE": "online", "WANDB_PROJECT": "p"})
    assert mine["WANDB_MODE"] == "online" and mine["WANDB_PROJECT"] == "p" and "WANDB_API_KEY" not in mine
    assert trackers.environment(["none"], "/runs/r1", env={}) == {}


def test_a_missing_tracker_package_is_an_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed.*pip install 'sftlaunch\[mlflow\]'"):
        trackers.check_installed(["tensorboard", "mlflow"])
    trackers.check_installed(["tensorboard", "wandb"])  # installed with the test extra


def test_the_plan_shows_where_the_run_reports():
    result = run_cli("plan", str(ROOT / "recipes" / "unit-conversion.yaml"), "--hardware", "cpu-2core",
                     "train.report_to=[tensorboard, wandb]", env={"WANDB_MODE": ""})
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("report_to"))
    assert "tensorboard,wandb" in line and "RUN_DIR/tensorboard" in line and "wandb: offline" in line and "rank 0" in line
    bad = run_cli("plan", str(ROOT / "recipes" / "unit-conversion.yaml"), "train.report_to=[none, wandb]")
    assert bad.returncode == 2 and "train.report_to" in bad.stderr
