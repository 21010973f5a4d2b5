"""Test-only fault injection: tests put this folder on PYTHONPATH (tests.conftest.fault_env), so every Python
process they start, torchrun's workers included, loads it. Production code carries no switch for any of it.

- OOM_ABOVE_MICRO_BATCH=N: a training micro-batch of more than N rows raises CUDA's out-of-memory error, as a
  GPU that is too small would;
- NAN_AT_STEP=N: the loss of optimizer step N is NaN (so are its gradients);
- SLOW_SAVE_SECONDS=S: every checkpoint takes S seconds longer (longer than torchrun's default grace);
- FAULT_RANK=R: the first two happen on rank R only.
"""

import os

_FAULTS = ("OOM_ABOVE_MICRO_BATCH", "NAN_AT_STEP", "SLOW_SAVE_SECONDS")

if any(os.environ.get(name) for name in _FAULTS):
    import time

    import torch
    import transformers

    _here = os.environ.get("FAULT_RANK") in (None, os.environ.get("RANK", "0"))
    _oom = int(os.environ["OOM_ABOVE_MICRO_BATCH"]) if os.environ.get("OOM_ABOVE_MICRO_BATCH") and _here else None
    _nan = int(os.environ["NAN_AT_STEP"]) if os.environ.get("NAN_AT_STEP") and _here else None
    _slow = float(os.environ.get("SLOW_SAVE_SECONDS") or 0)
    _training_step = transformers.Trainer.training_step
    _compute_loss = transformers.Trainer.compute_loss
    _save_checkpoint = transformers.Trainer._save_checkpoint

    _step = [0]  # the optimizer step being computed, for the loss paths that do not see the Trainer

    def training_step(self, model, inputs, *args, **kwargs):
        rows = inputs["input_ids"].shape[0]
        if _oom is not None and rows > _oom:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test: micro-batch {rows} > {_oom})")
        _step[0] = self.state.global_step + 1
        return _training_step(self, model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = _compute_loss(self, model, inputs, *args, **kwargs)
        if _nan is not None and self.state.global_step + 1 == _nan:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    # The worker's own loss (plan.loss_logits=trained) does not go through Trainer.compute_loss.
    import launcher.loss

    _trained_positions_loss = launcher.loss.trained_positions_loss

    def trained_positions_loss(*args, **kwargs):
        out = _trained_positions_loss(*args, **kwargs)
        return out * float("nan") if _nan is not None and _step[0] == _nan else out

    launcher.loss.trained_positions_loss = trained_positions_loss

    def _slow_save_checkpoint(self, *args, **kwargs):
        time.sleep(_slow)
        return _save_checkpoint(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
    transformers.Trainer.compute_loss = compute_loss
    if _slow:
        transformers.Trainer._save_checkpoint = _slow_save_checkpoint
