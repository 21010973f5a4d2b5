"""Held-out loss per item: the mean negative log-likelihood of its trained-on tokens, one forward pass per item.

Every dataset has this evidence, also where accuracy does not move: the same items under the base and the
trained model give paired losses, which launcher.stats.wilcoxon_signed_rank tests.
"""

from __future__ import annotations

# Tokens in one forward pass: the logits of a batch are tokens x vocabulary floats, and the loss holds them in the
# model's dtype, their fp32 copy at the trained positions and its log-softmax: 10 bytes per logit in bf16. So
# batches are cut by logits, not by items: at most 2^25 per batch (682 tokens of SmolLM2's 49,152-token
# vocabulary, 335 MB), at most 4,096 tokens. Cutting at 4,096 tokens alone made the loss pass the peak of a whole
# run's evaluation: 2 GB for SmolLM2 (measured: 3.3-3.9 GiB resident in the base evaluation of 48 unit-conversion
# items against 1.25 GiB for 10), 6 GB for a 151,936-token vocabulary.
TOKENS_PER_BATCH = 4096
LOGITS_PER_BATCH = 2**25


def tokens_per_batch(vocab: int) -> int:
    return max(1, min(TOKENS_PER_BATCH, LOGITS_PER_BATCH // max(1, vocab)))


def item_losses(model, tokenizer, features: list[dict], *, device: str, label: str = "held-out loss") -> list[float]:
    """Mean NLL (nats per trained-on token) of each feature {"input_ids", "labels"}; NaN for an item with no
    trained-on token. Batched: items sorted by length, padded on the right, one forward each."""
    import torch

    from launcher.evaluate import progress_bar

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    budget = tokens_per_batch(getattr(model.config, "vocab_size", None) or len(tokenizer))
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    out = [float("nan")] * len(features)
    batches, current = [], []
    for i in order:
        longest = len(features[current[0]]["input_ids"]) if current else len(features[i]["input_ids"])
        if current and longest * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    model.eval()
    with progress_bar(label, len(features)) as advance, torch.inference_mode():
        for idx in batches:
            width = max(len(features[i]["input_ids"]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(features[i]["input_ids"])
                ids[row, :n] = torch.tensor(features[i]["input_ids"])
                labels[row, :n] = torch.tensor(features[i]["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # Position t predicts token t + 1; only trained-on targets count.
            targets = labels[:, 1:].to(logits.device)
            keep = targets != -100
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
            per_row = torch.zeros(len(idx), device=nll.device).index_add_(0, keep.nonzero()[:, 0], nll)
            counts = keep.sum(dim=1)
            for row, i in enumerate(idx):
                if counts[row] > 0:
                    out[i] = (per_row[row] / counts[row]).item()
            advance(len(idx))
    return out
