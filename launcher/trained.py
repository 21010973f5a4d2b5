"""A run's trained model, loaded one way for every reader: the final evaluation, `sftlaunch eval`, `export`.

LoRA leaves an adapter (the base model from the plan with the saved adapter put on it); full fine-tuning
leaves a complete model in model/ (loaded in place of the base). Which of the two a run left, and the word
a user reads for it, are written here once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.rundir import RunDir


def output_word(method: str) -> str:
    """What training leaves, as a user reads it: 'model' (method full) or 'adapter' (method lora)."""
    return "model" if method == "full" else "adapter"


def load_trained(run_dir: RunDir, method: str, base_model: str, *, device: str, dtype: str,
                 trust_remote_code: bool = False, base=None):
    """The model a run trained, on `device` with weights in `dtype` (fp32, bf16, fp16), ready to generate.

    method lora: the base model (`base`, already loaded by the caller, or loaded from base_model, a
    resolved model path) with the run's adapter on it, a PeftModel (`disable_adapter()` gives the base).
    method full: the saved model from model/; pass no `base` (a full run's base would only take memory).
    Weights load in `dtype` directly, no second fp32 copy to cast from (a `base` given keeps its own dtype).
    Every reader of a trained model loads it here, so a check of what was loaded belongs here too.
    """
    from launcher.models import load_model

    if method == "full":
        if base is not None:
            raise ValueError("a full fine-tuning run's trained model is complete: pass no base model")
        model = load_model(str(run_dir.model), trust_remote_code, dtype=dtype)
    else:
        from peft import PeftModel

        if base is None:
            base = load_model(base_model, trust_remote_code, dtype=dtype)
        # The adapter takes the base's dtype (PEFT would otherwise upcast it to fp32 beside a half-precision base).
        model = PeftModel.from_pretrained(base, str(run_dir.adapter), autocast_adapter_dtype=False)
    return model.to(device)
