"""Real multi-process training on CPU (DeepSpeed over gloo) and a simulated two-node job."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli

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
    result = run_cli(str(tiny_recipe), *DS, f"hardware.zero_stage={stage}", "train.save_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"zero_stage                  = {stage}" in result.stdout and "world_size                  = 2" in result.stdout
    run_dir = _run_dir(tmp_path / "outputs")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["train"]["steps"] == 4 and ev["trained"]["n"] == 3
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
