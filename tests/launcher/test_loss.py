"""The loss from logits at trained positions only equals the model's own loss over every position."""

from pathlib import Path

import pytest
import torch

TINY = Path(__file__).parent / "data" / "tiny-llama"


def _batch(padded: bool):
    """Three rows with prompts (labels -100) of different lengths; padded: rows of different lengths, padded on the
    right with labels -100 and attention 0, as DataCollatorForSeq2Seq leaves them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 24), generator=g)
    attention = torch.ones_like(ids)
    labels = ids.clone()
    for row, prompt in enumerate((5, 9, 2)):
        labels[row, :prompt] = -100
    if padded:
        for row, length in ((1, 17), (2, 11)):
            ids[row, length:] = 2
            attention[row, length:] = 0
            labels[row, length:] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _model(lora: bool, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    from launcher.models import load_model

    torch.manual_seed(0)
    model = load_model(str(TINY), dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                                 init_lora_weights=False))  # non-zero B: gradients reach both A and B
    return model


def _loss_and_grads(model, batch, trained: bool, num_items=None):
    from launcher.loss import trained_positions_loss

    model.zero_grad()
    if trained:
        loss = trained_positions_loss(model, model.get_output_embeddings(), batch, num_items)
    else:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        loss = model(**batch, **extra).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lora", [True, False])
def test_trained_positions_loss_and_gradients_equal_the_full_computation_in_fp32(padded, lora):
    model, batch = _model(lora), _batch(padded)
    full, full_grads = _loss_and_grads(model, batch, trained=False)
    got, grads = _loss_and_grads(model, batch, trained=True)
    assert got == pytest.approx(full, abs=1e-5)
    assert grads.keys() == full_grads.keys() and grads  # the same weights receive gradients (lm_head's too, method full)
    for name, g in grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_with_gradient_checkpointing_it_still_equals_the_full_computation():
    model, batch = _model(lora=True), _batch(padded=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    full, full_grads = _loss_and_grads(model, batch, trained=False)
    got, grads = _loss_and_grads(model, batch, trained=True)
    assert got == pytest.approx(full, abs=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_steps_token_count_normalises_as_in_the_models_own_loss():
    # Under gradient accumulation the Trainer passes the whole step's trainable-token count.
    model, batch = _model(lora=True), _batch(padded=True)
    items = torch.tensor(100)
    assert _loss_and_grads(model, batch, True, items)[0] == pytest.approx(_loss_and_grads(model, batch, False, items)[0],
                                                                          abs=1e-5)


def test_chunks_smaller_than_the_trained_positions_give_the_same_loss(monkeypatch):
    import launcher.loss

    model, batch = _model(lora=True), _batch(padded=True)
    whole, grads = _loss_and_grads(model, batch, trained=True)
    monkeypatch.setattr(launcher.loss, "LOSS_CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7 positions a chunk
    chunked, chunked_grads = _loss_and_grads(model, batch, trained=True)
    assert chunked == pytest.approx(whole, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-6)


def test_on_a_bf16_base_under_autocast_it_matches_the_models_own_loss_to_bf16_rounding():
    model, batch = _model(lora=True, dtype=torch.bfloat16), _batch(padded=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, full_grads = _loss_and_grads(model, batch, trained=False)
        got, grads = _loss_and_grads(model, batch, trained=True)
    assert got == pytest.approx(full, rel=1e-2)
    for name, g in grads.items():
        assert g.dtype == torch.float32  # the LoRA weights' gradients
        cos = torch.nn.functional.cosine_similarity(g.flatten(), full_grads[name].flatten(), dim=0)
        assert cos > 0.99, name
