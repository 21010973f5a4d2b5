"""Real multi-process training on CPU (DeepSpeed over gloo) and a simulated two-node job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, fault_env, run_cli

DS = ["hardware.backend=deepspeed", "eval.compare_base=false", "eval.limit=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def _assert_trained_adapter_loads(run_dir: Path, base: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it trained


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_on_cpu(tiny_recipe, tiny_model, tmp_path, stage):
    # bf16 whatever the CPU (emulated where it has no bf16 instructions): the engine's module is then bf16, and the
    # adapter must come from the optimizer's fp32 master weights, not from the module.
    result = run_cli(str(tiny_recipe), *DS, f"hardware.zero_stage={stage}", "train.save_steps=2", "hardware.precision=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    saved = load_file(_run_dir(tmp_path / "outputs") / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert any(bool((t != t.to(torch.bfloat16).float()).any()) for t in saved.values())  # fp32 bits a bf16 copy lacks
    assert f"zero_stage                  = {stage}" in result.stdout and "world_size                  = 2" in result.stdout
    if stage == 3:  # built inside deepspeed.zero.Init: no rank ever held the whole model
        held, whole = (int(n.replace(",", "")) for n in
                       result.stdout.split("this rank holds ")[1].split(" weights")[0].split(" of "))
        assert whole > 0 and held < whole
    run_dir = _run_dir(tmp_path / "outputs")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["train"]["steps"] == 4 and ev["trained"]["n"] == 3
    assert json.loads((run_dir / "plan.json").read_text())["eval_merge"]  # evaluated with the adapter merged in place
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    _assert_trained_adapter_loads(run_dir, tiny_model)


def test_two_node_job_simulated_on_one_machine(tiny_recipe, tiny_model, tmp_path):
    port, run_dir = _free_port(), tmp_path / "shared-run"
    common = [sys.executable, "-m", "launcher.cli", "run", str(tiny_recipe), *DS, "hardware.processes=1", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(port), "--run-dir", str(run_dir)]
    nodes = [subprocess.Popen([*common, "--node-rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy()) for r in (1, 0)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert "node 1 finished" in outs[0][0]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["nodes"], plan["world_size"]) == (2, 2)
    assert not (run_dir / "hostfile").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    _assert_trained_adapter_loads(run_dir, tiny_model)


def test_a_rank_out_of_memory_reaches_the_launcher_and_backs_off(tiny_recipe, tmp_path):
    # Only rank 1 runs out of memory. torchrun turns any failed worker into its own exit 1, so before the ranks
    # recorded their ends the launcher never saw 75 and the back-off never ran under DeepSpeed.
    result = run_cli(str(tiny_recipe), *DS, "hardware.zero_stage=2", "train.save_steps=1",
                     env=fault_env(oom_above_micro_batch=2, fault_rank=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retrying from the last checkpoint with micro-batch 2 x accumulation 2" in result.stdout
    run_dir = _run_dir(tmp_path / "outputs")
    (backoff,) = [json.loads(line) for line in (run_dir / "oom_backoff.jsonl").read_text().splitlines()]
    assert (backoff["from_micro_batch"], backoff["to_micro_batch"]) == (4, 2)
    assert backoff["error"].startswith(f"rank 1 (node 0, {socket.gethostname()}): ") and "out of memory" in backoff["error"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "eval.json").read_text())["train"]["steps"] == 4


def test_a_nan_on_one_rank_stops_every_rank_with_the_guards_exit_code(tiny_recipe, tmp_path):
    # The loss becomes NaN at step 2 on rank 1 only. Each rank used to judge only its own loss: rank 1 stopped, rank 0
    # went on into the next collective, and the user saw torchrun's 1 instead of the guard's 3.
    start = time.monotonic()
    result = run_cli(str(tiny_recipe), *DS, "hardware.zero_stage=2", "hardware.precision=fp32",
                     env=fault_env(nan_at_step=2, fault_rank=1), timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training stopped at optimizer step 2: the loss is nan on rank 1" in result.stderr
    run_dir = _run_dir(tmp_path / "outputs")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 3 and status["rank"] in (0, 1)
    assert status["health"]["ranks"] == [1] and status["health"]["step"] == 2
    ends = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")}
    assert {r: e["exit_code"] for r, e in ends.items()} == {0: 3, 1: 3}  # every rank stopped, at the same step
    assert not (run_dir / "adapter").exists()
    assert time.monotonic() - start < 240  # no rank waited for a collective's timeout


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_node_job_stopped_on_node_0_with_a_slow_checkpoint_then_resumed_on_both_nodes(tiny_recipe, tiny_model, tmp_path):
    # SIGTERM reaches node 0 only. Its ranks and node 1's must stop at the same step and write one checkpoint that
    # takes longer than torchrun's default 30 s of grace before SIGKILL; then `resume` on both nodes finishes the run.
    port, run_dir = _free_port(), tmp_path / "shared-run"
    args = [str(tiny_recipe), *DS, "hardware.processes=1", "train.max_steps=40", "train.save_steps=100"]
    common = [sys.executable, "-m", "launcher.cli", "run", *args, "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), "--run-dir", str(run_dir)]
    env = {**os.environ, **fault_env(slow_save_seconds=35)}
    nodes = [subprocess.Popen([*common, "--node-rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and any(json.loads(line).get("step", 0) >= 2 for line in metrics.read_text().splitlines()),
              300, "training to reach step 2")
    nodes[0].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [143, 143], [o[1][-2000:] for o in outs]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "interrupted" and status["phase"] == "training", status
    (checkpoint,) = (run_dir / "checkpoints").iterdir()  # written whole, not cut by a SIGKILL
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 40 and status["step"] == step  # stopped mid-training (6 steps could all be done before the signal)
    assert "on every node: sftlaunch resume" in outs[0][0]

    port = _free_port()
    resume = [sys.executable, "-m", "launcher.cli", "resume", str(run_dir), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [subprocess.Popen([*resume, "--node-rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy()) for r in (1, 0)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "eval.json").read_text())["train"]["steps"] == 40
    _assert_trained_adapter_loads(run_dir, tiny_model)


def test_multi_node_needs_an_address_and_a_shared_run_directory(tiny_recipe, tmp_path):
    no_addr = run_cli(str(tiny_recipe), *DS, "hardware.processes=1", "--nnodes", "2", "--run-dir", str(tmp_path / "r"))
    assert no_addr.returncode == 2 and "needs --master-addr" in no_addr.stderr and "Traceback" not in no_addr.stderr
    no_dir = run_cli(str(tiny_recipe), *DS, "hardware.processes=1", "--nnodes", "2", "--master-addr", "10.0.0.1")
    assert no_dir.returncode == 2 and "needs --run-dir" in no_dir.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "outputs").exists()
