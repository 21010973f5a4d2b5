"""The health guard, checkpoints, resume and signals, on a tiny model through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli


def _run_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def poisoned_model(tiny_model, tmp_path_factory):
    """The tiny model with one NaN weight: every forward pass gives a NaN loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("poisoned")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def test_nan_loss_stops_at_the_first_step_with_a_diagnosis(tiny_recipe, poisoned_model, tmp_path):
    # fp32 explicitly: the automatic choice depends on the CPU (bf16 only where it has the instructions).
    result = run_cli(str(tiny_recipe), f"model.name={poisoned_model}", "eval.compare_base=false", "hardware.precision=fp32")
    assert result.returncode == 3, result.stderr[-2000:]
    err = result.stderr
    assert "training stopped at optimizer step 1: the loss is nan" in err
    for needed in ("precision fp32", "trainable tokens per micro-batch", "learning rate", "likely causes",
                   "train.learning_rate", "data.max_length"):
        assert needed in err, needed
    assert "Traceback" not in err
    run_dir = _run_dir(tmp_path / "outputs")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["health"]["step"] == 1
    assert not (run_dir / "adapter").exists()  # a broken run does not pretend to have a result


def test_bad_steps_can_be_allowed_but_never_silently(tiny_recipe, poisoned_model):
    result = run_cli(str(tiny_recipe), f"model.name={poisoned_model}", "eval.compare_base=false",
                     "train.guard.max_bad_steps=2")
    assert result.returncode == 3
    assert result.stdout.count("update skipped") == 2
    assert "optimizer step 3" in result.stderr


def test_all_masked_batch_is_caught(tiny_model, tmp_path):
    from launcher.hardware import HardwareInfo
    from launcher.health import TrainingHealthError
    from launcher.models import load_model, load_tokenizer
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe
    from launcher.rundir import RunDir
    from launcher.job import training_arguments
    from launcher.trainer import StopRequest, build_trainer
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq

    plan = make_plan(validate_recipe({"model": {"name": str(tiny_model)}, "train": {"max_steps": 2, "effective_batch_size": 2}}),
                     HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False))
    tok = load_tokenizer(str(tiny_model))
    model = get_peft_model(load_model(str(tiny_model)), LoraConfig(r=2, target_modules="all-linear"))
    ids = tok("Convert 1 km to m.\nAnswer: 1000", add_special_tokens=False)["input_ids"]
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids)}] * 4
    trainer = build_trainer(precision="fp32", keep_checkpoints=1, max_bad_steps=0, zero_loss_steps=3, max_time=None,
                            stop=StopRequest(), model=model, args=training_arguments(plan, RunDir(tmp_path)),
                            train_dataset=features, data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    with pytest.raises(TrainingHealthError, match="all labels masked") as exc:
        trainer.train()
    assert exc.value.details["trainable_tokens"] == [0]


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_for_checkpoint(out: Path, step: int, proc, timeout=300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        dirs = [p for p in out.iterdir()] if out.exists() else []
        if dirs and (dirs[0] / "checkpoints" / f"checkpoint-{step}").is_dir():
            return dirs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


LONG = ["train.max_steps=40", "train.save_steps=5", "train.keep_checkpoints=2", "eval.compare_base=false",
        "eval.limit=2", "data.train_size=320", "hardware.threads=1"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_recipe, tmp_path):
    ref = run_cli(str(tiny_recipe), *LONG, f"output.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_eval = json.loads((_run_dir(tmp_path / "ref") / "eval.json").read_text())

    out = tmp_path / "outputs"
    proc = _start([str(tiny_recipe), *LONG])
    run_dir = _wait_for_checkpoint(out, 5, proc)
    os.kill(json.loads((run_dir / "run.json").read_text())["worker_pid"], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (run_dir / "eval.json").exists()
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept and all(name.startswith("checkpoint-") for name in kept) and len(kept) <= 2  # no staging left visible

    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["train"]["steps"] == ref_eval["train"]["steps"] == 40
    assert ev["train"]["final_loss"] == pytest.approx(ref_eval["train"]["final_loss"], rel=0.02)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_sigint_saves_a_checkpoint_and_exits_130(tiny_recipe, tmp_path):
    out = tmp_path / "outputs"
    proc = _start([str(tiny_recipe), *LONG, "train.max_steps=400", "train.save_steps=200"])
    # Wait until training is under way (the first logged step), then interrupt the launcher.
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = list(out.iterdir()) if out.exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    run_dir = runs[0]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "interrupted"
    assert (run_dir / "checkpoints" / f"checkpoint-{status['step']}").is_dir()
    assert "sftlaunch resume" in stdout
    assert status["step"] < 400


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_diagnosis_points_at_the_precision_key(precision):
    from launcher.health import diagnose

    text = diagnose(step=3, problem="the loss is nan", loss=float("nan"), grad_norm=None, precision=precision,
                    tokens=[12, 9], learning_rate=1e-3, max_learning_rate=1e-3)
    assert "hardware.precision=fp32" in text and f"precision {precision}" in text


# Losses of every optimizer step of healthy runs (logging_steps=1), measured with the shipped recipes'
# settings: see tests/launcher/data/healthy_losses.json for where each curve comes from.
HEALTHY = json.loads((Path(__file__).parent / "data" / "healthy_losses.json").read_text())


@pytest.mark.parametrize("name", sorted(HEALTHY["curves"]))
def test_divergence_rule_never_trips_on_measured_healthy_curves(name):
    from launcher.health import LossWatch

    curve = HEALTHY["curves"][name]
    watch = LossWatch(curve["vocab_size"])
    tripped = [(step, loss) for step, loss in enumerate(curve["losses"], 1) if watch.check(step, loss)]
    assert tripped == [], tripped


def test_divergence_rule_catches_the_measured_collapse_without_nan():
    from launcher.health import LossWatch

    # Learning rate 1 on the embedded model: 1.76 -> 21 in five steps, never NaN (ln 49152 = 10.8).
    watch = LossWatch(49152)
    results = [watch.check(step, loss) for step, loss in enumerate([1.76, 1.9, 4.6, 9.8, 21.2], 1)]
    assert results[:2] == [None, None]
    problem, threshold = results[2]
    assert "rose above 2 x its best so far (1.760) + 1 = 4.52" in problem and threshold == pytest.approx(4.52)


def test_loss_above_uniform_guessing_trips_after_the_grace_steps():
    from launcher.health import GRACE_STEPS, LossWatch

    watch = LossWatch(400)  # ln 400 = 5.99: a freshly initialised head sits there
    assert all(watch.check(s, 6.5) is None for s in range(1, GRACE_STEPS + 1))
    problem, threshold = watch.check(GRACE_STEPS + 1, 7.2)
    assert "above ln(vocabulary size) + 1 = 6.99" in problem and threshold == pytest.approx(6.99, abs=0.01)


def test_absurd_learning_rate_diverges_without_nan_and_stops_the_run(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "train.learning_rate=1", "train.max_steps=12", "hardware.precision=fp32")
    assert result.returncode == 3, result.stderr[-2000:]
    err = result.stderr
    assert "training stopped at optimizer step 3: the loss" in err and "the model has diverged" in err
    assert "threshold" in err and "train.learning_rate=1" in err and "Traceback" not in err
    run_dir = _run_dir(tmp_path / "outputs")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["diverged"] is True and status["health"]["step"] == 3
    assert status["health"]["loss"] > status["health"]["threshold"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "eval.json").exists()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(loss == loss and loss < 100 for loss in losses)  # finite all along: no NaN was ever involved


def test_collapse_check_on_constructed_generations():
    from launcher.health import collapse_report, is_degenerate

    assert is_degenerate("1" * 64) and is_degenerate(" 7 ft = " + "the " * 20) and is_degenerate("::::::::::::::::")
    assert not is_degenerate("1 ft = 0.3048 m, so 7 * 0.3048 = 2.1336 <answer>2.1336</answer>")
    assert not is_degenerate("He pays 1000000 dollars.\n#### 1000000")  # a run of zeros is no collapse
    healthy = [f"{i} ft = {0.3048 * i:.4f} m <answer>{0.3048 * i:.4f}</answer>" for i in range(10)]
    assert not collapse_report(healthy)["collapsed"]
    ones = collapse_report(["1111111111111111111111111111111111"] * 6 + healthy[:4])
    assert ones["collapsed"] and ones["degenerate"] == 6
    same = collapse_report(["<answer>1</answer>"] * 5 + healthy[:5])
    assert same["collapsed"] and same["most_common_count"] == 5 and same["degenerate"] == 0
    assert not collapse_report(["<answer>1</answer>"] * 4 + healthy)["collapsed"]  # 4 of 14: under half
    assert not collapse_report([""] * 8 + healthy[:2])["collapsed"]  # stopping at once is no answer, not a collapse


def test_collapsed_generations_fail_the_run_with_a_diagnosis(tiny_recipe, tmp_path):
    # Targets that start with "1" x 60 teach the model to write ones to the length limit, whatever the
    # question: a collapse whose training loss looks healthy (it falls), so only the generations show it.
    data = tmp_path / "ones.json"
    data.write_text(json.dumps([[f"Convert {i} km to m.", "1" * 60 + " <answer>1</answer>"] for i in range(48)]))
    result = run_cli(str(tiny_recipe), f"data.path={data}", "data.on_truncation=drop", "train.max_steps=30",
                     "train.learning_rate=1e-2", "eval.max_new_tokens=24", "hardware.precision=fp32")
    run_dir = _run_dir(tmp_path / "outputs")
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["trained"]["collapse"]["collapsed"] and ev["collapsed"] is True, ev["trained"]["collapse"]
    assert not ev["base"]["collapse"]["collapsed"]
    assert result.returncode == 3, result.stderr[-2000:]
    assert "the trained model has collapsed" in result.stderr and "train.learning_rate" in result.stderr
    assert "COLLAPSED" in result.stdout  # the final table says so too
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["collapsed"] is True
    assert json.loads((run_dir / "comparison.json").read_text())["trained_collapsed"] is True


class _Scaler:
    """GradScaler's side the guard reads: the current scale."""

    def __init__(self, scale: float):
        self.scale = scale

    def get_scale(self) -> float:
        return self.scale


class _Optimizer:
    """accelerate's AcceleratedOptimizer carries the GradScaler as .scaler (accelerate 1.15 optimizer.py)."""

    def __init__(self, scaler=None):
        self.scaler = scaler


@pytest.fixture
def guarded(tiny_model, tmp_path):
    """A real Trainer with the guard, driven step by step with constructed losses and gradient norms."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from launcher.trainer import StopRequest, build_trainer

    def make(precision: str, max_bad_steps: int = 0):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        trainer = build_trainer(precision=precision, keep_checkpoints=1, max_bad_steps=max_bad_steps, zero_loss_steps=0,
                                max_time=None, stop=StopRequest(), model=model, args=args)
        return trainer, model

    return make


def _drive(trainer, model, step: int, loss: float, grad_norm: float, scaler=None, update_applied=None):
    from transformers import TrainerControl, TrainerState

    record = trainer.step_record
    record.clear()
    record.losses.append(loss)
    record.trainable_tokens.append(12)
    record.grad_norm, record.update_applied = grad_norm, update_applied
    state = TrainerState()
    state.global_step = step - 1
    trainer.guard.on_pre_optimizer_step(trainer.args, state, TrainerControl(), model=model,
                                        optimizer=_Optimizer(scaler), lr_scheduler=None)


def test_fp16_loss_scaler_overflows_are_the_scaler_working_not_a_bad_step(guarded, capsys):
    from launcher.health import TrainingHealthError

    trainer, model = guarded("fp16", max_bad_steps=0)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    # GradScaler starts at 2^16 and halves on each overflow: the first steps of an fp16 run overflow, recurring later.
    for step, scale in ((1, 65536.0), (2, 32768.0), (3, 16384.0), (40, 8192.0)):
        _drive(trainer, model, step, loss=2.3, grad_norm=float("inf"), scaler=_Scaler(scale))
    assert trainer.overflow_steps == [1, 2, 3, 40] and trainer.skipped_steps == []
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # the scaler skips, not the guard
    assert capsys.readouterr().out.count("fp16 loss scaler overflow") == 4
    _drive(trainer, model, 41, loss=2.2, grad_norm=1.5, scaler=_Scaler(8192.0))  # a normal step ends the streak
    # A scale already below 1 that still overflows: gradients are not finite at any scale.
    with pytest.raises(TrainingHealthError, match="step 42: the gradient norm is inf"):
        _drive(trainer, model, 42, loss=2.3, grad_norm=float("inf"), scaler=_Scaler(0.5))


def test_fp16_overflow_with_a_nan_loss_or_without_end_is_a_real_failure(guarded):
    from launcher.health import TrainingHealthError
    from launcher.trainer import MAX_OVERFLOW_STREAK

    trainer, model = guarded("fp16")
    with pytest.raises(TrainingHealthError, match="the loss is nan"):
        _drive(trainer, model, 1, loss=float("nan"), grad_norm=float("inf"), scaler=_Scaler(65536.0))
    trainer, model = guarded("fp16")
    scale = 2.0 ** 40  # a scale that never drops below 1 within the streak
    for step in range(1, MAX_OVERFLOW_STREAK + 1):
        _drive(trainer, model, step, loss=2.0, grad_norm=float("inf"), scaler=_Scaler(scale / 2 ** step))
    with pytest.raises(TrainingHealthError, match="the gradient norm is inf"):
        _drive(trainer, model, MAX_OVERFLOW_STREAK + 1, loss=2.0, grad_norm=float("inf"), scaler=_Scaler(2.0 ** 10))


def test_non_finite_gradients_without_a_loss_scaler_stop_the_run(guarded):
    from launcher.health import TrainingHealthError

    trainer, model = guarded("bf16")
    with pytest.raises(TrainingHealthError, match="step 1: the gradient norm is inf"):
        _drive(trainer, model, 1, loss=2.0, grad_norm=float("inf"))


def test_deepspeed_update_already_applied_cannot_be_skipped(guarded):
    from launcher.health import TrainingHealthError

    # DeepSpeed's fp16 scaler skipped the step itself: an overflow, not a bad step.
    trainer, model = guarded("fp16", max_bad_steps=2)
    _drive(trainer, model, 1, loss=2.0, grad_norm=float("inf"), update_applied=False)
    assert trainer.overflow_steps == [1]
    # bf16 under DeepSpeed: the engine stepped inside backward() and applied the non-finite update.
    trainer, model = guarded("bf16", max_bad_steps=2)
    with pytest.raises(TrainingHealthError, match="DeepSpeed had already applied the update"):
        _drive(trainer, model, 1, loss=2.0, grad_norm=float("nan"), update_applied=True)
    # fp32 under DeepSpeed: its overflow check skipped the step, which an allowance may accept.
    trainer, model = guarded("fp32", max_bad_steps=2)
    _drive(trainer, model, 1, loss=2.0, grad_norm=float("nan"), update_applied=False)
    assert trainer.skipped_steps == [1]
