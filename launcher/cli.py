"""The `sftlaunch` command line. Heavy libraries (torch, transformers) load only inside commands that need them."""

from __future__ import annotations

import json
import os
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


def _detected():
    """This machine's hardware, or the user's mistake in describing it (e.g. CUDA_VISIBLE_DEVICES) as an error."""
    from launcher.hardware import detect

    try:
        return detect()
    except SftlaunchError as exc:
        _fail(exc)


def _hardware(profile: str | None):
    from launcher.hardware import detect, load_profile

    return load_profile(profile) if profile else detect()


def _plan(recipe_path: str, overrides, profile: str | None, backend: str | None, nnodes: int | None = None, check: bool = False,
          hardware=None):
    """hardware: the nodes to plan for, when the caller made them (sftlaunch slurm); else the profile or this machine."""
    from launcher.hardware import detect, load_profile, start_rate_probe, with_rates
    from launcher.memory import find_shape
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    detected = hardware is None and profile is None
    if detected:  # the probe's child imports torch while this process reads the recipe and counts the data
        start_rate_probe()
    if backend:
        overrides = [*overrides, f"hardware.backend={backend}"]
    recipe = load_recipe(recipe_path, overrides)
    hw = hardware or (load_profile(profile) if profile else detect(probe_rates=False))
    if check or profile is None:  # inputs on this machine (a plan for another machine cannot see its files)
        from launcher.data import check_paths
        from launcher.models import check_reference
        from launcher.trackers import check_installed

        check_reference(recipe.model.name, hub_reachable=None if profile else hw.hub_reachable)
        for line in check_paths(recipe):  # the chat task's files: each one's format and the split
            click.echo(line, err=True)
        check_installed(recipe.train.report_to)
    if nnodes:
        hw = hw.model_copy(update={"nodes": nnodes})
    shape, source = find_shape(recipe.model.name)
    if shape is None:
        plan = make_plan(recipe, with_rates(hw) if detected else hw, shape, source)
    else:  # the time prediction needs the data's size, counted for the plan's data and max_length, and the rates
        data = _data_size(recipe, make_plan(recipe, hw, shape, source))
        if not isinstance(data, str):  # how long an earlier run's evaluations of the same items decoded
            from launcher.history import measured_answers

            data = data.model_copy(update={"measured_answers": measured_answers(recipe)})
        plan = make_plan(recipe, with_rates(hw) if detected else hw, shape, source, data=data)
    if check:
        _check_backend(plan, hw)
    return plan


def _data_size(recipe, plan):
    """The training data's size (launcher.data.measure_size), or why it cannot be measured here."""
    from launcher.data import cached_size
    from launcher.models import local_files
    from launcher.tasks import gsm8k

    data_path = plan.data_path
    if recipe.data.task == "gsm8k" and data_path is None:
        if (recipe.data.dataset, recipe.data.dataset_config) != gsm8k.HUB_DATASET:
            return f"the data ({recipe.data.dataset}) is on the Hub: its size is known once the run loads it"
        data_path = str(gsm8k.BUNDLED)  # the same dataset, shipped with sftlaunch
    try:
        return cached_size(recipe, data_path, plan.max_length, local_files(recipe.model.name))
    except (SftlaunchError, OSError) as exc:
        return f"the data could not be measured here ({str(exc).splitlines()[0][:200]})"


def _check_backend(plan, hw) -> None:
    from launcher.errors import PlanError
    from launcher.plan import runnable_here

    problems = runnable_here(plan, hw)
    if problems:
        raise PlanError(f"the {plan.backend} backend cannot run this plan here: " + "; ".join(problems))


def node_commands(plan, recipe_path: str, overrides, run_name: str) -> list[str]:
    """The exact command each node of a multi-node job runs (same run directory on a shared filesystem)."""
    import shlex

    out = []
    for rank in range(plan.nodes):
        cmd = ["sftlaunch", "run", recipe_path, *overrides, "--nnodes", str(plan.nodes), "--node-rank", str(rank),
               "--master-addr", "NODE0_ADDRESS", "--master-port", "29500", "--run-dir", f"{plan.recipe.output.dir}/{run_name}"]
        out.append(f"node {rank}: " + " ".join(shlex.quote(c) for c in cmd))
    return out


def render_plan(plan) -> str:
    lines = [f"plan for {plan.recipe.model.name} on {plan.hardware.name} hardware:"]
    width = max(len(d.field) for d in plan.decisions)
    for d in plan.decisions:
        lines.append(f"  {d.field:<{width}} = {str(d.value):<6}  # {d.reason}")
    return "\n".join(lines)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sftlaunch")
def main():
    """Fine-tune a model (LoRA, or every weight with model.method=full) from a YAML recipe, with settings decided
    from the hardware.

    \b
    sftlaunch RECIPE [key.path=value ...]     plan, train and evaluate (same as `sftlaunch run`)
    sftlaunch plan RECIPE [--hardware NAME]   show every decision and its reason, without training
    sftlaunch runs [DIR]                      past runs, newest first
    sftlaunch slurm RECIPE --nodes N --gpus-per-node G [--submit]   a SLURM batch job that requeues itself
    sftlaunch sky RECIPE --gpus A100:8 --outputs s3://BUCKET [--launch]   a SkyPilot task for cloud GPUs
    """


SMOKE_STEPS, SMOKE_ITEMS = 10, 10


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--backend", help="Override the automatic backend choice (cpu, cuda, deepspeed, mps).")
@click.option("--smoke", is_flag=True, help=f"Check a set-up in a minute: at most {SMOKE_STEPS} steps, {SMOKE_ITEMS} eval items.")
@click.option("--nnodes", type=click.IntRange(min=1), help="Nodes in a multi-node DeepSpeed job.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This node's rank (node 0 evaluates).")
@click.option("--master-addr", help="Address of node 0, reachable from every node (torchrun rendezvous; needed with "
              "several nodes; one node: 127.0.0.1).")
@click.option("--master-port", type=click.IntRange(1, 65535), help="Port on node 0 (default: 29500 for several nodes, a free port for one).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Use this run directory (multi-node: needed, the same path "
              "on storage every node sees).")
def run(recipe, overrides, backend, smoke, nnodes, node_rank, master_addr, master_port, run_dir):
    """Plan, train and evaluate RECIPE (overrides: key.path=value)."""
    from launcher.errors import PlanError

    try:
        if smoke:
            overrides = _smoke_overrides(recipe, overrides)
        plan = _plan(recipe, overrides, None, backend, nnodes=nnodes, check=True)
        check_rendezvous(plan.nodes, node_rank, master_addr)
        if plan.nodes > 1 and not run_dir:
            raise PlanError(f"a {plan.nodes}-node job needs --run-dir: one folder on storage every node sees (each node "
                            "writes its checkpoint shards there, and node 0 reads them to evaluate). Fix: --run-dir "
                            "/shared/path/run-name on every node.")
        from launcher.rundir import RunDir, create_run_dir

        status = RunDir(run_dir).status().get("status") if run_dir else None
        if status and node_rank == 0:
            # Node 0 writes run.json when it starts a job; the other nodes only join the directory (and may
            # write plan.json before node 0 does), so run.json, not plan.json, marks a run that exists.
            raise PlanError(f"--run-dir {run_dir} already holds a run ({status}); starting here would overwrite its plan "
                            f"and results. Fix: sftlaunch resume {run_dir}, or give --run-dir a new folder.")
        click.echo(render_plan(plan))
        path = create_run_dir(plan, recipe, suffix="-smoke" if smoke else "", explicit=run_dir)
        click.echo(f"run directory: {path}" + ("  (smoke run)" if smoke else ""))
        if node_rank == 0:
            from launcher.slurm import scheduler_fields

            path.write_status("starting", recipe=str(recipe), overrides=list(overrides), smoke=smoke, launcher_pid=os.getpid(),
                              **scheduler_fields(os.environ))
    except SftlaunchError as exc:
        _fail(exc)
    _launch(plan, path, resume=False, rendezvous=_rendezvous(plan, node_rank, master_addr, master_port))


def check_rendezvous(nodes: int, node_rank: int, master_addr: str | None) -> None:
    """A node's place in a multi-node job, checked before anything is started or written."""
    from launcher.errors import PlanError

    if node_rank >= nodes:
        raise PlanError(f"--node-rank {node_rank} is outside the {nodes}-node job. Fix: 0 <= --node-rank < --nnodes.")
    if nodes > 1 and not master_addr:
        # The default 127.0.0.1 made node 0 listen where no other machine can reach it, and the others wait.
        raise PlanError(f"a {nodes}-node job needs --master-addr: node 0's address, reachable from every node "
                        "(127.0.0.1 only when every node runs on this machine). Fix: --master-addr NODE0_ADDRESS on every node.")


def _rendezvous(plan, node_rank: int, master_addr: str | None, master_port: int | None):
    from launcher.backends.base import Rendezvous

    if master_port is None:
        master_port = 29500 if plan.nodes > 1 else _free_port()
    return Rendezvous(node_rank, master_addr or "127.0.0.1", master_port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The states a run can be resumed from (run.json's status as the worker and launcher write it). "prepared" and
# "queued": written by `sftlaunch slurm` before the job first starts; resume then starts it at step 0.
PREPARED = ("prepared", "queued")
RESUMABLE = ("starting", "running", "interrupted", "failed", "out_of_memory", "killed", *PREPARED)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Multi-node run: this node's rank (run `sftlaunch resume` on every node).")
@click.option("--master-addr", help="Multi-node run: address of node 0, reachable from every node.")
@click.option("--master-port", type=click.IntRange(1, 65535), help="Multi-node run: port on node 0 (default 29500).")
def resume(run_dir, node_rank, master_addr, master_port):
    """Continue an interrupted run from its last checkpoint, with the same plan and data order."""
    from launcher.errors import PlanError
    from launcher.hardware import detect
    from launcher.rundir import RunDir

    path = RunDir(run_dir)
    try:
        plan = path.read_plan()
        check_rendezvous(plan.nodes, node_rank, master_addr)
        state = path.status().get("status")
        if state == "completed":
            raise PlanError(f"{run_dir} already completed; nothing to resume.")
        if state not in RESUMABLE:
            # An edited run.json: resuming it retrained 0 steps and replaced the recorded training statistics.
            raise PlanError(f"{path.file(path.STATUS)} says status={state!r}, which sftlaunch never writes; the run's "
                            "files cannot be trusted to resume from. Fix: start a new run from the recipe "
                            f"({path.file(path.RECIPE)}).")
        live = path.live_process() if node_rank == 0 else None  # the pids in run.json are node 0's
        if live:
            raise PlanError(f"{run_dir} is still running ({live}, {RunDir.STATUS} says {state}); two workers must not share a run. "
                            f"Fix: wait for it to end, or stop it (kill -TERM {live.rsplit(' ', 1)[1]}) and resume then.")
        _check_backend(plan, detect())
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(render_plan(plan))
    if node_rank == 0:
        from launcher.slurm import scheduler_fields

        if state in PREPARED:
            click.echo(f"starting the prepared run {run_dir} (no checkpoint yet: from step 0)")
        path.write_status("starting", resumed=state not in PREPARED, launcher_pid=os.getpid(), **scheduler_fields(os.environ))
    _launch(plan, path, resume=True, rendezvous=_rendezvous(plan, node_rank, master_addr, master_port))


def _launch(plan, run_dir, resume: bool, rendezvous) -> None:
    """Start the plan's backend on run_dir (a RunDir), back off on out-of-memory, print the summary."""
    from launcher.backends import BACKENDS
    from launcher.evaluate import format_comparison
    from launcher.health import TrainingHealthError
    from launcher.launch import run as run_spec
    from launcher.oom import EXIT_OUT_OF_MEMORY, back_off, no_back_off
    from launcher.signals import oom_kills, shell_exit_code
    from launcher.trained import output_word

    while True:
        oom_before = oom_kills()
        if rendezvous.node_rank == 0:
            run_dir.clear_rank_ends()  # a retry or a resume starts with no rank's end recorded
        code = run_spec(BACKENDS[plan.backend].build(plan, run_dir.path, resume=resume, rendezvous=rendezvous), run_dir.path)
        rank_code = run_dir.record_rank_ends(code, write=rendezvous.node_rank == 0) if plan.world_size > 1 else None
        if rank_code is not None:  # the rank that failed first, not torchrun's "1"
            code = rank_code
        elif rendezvous.node_rank == 0:  # run.json ends true even when the worker was killed before it could write
            code = run_dir.record_worker_end(code, oom_before, oom_kills())
        else:
            code = shell_exit_code(code)
        if code != EXIT_OUT_OF_MEMORY or rendezvous.node_rank != 0:
            break
        try:
            no_back_off(plan, run_dir.status())
            plan = back_off(plan, run_dir)
        except SftlaunchError as exc:
            _fail(exc)
        click.echo(f"out of memory: retrying from the last checkpoint with micro-batch {plan.micro_batch_size} "
                   f"x accumulation {plan.gradient_accumulation_steps} (recorded in {run_dir.file(run_dir.OOM_BACKOFF)})")
        resume = True
    comparison = run_dir.read_comparison() if rendezvous.node_rank == 0 else None
    if comparison is not None and code in (0, TrainingHealthError.exit_code):
        # The worker printed each model's metrics; this is the side-by-side summary (also for a collapsed run).
        click.echo(format_comparison(comparison))
    if code != 0:
        click.echo(f"error: the {plan.backend} worker exited with code {code}; see {run_dir.file(run_dir.STATUS)}", err=True)
        sys.exit(code)
    if rendezvous.node_rank != 0:
        click.echo(f"node {rendezvous.node_rank} finished; node 0 evaluates and writes the results")
        return
    click.echo(f"{output_word(plan.recipe.model.method)}, metrics and predictions: {run_dir}")
    if plan.hardware.name == "detected":
        from launcher.hardware import refresh_rates_later

        refresh_rates_later()


def _smoke_overrides(recipe_path, overrides) -> list[str]:
    """Cap steps and evaluation items (keeping a recipe's smaller values)."""
    from launcher.recipe import load_recipe

    r = load_recipe(recipe_path, overrides)
    steps = min(SMOKE_STEPS, r.train.max_steps or SMOKE_STEPS)
    items = min(SMOKE_ITEMS, r.eval.limit or SMOKE_ITEMS)
    return [*overrides, f"train.max_steps={steps}", f"eval.limit={items}"]


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
    if as_json:
        summary = p.summary()
        if p.nodes > 1:
            summary["node_commands"] = node_commands(p, recipe, overrides, "RUN_NAME")
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(render_plan(p))
    if p.nodes > 1:
        click.echo(f"\nthis is a {p.nodes}-node job; run on each node (RUN_NAME: one shared run directory):")
        for line in node_commands(p, recipe, overrides, "RUN_NAME"):
            click.echo("  " + line)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--nodes", type=int, required=True, help="Nodes to run on (several: DeepSpeed, hardware.backend=deepspeed on CPU nodes).")
@click.option("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes); at most what the --hardware profile has.")
@click.option("--partition", help="SLURM partition (sbatch --partition); default: the cluster's default.")
@click.option("--time", "time_limit", help="Time limit (sbatch --time, e.g. 04:00:00); the job checkpoints and requeues "
              "itself before it.")
@click.option("--account", help="SLURM account to charge (sbatch --account).")
@click.option("--hardware", "profile", help="A profile (shipped name or YAML file) describing one node; default: this machine.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: a new one under output.dir). "
              "It must be on storage every node sees (NFS, Lustre, GPFS...), never /tmp.")
@click.option("--submit", is_flag=True, help="Submit the script with sbatch and print the job id (else only write and show it).")
def slurm(recipe, overrides, nodes, gpus_per_node, partition, time_limit, account, profile, run_dir, submit):
    """Plan RECIPE for a SLURM cluster's nodes and write RUN_DIR/slurm.sbatch; --submit submits it.

    The run directory must be on storage all nodes see. The job starts `sftlaunch resume RUN_DIR` on every node
    (srun), checkpoints on SLURM's warning before the time limit, requeues itself and continues where it stopped.
    Without --submit nothing is submitted: read the plan and the script first.
    """
    from launcher import slurm as sl
    from launcher.errors import PlanError
    from launcher.rundir import RunDir, create_run_dir

    req = sl.SlurmRequest(nodes, gpus_per_node, partition, time_limit, account)
    try:
        sl.check_request(req)
        hw = sl.node_hardware(_hardware(profile), req, from_profile=profile is not None)
        plan = _plan(recipe, overrides, profile, None, hardware=hw)
        if plan.nodes != nodes:
            raise PlanError(f"--nodes {nodes}, but the plan runs the {plan.backend} backend, which uses one node. Fix: "
                            "hardware.backend=deepspeed (several nodes), or --nodes 1.")
        target = Path(run_dir) if run_dir else Path(plan.recipe.output.dir)
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            mounts = ""
        problem = sl.shared_storage_problem(target, nodes, mounts)
        if problem:
            key = "--run-dir" if run_dir else "output.dir"
            raise PlanError(f"{key}: {problem}; the other {nodes - 1} node(s) cannot see it. Fix: {key} on storage every node "
                            "mounts (the cluster's shared home or scratch file system).")
        existing = RunDir(run_dir).status().get("status") if run_dir else None
        if existing:
            raise PlanError(f"--run-dir {run_dir} already holds a run ({existing}); writing here would replace its plan. "
                            f"Fix: submit its own script (sbatch {Path(run_dir) / RunDir.SLURM_SCRIPT}), or give --run-dir a new folder.")
        click.echo(render_plan(plan))
        path = create_run_dir(plan, recipe, explicit=str(Path(run_dir).absolute()) if run_dir else None)
        path = RunDir(path.path.absolute())
        script = path.file(RunDir.SLURM_SCRIPT)
        script.write_text(sl.sbatch_script(plan, path.path, req))
        path.write_status("prepared", recipe=str(recipe), overrides=list(overrides), smoke=False,
                          slurm={"script": str(script), "nodes": nodes, "gpus_per_node": gpus_per_node})
        click.echo(f"\nrun directory: {path}\n--- {script} ---")
        click.echo(script.read_text())
        if not submit:
            click.echo(f"not submitted. Submit with: sbatch {script}   (or add --submit)")
            return
        job = sl.submit(script)
        path.write_status("queued", slurm={"script": str(script), "job_id": job})
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(f"submitted batch job {job}; follow it: squeue -j {job}; tail -f {path.slurm_log(job)}")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--gpus", required=True, help="SkyPilot accelerators per node, NAME:COUNT (e.g. A100:8, H100:8).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes (several: DeepSpeed across them).")
@click.option("--cloud", help="Cloud to use (aws, gcp, azure, ...); default: SkyPilot picks the cheapest it can reach.")
@click.option("--image", default="sftlaunch:cuda", show_default=True,
              help="The cuda image, in a registry the cloud can pull from (docker tag + docker push).")
@click.option("--outputs", required=True, help="Bucket for the run directories (s3://..., gs://...), mounted at /outputs.")
@click.option("--hardware", "profile", help="A profile describing one node (default: the shipped one for --gpus).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Where to write the task (default: RECIPE_STEM.sky.yaml).")
@click.option("--launch", is_flag=True, help="Run `sky launch` on the task (SkyPilot installed and a cloud configured).")
def sky(recipe, overrides, gpus, nodes, cloud, image, outputs, profile, out_file, launch):
    """Write a SkyPilot task that runs RECIPE in the cuda image on cloud GPUs; --launch launches it."""
    import re as _re
    from datetime import datetime

    from launcher import sky as sk
    from launcher.errors import ClusterError, PlanError
    from launcher.slurm import SlurmRequest, node_hardware

    req = sk.SkyRequest(gpus, nodes, cloud, image, outputs)
    try:
        sk.check_request(req)
        name, count = sk.parse_gpus(gpus)
        hw = node_hardware(_hardware(sk.profile_for(gpus, profile)), SlurmRequest(nodes, count), from_profile=True)
        plan = _plan(recipe, overrides, sk.profile_for(gpus, profile), None, hardware=hw)
        if plan.nodes != nodes:
            raise PlanError(f"--nodes {nodes}, but the plan runs the {plan.backend} backend, which uses one node. Fix: "
                            "hardware.backend=deepspeed, or --nodes 1.")
        stem = _re.sub(r"[^A-Za-z0-9._-]+", "_", Path(recipe).stem) or "run"
        run_name = plan.recipe.output.name or f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        text = sk.task_yaml(plan, req, Path(recipe), tuple(overrides), run_name)
        target = Path(out_file or f"{stem}.sky.yaml")
        from launcher.errors import writing

        with writing(target, "--out"):
            target.write_text(text)
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(render_plan(plan))
    click.echo(f"\n--- {target} ---\n{text}")
    if not launch:
        click.echo(f"not launched. Launch with: HF_TOKEN=... sky launch --env HF_TOKEN {target}   (or add --launch)")
        return
    import shutil
    import subprocess

    exe = shutil.which("sky")
    if exe is None:
        _fail(ClusterError("`sky` is not on PATH. Fix: pip install 'sftlaunch[sky]' and `sky check` a cloud, or launch "
                           f"the written task from a machine that has SkyPilot: sky launch --env HF_TOKEN {target}"))
    sys.exit(subprocess.call([exe, "launch", "--yes", "--env", "HF_TOKEN", str(target)]))


@main.command(name="slurm-end", hidden=True)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--job", required=True)
@click.option("--exit-code", type=int, required=True)
@click.option("--stop", default="")
def slurm_end(run_dir, job, exit_code, stop):
    """The batch script's last step: record how the job ended; print `requeue` when it should requeue."""
    from launcher.slurm import job_end

    try:
        click.echo(job_end(run_dir, job, exit_code, stop))
    except SftlaunchError as exc:
        _fail(exc)


@main.command(name="eval")
@click.argument("target", type=click.Path(exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="Items to evaluate: a JSON array of [question, answer] (unit conversion), a JSONL file (GSM8K), or a chat-task file in any of its formats.")
@click.option("--metrics", help="chat task: generation metrics, comma-separated (exact,contains,numeric,regex,judge); sets eval.metrics.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N items.")
@click.option("--all", "all_items", is_flag=True, help="The whole held-out/test split (ignore eval.limit).")
@click.option("--compare", is_flag=False, flag_value="base", default=None, metavar="[BASE]",
              help="Also evaluate a base model on the same items: the run's own base model, or the model given.")
@click.option("--generations", type=click.Path(dir_okay=False, exists=True), help='Score generations made elsewhere: JSONL of {"generated": TEXT} per item, in order.')
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write one JSON line per item here.")
@click.option("--force", is_flag=True, help="Let --predictions replace an existing file (never a run directory's own).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of the metrics.")
def eval_cmd(target, overrides, data_file, metrics, limit, all_items, compare, generations, predictions, force, as_json):
    """Evaluate a run directory's trained model (its adapter or full model), or a recipe's base model."""
    if metrics is not None:
        overrides = (*overrides, f"eval.metrics=[{metrics}]")
    try:
        from launcher.eval_target import EvalRequest, run_eval

        out = run_eval(EvalRequest(target, tuple(overrides), data_file, limit, all_items, compare, generations, predictions, force))
    except SftlaunchError as exc:
        _fail(exc)
    from launcher.evaluate import format_comparison, format_metrics

    metrics = out["result"]
    if "comparison" in out:
        click.echo(format_comparison(out["comparison"]))
        if "comparison_file" in out:
            click.echo(f"comparison written to {out['comparison_file']}")
    else:
        click.echo(format_metrics("result", metrics))
    if as_json:
        click.echo(json.dumps({k: metrics[k] for k in ("accuracy", "answer_rate", "loss", "n", "decoding", "error_kinds",
                                                          "calculator_calls", "rows_with_calculator") if k in metrics}))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir):
    """Draw RUN_DIR/plots/training.png and comparison.png again from the run's files."""
    from launcher.plots import draw
    from launcher.rundir import RunDir

    from launcher.errors import writing

    path = RunDir(run_dir)
    try:
        path.read_plan()
        with writing(path.plots, "plot"):
            written = draw(path)
    except SftlaunchError as exc:
        _fail(exc)
    if not written:  # a state of the run, not a bug: exit 2 like other refusals
        from launcher.errors import PlanError

        _fail(PlanError(f"{run_dir} has no logged steps and no comparison yet: nothing to draw. Fix: plot a run "
                        "that has trained at least one logged step."))
    for p in written:
        click.echo(str(p))


@main.command()
@click.argument("folder", default="outputs", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the runs.")
def runs(folder, as_json):
    """List the run directories in FOLDER (default: outputs), newest first."""
    from launcher.history import format_table, list_runs

    try:
        rows = list_runs(folder)
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--merge", is_flag=True, help="Merge the adapter into the base weights (in fp32) and save a full model.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Weights of the merged model (cast after the fp32 merge).")
@click.option("--check", "check_items", type=click.IntRange(min=1), default=10, show_default=True,
              help="Evaluation items whose greedy generations must match between the export and base + adapter.")
def export(run_dir, out, merge, dtype, check_items):
    """Export RUN_DIR's model to OUT: the adapter, or with --merge a model that loads without PEFT."""
    from launcher.export import export as do_export
    from launcher.rundir import RunDir

    try:
        do_export(RunDir(run_dir), Path(out), merge=merge, dtype=dtype, check_items=check_items, log=click.echo)
    except SftlaunchError as exc:
        _fail(exc)


@main.group()
def docker():
    """Build the image, or run a recipe in a container (the docker Python SDK)."""


@docker.command(name="build")
@click.option("--target", type=click.Choice(["cuda", "cpu"]), help="Image target (default: cuda if this host has NVIDIA GPUs, else cpu).")
@click.option("--tag", help="Image tag (default: sftlaunch:TARGET).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="Docker build argument, e.g. BASE_IMAGE=...")
@click.option("--network", help="Build network mode (e.g. host).")
@click.option("--context", type=click.Path(exists=True, file_okay=False), help="Build context (default: this project).")
def docker_build(target, tag, build_args, network, context):
    """Build the image with the project's pinned versions."""
    from launcher import docker_cmd

    target = target or docker_cmd.default_target(bool(_detected().gpus))
    args = {}
    for item in build_args:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(docker_cmd.DockerError(f"--build-arg {item!r} must be KEY=VALUE"))
        args[key] = value
    tag = tag or f"sftlaunch:{target}"
    try:
        image = docker_cmd.build(target=target, tag=tag, context=Path(context) if context else docker_cmd.ROOT,
                                 build_args=args, network=network, log=click.echo)
    except SftlaunchError as exc:
        _fail(exc)
    click.echo(f"built {tag} ({image})")


@docker.command(name="run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--image", help="Image to run (default: sftlaunch:cuda with GPUs, else sftlaunch:cpu).")
@click.option("--outputs", type=click.Path(file_okay=False), default="outputs", show_default=True, help="Host folder for run directories.")
@click.option("--hf-cache", type=click.Path(file_okay=False), help="Host Hugging Face cache to mount (default: ~/.cache/huggingface).")
@click.option("--mount", "mounts", multiple=True, metavar="HOST:CONTAINER", help="Extra read-only mount (data, local models).")
@click.option("--smoke", is_flag=True, help="Smoke run inside the container.")
@click.option("--network", help="Container network mode (e.g. none, host).")
def docker_run(recipe, overrides, image, outputs, hf_cache, mounts, smoke, network):
    """Run RECIPE in a container: GPUs when present, caches and outputs mounted, the container's exit code returned."""
    from launcher import docker_cmd
    from launcher.recipe import load_recipe

    try:  # the recipe and overrides first: a typo should not wait for an engine, an image or a container
        load_recipe(recipe, overrides)
    except SftlaunchError as exc:
        _fail(exc)
    gpus = bool(_detected().gpus)
    pairs = []
    for m in mounts:
        host, sep, inside = m.partition(":")
        if not sep or not inside.startswith("/"):
            _fail(docker_cmd.DockerError(f"--mount {m!r} must be HOST:/container/path"))
        pairs.append((host, inside))
    req = docker_cmd.RunRequest(
        image=image or f"sftlaunch:{docker_cmd.default_target(gpus)}", recipe=Path(recipe), overrides=tuple(overrides),
        outputs=Path(outputs), hf_cache=Path(hf_cache) if hf_cache else Path.home() / ".cache" / "huggingface",
        gpus=gpus, smoke=smoke, mounts=tuple(pairs), network=network)
    try:
        code = docker_cmd.run(req, log=click.echo)
    except SftlaunchError as exc:
        _fail(exc)
    sys.exit(code)


@main.command()
def env():
    """Show the detected hardware and library versions."""
    from launcher.rundir import library_versions

    click.echo(json.dumps({"hardware": _detected().model_dump(mode="json"), "versions": library_versions()}, indent=2))


@main.command()
def schema():
    """Print the recipe's JSON Schema (every key with its description)."""
    from launcher.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


if __name__ == "__main__":
    main()
