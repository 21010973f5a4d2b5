"""Test-only fault injection, put on PYTHONPATH by tests/launcher/test_oom.py: in every Python process that
starts with OOM_ABOVE_MICRO_BATCH=N set, a training micro-batch of more than N rows raises CUDA's
out-of-memory error, as a GPU that is too small would. Production code carries no switch for it."""

import os

if os.environ.get("OOM_ABOVE_MICRO_BATCH"):
    import torch
    import transformers

    _limit = int(os.environ["OOM_ABOVE_MICRO_BATCH"])
    _training_step = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        rows = inputs["input_ids"].shape[0]
        if rows > _limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test: micro-batch {rows} > {_limit})")
        return _training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step
