"""The causal-LM loss from logits at trained positions only, a chunk of positions at a time.

The model's own loss (transformers' ForCausalLMLoss) computes lm_head at every position of the micro-batch,
prompt and padding included, upcasts the whole batch x sequence x vocab block to fp32 and keeps it for
backward. The loss needs the logits only where the shifted label is not -100. Here the model's forward runs
with lm_head fed an empty slice (a forward pre-hook takes the final hidden states instead), the hidden states
at trained positions are gathered, and lm_head plus cross-entropy run over them in chunks; each chunk's
gradient with respect to the hidden states (and to lm_head's weight when it trains) is computed in the
forward pass, so no chunk's logits outlive it (the fused linear cross-entropy of Liger-Kernel and
Apple's Cut Cross-Entropy, written here in plain torch).

The forward goes through the model as the Trainer wrapped it (PEFT, accelerate, DeepSpeed ZeRO-1/2), so
their hooks run as usual. ZeRO-3 partitions lm_head's weight outside the model's forward: the planner keeps
the model's own loss there (launcher.plan.trained_logits_blocker).
"""

from __future__ import annotations

# Elements of one chunk's logits: 2^25 fp32 values are 128 MiB (682 positions of a 49,152-token vocabulary).
LOSS_CHUNK_ELEMENTS = 2**25


def chunk_positions(vocab: int) -> int:
    """Positions whose logits are computed at once."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab)


def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum over rows of cross_entropy(hidden @ weight.T (+ bias), targets), chunked; the gradients are
        computed in forward, chunk by chunk, and scaled by the incoming gradient in backward."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk):
            want_h, want_w = hidden.requires_grad, weight.requires_grad
            want_b = bias is not None and bias.requires_grad
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], chunk):
                    h = hidden[start:start + chunk].to(compute_dtype)
                    t = targets[start:start + chunk]
                    logits = torch.nn.functional.linear(h, w, b).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    # d(sum of losses)/d(logits) = softmax - one_hot(target), built in place of the logits.
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
                    g = g.to(compute_dtype)
                    if want_h:
                        grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
                    if want_w:
                        grad_w += (g.t() @ h).float()
                    if want_b:
                        grad_b += g.float().sum(0)
            ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
            ctx.wants = (want_h, want_w, want_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            saved = iter(ctx.saved_tensors)
            want_h, want_w, want_b = ctx.wants
            # grad_out is a 0-dim tensor: the product keeps each saved gradient's dtype.
            grad_h = next(saved) * grad_out if want_h else None
            grad_w = (next(saved) * grad_out).to(ctx.dtypes[0]) if want_w else None
            grad_b = (next(saved) * grad_out).to(ctx.dtypes[1]) if want_b else None
            return grad_h, grad_w, grad_b, None, None, None

    return LinearCrossEntropy


def trained_positions_loss(model, head, inputs: dict, num_items_in_batch=None):
    """The causal-LM loss of `inputs` (with "labels") that transformers' ForCausalLMLoss computes: the sum of the
    cross-entropies at positions whose shifted label is not -100, divided by num_items_in_batch when given (the
    step's trainable tokens, the Trainer's gradient-accumulation normalisation), else their mean.

    `model` is the model as called (any wrapper), `head` its output embedding (an nn.Linear, not adapted).
    """
    import torch

    labels = inputs["labels"]
    captured = {}

    def take_hidden(module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :],)  # lm_head runs on no position: its logits are computed below

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    hidden = captured["hidden"]
    # Tokens < n predict n: the hidden state at position i is scored against the label at i + 1.
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    selected = hidden[:, :-1][keep]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
    total = _linear_cross_entropy().apply(selected, head.weight, head.bias, targets[keep], compute_dtype,
                                          chunk_positions(head.weight.shape[0]))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / keep.sum()
