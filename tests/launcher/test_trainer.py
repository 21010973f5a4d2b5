"""build_trainer: Trainer with atomic checkpoints, the health guard and stop requests."""

from pathlib import Path

import pytest

TINY = Path(__file__).parent / "data" / "tiny-llama"  # the shipped tiny model (see test_job.py)


def test_a_full_disk_while_checkpointing_leaves_no_staging_folder_and_says_so(tmp_path, monkeypatch):
    import errno

    from transformers import DataCollatorForSeq2Seq, Trainer

    from launcher.data import encode_examples
    from launcher.errors import StorageError
    from launcher.hardware import HardwareInfo
    from launcher.models import load_model, load_tokenizer
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe
    from launcher.rundir import RunDir
    from launcher.tasks.unit_conversion import generate
    from launcher.job import training_arguments
    from launcher.trainer import StopRequest, build_trainer
    from peft import LoraConfig, get_peft_model

    recipe = validate_recipe({"model": {"name": str(TINY)}, "train": {"max_steps": 2, "save_steps": 1, "effective_batch_size": 4},
                              "hardware": {"precision": "fp32", "threads": 1}})
    plan = make_plan(recipe, HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False))
    tok = load_tokenizer(str(TINY))
    features, _ = encode_examples(generate(8, 1, seed=3)[0], tok, 96, "plain")
    model = get_peft_model(load_model(str(TINY)), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    run_dir = RunDir(tmp_path)
    trainer = build_trainer(precision="fp32", keep_checkpoints=1, max_bad_steps=0, zero_loss_steps=3, max_time=None,
                            stop=StopRequest(), model=model, args=training_arguments(plan, run_dir), train_dataset=features,
                            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))

    def half_written(self, model, trial):  # the disk fills up in the middle of the checkpoint
        staging = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        staging.mkdir(parents=True)
        (staging / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_checkpoint", half_written)
    with pytest.raises(StorageError, match="cannot write checkpoint-1 .*No space left on device.*Fix: free space") as exc:
        trainer.train()
    assert exc.value.exit_code == 74
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == []  # no .staging, no half checkpoint
