import pytest

from launcher.errors import PlanError
from launcher.hardware import GpuInfo, HardwareInfo
from launcher.plan import choose_precision, make_plan
from launcher.recipe import load_recipe
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "unit-conversion.yaml"

CPU_BF16 = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True)
CPU_OLD = HardwareInfo(cpu_cores=16, ram_gb=64, cpu_bf16=False)
T4 = HardwareInfo(cpu_cores=4, ram_gb=16, cpu_bf16=False, gpus=(GpuInfo(name="Tesla T4", memory_gb=15, compute_capability=(7, 5)),))
V100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="V100", memory_gb=16, compute_capability=(7, 0)),))
A100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="A100", memory_gb=40, compute_capability=(8, 0)),))
H100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="H100", memory_gb=80, compute_capability=(9, 0)),))
M2 = HardwareInfo(cpu_cores=8, ram_gb=16, cpu_bf16=False, mps=True)
A100x8 = HardwareInfo(cpu_cores=96, ram_gb=1152, cpu_bf16=False, gpus=(A100.gpus[0],) * 8)


def plan_for(hw, *overrides):
    return make_plan(load_recipe(RECIPE, list(overrides)), hw)


@pytest.mark.parametrize("hw, backend, precision", [
    (CPU_BF16, "cpu", "bf16"),
    (CPU_OLD, "cpu", "fp32"),
    (T4, "cuda", "fp16"),
    (V100, "cuda", "fp16"),
    (A100, "cuda", "bf16"),
    (H100, "cuda", "bf16"),
    (M2, "mps", "fp32"),
])
def test_precision_table(hw, backend, precision):
    plan = plan_for(hw)
    assert (plan.backend, plan.precision) == (backend, precision)
    assert plan.decision("precision").reason  # every choice says why


def test_fp16_reason_says_master_weights_stay_fp32():
    reason = plan_for(T4).decision("precision").reason
    assert "fp32" in reason and "loss scaler" in reason


@pytest.mark.parametrize("hw, precision, match", [
    (T4, "bf16", "hardware.precision=fp16"),
    (CPU_BF16, "fp16", "needs a CUDA GPU"),
    (M2, "bf16", "MPS"),
])
def test_impossible_precision_is_an_error_with_the_fix(hw, precision, match):
    with pytest.raises(PlanError, match=match):
        plan_for(hw, f"hardware.precision={precision}")


def test_explicit_precision_is_honoured_where_possible():
    assert plan_for(A100, "hardware.precision=fp32").precision == "fp32"
    plan = plan_for(CPU_OLD, "hardware.precision=bf16")
    assert plan.precision == "bf16" and "emulated" in plan.decision("precision").reason


@pytest.mark.parametrize("effective", [1, 6, 16, 24, 64, 96, 7])
def test_batch_layout_keeps_the_effective_batch(effective):
    for hw in (CPU_BF16, T4):
        plan = plan_for(hw, f"train.effective_batch_size={effective}")
        assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == effective
        assert plan.micro_batch_size & (plan.micro_batch_size - 1) == 0  # a power of two
        assert str(effective) in plan.decision("gradient_accumulation_steps").reason


def test_cpu_takes_the_whole_effective_batch_in_one_pass_when_small():
    plan = plan_for(CPU_BF16)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (16, 1)
    assert plan.threads == 2 and plan.gradient_checkpointing is False


def test_explicit_micro_batch_must_divide_the_effective_batch():
    assert plan_for(CPU_BF16, "hardware.micro_batch_size=4").gradient_accumulation_steps == 4
    with pytest.raises(PlanError, match="hardware.micro_batch_size=5"):
        plan_for(CPU_BF16, "hardware.micro_batch_size=5")


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(PlanError, match="no CUDA GPU"):
        plan_for(CPU_BF16, "hardware.backend=cuda")
    with pytest.raises(PlanError, match="not an Apple-silicon"):
        plan_for(T4, "hardware.backend=mps")
    with pytest.raises(PlanError, match="hardware.backend=cuda"):
        plan_for(A100x8)  # several GPUs need DeepSpeed, not in this version: says how to use one
    assert plan_for(A100x8, "hardware.backend=cuda").backend == "cuda"
    assert plan_for(T4, "hardware.backend=cpu").backend == "cpu"


def test_trust_remote_code_is_shown():
    assert plan_for(CPU_BF16).trust_remote_code is False
    assert plan_for(CPU_BF16, "model.trust_remote_code=true").decision("trust_remote_code").value is True


def test_plan_is_frozen_and_serialises():
    from launcher.plan import Plan

    plan = plan_for(CPU_BF16)
    with pytest.raises(Exception):
        plan.precision = "fp32"
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    summary = plan.summary()
    for key in ("backend", "precision", "world_size", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "decisions"):
        assert key in summary
    assert {"field", "value", "reason"} == set(summary["decisions"][0])


def test_choose_precision_is_pure():
    assert choose_precision("auto", "cuda", A100) == choose_precision("auto", "cuda", A100)
