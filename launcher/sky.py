"""`sftlaunch sky`: a SkyPilot task that runs a recipe in the `cuda` image on cloud GPUs.

Pure: the task is built from the request and returned as YAML text. SkyPilot itself is needed only to launch
(`--launch`) and to check the file (`sky.Task.from_yaml`, the extra `sftlaunch[sky]`).

The task follows `docker run` semantics: the image runs sftlaunch, the run directory lives on a mounted bucket
(it outlives the VMs), HF_TOKEN is declared with no value and given at launch (`--env HF_TOKEN`), never
written into the file. Several nodes use sftlaunch's own multi-node launch (torchrun's static rendezvous on
SkyPilot's first node IP). A restarted task (a preempted spot VM brought back by `sky jobs launch`) finds the
run directory and continues it with `sftlaunch resume`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.errors import ConfigError, Problem
from launcher.rundir import RunDir

# SkyPilot accelerator names -> the shipped profile of one such machine (the GPU's memory decides the plan).
ACCELERATOR_PROFILES = {
    "A100": "a100-40gb-x8", "A100-80GB": "a100-80gb-x8", "H100": "h100-80gb-x8", "A10G": "a10g-24gb", "T4": "t4-16gb",
}
OUTPUTS = "/outputs"  # where the bucket is mounted in the container
TASK = "/workspace/task"  # the recipe is mounted here under its own file name
MASTER_PORT = 29500
GPUS = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*):([1-9]\d*)$")


@dataclass(frozen=True)
class SkyRequest:
    gpus: str  # SkyPilot's accelerators, NAME:COUNT per node
    nodes: int = 1
    cloud: str | None = None
    image: str = "sftlaunch:cuda"
    outputs: str = ""  # the bucket (s3://, gs://, r2://, ...) the run directories are written to


def parse_gpus(gpus: str) -> tuple[str, int]:
    m = GPUS.match(gpus or "")
    if not m:
        raise ConfigError([Problem("--gpus", "not NAME:COUNT", "SkyPilot's accelerator and count per node, e.g. A100:8 "
                                   "(`sky show-gpus` lists them)", got=gpus)])
    return m.group(1), int(m.group(2))


def profile_for(gpus: str, profile: str | None) -> str:
    """The profile to plan with: --hardware, or the shipped one for a known accelerator."""
    name, _ = parse_gpus(gpus)
    if profile:
        return profile
    if name not in ACCELERATOR_PROFILES:
        raise ConfigError([Problem("--gpus", f"no shipped profile describes {name}", "add --hardware PROFILE (a YAML file "
                                   "describing one node; see launcher/profiles/a100-80gb-x8.yaml), or use one of "
                                   + ", ".join(ACCELERATOR_PROFILES), got=gpus)])
    return ACCELERATOR_PROFILES[name]


def check_request(req: SkyRequest) -> None:
    problems = []
    if req.nodes < 1:
        problems.append(Problem("--nodes", "a task needs at least one node", "--nodes 1 or more", got=req.nodes))
    if not re.match(r"^[a-z0-9]+://[^\s]+$", req.outputs or ""):
        problems.append(Problem("--outputs", "not a bucket URI: the run directory must outlive the VMs", "a bucket SkyPilot "
                                "can mount, e.g. s3://my-bucket/sftlaunch or gs://my-bucket/sftlaunch", got=req.outputs or None))
    if problems:
        raise ConfigError(problems)


def task_yaml(plan, req: SkyRequest, recipe_path: Path, overrides: tuple[str, ...], run_name: str) -> str:
    """The SkyPilot task's YAML text (pure)."""
    q = shlex.quote
    run_dir = f"{OUTPUTS}/{run_name}"
    recipe_in_task = f"{TASK}/{Path(recipe_path).name}"
    run_args = " ".join(q(o) for o in overrides)
    resources: dict = {"accelerators": req.gpus, "image_id": f"docker:{req.image}"}
    if req.cloud:
        resources["cloud"] = req.cloud
    task = {
        "name": f"sftlaunch-{re.sub(r'[^a-z0-9-]', '-', run_name.lower())}"[:60].rstrip("-"),
        "num_nodes": req.nodes,
        "resources": resources,
        # No value here: `sky launch --env HF_TOKEN` passes the launching shell's token; it is never in this file.
        "envs": {"HF_TOKEN": None},
        "file_mounts": {
            OUTPUTS: {"source": req.outputs, "mode": "MOUNT"},
            recipe_in_task: str(Path(recipe_path).resolve()),
        },
        "run": f"""\
set -euo pipefail
RUN_DIR={q(run_dir)}
MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)
NODE=(--node-rank "$SKYPILOT_NODE_RANK" --master-addr "$MASTER_ADDR" --master-port {MASTER_PORT})
# A restarted task (spot VM preempted, brought back by `sky jobs launch`) continues from the last checkpoint.
if [ -f "$RUN_DIR/{RunDir.STATUS}" ]; then
  exec sftlaunch resume "$RUN_DIR" "${{NODE[@]}}"
fi
exec sftlaunch run {q(recipe_in_task)}{' ' + run_args if run_args else ''} --nnodes "$SKYPILOT_NUM_NODES" "${{NODE[@]}}" --run-dir "$RUN_DIR"
""",
    }
    header = (f"# sftlaunch on SkyPilot: {run_name}, {req.nodes} node(s) x {req.gpus}, planned as backend {plan.backend}, "
              f"{plan.world_size} training process(es)\n"
              f"# ({plan.hardware.name}; each node plans again on the GPUs it gets and writes {RunDir.PLAN} to {run_dir}).\n"
              f"# Launch: sky launch --env HF_TOKEN THIS_FILE   (spot VMs that come back after preemption: sky jobs launch)\n")
    return header + yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run script) as YAML literal blocks, readable as the shell script they are."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
