"""sftlaunch's training step against TRL's SFTTrainer on the same tokens, the same model and the same machine.

Both train the embedded SmolLM2-135M-Instruct with LoRA r16 (alpha 32) on all linear layers over the same GSM8K
training samples (the bundled copy, encoded once by sftlaunch: prompt masked, answer and EOS trained), micro-batch
8 x accumulation 2, one epoch, in one process one after the other:

    sftlaunch  the worker's pieces: the plan's choices on this machine (precision, base dtype, the loss from logits
               at trained positions, train.compile as the plan decides it unless --compile says otherwise),
               load_model, the launcher's Trainer
    TRL        SFTTrainer with its defaults (SFTConfig: padded batches, gradient checkpointing on) on the same
               pre-tokenized rows (input_ids + completion_mask, so its completion-only loss trains the same
               tokens), the base loaded as the plan loads it, bf16 where the plan trains in bf16

Tokens/s: non-padding tokens over the Trainer's train_runtime (the compile's warm-up included for sftlaunch).
The machine's matmul peak is measured in the same run; "% of peak" is 4 x the base's parameters FLOPs per token
(forward 2N, backward to the activations 2N; attention's own FLOPs left out), as benchmarks/train_profile.py.

    .venv/bin/pip install --no-deps trl==1.16.0    # once: TRL is not a dependency of sftlaunch
    .venv/bin/python benchmarks/vs_trl.py [--samples 256] [--compile auto|true|false]

Run it alone on the machine: other processes on the cores slow one side more than the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "embedded:smollm2-135m-instruct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="GSM8K training samples (one epoch)")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="sftlaunch's train.compile")
    parser.add_argument("--only", choices=["sftlaunch", "trl"], help="run one side only")
    args = parser.parse_args()

    import torch

    from benchmarks.train_profile import cpu_name, matmul_peak
    from launcher.data import build_examples, encode_for_training
    from launcher.hardware import detect
    from launcher.memory import find_shape
    from launcher.models import load_tokenizer, resolve_model
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe
    from launcher.tasks import task_for
    from launcher.tasks.gsm8k import BUNDLED

    hardware = detect()
    compile_key = {"auto": "auto", "true": True, "false": False}[args.compile]
    recipe = validate_recipe({
        "model": {"name": MODEL, "lora": {"rank": 16, "alpha": 32, "dropout": 0.05}},
        "data": {"task": "gsm8k", "path": str(BUNDLED), "max_length": 512, "calculator_annotations": False},
        "train": {"epochs": 1, "effective_batch_size": args.micro * args.accumulation, "learning_rate": 2e-4,
                  "warmup": 0, "logging_steps": 1, "save_steps": 100_000, "seed": 0, "compile": compile_key},
        "hardware": {"micro_batch_size": args.micro, "gradient_checkpointing": False}})
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    train, _ = build_examples(recipe)
    features, _ = encode_for_training(recipe, task_for(recipe), train[:args.samples], tokenizer, 512)
    rows = [{"input_ids": list(f["input_ids"]), "attention_mask": list(f["attention_mask"]), "labels": list(f["labels"])}
            for f in features]
    tokens = sum(len(r["input_ids"]) for r in rows)
    from launcher.data import measure_size

    whole = measure_size(recipe, None, 512, path)  # the plan's view of the whole split, scaled to the rows trained
    trainable = sum(sum(label != -100 for label in r["labels"]) for r in rows)
    size = whole.model_copy(update={"samples": len(rows), "tokens": tokens, "trainable_tokens": trainable})
    plan = make_plan(recipe, hardware, *find_shape(MODEL), data=size)
    torch.set_num_threads(plan.threads)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"CPU: {cpu_name()}; {plan.threads} threads; torch {torch.__version__}")
    print(f"matmul peak 2048^3: bf16 {peaks['bf16']:.2f} TFLOP/s, fp32 {peaks['fp32']:.2f} TFLOP/s")
    print(f"{len(rows)} GSM8K samples, {tokens} tokens; LoRA r16 all-linear; micro-batch {args.micro} x {args.accumulation}; "
          f"plan: precision {plan.precision}, base {plan.base_dtype}, loss logits {plan.loss_logits}, compile {plan.compile}, "
          f"LoRA dropout {plan.lora_dropout}\n",
          flush=True)

    results = {}
    if args.only in (None, "sftlaunch"):
        results["sftlaunch"] = run_sftlaunch(plan, path, tokenizer, rows)
        print(f"  sftlaunch: {results['sftlaunch']}", flush=True)
    if args.only in (None, "trl"):
        results["TRL"] = run_trl(plan, path, tokenizer, rows, args)
        print(f"  TRL: {results['TRL']}", flush=True)

    params = find_shape(MODEL)[0].params
    print(f"\n{'trainer':<11}{'tokens/s':>9}{'train s':>9}{'TFLOP/s':>9}{'% of peak':>10}{'final loss':>11}")
    for name, r in results.items():
        rate = tokens / r["seconds"]
        flops = 4 * params * rate / 1e12
        print(f"{name:<11}{rate:>9.0f}{r['seconds']:>9.1f}{flops:>9.3f}{100 * flops / peaks[plan.precision]:>9.1f}%"
              f"{r['loss']:>11.4f}")
    if len(results) == 2:
        print(f"\nsftlaunch / TRL tokens/s: {results['TRL']['seconds'] / results['sftlaunch']['seconds']:.2f}x "
              f"(% of the {plan.precision} matmul peak, as the step computes)")
    return 0


def run_sftlaunch(plan, path: str, tokenizer, rows: list[dict]) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed

    from launcher.compile import compile_for_training, uncompile
    from launcher.job import keep_trainable_fp32, training_arguments
    from launcher.models import load_model
    from launcher.rundir import RunDir
    from launcher.trainer import StopRequest, build_trainer

    set_seed(0)
    lora = plan.recipe.model.lora
    model = get_peft_model(load_model(path, dtype=plan.base_dtype),
                           LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    keep_trainable_fp32(model)
    if plan.lora_dropout == "half_draw":
        from launcher.dropout import use_half_draw_dropout

        use_half_draw_dropout(model)
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    callbacks, blocks, record = [], [], {}
    if plan.compile:  # as the worker does it (launcher/job.py)
        blocks, callback, _ = compile_for_training(model, collator(rows[:plan.micro_batch_size]), record)
        callbacks.append(callback)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(precision=plan.precision, keep_checkpoints=1, max_bad_steps=0, zero_loss_steps=0,
                                max_time=None, stop=StopRequest(), loss_logits=plan.loss_logits, model=model,
                                args=training_arguments(plan, RunDir(Path(tmp))), train_dataset=rows,
                                data_collator=collator, callbacks=callbacks)
        for callback in callbacks:
            callback.trainer = trainer
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    uncompile(blocks)
    del trainer, model
    torch.set_num_threads(plan.threads)
    return {"seconds": seconds, "loss": output.training_loss, "steps": output.global_step, "compile": record or None}


def run_trl(plan, path: str, tokenizer, rows: list[dict], args) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from launcher.models import load_model

    set_seed(0)
    lora = plan.recipe.model.lora
    # Pre-tokenized rows: TRL skips its own tokenization and trains where completion_mask is 1 (the answer + EOS).
    data = datasets.Dataset.from_list([{"input_ids": r["input_ids"],
                                        "completion_mask": [int(label != -100) for label in r["labels"]]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.micro,
                           gradient_accumulation_steps=args.accumulation, num_train_epochs=1, learning_rate=2e-4,
                           lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
                           max_length=512, bf16=plan.precision == "bf16", use_cpu=plan.device == "cpu", seed=0,
                           dataloader_num_workers=0)
        trainer = SFTTrainer(model=load_model(path, dtype=plan.base_dtype), args=config, train_dataset=data,
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": output.training_loss, "steps": output.global_step,
            "gradient_checkpointing": config.gradient_checkpointing}


if __name__ == "__main__":
    sys.exit(main())
