"""The training health guard: checks every optimizer step and stops a broken run with a diagnosis.

Trainer's own logging hides the failure: its NaN filter replaces a NaN loss with the running average,
which is how `loss: 0.0` next to `grad_norm: nan` shows up in logs. So the guard looks at the raw loss
of every micro-batch and at the gradient norm before each optimizer step, and never "repairs" a bad
step (no zeroing of NaN gradients, no replacing a zero loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import SftlaunchError


class TrainingHealthError(SftlaunchError):
    """Training is numerically broken; the message is the diagnosis (exit code 3)."""

    exit_code = 3

    def __init__(self, diagnosis: str, details: dict):
        super().__init__(diagnosis)
        self.details = details


@dataclass
class StepRecord:
    losses: list[float] = field(default_factory=list)
    trainable_tokens: list[int] = field(default_factory=list)


def diagnose(*, step: int, problem: str, loss: float | None, grad_norm: float | None, precision: str,
             tokens: list[int], learning_rate: float, max_learning_rate: float) -> str:
    """The stop message: what broke, the numbers, and the likely causes in order with the key to change."""
    token_text = f"trainable tokens per micro-batch {tokens} (total {sum(tokens)})" if tokens else "no batch recorded"
    causes = []
    if precision == "fp16":
        causes.append("half-precision overflow: fp16 activations or a loss scale that grew too large; use "
                      "hardware.precision=bf16 on compute capability >= 8.0, or fp32 (hardware.precision=fp32)")
    elif precision == "bf16":
        causes.append("bf16 rounding: rerun with hardware.precision=fp32 to see if it is precision-related "
                      "(weights are fp32 under the optimizer, so it rarely is)")
    if not tokens or min(tokens) == 0:
        causes.insert(0, "all labels masked: a micro-batch has no trainable tokens, so its loss is 0/0; check "
                         "data.max_length, data.prompt_format and the data (the pre-flight report in preflight.json)")
    else:
        causes.append("all or nearly all labels masked: check preflight.json and data.max_length")
    causes.append(f"learning rate too high: train.learning_rate={max_learning_rate:g} (try 10x lower), "
                  "and keep train.max_grad_norm at 1.0")
    lines = [
        f"training stopped at optimizer step {step}: {problem}.",
        f"  loss {loss}, grad_norm {grad_norm}, precision {precision}, learning rate {learning_rate:.3g}",
        f"  {token_text}",
        "  likely causes, most likely first:",
    ]
    lines += [f"    {i}. {c}" for i, c in enumerate(causes, 1)]
    lines.append("  The last good checkpoint and all metrics so far are in the run directory; "
                 "train.guard.max_bad_steps lets a run skip a few bad steps (it says so each time).")
    return "\n".join(lines)
