"""transformers.Trainer, extended only where it has no option for what we need.

- Atomic checkpoints: Trainer writes checkpoint-N in place, so a crash mid-save leaves a folder that
  resume would pick up and fail on. We stage the save under a temporary name, then rename.
- The health guard: per-micro-batch raw losses and trainable-token counts, checked before every
  optimizer step (Trainer's NaN filter would otherwise hide a NaN loss behind the running average).
- Stop requests (SIGINT/SIGTERM, the time budget) end training at a step boundary with a checkpoint.
- The loss from logits at trained positions only (launcher/loss.py), where the plan chose it (loss_logits).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time

from launcher.distributed import agreed_loss, every_rank
from launcher.errors import StorageError
from launcher.rundir import RunDir, complete_checkpoints
from launcher.signals import TRAINING, Stopped
from launcher.health import (LossWatch, StepRecord, TrainingHealthError, diagnose, diverged_diagnosis,
                             scaler_overflow)


class StopRequest:
    """Set by a signal handler or the time budget; read by the trainer at each step boundary."""

    def __init__(self):
        self.reason: str | None = None
        self.signal: int | None = None

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.signal is not None:  # a second Ctrl-C: stop now, without the checkpoint
                raise Stopped(signum, TRAINING, "resume continues from the last complete checkpoint")
            self.signal = signum
            self.reason = f"signal {signal.Signals(signum).name}"
            print(f"\n{signal.Signals(signum).name} received: finishing the current step, saving a checkpoint "
                  "(press Ctrl-C again to abort at once)", flush=True)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


# Consecutive loss-scaler overflows after which the gradients count as non-finite: halving from GradScaler's
# initial 2^16 reaches a scale below 1 in 17 steps.
MAX_OVERFLOW_STREAK = 24

OOM_MARKERS = ("out of memory", "MPS backend out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (torch.OutOfMemoryError) and MPS ("MPS backend out of memory") both count."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS))


def build_trainer(*, precision: str, keep_checkpoints: int, max_bad_steps: int, zero_loss_steps: int,
                  max_time: float | None, stop: StopRequest, vocab_size: int | None = None, loss_logits: str = "all",
                  **trainer_kwargs):
    """A Trainer with the health guard (a callback) and the raw-loss recording it reads (a Trainer subclass).

    Longer than the other functions on purpose: the two classes are defined here because transformers is
    imported lazily (the CLI starts without torch) and both share one StepRecord of the current step; each
    method is short and does one thing.
    """
    from transformers import Trainer, TrainerCallback

    record = StepRecord()

    class Guard(TrainerCallback):
        def __init__(self):
            self.zero_streak = 0
            self.bad_steps = 0
            self.start = time.monotonic()
            self.watch = LossWatch(vocab_size) if vocab_size else None
            self.skipped_steps: list[int] = []  # optimizer steps whose update was skipped (trainer.skipped_steps)
            self.overflow_streak = 0
            self.overflow_steps: list[int] = []  # fp16: steps the loss scaler skipped (overflow), which is normal

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            tokens = record.trainable_tokens
            # Every rank judges the same numbers: the losses of all ranks, and the global gradient norm.
            loss, bad_ranks = agreed_loss(every_rank(record.step_loss(), args.device))
            grad_norm = record.grad_norm if record.grad_norm is not None else _grad_norm(model)
            where = f" on rank {', '.join(map(str, bad_ranks))}" if bad_ranks and args.world_size > 1 else ""
            step = state.global_step + 1
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler else args.learning_rate
            overflow = scaler_overflow(precision, loss, grad_norm, getattr(optimizer, "scaler", None), record.update_applied)
            self.overflow_streak = self.overflow_streak + 1 if overflow else 0
            if overflow and self.overflow_streak <= MAX_OVERFLOW_STREAK:
                # The fp16 loss scaler working: it skips this update and lowers its scale. Past the streak, no
                # scale gives finite gradients (DeepSpeed's scale stops at min_loss_scale): a bad step below.
                self.overflow_steps.append(step)
                print(f"note: step {step}: {overflow}", flush=True)
                return
            problem = None
            if loss is not None and not math.isfinite(loss):
                problem = f"the loss is {loss}{where}"
            elif grad_norm is not None and not math.isfinite(grad_norm):
                problem = f"the gradient norm is {grad_norm}"
            details = {"step": step, "loss": loss, "grad_norm": grad_norm, "trainable_tokens": tokens, "learning_rate": lr}
            if bad_ranks:
                details["ranks"] = bad_ranks
            if problem:
                self.bad_steps += 1
                # DeepSpeed steps its engine inside backward() (accelerate's DeepSpeedEngineWrapper.backward), so
                # the update is behind us here; its bf16 path applies non-finite gradients (deepspeed 0.19.8
                # stage_1_and_2.py step(): overflow is only checked for other dtypes), which cannot be skipped.
                applied = record.update_applied is True
                if self.bad_steps <= max_bad_steps and not applied:
                    # Skip the update (the optimizer ignores parameters without a gradient; DeepSpeed skipped it
                    # already); never zero or rescale the bad gradients into something that looks trainable.
                    for p in model.parameters():
                        p.grad = None
                    print(f"warning: step {step}: {problem}; update skipped ({self.bad_steps} of "
                          f"train.guard.max_bad_steps={max_bad_steps} allowed)", flush=True)
                    self.skipped_steps.append(step)
                    return
                if applied and self.bad_steps <= max_bad_steps:
                    problem += (" and DeepSpeed had already applied the update (its bf16 path does not skip non-finite "
                                "steps), so the weights are no longer usable: train.guard.max_bad_steps cannot skip it")
                raise TrainingHealthError(
                    diagnose(step=step, problem=problem, loss=loss, grad_norm=grad_norm, precision=precision,
                             tokens=tokens, learning_rate=lr, max_learning_rate=args.learning_rate), details)
            if self.watch is not None and loss is not None:
                diverged = self.watch.check(step, loss)
                if diverged:
                    problem, threshold = diverged
                    raise TrainingHealthError(
                        diverged_diagnosis(step=step, problem=problem, loss=loss, threshold=threshold, precision=precision,
                                           learning_rate=lr, max_learning_rate=args.learning_rate),
                        {"step": step, "loss": loss, "threshold": threshold, "diverged": True, "learning_rate": lr,
                         "grad_norm": grad_norm})
            self.zero_streak = self.zero_streak + 1 if loss == 0.0 else 0
            if zero_loss_steps and self.zero_streak >= zero_loss_steps:
                raise TrainingHealthError(
                    diagnose(step=step, problem=f"the loss was exactly 0.0 for {self.zero_streak} steps in a row "
                             "(nothing is being learned; usually every label is masked)", loss=loss,
                             grad_norm=grad_norm, precision=precision, tokens=tokens, learning_rate=lr,
                             max_learning_rate=args.learning_rate), details)

        def on_step_end(self, args, state, control, **kwargs):
            record.clear()
            if max_time is not None and stop.reason is None and time.monotonic() - self.start >= max_time \
                    and state.global_step < state.max_steps:
                stop.reason = "time budget"
            # All ranks stop at the same step, and for the same reason: a signal reaches only the ranks of the
            # node it was sent to (on the others training would go on to saving, alone), the time budget
            # runs out on each rank's own clock.
            kind = 2 if stop.signal is not None else 1 if stop.reason is not None else 0
            agreed = max(int(k or 0) for k in every_rank(kind, args.device))
            if agreed:
                if agreed == 2 and stop.signal is None:
                    stop.signal, stop.reason = signal.SIGTERM, "a signal on another node"
                stop.reason = stop.reason or "time budget"
                control.should_training_stop = True
                control.should_save = True

    class SftTrainer(Trainer):

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (loss_logits != "trained" or return_outputs or "labels" not in inputs or self.label_smoother is not None
                    or self.compute_loss_func is not None):  # the launcher sets neither; they need the logits
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch

            from launcher.loss import trained_positions_loss

            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            if type(head) is not torch.nn.Linear:  # the planner rules these out: a plain lm_head is what the loss multiplies by
                raise RuntimeError(f"plan.loss_logits=trained needs a plain torch.nn.Linear lm_head, and the model has a "
                                   f"{type(head).__name__}: plan the run again (the planner chooses the model's own loss there)")
            # As Trainer.compute_loss: the step's token count normalises when the model takes loss kwargs, and the
            # loss is scaled back up by the processes whose token counts were summed into it.
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = trained_positions_loss(model, head, inputs, items)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss_scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            return loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Targets are labels shifted by one: position 0 is never predicted.
            tokens = int((inputs["labels"][:, 1:] != -100).sum())
            record.trainable_tokens.append(tokens)
            if tokens == 0:
                raise TrainingHealthError(
                    diagnose(step=self.state.global_step + 1, problem="a micro-batch has no trainable tokens (all labels masked)",
                             loss=None, grad_norm=None, precision=precision, tokens=list(record.trainable_tokens),
                             learning_rate=self.args.learning_rate, max_learning_rate=self.args.learning_rate),
                    {"step": self.state.global_step + 1, "trainable_tokens": list(record.trainable_tokens)})
            loss = super().training_step(model, inputs, num_items_in_batch)
            record.losses.append(float(loss.detach()))
            # Trainer returns each micro-batch's share of the step's loss when it normalises by the step's
            # token count (num_items_in_batch), else the micro-batch mean: the step loss is then the sum.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            record.summed = bool(scaled)
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # Trainer's own norm of the step, just before on_pre_optimizer_step (transformers 5.23 trainer.py,
            # _inner_training_loop): unscaled under fp16, the engine's global norm under DeepSpeed, where
            # ZeRO-2/3 leave p.grad None so the guard cannot compute it from the parameters.
            norm = super()._get_grad_norm(model, grad_norm)
            record.grad_norm = None if norm is None else float(norm)
            if self.is_deepspeed_enabled:
                record.update_applied = bool(self.model_wrapped.was_step_applied())
            return norm

        def _save_checkpoint(self, model, trial):
            out = self.args.output_dir
            staging = os.path.join(out, RunDir.STAGING)
            name = RunDir.checkpoint_name(self.state.global_step)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, trial)
            except OSError as exc:  # disk full, quota, read-only: leave no half-written staging folder behind
                if self.args.should_save:
                    shutil.rmtree(staging, ignore_errors=True)
                raise StorageError(f"cannot write {name} into {out}: {exc.strerror or exc}. Fix: free space there "
                                   "(or lower train.keep_checkpoints); `sftlaunch resume` then continues from the last "
                                   "complete checkpoint.") from None
            finally:
                self.args.output_dir = out
            # DeepSpeed writes one shard per rank: rename only once every rank has finished writing.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = os.path.join(out, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(os.path.join(staging, name), final)  # the checkpoint appears whole or not at all
                shutil.rmtree(staging, ignore_errors=True)
                for old in complete_checkpoints(out)[:-keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)

    guard = Guard()
    trainer = SftTrainer(callbacks=[*trainer_kwargs.pop("callbacks", []), guard], **trainer_kwargs)
    trainer.skipped_steps = guard.skipped_steps
    trainer.overflow_steps = guard.overflow_steps
    trainer.guard, trainer.step_record = guard, record  # for tests that drive the guard with constructed steps
    return trainer


def _grad_norm(model) -> float | None:
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    import torch

    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
