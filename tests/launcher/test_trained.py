"""load_trained: the one loader of a run's trained model (final evaluation, `sftlaunch eval`, export)."""

import pytest
import torch

from launcher.rundir import RunDir
from launcher.trained import load_trained, output_word


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A run directory with an adapter whose B matrices are non-zero (a fresh LoRA adapter changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = RunDir(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(run_dir.adapter)
    return run_dir


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_lora_run_loads_as_the_base_with_its_adapter_which_changes_the_output(lora_run, tiny_model):
    model = load_trained(lora_run, "lora", str(tiny_model), device="cpu", dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with model.disable_adapter():
        plain = _logits(model, ids)
    assert not torch.allclose(plain, _logits(model, ids))
    from transformers import AutoModelForCausalLM
    assert torch.allclose(plain, _logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), ids))


def test_weights_load_in_the_requested_dtype_adapter_included(lora_run, tiny_model):
    model = load_trained(lora_run, "lora", str(tiny_model), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = load_trained(lora_run, "lora", str(tiny_model), device="cpu", dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    assert torch.allclose(_logits(model, ids), _logits(fp32, ids), atol=0.1, rtol=0.05)


def test_a_full_run_loads_its_saved_model_and_takes_no_base(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = RunDir(tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        saved.model.norm.weight.mul_(3)  # differs from the base
    saved.save_pretrained(run_dir.model)
    model = load_trained(run_dir, "full", "no-base-is-read", device="cpu", dtype="fp32")
    assert torch.equal(model.model.norm.weight, saved.model.norm.weight)
    with pytest.raises(ValueError, match="pass no base model"):
        load_trained(run_dir, "full", str(tiny_model), device="cpu", dtype="fp32", base=saved)


def test_the_word_for_what_a_run_leaves():
    assert (output_word("lora"), output_word("full")) == ("adapter", "model")


def _edited_copy(run_dir: RunDir, tmp_path, edit) -> RunDir:
    """A copy of the run's adapter whose safetensors tensors went through edit(dict) -> dict."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = RunDir(tmp_path / "edited")
    shutil.copytree(run_dir.adapter, copy.adapter)
    path = copy.adapter / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)
    return copy


def test_a_non_finite_adapter_is_refused_where_it_is_loaded(lora_run, tiny_model, tmp_path):
    from launcher.health import BrokenModelError

    def poison(tensors):
        name = next(k for k in tensors if "lora_B" in k)
        tensors[name][0, 0] = float("nan")
        return tensors

    broken = _edited_copy(lora_run, tmp_path, poison)
    with pytest.raises(BrokenModelError) as err:
        load_trained(broken, "lora", str(tiny_model), device="cpu", dtype="fp32")
    assert err.value.exit_code == 3 and "non-finite tensors of" in str(err.value) and "lora_B" in str(err.value)


def test_an_adapter_that_does_not_fit_the_base_is_refused(lora_run, tiny_model, tmp_path):
    from launcher.errors import PlanError

    def wrong_rank(tensors):
        name = next(k for k in tensors if "lora_A" in k)
        tensors[name] = torch.zeros(8, tensors[name].shape[1])
        return tensors

    with pytest.raises(PlanError, match="does not fit .*size mismatch|does not fit .*copying a param"):
        load_trained(_edited_copy(lora_run, tmp_path / "a", wrong_rank), "lora", str(tiny_model), device="cpu", dtype="fp32")

    def stray(tensors):
        tensors["base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        return tensors

    with pytest.raises(PlanError, match="1 tensors for modules .* does not have .*layers.99"):
        load_trained(_edited_copy(lora_run, tmp_path / "b", stray), "lora", str(tiny_model), device="cpu", dtype="fp32")
