"""The worker's job: load the model, evaluate the base, train LoRA with Trainer, evaluate the adapter.

Everything it needs comes from the Plan (plan.json); it never re-reads YAML or re-detects hardware.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from launcher import evaluate as ev
from launcher.data import build_examples, encode_examples
from launcher.models import load_model, load_tokenizer, resolve_model
from launcher.plan import Plan


def training_arguments(plan: Plan, output_dir: Path, num_samples: int):
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
        save_strategy="no",
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
    )


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Append every logged step (loss, grad_norm, learning_rate) to metrics.jsonl as it happens."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsFile()


def train_and_evaluate(plan: Plan, run_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    recipe = plan.recipe
    torch.set_num_threads(plan.threads)
    set_seed(recipe.train.seed)

    train_examples, eval_examples = build_examples(recipe)
    model_path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_path, plan.trust_remote_code)
    features, report = encode_examples(train_examples, tokenizer, recipe.data.max_length, recipe.data.prompt_format,
                                       recipe.data.on_truncation)
    print(report.render(), flush=True)
    (run_dir / "preflight.json").write_text(json.dumps(report.as_dict(), indent=2))

    model = load_model(model_path, plan.trust_remote_code).to(plan.device)
    eval_kwargs = dict(prompt_format=recipe.data.prompt_format, batch_size=recipe.eval.batch_size,
                       max_new_tokens=recipe.eval.max_new_tokens, device=plan.device, precision=plan.precision)
    results: dict = {"model": recipe.model.name, "eval_items": len(eval_examples)}
    if recipe.eval.compare_base:
        t0 = time.time()
        results["base"], base_records = ev.evaluate(model, tokenizer, eval_examples, label="evaluating base", **eval_kwargs)
        results["base"]["seconds"] = round(time.time() - t0, 1)
        ev.write_predictions(run_dir / "predictions-base.jsonl", base_records)
        print(ev.format_metrics("base", results["base"]), flush=True)

    lora = recipe.model.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA r={lora.rank}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    if plan.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the frozen embeddings

    tokenizer.padding_side = "right"
    trainer = Trainer(
        model=model,
        args=training_arguments(plan, run_dir / "trainer", len(features)),
        train_dataset=features,
        # Pads labels with -100 (never with the pad id, which is EOS here) and input ids with the pad id.
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_metrics_callback(run_dir / "metrics.jsonl")],
    )
    t0 = time.time()
    output = trainer.train()
    train_seconds = time.time() - t0
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    results["train"] = {"steps": output.global_step, "seconds": round(train_seconds, 1),
                        "final_loss": _last_loss(run_dir / "metrics.jsonl"), "train_loss": output.training_loss,
                        "samples": len(features)}

    t0 = time.time()
    results["trained"], records = ev.evaluate(model, tokenizer, eval_examples, label="evaluating trained", **eval_kwargs)
    results["trained"]["seconds"] = round(time.time() - t0, 1)
    ev.write_predictions(run_dir / "predictions.jsonl", records)
    print(ev.format_metrics("trained", results["trained"]), flush=True)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def _last_loss(path: Path) -> float | None:
    loss = None
    if path.exists():
        for line in path.read_text().splitlines():
            value = json.loads(line).get("loss")
            if value is not None and math.isfinite(value):
                loss = value
    return loss
