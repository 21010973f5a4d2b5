"""`sftlaunch slurm`: the plan for a cluster's nodes, and the batch script that runs it under SLURM.

Pure functions build the hardware of the nodes and the script's text from the plan and judge the run directory's
storage from the mount table they are given; `submit` (sbatch) and `job_end` (the run directory, at the end of a
job) are the only ones that touch the world.

What the script does, in order: every node runs one `sftlaunch resume RUN_DIR` (srun, one task per node),
the rendezvous on the allocation's first node (`scontrol show hostnames`). The run directory was prepared
by `sftlaunch slurm` (plan.json, run.json "prepared"), so the first start and a requeued start are the same
command: resume continues from the last checkpoint, or starts at step 0 when there is none. SLURM's warning
signal (`--signal=B:USR1@SECONDS`, to the batch shell) is passed on as one SIGTERM to node 0's launcher,
which is the stop `sftlaunch` already turns into a checkpoint at the next step on every node (a signal to
every process of the job would reach each worker twice, through torchrun as well, and a second signal
aborts without the checkpoint). When the run says "interrupted", the script requeues the job.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from launcher.errors import ClusterError, ConfigError, Problem
from launcher.hardware import HardwareInfo
from launcher.rundir import RunDir

SCRIPT = RunDir.SLURM_SCRIPT
WARNING_SIGNAL = "USR1"
# Seconds before the time limit that SLURM warns the job: one training step and one checkpoint must fit.
WARNING_SECONDS = 300
# Folders that are local to each machine on every Linux cluster (and tmpfs mounts, found in the mount table).
LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
LOCAL_FS_TYPES = ("tmpfs", "ramfs")
# SLURM's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass(frozen=True)
class SlurmRequest:
    """What the user asked SLURM for (the flags of `sftlaunch slurm`)."""

    nodes: int
    gpus_per_node: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None


def check_request(req: SlurmRequest) -> None:
    problems = []
    if req.nodes < 1:
        problems.append(Problem("--nodes", "a job needs at least one node", "--nodes 1 or more", got=req.nodes))
    if req.gpus_per_node < 0:
        problems.append(Problem("--gpus-per-node", "cannot be negative", "--gpus-per-node 0 for CPU nodes", got=req.gpus_per_node))
    if req.time is not None and not TIME.match(req.time):
        problems.append(Problem("--time", "not a SLURM time limit", "minutes, HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)",
                                got=req.time))
    for flag, value in (("--partition", req.partition), ("--account", req.account)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]+", value):
            problems.append(Problem(flag, "not a SLURM name", "letters, digits, '_', '.', '-' (see `sinfo -s`)", got=value))
    if problems:
        raise ConfigError(problems)


def node_hardware(hw: HardwareInfo, req: SlurmRequest, from_profile: bool) -> HardwareInfo:
    """The hardware the plan is made for: the profile's (or this machine's) node, with the requested GPUs and nodes.

    The GPU model and memory come from the profile; a count it does not have is an error, not a guess.
    """
    where = f"the profile {hw.name}" if from_profile else "this machine"
    if req.gpus_per_node > len(hw.gpus):
        fix = ("--hardware PROFILE describing the cluster's nodes (sftlaunch plan --help lists the shipped ones), or a "
               "YAML file like launcher/profiles/a100-80gb-x8.yaml" if not hw.gpus else
               f"--gpus-per-node {len(hw.gpus)} or fewer, or a --hardware profile with more GPUs per node")
        raise ConfigError([Problem("--gpus-per-node", f"{where} has {len(hw.gpus)} GPU(s) per node", fix, got=req.gpus_per_node)])
    return hw.model_copy(update={"gpus": hw.gpus[:req.gpus_per_node], "nodes": req.nodes, "hub_reachable": None})


def shared_storage_problem(run_dir: Path, nodes: int, mounts: str) -> str | None:
    """Why run_dir is surely not on storage every node sees (a folder local to each machine), or None.

    `mounts` is /proc/self/mounts' text. A network file system cannot be told from a local disk in general,
    so only what is certainly local is refused.
    """
    if nodes < 2:
        return None
    path = os.path.realpath(run_dir)
    for prefix in LOCAL_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return f"{path} is under {prefix}, which is local to each machine"
    best, fstype = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, parts[2]
    if fstype in LOCAL_FS_TYPES:
        return f"{path} is on a {fstype} mount ({best}), which is in one machine's memory"
    return None


def sbatch_script(plan, run_dir: Path, req: SlurmRequest, launcher: tuple[str, ...] | None = None) -> str:
    """The batch script's text (pure). `launcher`: the command that runs sftlaunch on the nodes."""
    launcher = launcher or (sys.executable, "-m", "launcher.cli")
    run_dir = Path(run_dir)
    q = shlex.quote
    name = re.sub(r"[^A-Za-z0-9._-]", "_", run_dir.name)
    gpus = f"{req.gpus_per_node} GPU(s)" if req.gpus_per_node else "no GPU"
    head = [
        "#!/bin/bash",
        f"# sftlaunch on SLURM: {run_dir.name}, {req.nodes} node(s) x {gpus}, backend {plan.backend}, "
        f"{plan.world_size} training process(es).",
        f"# The plan (every decision and its reason) is {run_dir / RunDir.PLAN}; this script runs it unchanged.",
        f"# Submit: sbatch {run_dir / SCRIPT}   (or sftlaunch slurm ... --submit)",
        f"#SBATCH --job-name=sftlaunch-{name}",
        f"#SBATCH --nodes={req.nodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
    ]
    if req.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={req.gpus_per_node}")
    for flag, value in (("partition", req.partition), ("time", req.time), ("account", req.account)):
        if value:
            head.append(f"#SBATCH --{flag}={value}")
    head += [
        f"#SBATCH --output={run_dir / RunDir.SLURM_LOG}",
        "#SBATCH --open-mode=append",
        "# Requeue-able, and warned before the time limit: the warning becomes a checkpoint, then a requeue.",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:{WARNING_SIGNAL}@{WARNING_SECONDS}",
    ]
    body = f"""\
set -uo pipefail
RUN_DIR={q(str(run_dir))}
SFTLAUNCH=({' '.join(q(c) for c in launcher)})
PIDS="$RUN_DIR/{RunDir.SLURM_STATE}"
mkdir -p "$PIDS" && rm -f "$PIDS"/exit-"$SLURM_JOB_ID"-node-*

# The rendezvous: the allocation's first node, from SLURM's own node list; a port from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "sftlaunch: job $SLURM_JOB_ID (start ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# SLURM's warning (time limit) or a SIGTERM to this script: one SIGTERM to node 0's launcher. That stop reaches
# every rank on every node, which all checkpoint at the same next step.
stop=""
on_stop() {{
  stop="$1"
  echo "sftlaunch: $1 received: checkpointing at the next step, then requeueing"
  [ -s "$PIDS/launcher-$SLURM_JOB_ID-node-0.pid" ] && kill -TERM "$(cat "$PIDS/launcher-$SLURM_JOB_ID-node-0.pid")"
}}
trap 'on_stop {WARNING_SIGNAL}' {WARNING_SIGNAL}
trap 'on_stop TERM' TERM

# One launcher per node. A first start and a requeued one are the same command: resume continues from the last
# checkpoint (none yet: from step 0). Each node leaves its exit code in $PIDS for the failure report below.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  "${{@:4}}" resume "$1" --node-rank "$SLURM_NODEID" --master-addr "$2" --master-port "$3" &
  echo $! > "$0/launcher-$SLURM_JOB_ID-node-$SLURM_NODEID.pid"
  wait $!; code=$?
  echo "$code $(hostname)" > "$0/exit-$SLURM_JOB_ID-node-$SLURM_NODEID"
  exit $code' "$PIDS" "$RUN_DIR" "$MASTER_ADDR" "$MASTER_PORT" "${{SFTLAUNCH[@]}}" &
"""
    body += f"""step=$!
wait "$step"; code=$?
while kill -0 "$step" 2>/dev/null; do wait "$step"; code=$?; done  # a trap interrupts wait: wait again

# {RunDir.STATUS} says how the run ended; a node that failed is named there (slurm-end), and an interrupted run requeues.
next=$("${{SFTLAUNCH[@]}}" slurm-end "$RUN_DIR" --job "$SLURM_JOB_ID" --exit-code "$code" --stop "$stop")
if [ "$next" = requeue ]; then
  echo "sftlaunch: requeueing job $SLURM_JOB_ID; it continues with sftlaunch resume $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "sftlaunch: scontrol requeue failed; continue by hand: sbatch $RUN_DIR/{SCRIPT}" >&2
fi
exit "$code"
"""
    return "\n".join(head) + "\n\n" + body


def scheduler_fields(environ: Mapping[str, str]) -> dict:
    """run.json's `slurm` record when this process runs inside a SLURM job (else {})."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    return {"slurm": {"job_id": job, "nodes": environ.get("SLURM_JOB_NODELIST"),
                      "restarts": int(environ.get("SLURM_RESTART_COUNT") or 0)}}


def submit(script: Path) -> str:
    """sbatch the script; the job id, or the scheduler's refusal with its fix."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise ClusterError("sbatch is not on PATH: this machine is not a SLURM submit host. Fix: run `sftlaunch slurm "
                           f"... --submit` on the cluster's login node, or submit the written script there: sbatch {script}")
    out = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip().replace("sbatch: error: ", "")
        fix = "check the flags against `sinfo -s` (partitions) and `sacctmgr show assoc user=$USER` (accounts)"
        if "partition" in said.lower():
            fix = "pick a partition `sinfo -s` lists, with --partition"
        raise ClusterError(f"sbatch refused {script}: {said}. Fix: {fix}; the script is kept, edit it or rerun sftlaunch slurm.")
    return out.stdout.strip().split(";")[0]


def node_exits(folder: Path, job: str) -> list[dict]:
    """What each node's launcher exited with in this start of the job (files the script's srun line writes)."""
    ends = []
    for path in sorted(folder.glob(f"exit-{job}-node-*")):
        try:
            code, host = path.read_text().split(maxsplit=1)
            ends.append({"node": int(path.name.rsplit("-", 1)[1]), "host": host.strip(), "exit_code": int(code)})
        except (OSError, ValueError):
            continue
    return sorted(ends, key=lambda e: e["node"])


# Exit codes of a launcher that was stopped (a signal's 128 + N) rather than failing on its own: SIGTERM/SIGKILL
# from srun's --kill-on-bad-exit after another node failed, or the stop before a requeue.
STOPPED_CODES = (130, 137, 143)


def job_end(run_dir, job: str, exit_code: int, stop: str) -> str:
    """After srun: "requeue" when the run checkpointed on the scheduler's warning, else "done"; a failed job leaves
    run.json naming the node, its host and why. (The script's last step: `sftlaunch slurm-end`.)"""
    run_dir = RunDir(run_dir)
    state = run_dir.status()
    status = state.get("status")
    slurm = {**(state.get("slurm") or {}), "job_id": job, "srun_exit_code": exit_code}
    if status == "interrupted" and stop:
        run_dir.write_status("interrupted", slurm={**slurm, "requeued": True})
        return "requeue"
    if status == "completed":
        run_dir.write_status("completed", slurm=slurm)
        return "done"
    ends = node_exits(run_dir.file(RunDir.SLURM_STATE), job)
    failed = [e for e in ends if e["exit_code"] != 0]
    cause = next((e for e in failed if e["exit_code"] not in STOPPED_CODES), failed[0] if failed else None)
    log = run_dir.slurm_log(job)
    if cause is None:
        if status in ("starting", "running", "prepared", "queued"):  # no node said anything: killed outright
            run_dir.write_status("failed", slurm=slurm, exit_code=exit_code,
                                 error=f"the SLURM job step ended with code {exit_code} before any node recorded its end; see {log}")
        else:
            run_dir.write_status(status, slurm=slurm)
        return "done"
    where = {"node": cause["node"], "host": cause["host"]}
    if status in ("failed", "out_of_memory", "killed") and state.get("error"):
        # A rank recorded why (run.json has it): say on which node it ran, keep the rank's own words.
        run_dir.write_status(status, slurm=slurm, **{k: v for k, v in where.items() if k not in state})
    else:
        run_dir.write_status("failed", slurm=slurm, exit_code=cause["exit_code"], **where,
                             error=f"node {cause['node']} ({cause['host']}): sftlaunch exited with code {cause['exit_code']}; "
                                   f"its error is in {log}")
    return "done"
