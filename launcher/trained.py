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
    from launcher.health import check_finite
    from launcher.models import load_model

    if method == "full":
        if base is not None:
            raise ValueError("a full fine-tuning run's trained model is complete: pass no base model")
        model = load_model(str(run_dir.model), trust_remote_code, dtype=dtype)
    else:
        if base is None:
            base = load_model(base_model, trust_remote_code, dtype=dtype)
        model = _attach_adapter(base, run_dir, base_model)
    # Every reader of a run's model (final evaluation, eval, export, resume) checks it here, once: a NaN adapter
    # generated nothing and scored accuracy 0.000 as if it were a poor model.
    check_finite(model, f"the {output_word(method)} of {run_dir} on {base_model}" if method != "full" else
                 f"the model in {run_dir.model}", "it cannot generate anything; train again from the last good "
                 "checkpoint with a lower train.learning_rate (or hardware.precision=fp32 to rule out an overflow).")
    return model.to(device)


def _attach_adapter(base, run_dir: RunDir, base_model: str):
    """The run's adapter on base, refused when its tensors do not match the base's modules (names and shapes):
    PEFT raises on a shape and only warns about adapter weights that land nowhere."""
    from peft import PeftModel
    from safetensors import safe_open

    from launcher.errors import PlanError
    from launcher.rundir import RunDir

    fix = (f"an adapter only fits the base it was trained on; {run_dir} names {base_model} in its {RunDir.PLAN}, so "
           "the adapter files were replaced or edited since. Train again, or evaluate the adapter's own run directory.")
    try:
        # The adapter takes the base's dtype (PEFT would otherwise upcast it to fp32 beside a half-precision base).
        model = PeftModel.from_pretrained(base, str(run_dir.adapter), autocast_adapter_dtype=False)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise PlanError(f"the adapter in {run_dir.adapter} does not fit {base_model}: "
                        f"{str(exc).strip().splitlines()[-1].strip()}. Fix: {fix}") from None
    weights = run_dir.adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        adapter_name = model.active_adapter
        loaded = {name.replace(f".{adapter_name}.", ".") for name, _ in model.named_parameters() if "lora_" in name}
        stray = sorted(saved - loaded)
        if stray:
            raise PlanError(f"the adapter in {run_dir.adapter} has {len(stray)} tensors for modules {base_model} does not "
                            f"have (first: {stray[0]}). Fix: {fix}")
    return model
