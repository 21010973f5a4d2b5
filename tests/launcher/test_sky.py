"""`sftlaunch sky`: the SkyPilot task for two accelerators (exact text), checked with SkyPilot's own loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from launcher.errors import ConfigError
from launcher.hardware import load_profile
from launcher.memory import find_shape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from launcher.sky import SkyRequest, check_request, profile_for, task_yaml
from launcher.slurm import SlurmRequest, node_hardware
from tests.conftest import ROOT, run_cli

GOLDEN = Path(__file__).parent / "golden"
RECIPE = ROOT / "recipes" / "gsm8k.yaml"
CASES = {  # the expected tasks are in tests/launcher/golden/
    "h100-2nodes": (SkyRequest("H100:8", nodes=2, cloud="aws", image="ghcr.io/lab/sftlaunch:cuda", outputs="s3://lab-runs/sft"),
                    ("train.epochs=2",)),
    "a10g-1node": (SkyRequest("A10G:1", outputs="gs://lab-runs/sft"), ()),
}
HAS_SKY = importlib.util.find_spec("sky") is not None


def _task(case: str) -> str:
    req, overrides = CASES[case]
    recipe = load_recipe(str(RECIPE), list(overrides))
    name, count = req.gpus.split(":")
    hw = node_hardware(load_profile(profile_for(req.gpus, None)), SlurmRequest(req.nodes, int(count)), from_profile=True)
    plan = make_plan(recipe, hw, *find_shape(recipe.model.name))
    # The recipe's path as a clone has it: the golden files hold the part after the clone's root.
    return task_yaml(plan, req, RECIPE, overrides, "gsm8k-1").replace(str(RECIPE.resolve()), "ROOT/recipes/gsm8k.yaml")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_task_for_an_accelerator_is_exactly_the_reviewed_one(case):
    assert _task(case) == (GOLDEN / f"sky-{case}.yaml").read_text()


def test_the_task_runs_the_image_with_the_bucket_and_never_holds_the_token():
    task = yaml.safe_load(_task("h100-2nodes"))
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8", "image_id": "docker:ghcr.io/lab/sftlaunch:cuda",
                                                            "cloud": "aws"}
    assert task["envs"] == {"HF_TOKEN": None}  # declared, given at launch
    assert task["file_mounts"]["/outputs"] == {"source": "s3://lab-runs/sft", "mode": "MOUNT"}
    run = task["run"]
    assert 'exec sftlaunch resume "$RUN_DIR" "${NODE[@]}"' in run
    assert ('exec sftlaunch run /workspace/task/gsm8k.yaml train.epochs=2 --nnodes "$SKYPILOT_NUM_NODES" "${NODE[@]}" '
            '--run-dir "$RUN_DIR"') in run


def test_bad_requests_name_the_flag_and_the_fix():
    with pytest.raises(ConfigError) as bad:
        check_request(SkyRequest("A100:8", nodes=0, outputs="/local/folder"))
    assert "--nodes: a task needs at least one node (got 0)" in str(bad.value)
    assert "--outputs: not a bucket URI" in str(bad.value) and "s3://my-bucket/sftlaunch" in str(bad.value)
    with pytest.raises(ConfigError, match=r"--gpus: not NAME:COUNT.*\(got 'A100x8'\)"):
        profile_for("A100x8", None)
    with pytest.raises(ConfigError, match=r"--gpus: no shipped profile describes L4.*Fix: add --hardware PROFILE"):
        profile_for("L4:4", None)
    with pytest.raises(ConfigError, match=r"a10g-24gb has 1 GPU\(s\) per node \(got 4\)"):
        node_hardware(load_profile(profile_for("A10G:4", None)), SlurmRequest(1, 4), from_profile=True)


@pytest.mark.skipif(not HAS_SKY, reason="SkyPilot is not installed (pip install -c constraints.txt '.[sky]'); its loader "
                                        "cannot check the task here")
@pytest.mark.parametrize("case", sorted(CASES))
def test_skypilot_loads_the_task_and_requires_the_token_at_launch(case, tmp_path):
    import sky

    path = tmp_path / "task.yaml"
    path.write_text(_task(case).replace("ROOT/recipes/gsm8k.yaml", str(RECIPE.resolve())))
    with pytest.raises(ValueError, match="HF_TOKEN"):  # no value in the file: `sky launch` refuses without --env HF_TOKEN
        sky.Task.from_yaml(str(path))
    task = sky.Task.from_yaml_config(yaml.safe_load(path.read_text()), env_overrides=[("HF_TOKEN", "hf_test")])
    req, _ = CASES[case]
    (resources,) = task.resources
    name, count = req.gpus.split(":")
    assert task.num_nodes == req.nodes and resources.accelerators == {name: int(count)}
    assert resources.extract_docker_image() == req.image
    assert task.envs == {"HF_TOKEN": "hf_test"}
    assert set(task.storage_mounts) == {"/outputs"} and task.file_mounts == {"/workspace/task/gsm8k.yaml": str(RECIPE.resolve())}


def test_sky_command_writes_the_task_and_launches_nothing(tmp_path):
    out = tmp_path / "t.sky.yaml"
    result = run_cli("sky", str(RECIPE), "--gpus", "H100:8", "--nodes", "2", "--outputs", "s3://b/runs", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "world_size                  = 16" in result.stdout and f"not launched. Launch with: HF_TOKEN=... sky launch --env HF_TOKEN {out}" in result.stdout
    assert yaml.safe_load(out.read_text())["num_nodes"] == 2
    bad = run_cli("sky", str(RECIPE), "--gpus", "H100:8", "--outputs", "outputs")
    assert bad.returncode == 2 and "--outputs: not a bucket URI" in bad.stderr and "Traceback" not in bad.stderr
