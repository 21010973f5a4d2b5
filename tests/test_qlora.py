"""4-bit QLoRA (model.quantize=4bit) on the CPU: bitsandbytes 0.50 has a CPU backend for NF4, so the tiny model
trains here through the real CLI, and its export merges onto the base dequantized to fp32."""

import json
import math

import pytest
import torch

from tests.conftest import run_cli

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'sftlaunch[qlora]' (make setup installs it)")


def _lora_gradients(model, batch) -> tuple[float, dict]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same (non-zero) adapter on both models
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_on_the_4bit_base_are_those_of_its_dequantized_copy_after_an_evaluation(tiny_model):
    """The base is evaluated (eval mode, no gradients) before training. On a CPU with avx512_bf16, bitsandbytes
    then repacked every 4-bit weight for a kernel without autograd, and the LoRA gradients came out 100% off
    (launcher.models.keep_4bit_trainable); here they must equal those on the same NF4 weights dequantized."""
    from transformers import AutoTokenizer

    from launcher.models import dequantized_base, load_model

    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = tok(["Question: 3 ft in m?\nAnswer: 1 ft = 0.3048 m, so 0.9144<|im_end|>"] * 2, return_tensors="pt")
    quantized = load_model(str(tiny_model), dtype="fp32", quantize="4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules()) == 2 * 7  # every projection of 2 layers
    with torch.no_grad():
        quantized.eval()
        quantized(**batch)  # what the base evaluation does first
    loss_q, grads_q = _lora_gradients(quantized, batch)
    loss_d, grads_d = _lora_gradients(dequantized_base(str(tiny_model), False, "fp32"), batch)
    assert loss_q == pytest.approx(loss_d, rel=1e-5)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 2 * 7 * 2
    for name, g in grads_d.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads_q[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_trains_the_tiny_model_on_the_cpu_and_merges_onto_the_dequantized_base(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "model.quantize=4bit", "train.max_steps=12", "train.learning_rate=1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its linear layers in 4-bit NF4" in result.stdout
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["quantize"], plan["eval_precision"]) == ("4bit", plan["base_dtype"])
    assert "NF4 with double quantization" in next(d["reason"] for d in plan["decisions"] if d["field"] == "quantize")

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert len(losses) == 12 and all(math.isfinite(x) and x > 0 for x in losses)
    assert sum(losses[-4:]) < sum(losses[:4])  # learning: the last steps' loss below the first steps'
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["trained"]["loss"] < ev["base"]["loss"]  # and on held-out items
    assert (run_dir / "adapter" / "adapter_config.json").is_file()

    out = tmp_path / "merged"
    export = run_cli("export", str(run_dir), str(out), "--merge", "--check", "6")
    assert export.returncode == 0, export.stderr[-3000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["merged_in"], info["base_weights"], info["generations_equal"]) == ("fp32", "NF4 dequantized to fp32 (QLoRA)", 6)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no bitsandbytes config, no 4-bit layers
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in merged.parameters())
