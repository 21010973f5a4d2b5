"""The evaluation's memory: planned before a run, measured on this CPU against the plan, and a weights copy that
costs half the fp32 weights, not twice them."""

import json
import subprocess
import sys

import pytest

from launcher.errors import PlanError
from launcher.hardware import load_profile
from launcher.memory import GiB, ModelShape, estimate_eval_memory, find_shape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from tests.conftest import ROOT

GSM8K = ROOT / "recipes" / "gsm8k.yaml"

# A 10-layer Llama of 126M parameters (504 MB in fp32) with the tiny tokenizer's 400-token vocabulary: big enough
# that a copy of its weights stands out of the allocator's noise.
CHILD = r'''
import gc, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from launcher.evaluate import generate, inference_weights

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, precision, batch, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(path)
prompts = [f"Question: convert {i} ft to m\nAnswer:" for i in range(batch)]
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset the resident high-water mark (Linux)
    f.write("5")
base = status("VmRSS")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
with inference_weights(model, precision) as weights:
    generate(weights, tok, prompts, batch_size=batch, max_new_tokens=new, device="cpu", label="x")
print(json.dumps({"peak": status("VmHWM") - base, "prompt_tokens": max(len(tok(p).input_ids) for p in prompts)}))
'''


@pytest.fixture(scope="module")
def mid_model(tiny_model, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("mid-llama")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=10,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_evaluation_peak_on_cpu_matches_the_plan_and_the_copy_costs_half_the_weights(mid_model):
    batch, new = 8, 8
    out = subprocess.run([sys.executable, "-c", CHILD, str(mid_model), "bf16", str(batch), str(new)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    shape = find_shape(str(mid_model))[0]
    fp32_bytes = shape.params * 4
    est = estimate_eval_memory(shape, eval_precision="bf16", training_precision="bf16", batch=batch,
                               prompt_len=measured["prompt_tokens"], new_tokens=new, reloaded=False, device="cpu")
    ratio = measured["peak"] / est.total
    print(f"evaluation peak: measured {measured['peak'] / GiB:.2f} GiB, planned {est.total / GiB:.2f} GiB ({ratio:.2f}x)")
    # deepcopy(model).to(bf16) held a second fp32 copy: the peak was >= 2x the fp32 weights. The bf16 copy is 0.5x.
    assert measured["peak"] < 1.8 * fp32_bytes
    assert 0.75 <= ratio <= 1.25


def test_plan_decides_the_evaluation_memory_and_refuses_what_cannot_evaluate():
    recipe = load_recipe(GSM8K, ["model.name=Qwen/Qwen2.5-7B-Instruct"])
    shape = find_shape(recipe.model.name)[0]
    plan = make_plan(recipe, load_profile("a100-40gb-x8"), shape)
    decision = plan.decision("eval_memory_gib")
    # Under DeepSpeed the engine is freed and the model reloaded in bf16: 7.6B x 2 bytes, no fp32 copy beside it.
    assert 14 < decision.value < 20 and "reloaded in bf16" in decision.reason and "training weights" not in decision.reason
    # The reloaded model serves the evaluation alone: its adapter is merged in place, no copy of the 7B weights.
    assert plan.eval_merge and "merged in place" in plan.decision("eval_merge").reason and "merged copy" not in decision.reason
    # One GPU: the trained fp32 weights stay beside the evaluation's copy; a big batch of prompts as long as
    # data.max_length may not fit: the plan warns and names the batch that fits even then.
    big = load_recipe(GSM8K, ["model.name=Qwen/Qwen2.5-1.5B-Instruct", "eval.batch_size=512", "eval.max_new_tokens=1024"])
    reason = make_plan(big, load_profile("t4-16gb"), find_shape(big.model.name)[0]).decision("eval_memory_gib").reason
    assert reason.startswith("warning: prompts as long as data.max_length")
    fits = int(reason.split("; eval.batch_size=")[1].split(" ")[0])
    fitted = load_recipe(GSM8K, ["model.name=Qwen/Qwen2.5-1.5B-Instruct", f"eval.batch_size={fits}", "eval.max_new_tokens=1024"])
    assert not make_plan(fitted, load_profile("t4-16gb"), find_shape(fitted.model.name)[0]).decision(
        "eval_memory_gib").reason.startswith("warning")


def test_a_model_that_trains_but_cannot_evaluate_is_refused_before_training():
    # Two T4s train an 8B model with ZeRO-3 and offload, but the evaluation runs on one T4: 16 GB of fp16 weights.
    t4 = load_profile("t4-16gb")
    pair = t4.model_copy(update={"gpus": t4.gpus * 2, "name": "2x t4"})
    recipe = load_recipe(GSM8K, ["model.name=meta-llama/Llama-3.1-8B-Instruct", "train.effective_batch_size=64"])
    with pytest.raises(PlanError, match="would train here but cannot be evaluated: even one prompt needs"):
        make_plan(recipe, pair, find_shape(recipe.model.name)[0])


# A bf16 Llama with a 32,768-token vocabulary, loaded as the launcher loads a bf16 base, generating at batch 32.
HEAD_CHILD = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from launcher import evaluate

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, without_fix = sys.argv[1], sys.argv[2] == "unpatched"
if without_fix:  # what generation did before the head's input was made contiguous
    evaluate._contiguous_input = lambda module, args: None
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
model.requires_grad_(False)  # frozen, as a LoRA run's base is (the broadcast below happens only without gradients)
prompts = [f"Question: convert {i} ft to m, then say it twice\nAnswer:" for i in range(32)]
evaluate.generate(model, tok, prompts[:2], batch_size=2, max_new_tokens=2, device="cpu", label="x")  # warm-up
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
evaluate.generate(model, tok, prompts, batch_size=32, max_new_tokens=4, device="cpu", label="x")
print(json.dumps({"peak": status("VmHWM") - base}))
'''


def test_generation_does_not_multiply_the_output_head_by_the_batch(tiny_model, tmp_path):
    """generate takes the last position's logits from a strided view of the hidden states; torch's CPU linear
    then broadcast the bf16 head over the batch (batch x hidden x vocab: 3.4 GiB resident for the quick start's
    evaluation of SmolLM2, 4x the plan). The head's weight here is 16 MiB, its broadcast at batch 32 512 MiB."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    peak = json.loads(subprocess.run([sys.executable, "-c", HEAD_CHILD, str(tmp_path), "patched"], capture_output=True,
                                     text=True, check=True, cwd=ROOT).stdout.splitlines()[-1])["peak"]
    assert peak < 128 * 2**20, f"generation at batch 32 added {peak / 2**20:.0f} MiB"


def _rates_hardware():
    from launcher.hardware import HardwareInfo

    return HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True, matmul_tflops={"fp32": 0.2, "bf16": 0.88},
                        memory_bandwidth_gbs=100, elementwise_gops={"fp32": 5.0, "bf16": 6.0}, rates_source="test figures")


def _counted_data(eval_items: int):
    """A data size as the pre-flight counts it: 1000 samples, evaluation prompts of 14 tokens on average, 30 at most."""
    from launcher.timing import DataSize

    return DataSize(samples=1000, tokens=87_000, trainable_tokens=74_000, answer_tokens_max=103, eval_items=eval_items,
                    eval_prompt_tokens=14, eval_prompt_tokens_max=30, source="test")


def test_each_evaluations_predicted_peak_is_sized_for_what_it_will_generate_not_for_the_limits():
    """run.json's memory ratio of an evaluation compares its peak with plan.predicted_memory_gib. Sized for the limits
    the fit is checked against (eval.batch_size prompts of data.max_length, eval.max_new_tokens each), the prediction
    was 1.5-1.9x the measured peak in 5 of the 16 evaluations of benchmarks/time_estimate.py's 8 cases; the items
    there are, their longest prompt and the answers' expected length give what the evaluation holds. The base
    evaluation merges no adapter, and starts before training; the final one runs in a fresh process (one CPU process),
    on the trained model loaded for it alone: neither holds anything of training."""
    from launcher.memory import CPU_RUNTIME_GIB

    unit = ROOT / "recipes" / "unit-conversion.yaml"
    recipe = load_recipe(unit, ["hardware.precision=fp32", "eval.limit=16"])
    shape = find_shape(recipe.model.name)[0]
    data = _counted_data(16)
    plan = make_plan(recipe, _rates_hardware(), shape, data=data)
    assert plan.eval_merge and plan.final_eval_fresh

    def expected(new_tokens, reloaded):
        return estimate_eval_memory(shape, eval_precision="fp32", training_precision="fp32", batch=16, prompt_len=30,
                                    new_tokens=new_tokens, reloaded=reloaded, device="cpu", base_dtype="fp32").total / GiB

    predicted = plan.predicted_memory_gib
    # One batch of the 16 items, 30 prompt tokens + the training answers' longest (103): the trained model reloaded in
    # fp32 (merged in place), the base as training loaded it, fp32 too: the same bytes.
    assert predicted["final_eval"] == round(expected(103, True) + CPU_RUNTIME_GIB, 2)
    assert predicted["base_eval"] == round(expected(103, False) + CPU_RUNTIME_GIB, 2) == predicted["final_eval"]
    # The fit is still checked against the limits: 50 prompts of 128 tokens, 128 new tokens each.
    limits = plan.decision("eval_memory_gib")
    assert "eval.batch_size=50, 128+128 tokens" in limits.reason and limits.value > predicted["final_eval"] - CPU_RUNTIME_GIB
    # Answers an earlier run measured (3 decoding steps per batch) size the KV cache instead of the training answers'.
    measured = data.model_copy(update={"measured_answers": {"trained": {"decode_steps": 3, "batches": 1, "run": "r"}}})
    short = make_plan(recipe, _rates_hardware(), shape, data=measured).predicted_memory_gib
    assert short["final_eval"] == round(expected(3, True) + CPU_RUNTIME_GIB, 2)
    assert short["base_eval"] == predicted["base_eval"]


def test_processes_that_evaluate_the_base_after_training_are_predicted_with_what_training_left():
    """Under DeepSpeed with several processes the base is evaluated after training, reloaded in the evaluation's
    precision (launcher.job): its prediction carries what the process retained, like the final evaluation's."""
    from launcher.memory import CPU_RUNTIME_GIB, cpu_retained_gib
    from launcher.timing import predict_for_plan

    unit = ROOT / "recipes" / "unit-conversion.yaml"
    recipe = load_recipe(unit, ["hardware.backend=deepspeed", "eval.limit=24"])
    shape = find_shape(recipe.model.name)[0]
    plan = make_plan(recipe, _rates_hardware(), shape, data=_counted_data(24))
    assert plan.world_size == 2 and plan.precision == "bf16"
    base = estimate_eval_memory(shape, eval_precision="bf16", training_precision="bf16", batch=24, prompt_len=30,
                                new_tokens=103, reloaded=True, device="cpu", base_dtype=plan.base_dtype).total / GiB
    # What training left grows with its micro-batches (3 epochs of 1000 samples, 8 a micro-batch on each of the 2
    # processes: 189 each), here up to its cap: 0.3 + 0.4 GiB.
    micro_batches = predict_for_plan(plan, shape).parts["micro_batches"]
    assert micro_batches == 189 and cpu_retained_gib("bf16", micro_batches) == pytest.approx(0.7)
    # After 12 micro-batches (the benchmark's short cases): 0.3 + 12 x 0.0075 (measured 0.34-0.38); fp32 does not grow.
    assert cpu_retained_gib("bf16", 12) == pytest.approx(0.39) and cpu_retained_gib("fp32", 189) == pytest.approx(0.2)
    assert plan.predicted_memory_gib["base_eval"] == round(base + CPU_RUNTIME_GIB + 0.7, 2)
    # Merged in place into the reloaded model: no copy, so both evaluations predict the same peak.
    assert plan.predicted_memory_gib["final_eval"] == plan.predicted_memory_gib["base_eval"]


def test_a_first_runs_evaluation_memory_follows_the_longest_reference_answer_and_a_loss_only_one_its_loss_pass():
    """On a first run the evaluation's KV cache is sized for the decoding steps the time model expects: until the
    longest reference answer ends (launcher.timing.answer_batches), not the training answers' longest. A chat
    evaluation without eval.metrics generates nothing: its peak is the held-out loss pass, and its fit is checked
    for that, not for a KV cache of eval.batch_size x (data.max_length + eval.max_new_tokens)."""
    from launcher.memory import CPU_RUNTIME_GIB

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["hardware.precision=fp32", "eval.limit=16"])
    shape = find_shape(recipe.model.name)[0]
    data = _counted_data(16).model_copy(update={"eval_answer_tokens": [61] + [40] * 15})
    predicted = make_plan(recipe, _rates_hardware(), shape, data=data).predicted_memory_gib

    def expected(new_tokens, reloaded, generates=True, batch=16, prompt=30):
        return estimate_eval_memory(shape, eval_precision="fp32", training_precision="fp32", batch=batch, prompt_len=prompt,
                                    new_tokens=new_tokens, reloaded=reloaded, device="cpu", base_dtype="fp32",
                                    generates=generates).total / GiB

    assert predicted["final_eval"] == round(expected(61, True) + CPU_RUNTIME_GIB, 2)  # the training answers': 103
    assert predicted["base_eval"] == round(expected(61, False) + CPU_RUNTIME_GIB, 2)

    # 64 prompts of up to 200 tokens: generation's KV cache and prompt pass outgrow the loss pass's logits.
    chat = ROOT / "recipes" / "chat.yaml"
    data = _counted_data(64).model_copy(update={"eval_prompt_tokens_max": 200})
    generating = make_plan(load_recipe(chat, ["eval.batch_size=64"]), _rates_hardware(), shape, data=data)
    loss_only = make_plan(load_recipe(chat, ["eval.batch_size=64", "eval.metrics=[]"]), _rates_hardware(), shape, data=data)
    assert generating.eval_precision == loss_only.eval_precision == "bf16"
    loss_pass = estimate_eval_memory(shape, eval_precision="bf16", training_precision="bf16", batch=64, prompt_len=200,
                                     new_tokens=0, reloaded=True, device="cpu", base_dtype=loss_only.base_dtype,
                                     generates=False)
    assert loss_pass.kv_cache == loss_pass.activations == 0 and loss_pass.working == loss_pass.loss_pass > 0
    assert loss_only.predicted_memory_gib["final_eval"] == round(loss_pass.total / GiB + CPU_RUNTIME_GIB, 2)
    assert loss_only.predicted_memory_gib["final_eval"] < generating.predicted_memory_gib["final_eval"]
    fit = loss_only.decision("eval_memory_gib")
    assert "held-out loss pass" in fit.reason and "no generation" in fit.reason and "KV cache" not in fit.reason
    assert fit.value < generating.decision("eval_memory_gib").value
