"""transformers.Trainer, extended only where it has no option for what we need.

- Atomic checkpoints: Trainer writes checkpoint-N in place, so a crash mid-save leaves a folder that
  resume would pick up and fail on. We stage the save under a temporary name, then rename.
- The health guard: per-micro-batch raw losses and trainable-token counts, checked before every
  optimizer step (Trainer's NaN filter would otherwise hide a NaN loss behind the running average).
- Stop requests (SIGINT/SIGTERM, the time budget) end training at a step boundary with a checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time

from launcher.errors import StorageError
from launcher.rundir import RunDir, complete_checkpoints
from launcher.signals import TRAINING, Stopped
from launcher.health import LossWatch, StepRecord, TrainingHealthError, diagnose, diverged_diagnosis


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


def _any_rank(flag: bool, device) -> bool:
    """True if any training process has the flag set: all ranks must stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


OOM_MARKERS = ("out of memory", "MPS backend out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (torch.OutOfMemoryError) and MPS ("MPS backend out of memory") both count."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS))


def build_trainer(*, precision: str, keep_checkpoints: int, max_bad_steps: int, zero_loss_steps: int,
                  max_time: float | None, stop: StopRequest, vocab_size: int | None = None, **trainer_kwargs):
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

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            tokens = record.trainable_tokens
            loss = record.step_loss()
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            grad_norm = None
            if grads:
                import torch

                grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            problem = None
            if loss is not None and not math.isfinite(loss):
                problem = f"the loss is {loss}"
            elif grad_norm is not None and not math.isfinite(grad_norm):
                problem = f"the gradient norm is {grad_norm}"
            step = state.global_step + 1
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler else args.learning_rate
            if problem:
                self.bad_steps += 1
                if self.bad_steps <= max_bad_steps:
                    # Skip the update (the optimizer ignores parameters without a gradient); never zero
                    # or rescale the bad gradients into something that looks trainable.
                    for p in model.parameters():
                        p.grad = None
                    print(f"warning: step {step}: {problem}; update skipped ({self.bad_steps} of "
                          f"train.guard.max_bad_steps={max_bad_steps} allowed)", flush=True)
                    self.skipped_steps.append(step)
                    return
                raise TrainingHealthError(
                    diagnose(step=step, problem=problem, loss=loss, grad_norm=grad_norm, precision=precision,
                             tokens=tokens, learning_rate=lr, max_learning_rate=args.learning_rate),
                    {"step": step, "loss": loss, "grad_norm": grad_norm, "trainable_tokens": tokens, "learning_rate": lr})
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
                             max_learning_rate=args.learning_rate),
                    {"step": step, "loss": loss, "grad_norm": grad_norm, "trainable_tokens": tokens, "learning_rate": lr})

        def on_step_end(self, args, state, control, **kwargs):
            record.losses.clear()
            record.trainable_tokens.clear()
            if max_time is not None and stop.reason is None and time.monotonic() - self.start >= max_time \
                    and state.global_step < state.max_steps:
                stop.reason = "time budget"
            if _any_rank(stop.reason is not None, args.device):
                stop.reason = stop.reason or "another rank stopped"
                control.should_training_stop = True
                control.should_save = True

    class SftTrainer(Trainer):

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
    return trainer
