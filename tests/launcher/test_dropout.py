"""LoRA's half-draw dropout: the probability it drops at, its scale and gradient, its seed, where the plan uses it."""

import math

import pytest
import torch
from torch import nn

from launcher.dropout import HalfDrawDropout, drawn_probability, use_half_draw_dropout
from launcher.hardware import GpuInfo, HardwareInfo
from launcher.memory import KNOWN_SHAPES, ModelShape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from tests.conftest import ROOT

N = 4_000_001  # odd: the second half is one element shorter than the first


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_half_of_the_input_is_dropped_at_p_rounded_to_a_multiple_of_2_to_the_minus_15(p):
    torch.manual_seed(0)
    y = HalfDrawDropout(p).train()(torch.ones(N))
    dropped = y == 0
    q = drawn_probability(p)
    assert abs(q - p) <= 2**-16
    sigma = math.sqrt(q * (1 - q) / (N // 2))
    for part in (dropped[: (N + 1) // 2], dropped[(N + 1) // 2:]):  # the low and the high 15 bits of each draw
        assert abs(float(part.float().mean()) - q) < 6 * sigma
    # The kept elements are scaled as torch's dropout scales them, by 1 / (1 - the probability drawn).
    assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - q)))


def test_the_two_halves_are_not_the_same_mask():
    torch.manual_seed(0)
    dropped = HalfDrawDropout(0.5).train()(torch.ones(2 * 100_000)) == 0
    first, second = dropped[:100_000], dropped[100_000:]
    assert 0.45 < float((first == second).float().mean()) < 0.55  # independent halves agree half the time


def test_the_gradient_passes_the_kept_elements_scaled_and_stops_at_the_dropped():
    torch.manual_seed(1)
    x = torch.randn(8, 33, 24, requires_grad=True)
    y = HalfDrawDropout(0.2).train()(x)
    y.backward(torch.ones_like(y))
    scale = 1 / (1 - drawn_probability(0.2))
    kept = y != 0
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], scale))
    assert torch.allclose(y[kept], x.detach()[kept] * scale)
    assert y.dtype == x.dtype and y.shape == x.shape


def test_the_masks_follow_torchs_seed_and_evaluation_drops_nothing():
    x = torch.randn(1000)
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(HalfDrawDropout(0.3).train()(x) == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert torch.equal(HalfDrawDropout(0.3).eval()(x), x)


def test_peft_lora_dropouts_are_replaced_and_identity_ones_left(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert use_half_draw_dropout(model) == len(layers) > 0
    assert all(type(m.lora_dropout["default"]) is HalfDrawDropout and m.lora_dropout["default"].p == 0.05 for m in layers)
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()  # trains through it
    none = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    assert use_half_draw_dropout(none) == 0


SMOL = ModelShape(*KNOWN_SHAPES["embedded:smollm2-135m-instruct"])
CPU = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True, matmul_tflops={"fp32": 0.2, "bf16": 1.0},
                   memory_bandwidth_gbs=20, elementwise_gops={"fp32": 5.0, "bf16": 6.0}, rates_source="test figures")
A100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="A100", memory_gb=40, compute_capability=(8, 0)),))


def _plan(hw, *overrides):
    return make_plan(load_recipe(ROOT / "recipes" / "gsm8k.yaml", ["model.name=embedded:smollm2-135m-instruct", *overrides]),
                     hw, SMOL, "test", data="not measured")


def test_the_plan_draws_half_on_an_eager_cpu_run_with_dropout_and_says_what_it_drops_at():
    plan = _plan(CPU, "train.compile=false")
    assert plan.recipe.model.lora.dropout == 0.05 and plan.lora_dropout == "half_draw"
    reason = plan.decision("lora_dropout").reason
    assert "model.lora.dropout=0.05" in reason and "1638/32768 = 0.049988" in reason
    assert plan.summary()["lora_dropout"] == "half_draw"


@pytest.mark.parametrize("hw, overrides, why", [
    (CPU, ["train.compile=true"], "inductor"),  # compiled blocks draw their own dropout
    (A100, [], "cuda generator"),
    (CPU, ["model.lora.dropout=0.00001", "train.compile=false"], "rounds to 0"),
])
def test_the_plan_keeps_torchs_dropout_where_the_half_draw_would_not_help_or_would_change_p(hw, overrides, why, monkeypatch):
    from launcher import plan as plan_module

    monkeypatch.setattr(plan_module, "_cpp_compiler", lambda: "/usr/bin/g++")
    plan = _plan(hw, *overrides)
    assert plan.lora_dropout == "torch" and why in plan.decision("lora_dropout").reason


def test_no_dropout_no_decision():
    plan = _plan(CPU, "model.lora.dropout=0", "train.compile=false")
    assert plan.lora_dropout == "torch" and all(d.field != "lora_dropout" for d in plan.decisions)


def test_planning_the_dropout_draw_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "from launcher.hardware import HardwareInfo\n"
            "from launcher.memory import KNOWN_SHAPES, ModelShape\n"
            "from launcher.plan import make_plan\n"
            "from launcher.recipe import load_recipe\n"
            f"recipe = load_recipe({str(ROOT / 'recipes' / 'gsm8k.yaml')!r}, ['model.name=embedded:smollm2-135m-instruct', "
            "'train.compile=false'])\n"
            "hw = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True)\n"
            "plan = make_plan(recipe, hw, ModelShape(*KNOWN_SHAPES['embedded:smollm2-135m-instruct']), 'test', data='not measured')\n"
            "print(plan.lora_dropout, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["half_draw", "False"]  # the plan's 1-2 s without torch's import
