"""`sftlaunch export RUN_DIR OUT [--merge]`: the run's model in a form that needs neither sftlaunch nor PEFT.

The merge is done in fp32 and cast afterwards: merging LoRA into half-precision weights rounds every
updated weight once more (the drift peers' users report). The base comes from the run's own plan, so an
adapter cannot be merged onto another model. The export is checked: every merged weight finite, and the
saved model, loaded back with plain AutoModelForCausalLM.from_pretrained, generates greedily what base +
adapter generate on evaluation items.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from launcher.errors import ConfigError, Problem, SftlaunchError, check_writable, writing
from launcher.rundir import RunDir
from launcher.trained import load_trained, output_word

DTYPES = ("fp32", "bf16", "fp16")


class ExportError(SftlaunchError):
    """The exported model is not what the run trained (non-finite weights, or different fp32 generations)."""

    exit_code = 3


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([Problem("OUT", "exists and is not an empty folder; an export never overwrites",
                                   "choose a new folder", got=str(out))])


def export(run_dir: RunDir, out: Path, *, merge: bool, dtype: str = "fp32", check_items: int = 10, log=print) -> dict:
    plan = run_dir.read_plan()
    method = plan.recipe.model.method
    if not run_dir.has_output(method):
        raise ConfigError([Problem("RUN_DIR", f"the run has no trained {output_word(method)} in "
                                   f"{run_dir.output(method)}", "export a finished run (or `sftlaunch resume` it first)",
                                   got=str(run_dir))])
    if method == "full" and not merge:
        raise ConfigError([Problem("--merge", "a full fine-tuning run has no adapter to copy: its output is a complete model",
                                   "add --merge (it saves that model, cast to --dtype and checked)", got=str(run_dir))])
    _check_target(out)
    check_writable(out, "OUT")  # before a merge that may take minutes
    if dtype not in DTYPES:
        raise ConfigError([Problem("--dtype", "unknown dtype", f"use one of {', '.join(DTYPES)}", got=dtype)])
    with writing(out, "OUT"):
        return _export(run_dir, plan, out, merge, dtype, check_items, log)


def _export(run_dir: RunDir, plan, out: Path, merge: bool, dtype: str, check_items: int, log) -> dict:
    if not merge:
        shutil.copytree(run_dir.adapter, out, dirs_exist_ok=True)
        info = {"kind": "adapter", "base_model": plan.recipe.model.name, "run": str(run_dir.path)}
        (out / "export.json").write_text(json.dumps(info, indent=2))
        log(f"adapter of {run_dir} copied to {out} (base model: {plan.recipe.model.name}); --merge writes a full model")
        return info
    return _merge(run_dir, plan, out, dtype, check_items, log)


def _merge(run_dir: RunDir, plan, out: Path, dtype: str, check_items: int, log) -> dict:
    from transformers import AutoModelForCausalLM

    from launcher.data import format_prompt
    from launcher.evaluate import generate, settings
    from launcher.hardware import detect
    from launcher.health import check_finite
    from launcher.models import load_tokenizer, resolve_model, torch_dtype
    from launcher.plan import make_eval_plan
    from launcher.tasks import get_task

    recipe = plan.recipe
    t0 = time.time()
    # The device `sftlaunch eval` would use on this machine, and the evaluation's generation settings; the
    # merge and its check stay in fp32 whatever the evaluation's precision.
    eval_plan = make_eval_plan(recipe, detect())
    evaluation = settings(recipe, eval_plan)
    device = evaluation["device"]
    gen = {k: evaluation[k] for k in ("batch_size", "max_new_tokens", "device", "stop_on_repetition")}
    base_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(base_path, plan.trust_remote_code)
    full = recipe.model.method == "full"
    # A full run has nothing to merge: its complete model, in fp32, is cast and checked like a merge. A QLoRA run's
    # adapter goes onto its NF4 base dequantized to fp32: the weights it was trained beside, not 4-bit ones.
    quantized = plan.quantize == "4bit" and not full
    if quantized:
        from launcher.models import dequantized_base

        log(f"QLoRA run: quantizing {recipe.model.name} to NF4 as training did, then dequantizing it to fp32 for the merge")
    base = dequantized_base(base_path, plan.trust_remote_code, plan.base_dtype) if quantized else None
    model = load_trained(run_dir, recipe.model.method, base_path, device=device, dtype="fp32",
                         trust_remote_code=plan.trust_remote_code, base=base)
    del base
    items = get_task(recipe.data.task).eval_examples(recipe, plan.data_path)[:check_items]  # held-out items, eval.limit aside
    prompts = [format_prompt(ex.question, tokenizer, evaluation["prompt_format"]) for ex in items]
    expected = generate(model, tokenizer, prompts, label="trained model" if full else "base + adapter", **gen)

    merged = model if full else model.merge_and_unload()  # fp32 weights: W + (alpha / r) * B @ A, rounded once
    # Every tensor, frozen ones included: after merging the base weights are not trainable, and a check of
    # trainable weights only let a model with 210 of 272 tensors NaN be written.
    check_finite(merged, "the merged model", "nothing was written; the run's adapter and base were finite when "
                 "loaded, so report it.")
    merged = merged.to("cpu", torch_dtype(dtype))
    check_finite(merged, f"the merged model cast to {dtype}", f"nothing was written; weights beyond {dtype}'s range "
                 "overflowed in the cast: export with --dtype bf16 or fp32.")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size="2GB")  # safetensors; a generation_config.json with it
    tokenizer.save_pretrained(out)
    del model, merged

    # The check loads what was written, as a user would: no PEFT, no sftlaunch.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype(dtype)).to(device)
    got = generate(reloaded, tokenizer, prompts, label="exported model", **gen)
    matches = sum(a == b for a, b in zip(expected, got))
    info = {"kind": "merged", "base_model": recipe.model.name, "run": str(run_dir.path), "dtype": dtype,
            "merged_in": "fp32", "base_weights": "NF4 dequantized to fp32 (QLoRA)" if quantized else "as saved",
            "check_items": len(prompts), "generations_equal": matches,
            "seconds": round(time.time() - t0, 1)}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    log(f"merged {recipe.model.name} + adapter of {run_dir} in fp32, saved as {dtype} to {out}: "
        f"{matches}/{len(prompts)} greedy generations equal to base + adapter")
    if dtype == "fp32" and matches != len(prompts):
        raise ExportError(f"the exported fp32 model generates differently from base + adapter on {len(prompts) - matches} "
                          f"of {len(prompts)} items (see {out / 'export.json'}); in fp32 they must agree. Fix: report it; "
                          "do not use this export.")
    if matches != len(prompts):
        log(f"note: {dtype} rounds the merged weights, so {len(prompts) - matches} of {len(prompts)} greedy generations "
            "differ from the fp32 base + adapter; export --dtype fp32 for identical behaviour")
    return info
