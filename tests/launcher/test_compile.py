"""train.compile: the plan's decision with its reason, compiled training that matches eager, and the fallback."""

import os
import shutil
from pathlib import Path

import pytest

from launcher import plan as plan_module
from launcher.errors import PlanError
from launcher.hardware import GpuInfo, HardwareInfo
from launcher.memory import KNOWN_SHAPES, ModelShape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from launcher.timing import DataSize
from tests.conftest import ROOT

TINY = Path(__file__).parent / "data" / "tiny-llama"  # the shipped tiny model (see test_job.py)
RECIPE = ROOT / "recipes" / "unit-conversion.yaml"
SMOL = ModelShape(*KNOWN_SHAPES["embedded:smollm2-135m-instruct"])
CPU = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=False, matmul_tflops={"fp32": 0.2, "bf16": 0.05},
                   memory_bandwidth_gbs=20, elementwise_gops={"fp32": 5.0}, rates_source="test figures")
A100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="A100", memory_gb=40, compute_capability=(8, 0)),))
A100x2 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=A100.gpus * 2)
M2 = HardwareInfo(cpu_cores=8, ram_gb=16, cpu_bf16=False, mps=True)


@pytest.fixture(autouse=True)
def a_cpp_compiler(monkeypatch):
    """The plan's decisions here must not depend on whether the machine running the tests has g++."""
    monkeypatch.setattr(plan_module, "_cpp_compiler", lambda: "/usr/bin/g++")


# Compiling for real needs inductor's C++ compiler; the fallback test below needs none.
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="inductor's CPU code needs a C++ compiler (g++ or $CXX), and this machine has none")


def _data(samples: int) -> DataSize:
    return DataSize(samples=samples, tokens=samples * 87, trainable_tokens=samples * 74, answer_tokens_max=103,
                    eval_items=150, eval_prompt_tokens=14, source="test")


def plan_for(hw, *overrides, samples=1000):
    return make_plan(load_recipe(RECIPE, list(overrides)), hw, SMOL, "test", data=_data(samples))


def test_auto_stays_off_where_compiled_steps_were_not_measured_faster_and_says_so(monkeypatch):
    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {})
    for hw, words in [(CPU, "not been measured faster on cpu in fp32"), (A100, "not been measured faster on cuda in bf16"),
                      (A100x2, "DeepSpeed wraps the model"), (M2, "MPS")]:
        plan = plan_for(hw)
        assert plan.compile is False and words in plan.decision("compile").reason, (hw, plan.decision("compile"))
    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {("cpu", "fp32"): (0.9, 60.0, "a test CPU")})
    assert "0.90x the speed of eager ones on a test CPU" in plan_for(CPU).decision("compile").reason
    assert plan_for(CPU, "train.compile=false").decision("compile").reason == "requested by the recipe (train.compile)"


def test_auto_compiles_only_when_the_predicted_training_pays_the_compile_back(monkeypatch):
    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {("cpu", "fp32"): (1.5, 60.0, "a test CPU")})
    long_run = plan_for(CPU, samples=20_000)
    assert long_run.compile is True and long_run.summary()["compile"] is True
    reason = long_run.decision("compile").reason
    assert "measured 1.50x" in reason and "~60 s compile" in reason
    # The predicted training counts both: the steps at the measured speed, and the compile.
    eager = plan_for(CPU, "train.compile=false", samples=20_000).predicted_seconds["training"]
    assert long_run.predicted_seconds["training"] == pytest.approx(eager / 1.5 + 60, abs=0.2)
    short = plan_for(CPU, "train.max_steps=2")
    assert short.compile is False
    assert "less than the compile's ~60 s" in short.decision("compile").reason
    # Without a time prediction (no data size), nobody knows whether it pays: off, and said.
    unknown = make_plan(load_recipe(RECIPE, []), CPU, SMOL, "test", data="not measured")
    assert unknown.compile is False and "not predicted" in unknown.decision("compile").reason


def test_no_cpp_compiler_on_this_machine_keeps_auto_off_and_refuses_true_with_the_fix(monkeypatch):
    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {("cpu", "fp32"): (1.5, 60.0, "a test CPU")})
    monkeypatch.setattr(plan_module, "_cpp_compiler", lambda: None)
    plan = plan_for(CPU, samples=20_000)
    assert plan.compile is False and "needs a C++ compiler" in plan.decision("compile").reason
    with pytest.raises(PlanError, match="train.compile=true: inductor's CPU code needs a C\\+\\+ compiler.*apt-get install g\\+\\+"):
        plan_for(CPU, "train.compile=true")
    # A profile is planned for another machine: this one's compiler says nothing about it.
    profile = plan_for(CPU.model_copy(update={"name": "some-profile"}), samples=20_000)
    assert profile.compile is True


@pytest.mark.parametrize("hw, overrides, match", [
    (A100x2, [], "DeepSpeed wraps the model"),
    (M2, [], "MPS"),
    (A100, ["model.quantize=4bit"], "4-bit"),
])
def test_compile_requested_where_it_cannot_run_is_refused_with_the_fix(hw, overrides, match):
    with pytest.raises(PlanError, match=f"train.compile=true: .*{match}.*Fix: train.compile=auto"):
        plan_for(hw, "train.compile=true", *overrides)


def _trainer(tmp_path, compile_blocks_too: bool, steps: int = 3):
    """A LoRA Trainer on the shipped tiny model, with the worker's warm-up callback when compiling."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainerCallback

    from launcher.compile import compile_blocks, warm_up_callback
    from launcher.data import encode_examples
    from launcher.job import training_arguments
    from launcher.models import load_model, load_tokenizer
    from launcher.recipe import validate_recipe
    from launcher.rundir import RunDir
    from launcher.tasks.unit_conversion import generate
    from launcher.trainer import StopRequest, build_trainer

    recipe = validate_recipe({"model": {"name": str(TINY)}, "train": {"max_steps": steps, "effective_batch_size": 4,
                                                                       "logging_steps": 1, "seed": 0},
                              "hardware": {"precision": "fp32", "threads": 1, "gradient_checkpointing": False}})
    plan = make_plan(recipe, HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False))
    tok = load_tokenizer(str(TINY))
    tok.padding_side = "right"
    features, _ = encode_examples(generate(4 * steps, 1, seed=3)[0], tok, 96, "plain")
    model = get_peft_model(load_model(str(TINY)), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    losses, record, callbacks, blocks = [], {}, [], []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    if compile_blocks_too:
        blocks = compile_blocks(model)
        callbacks.append(warm_up_callback(blocks, collator([features[i] for i in range(4)]), record))
    trainer = build_trainer(precision="fp32", keep_checkpoints=1, max_bad_steps=0, zero_loss_steps=3, max_time=None,
                            stop=StopRequest(), loss_logits=plan.loss_logits, model=model,
                            args=training_arguments(plan, RunDir(tmp_path)), train_dataset=features,
                            data_collator=collator, callbacks=[*callbacks, Losses()])
    for callback in callbacks:
        callback.trainer = trainer
    return trainer, blocks, losses, record


@needs_cxx
def test_compiled_training_follows_the_eager_loss_curve_and_its_compile_time_is_recorded(tmp_path):
    import torch

    torch._dynamo.reset()
    eager, _, eager_losses, _ = _trainer(tmp_path / "eager", compile_blocks_too=False)
    eager.train()
    compiled, blocks, compiled_losses, record = _trainer(tmp_path / "compiled", compile_blocks_too=True)
    compiled.train()
    layers = compiled.model.config.num_hidden_layers
    assert len(blocks) == layers and record["compiled"] is True and record["blocks"] == layers and record["seconds"] > 0
    assert all(b._compiled_call_impl is not None for b in blocks)  # the steps ran compiled
    assert len(compiled_losses) == len(eager_losses) == 3
    # The first step's loss is the same computation (the warm-up took no step and drew no random number). After
    # two updates the losses drift in the fourth digit even between two eager runs in one process (2.93680 against
    # 2.93824 at step 3, measured: Adam's normalised updates carry the products' last bits on), so within 2e-3.
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5), (compiled_losses, eager_losses)
    assert compiled_losses == pytest.approx(eager_losses, rel=2e-3), (compiled_losses, eager_losses)


def test_a_compile_that_fails_falls_back_to_eager_and_says_why(tmp_path, monkeypatch, capsys):
    import torch
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    # A real compiler failure: inductor's C++ compiler is missing (as in a slim container without g++).
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    trainer, blocks, losses, record = _trainer(tmp_path, compile_blocks_too=True, steps=2)
    trainer.train()
    assert record["compiled"] is False and record["fallback"]
    assert all(b._compiled_call_impl is None for b in blocks)  # eager again
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # and it trained
    out = capsys.readouterr().out
    assert "train.compile: compiling failed" in out and "training runs uncompiled (eager)" in out
    torch._dynamo.reset()


@needs_cxx
def test_a_compiled_run_through_the_cli_says_what_the_compile_cost_and_evaluates_eagerly(tiny_recipe, tmp_path):
    import json

    from tests.conftest import run_cli

    result = run_cli(str(tiny_recipe), "train.compile=true", "hardware.precision=fp32", "train.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.compile: compiled in" in result.stdout
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["compile"] is True
    evaluation = json.loads((run_dir / "eval.json").read_text())
    record = evaluation["train"]["compile"]
    assert record["compiled"] is True and record["blocks"] > 0 and record["seconds"] > 0
    assert evaluation["train"]["steps"] == 4 and evaluation["trained"]["accuracy"] is not None


def test_an_out_of_memory_in_the_warm_up_reaches_the_back_off_instead_of_passing_for_a_compile_failure():
    import torch

    from launcher.compile import warm_up_callback

    class Trainer:
        def _prepare_inputs(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model, record = torch.nn.Linear(2, 2), {}
    callback = warm_up_callback([], {}, record)
    callback.trainer = Trainer()
    with pytest.raises(torch.OutOfMemoryError):
        callback.on_train_begin(None, None, None, model=model)
    assert record == {}  # not recorded as a compile that fell back


def test_auto_does_not_compile_when_the_time_budget_stops_training_before_the_compile_pays(monkeypatch):
    """train.max_time cuts the run: the compile's saving is then bounded by the budget, not the whole data."""
    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {("cpu", "fp32"): (1.25, 60.0, "a test CPU")})
    assert plan_for(CPU, samples=20_000).compile is True
    short = plan_for(CPU, "train.max_time=200s", samples=20_000)  # pays only over 60 x 1.25 / 0.25 = 300 s
    assert short.compile is False
    assert "train.max_time=200s stops training first" in short.decision("compile").reason
    assert "only in budgets over 300 s" in short.decision("compile").reason
    assert plan_for(CPU, "train.max_time=20m", samples=20_000).compile is True
