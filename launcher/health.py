"""The training health guard: checks every optimizer step and stops a broken run with a diagnosis.

Trainer's own logging hides the failure: its NaN filter replaces a NaN loss with the running average,
which is how `loss: 0.0` next to `grad_norm: nan` shows up in logs. So the guard looks at the raw loss
of every micro-batch and at the gradient norm before each optimizer step, and never "repairs" a bad
step (no zeroing of NaN gradients, no replacing a zero loss).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from launcher.errors import SftlaunchError
from launcher.rundir import RunDir

# Divergence (see LossWatch). Fitted to nothing: these are wide margins around measured healthy curves
# (README "Health guard"): no healthy run of either shipped recipe came within half of either margin.
GRACE_STEPS = 5          # the first steps may sit at ln(V) (a freshly initialised head) or jump while Adam warms up
ABOVE_UNIFORM_NATS = 1.0  # loss above ln(V) + 1: worse than guessing uniformly, by e in perplexity
RISE_FACTOR, RISE_NATS = 2.0, 1.0  # loss above 2 x best + 1 nat: training is undoing what it learned

# Collapse (see collapse_report): a generation is degenerate when its tail is one short unit repeated.
REPEAT_UNIT_MAX_CHARS = 10
REPEAT_MIN_TIMES = 8
COLLAPSED_SHARE = 0.5  # collapsed when at least half of the generations are degenerate, or identical


class TrainingHealthError(SftlaunchError):
    """Training is numerically broken; the message is the diagnosis (exit code 3)."""

    exit_code = 3

    def __init__(self, diagnosis: str, details: dict):
        super().__init__(diagnosis)
        self.details = details


@dataclass
class StepRecord:
    """The raw losses and trainable-token counts of the micro-batches of the current optimizer step."""

    losses: list[float] = field(default_factory=list)
    trainable_tokens: list[int] = field(default_factory=list)
    summed: bool = False  # each loss is a share of the step's loss (normalised by the step's token count)
    grad_norm: float | None = None  # Trainer's own gradient norm of the step (unscaled; DeepSpeed: global)
    update_applied: bool | None = None  # DeepSpeed only: the engine applied the update before the guard looked

    def clear(self) -> None:
        self.losses.clear()
        self.trainable_tokens.clear()
        self.grad_norm = self.update_applied = None

    def step_loss(self) -> float | None:
        if not self.losses:
            return None
        return sum(self.losses) if self.summed else sum(self.losses) / len(self.losses)


# Below this loss scale, gradients that still overflow are not finite at any scale: a real failure.
MIN_LOSS_SCALE = 1.0


def scaler_overflow(precision: str, loss: float | None, grad_norm: float | None, scaler, update_applied: bool | None) -> str | None:
    """Why a non-finite gradient is the fp16 loss scaler's normal overflow (it skips the update and halves its
    scale), or None when it is not one: the loss itself is not finite, or the scale is already below
    MIN_LOSS_SCALE, or nothing skips the step.

    Trainer unscales before on_pre_optimizer_step (accelerate's clip_grad_norm_ calls unscale_gradients), so a
    step GradScaler will skip reaches the guard as grad_norm inf; DeepSpeed's fp16 scaler has skipped it already.
    """
    if precision != "fp16" or grad_norm is None or math.isfinite(grad_norm):
        return None
    if loss is None or not math.isfinite(loss):
        return None
    if scaler is not None:
        scale = float(scaler.get_scale())
        if scale < MIN_LOSS_SCALE:
            return None
        return (f"fp16 loss scaler overflow (gradient norm {grad_norm} at scale {scale:g}): the scaler skips this update "
                f"and halves its scale; this is the scaler working, not a bad step")
    if update_applied is False:  # DeepSpeed's own fp16 loss scaler (ds_config "fp16": loss_scale 0, dynamic)
        return (f"fp16 loss scaler overflow (gradient norm {grad_norm}): DeepSpeed skipped this update and lowered its "
                "scale; this is the scaler working, not a bad step")
    return None


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
                         f"data.max_length, data.prompt_format and the data (the pre-flight report in {RunDir.PREFLIGHT})")
    else:
        causes.append(f"all or nearly all labels masked: check {RunDir.PREFLIGHT} and data.max_length")
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


class LossWatch:
    """Divergence without NaN: the loss climbing above uniform guessing, or far above its own best.

    A diverged run shows no NaN (at learning rate 1 the embedded model went 1.76 -> 21 in five steps,
    ln(49152) = 10.8, and every generation became "1111..."), so the NaN checks alone let it finish
    "completed". Two rules, each checked on the loss of every optimizer step:
      - after GRACE_STEPS: loss > ln(V) + ABOVE_UNIFORM_NATS (worse than uniform guessing over V tokens);
      - from the second step: loss > RISE_FACTOR x best + RISE_NATS, best being the lowest loss so far.
    """

    def __init__(self, vocab_size: int, grace_steps: int = GRACE_STEPS):
        self.uniform = math.log(vocab_size)
        self.grace = grace_steps
        self.best = math.inf
        self.seen = 0

    def check(self, step: int, loss: float) -> tuple[str, float] | None:
        """(problem, threshold) when this step's loss has diverged; else None (and the loss is remembered)."""
        self.seen += 1
        ceiling = self.uniform + ABOVE_UNIFORM_NATS
        if self.seen > self.grace and loss > ceiling:
            return (f"the loss {loss:.3f} is above ln(vocabulary size) + {ABOVE_UNIFORM_NATS:g} = {ceiling:.2f} "
                    f"(uniform guessing scores {self.uniform:.2f}): the model has diverged", ceiling)
        rise = RISE_FACTOR * self.best + RISE_NATS
        if math.isfinite(self.best) and loss > rise:
            return (f"the loss {loss:.3f} rose above {RISE_FACTOR:g} x its best so far ({self.best:.3f}) + "
                    f"{RISE_NATS:g} = {rise:.2f}: the model has diverged", rise)
        self.best = min(self.best, loss)
        return None


def diverged_causes(precision: str, max_learning_rate: float) -> list[str]:
    causes = [f"learning rate too high: train.learning_rate={max_learning_rate:g} (try 10x lower); keep "
              "train.max_grad_norm at 1.0 and some train.warmup"]
    if precision == "fp16":
        causes.append("fp16 overflow: use hardware.precision=bf16 on compute capability >= 8.0, or fp32")
    elif precision == "bf16":
        causes.append("bf16 rounding (rare: weights stay fp32): rerun with hardware.precision=fp32 to rule it out")
    return causes


def diverged_diagnosis(*, step: int, problem: str, loss: float, threshold: float, precision: str,
                       learning_rate: float, max_learning_rate: float) -> str:
    lines = [f"training stopped at optimizer step {step}: {problem}.",
             f"  loss {loss:.4g}, threshold {threshold:.4g}, precision {precision}, learning rate {learning_rate:.3g}",
             "  likely causes, most likely first:"]
    lines += [f"    {i}. {c}" for i, c in enumerate(diverged_causes(precision, max_learning_rate), 1)]
    lines.append("  The last good checkpoint and all metrics so far are in the run directory; nothing was saved "
                 "from the diverged steps.")
    return "\n".join(lines)


def is_degenerate(text: str) -> bool:
    """One short unit ("1", "the ", ":") repeated to fill the tail: what a collapsed model writes until the limit."""
    t = text.rstrip()
    if not t:
        return False
    for size in range(1, REPEAT_UNIT_MAX_CHARS + 1):
        unit = t[-size:]
        times, end = 0, len(t)
        while end >= size and t[end - size:end] == unit:
            times, end = times + 1, end - size
        if times >= REPEAT_MIN_TIMES and times * size >= len(t) / 2:
            return True
    return False


def collapse_report(generations: list[str]) -> dict:
    """Whether a model's generations have collapsed: most degenerate, or most of them the same text."""
    n = len(generations)
    degenerate = sum(is_degenerate(g) for g in generations)
    # An empty generation is a model that stops at once (the embedded base model does with a plain prompt):
    # answer_rate reports that; it is not many answers collapsing into one.
    said = Counter(g.strip() for g in generations if g.strip())
    text, count = said.most_common(1)[0] if said else ("", 0)
    identical = count if n >= 4 else 0  # a handful of items can agree by chance
    collapsed = n > 0 and (degenerate >= COLLAPSED_SHARE * n or identical >= COLLAPSED_SHARE * n)
    return {"collapsed": collapsed, "n": n, "degenerate": degenerate, "most_common_count": count,
            "most_common": text[:80]}


def collapse_diagnosis(report: dict, *, max_learning_rate: float, precision: str, base: dict | None) -> str:
    n = report["n"]
    what = []
    if report["degenerate"] >= COLLAPSED_SHARE * n:
        what.append(f"{report['degenerate']} of {n} generations repeat one short piece of text to the end")
    if report["most_common_count"] >= COLLAPSED_SHARE * n:
        what.append(f"{report['most_common_count']} of {n} generations are the same text {report['most_common']!r}")
    lines = ["the trained model has collapsed: " + "; ".join(what) + "."]
    if base is not None:
        lines.append(f"  the base model's generations: {base['degenerate']} of {base['n']} degenerate, the most common "
                     f"one {base['most_common_count']} times" + (" (the base had collapsed already)" if base["collapsed"] else ""))
    lines.append("  likely causes, most likely first:")
    causes = diverged_causes(precision, max_learning_rate)
    causes.insert(1, f"training targets that repeat themselves or are all alike: check the data ({RunDir.PREFLIGHT}, "
                     "data.path) and data.max_length")
    lines += [f"    {i}. {c}" for i, c in enumerate(causes, 1)]
    lines.append(f"  The trained weights, {RunDir.PREDICTIONS} and {RunDir.EVAL} are kept in the run directory for inspection.")
    return "\n".join(lines)


def non_finite_names(named_tensors) -> list[str]:
    """Names of the floating tensors holding NaN or inf.

    Under ZeRO-3 a parameter's own tensor is an empty placeholder and this rank's shard is `ds_tensor`
    (deepspeed/runtime/zero/partition_parameters.py): the shard is what is checked, so each rank checks its
    part and the caller combines the ranks' answers.
    """
    import torch

    bad = []
    for name, t in named_tensors:
        data = getattr(t, "ds_tensor", None)
        data = (t if data is None else data).detach()
        if data.is_floating_point() and data.numel() and not bool(torch.isfinite(data).all()):
            bad.append(name)
    return bad


def non_finite_weights(named_parameters) -> list[str]:
    """Names of trainable weights holding NaN or inf (checked before an adapter is saved)."""
    return non_finite_names((name, p) for name, p in named_parameters if p.requires_grad)


class BrokenModelError(SftlaunchError):
    """A model about to be used or written holds NaN or inf: nothing it would produce can be trusted (exit 3)."""

    exit_code = 3


def non_finite_tensors(model) -> tuple[list[str], int]:
    """Names of the model's floating tensors (every parameter, trainable or frozen, and buffer) holding NaN or
    inf, and how many floating tensors there are."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return non_finite_names(named), sum(t.is_floating_point() and t.numel() > 0 for _, t in named)


def check_finite(model, what: str, fix: str) -> None:
    """Raise BrokenModelError naming the count and the first tensors when any floating tensor of model is not finite."""
    bad, total = non_finite_tensors(model)
    if bad:
        raise BrokenModelError(f"{what} has {len(bad)} non-finite tensors of {total} (first: {', '.join(bad[:3])}). Fix: {fix}")
