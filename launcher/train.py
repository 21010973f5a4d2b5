"""The worker's job: load the model, evaluate the base, train LoRA with Trainer, evaluate the adapter.

Everything it needs comes from the Plan (plan.json); it never re-reads YAML or re-detects hardware.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from launcher import evaluate as ev
from launcher.data import build_examples, encode_examples
from launcher.health import TrainingHealthError, collapse_diagnosis, collapse_report, non_finite_weights
from launcher.models import load_model, load_tokenizer, resolve_model
from launcher.plan import Plan
from launcher.tasks import get_task
from launcher.trainer import StopRequest, build_trainer, checkpoints


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted at step {step}")
        self.signum, self.step = signum, step


def training_arguments(plan: Plan, output_dir: Path):
    from transformers import TrainingArguments

    t = plan.recipe.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup,  # a float below 1 is a share of all steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        report_to="none",
        seed=t.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.gradient_checkpointing,
        label_names=["labels"],
        remove_unused_columns=False,
        # Batches of similar lengths: dynamic padding then pads little.
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        # The ZeRO JSON the deepspeed backend wrote into the run directory, "auto" fields tied to these args.
        deepspeed=str(output_dir.parent / "ds_config.json") if plan.backend == "deepspeed" else None,
        ddp_backend="gloo" if plan.backend == "deepspeed" and plan.device == "cpu" else None,
    )


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Append every logged step (loss, grad_norm, learning_rate) to metrics.jsonl as it happens."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsFile()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint: those steps are trained again."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_and_evaluate(plan: Plan, run_dir: Path, resume: bool = False) -> dict | None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed

    recipe = plan.recipe
    torch.set_num_threads(plan.threads)
    set_seed(recipe.train.seed)

    model_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_path, plan.trust_remote_code)
    task = get_task(recipe.data.task)
    train_examples, eval_examples = build_examples(recipe, plan.data_path)
    features, report = encode_examples(train_examples, tokenizer, plan.max_length, recipe.data.prompt_format,
                                       recipe.data.on_truncation)
    main = is_main_process()
    distributed = plan.world_size > 1
    if main:
        print(report.render(), flush=True)
        (run_dir / "preflight.json").write_text(json.dumps(report.as_dict(), indent=2))

    # Under DeepSpeed the engine places the model; one process places it itself.
    model = load_model(model_path, plan.trust_remote_code)
    if not distributed:
        model = model.to(plan.device)
    eval_kwargs = ev.settings(recipe, plan)
    results: dict = {"model": recipe.model.name, "eval_items": len(eval_examples)}
    base_file = run_dir / "eval-base.json"
    base_records = None
    if recipe.eval.compare_base and not distributed:
        if resume and base_file.exists():  # evaluated before the interruption: same items, same model
            results["base"] = json.loads(base_file.read_text())
            base_records = [json.loads(line) for line in (run_dir / "predictions-base.jsonl").read_text().splitlines()]
        else:
            t0 = time.time()
            results["base"], base_records = ev.evaluate(model, tokenizer, task, eval_examples, label="evaluating base", **eval_kwargs)
            results["base"]["seconds"] = round(time.time() - t0, 1)
            ev.write_predictions(run_dir / "predictions-base.jsonl", base_records)
            base_file.write_text(json.dumps(results["base"], indent=2))
        print(ev.format_metrics("base", results["base"]), flush=True)

    lora = recipe.model.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    if main:
        print(f"LoRA r={lora.rank}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    if plan.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the frozen embeddings

    tokenizer.padding_side = "right"
    stop = StopRequest()
    stop.install_signal_handlers()
    ckpt_dir = run_dir / "checkpoints"
    trainer = build_trainer(
        precision=plan.precision, keep_checkpoints=recipe.train.keep_checkpoints,
        max_bad_steps=recipe.train.guard.max_bad_steps, zero_loss_steps=recipe.train.guard.zero_loss_steps,
        max_time=recipe.train.max_time_seconds, stop=stop,
        vocab_size=model.config.vocab_size if recipe.train.guard.divergence else None,
        model=model, args=training_arguments(plan, ckpt_dir), train_dataset=features,
        # Pads labels with -100 (never with the pad id, which is EOS here) and input ids with the pad id.
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_metrics_callback(run_dir / "metrics.jsonl")],
    )
    resume_from = None
    if resume:
        found = checkpoints(ckpt_dir)
        if found:
            resume_from = found[-1]
            step = int(resume_from.rsplit("-", 1)[1])
            if main:
                _truncate_metrics(run_dir / "metrics.jsonl", step)
                print(f"resuming from {resume_from} (step {step})", flush=True)
        else:
            if main:
                print("no checkpoint yet: training starts from step 0", flush=True)
                _truncate_metrics(run_dir / "metrics.jsonl", 0)
    t0 = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - t0
    if stop.signal is not None:
        raise Interrupted(stop.signal, output.global_step)
    skipped = list(trainer.skipped_steps)
    bad = non_finite_weights(model.named_parameters())
    if bad:  # never save an adapter that cannot generate anything
        raise TrainingHealthError(
            f"training ended with {len(bad)} non-finite adapter weights (first: {bad[0]}); the adapter was not saved. "
            f"Likely cause: train.learning_rate={recipe.train.learning_rate:g} too high (try 10x lower), or "
            f"precision {plan.precision} overflow (hardware.precision=fp32 to rule it out). The last good checkpoint "
            "is in the run directory.", {"non_finite_weights": bad[:20], "step": output.global_step})
    # save_model gathers ZeRO-3 shards and writes from the main process only.
    trainer.save_model(str(run_dir / "adapter"))
    if not main:
        return None
    tokenizer.save_pretrained(run_dir / "adapter")
    if distributed:
        # Evaluate in this process alone, on a fresh copy: the DeepSpeed engine's weights are sharded.
        from peft import PeftModel

        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del trainer
        unset_hf_deepspeed_config()  # else from_pretrained would build a ZeRO-3-partitioned model again
        base = load_model(model_path, plan.trust_remote_code).to(plan.device)
        if recipe.eval.compare_base:
            t0 = time.time()
            results["base"], base_records = ev.evaluate(base, tokenizer, task, eval_examples, label="evaluating base", **eval_kwargs)
            results["base"]["seconds"] = round(time.time() - t0, 1)
            ev.write_predictions(run_dir / "predictions-base.jsonl", base_records)
            print(ev.format_metrics("base", results["base"]), flush=True)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).to(plan.device)
    cut = stop.reason == "time budget"
    results["train"] = {"steps": output.global_step, "seconds": round(train_seconds, 1),
                        "final_loss": _last_loss(run_dir / "metrics.jsonl"), "train_loss": output.training_loss,
                        "samples": len(features), "cut_by_time_budget": cut,
                        "max_time_seconds": recipe.train.max_time_seconds, "skipped_steps": skipped,
                        "resumed_from": resume_from}
    if cut:
        print(f"time budget train.max_time={recipe.train.max_time} ran out: training stopped after step "
              f"{output.global_step}; the adapter is saved and evaluated", flush=True)

    t0 = time.time()
    results["trained"], records = ev.evaluate(model, tokenizer, task, eval_examples, label="evaluating trained", **eval_kwargs)
    results["trained"]["seconds"] = round(time.time() - t0, 1)
    ev.write_predictions(run_dir / "predictions.jsonl", records)
    print(ev.format_metrics("trained", results["trained"]), flush=True)
    collapse = collapse_report([r["generated"] for r in records])
    base_collapse = collapse_report([r["generated"] for r in base_records]) if base_records is not None else None
    results["trained"]["collapse"] = collapse
    if base_collapse is not None:
        results["base"]["collapse"] = base_collapse
    if base_records is not None:
        comparison = ev.compare(base_records, records)
        comparison["base_model"] = recipe.model.name
        comparison["trained_collapsed"] = collapse["collapsed"]
        (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
        results["comparison"] = {k: comparison[k] for k in ev.COMPARISON_SUMMARY}
    results["collapsed"] = collapse["collapsed"] and recipe.train.guard.collapse
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    if results["collapsed"]:
        raise TrainingHealthError(
            collapse_diagnosis(collapse, max_learning_rate=recipe.train.learning_rate, precision=plan.precision,
                               base=base_collapse),
            {"collapsed": True, "collapse": collapse, "trained": results["trained"], "train": results["train"]})
    return results


def _last_loss(path: Path) -> float | None:
    loss = None
    if path.exists():
        for line in path.read_text().splitlines():
            value = json.loads(line).get("loss")
            if value is not None and math.isfinite(value):
                loss = value
    return loss
