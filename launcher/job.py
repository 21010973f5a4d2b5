"""The worker's whole job in phases: load, evaluate the base, train (LoRA, or every weight), save, evaluate the trained model.

Everything it needs comes from the Plan (plan.json); it never re-reads YAML or re-detects hardware.
"""

from __future__ import annotations

import os
import sys
import time

from launcher import evaluate as ev
from launcher import trackers
from launcher.data import build_examples, encode_for_training
from launcher.health import TrainingHealthError, collapse_diagnosis, collapse_report, non_finite_weights
from launcher.models import check_target_modules, load_model, load_tokenizer, resolve_model, torch_dtype
from launcher.plan import Plan
from launcher.phases import PhaseMeter
from launcher.process import FINAL_EVALUATION_FLAG, Process
from launcher.rundir import RunDir
from launcher.signals import (BASE_EVAL, FINAL_EVAL, LOADING, SAVING, TRAINING, PhaseSignals, Stopped, hold_stop_signals,
                              release_stop_signals)
from launcher.tasks import task_for
from launcher.trained import load_trained, output_word
from launcher.trainer import StopRequest, build_trainer


class Interrupted(Stopped):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at that step."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, TRAINING, f"resume continues from {RunDir.checkpoint_name(step)}", step=step)


def training_arguments(plan: Plan, run_dir: RunDir):
    from transformers import TrainingArguments

    t = plan.recipe.train
    return TrainingArguments(
        output_dir=str(run_dir.checkpoints),
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
        # Trackers (train.report_to) report from the main process only; launcher.trackers points them at the run.
        report_to=trackers.active(t.report_to) or "none",
        run_name=t.run_name or run_dir.path.name,
        seed=t.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.gradient_checkpointing,
        label_names=["labels"],
        remove_unused_columns=False,
        # Batches of similar lengths: dynamic padding then pads little.
        train_sampling_strategy="group_by_length",
        # Non-padding tokens seen: each log line then carries num_input_tokens_seen and train_tokens_per_second.
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # The ZeRO JSON the deepspeed backend wrote into the run directory, "auto" fields tied to these args.
        deepspeed=str(run_dir.ds_config) if plan.backend == "deepspeed" else None,
        ddp_backend="gloo" if plan.backend == "deepspeed" and plan.device == "cpu" else None,
    )


def keep_trainable_fp32(model) -> None:
    """Trainable weights in fp32 beside a half-precision base: Adam's state takes their dtype, and bf16/fp16
    weights under Adam lose small updates to rounding. PEFT's get_peft_model upcasts a half adapter already
    (autocast_adapter_dtype=True); this makes the guarantee not depend on that default."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def release_heap() -> None:
    """Give the freed heap back to the system (glibc's malloc_trim): glibc keeps the blocks training freed and
    reuses them only for requests that fit, so without this the evaluation's resident set started at training's
    peak (measured on the quick start's smoke run: 3.9 GiB resident at the final evaluation against 1.2 GiB at the
    base evaluation). No-op where the C library has no malloc_trim (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _metrics_callback(run_dir: RunDir, meter: PhaseMeter | None = None):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Append every logged step (loss, grad_norm, learning_rate) to the run's metrics as it happens, with the
        training phase's peak memory so far (the same measure as run.json's phases: where over a run it grows)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            extra = {}
            done = state.global_step - self.step0
            if done > 0 and state.max_steps:  # the ETA from this session's measured rate
                extra["eta_seconds"] = round((time.perf_counter() - self.t0) / done * (state.max_steps - state.global_step), 3)
            peak = meter.peak_gib() if meter is not None else None
            if peak is not None:
                extra["peak_memory_gib"] = peak
            run_dir.append_metrics({"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs, **extra})

    return MetricsFile()


# The phases so far, handed to the fresh process of the final evaluation (Plan.final_eval_fresh) in its environment.
HANDOVER_ENV = "SFTLAUNCH_HANDOVER"

PHASE_KEYS = {LOADING: "loading", BASE_EVAL: "base_eval", TRAINING: "training", SAVING: "saving", FINAL_EVAL: "final_eval"}


class Run:
    """The worker's job in phases, in the shape of torchtune's recipes: setup, evaluate base, train, save,
    evaluate trained. Each phase leaves its result in the run directory, so a resumed run skips what is done
    (the base evaluation, the steps up to the last checkpoint).

    One process evaluates the base model before training. Under DeepSpeed the main process evaluates it
    after training instead, on a fresh copy: the other ranks would otherwise wait in the first collective
    for the whole evaluation (minutes on GSM8K), against the process group's timeout.
    """

    def __init__(self, plan: Plan, run_dir: RunDir, process: Process = Process(), resume: bool = False,
                 signals: PhaseSignals | None = None, final_evaluation: bool = False):
        self.plan, self.recipe, self.run_dir, self.process, self.resume = plan, plan.recipe, run_dir, process, resume
        self.final_evaluation = final_evaluation  # this process only evaluates what an earlier one trained and saved
        self.signals = signals or PhaseSignals()
        self.distributed = plan.world_size > 1
        self.full = self.recipe.model.method == "full"
        self.results: dict = {"model": self.recipe.model.name}
        self.base_records: list[dict] | None = None
        self.compile_record: dict = {}  # train.compile: the compile's seconds, or why it fell back (launcher/compile.py)
        # Each phase's seconds and peak memory beside the plan's predictions (eval.json and run.json, "phases").
        self.meter = PhaseMeter(plan.device, plan.predicted_seconds, plan.predicted_memory_gib)

    def __call__(self) -> dict | None:
        if self.final_evaluation:
            return self.continue_final_evaluation()
        self.enter(LOADING)
        self.setup()
        trained = self.run_dir.training_done() if self.resume else None
        if trained is not None:  # stopped after training: only the evaluation is left to do
            return self.evaluate_saved(trained)
        if not self.distributed:
            self.evaluate_base(self.model)
        output, seconds, stop = self.train()
        self.enter(SAVING)
        self.save(output)
        if not self.process.main:
            return None
        self.record_training(output, seconds, stop)
        if self.plan.final_eval_fresh:
            self.hand_over_final_evaluation()  # does not return: this process becomes the final evaluation's
        self.release_training()  # before the final evaluation's phase starts: its peak memory is its own
        self.enter(FINAL_EVAL)  # a signal that came while saving stops here, with the adapter complete
        if self.distributed:
            self.reload_for_evaluation()
        return self.evaluate_trained()

    def enter(self, phase: str, **record) -> None:
        """Say in run.json which phase runs, and how a SIGINT/SIGTERM stops it (training: the StopRequest)."""
        self.signals.raise_swallowed()  # the phase before ended in a Stopped that library code caught and dropped
        self.signals.phase = phase  # training's own handler is the StopRequest; the phase is still recorded
        self.meter.start(PHASE_KEYS[phase], **record)
        if phase == SAVING:
            self.signals.defer(phase)
        elif phase != TRAINING:
            self.signals.stop_now(phase)
        if self.process.main:
            self.run_dir.write_status("running", phase=phase)

    def setup(self, training: bool = True) -> None:
        """The tokenizer, the task, the evaluation items and settings; for training also its features, arguments and
        the model (a fresh final evaluation loads the trained model itself)."""
        import torch
        from transformers import set_seed

        torch.set_num_threads(self.plan.threads)
        os.environ.update(trackers.environment(self.recipe.train.report_to, str(self.run_dir.path)))
        set_seed(self.recipe.train.seed)
        self.model_path = resolve_model(self.recipe.model.name)
        self.tokenizer = load_tokenizer(self.model_path, self.plan.trust_remote_code)
        self.task = task_for(self.recipe)
        train_examples, self.eval_examples = build_examples(self.recipe, self.plan.data_path)
        self.results["eval_items"] = len(self.eval_examples)
        self.eval_kwargs = ev.settings(self.recipe, self.plan)
        if training:
            self.prepare_training(train_examples)

    def prepare_training(self, train_examples) -> None:
        self.features, report = encode_for_training(self.recipe, self.task, train_examples, self.tokenizer,
                                                    self.plan.max_length)
        if self.process.main:
            print(report.render(), flush=True)
            self.run_dir.write_preflight(report.as_dict())
        # The training arguments first: under DeepSpeed they register the ZeRO config (a weak reference that
        # lives as long as they do, transformers/integrations/deepspeed.py set_hf_deepspeed_config), so that
        # under ZeRO-3 from_pretrained builds the model inside deepspeed.zero.Init (modeling_utils.py,
        # needs_zero3_init) and each rank holds its shard, not the whole fp32 model, from the start.
        self.args = training_arguments(self.plan, self.run_dir)
        if self.plan.backend == "deepspeed":
            import deepspeed

            # zero.Init builds its DeepSpeedConfig, which checks the batch sizes against deepspeed.comm's world size,
            # before it initialises deepspeed.comm (deepspeed/runtime/zero/partition_parameters.py, Init.__init__):
            # start the process group (accelerate, through args.device) and hand it to deepspeed.comm first.
            self.args.device
            deepspeed.init_distributed()
        # Under DeepSpeed the engine places the model; one process places it itself. The frozen base loads in
        # the plan's base_dtype (a resumed run reads the same plan.json, so it loads what it trained on).
        self.model = load_model(self.model_path, self.plan.trust_remote_code, dtype=self.plan.base_dtype,
                                quantize=self.plan.quantize)
        if self.plan.backend == "deepspeed" and self.plan.zero_stage == 3 and self.process.main:
            held = sum(p.numel() for p in self.model.parameters())
            whole = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
            print(f"ZeRO-3: the model was partitioned as it loaded; this rank holds {held:,} of {whole:,} weights", flush=True)
        check_target_modules(self.model, self.recipe.model.lora.target_modules, self.recipe.model.name)
        if not self.distributed:
            self.model = self.model.to(self.plan.device)

    def evaluate_base(self, model) -> None:
        """The base model on the evaluation items, once per run: a resumed run reads eval-base.json."""
        if not (self.recipe.eval.compare_base and self.process.main):
            return
        self.enter(BASE_EVAL)
        done = self.run_dir.read_base_eval() if self.resume else None
        if done is not None:  # evaluated before the interruption: same items, same model
            self.results["base"], self.base_records = done
        else:
            t0 = time.time()
            self.results["base"], self.base_records = ev.evaluate(model, self.tokenizer, self.task, self.eval_examples,
                                                                  label="evaluating base", **self.eval_kwargs)
            self.results["base"]["seconds"] = round(time.time() - t0, 1)
            self.run_dir.write_base_eval(self.results["base"], self.base_records)
            if self.plan.device == "cpu":  # training's peak is its own, not on top of the evaluation's freed blocks
                release_heap()
        print(ev.format_metrics("base", self.results["base"]), flush=True)

    def train(self):
        """LoRA on the model (or every weight, method full), Trainer with the health guard, from the last
        checkpoint when resuming."""
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq

        lora, guard = self.recipe.model.lora, self.recipe.train.guard
        if self.full:
            total = sum(p.numel() for p in self.model.parameters())
            if self.process.main:
                print(f"full fine-tuning: all {total:,} parameters trainable (fp32 master weights)", flush=True)
        else:
            self.model = get_peft_model(self.model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))
            keep_trainable_fp32(self.model)
            drawn = ""
            if self.plan.lora_dropout == "half_draw":  # the plan's lora_dropout decision says why
                from launcher.dropout import described, use_half_draw_dropout

                use_half_draw_dropout(self.model)
                drawn = f"; LoRA dropout {lora.dropout:g} drawn as {described(lora.dropout)}, one random draw per two elements"
            trainable, total = self.model.get_nb_trainable_parameters()
            if self.process.main:
                print(f"LoRA r={lora.rank}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
                      f"frozen base in {self.plan.base_dtype}" + (", its linear layers in 4-bit NF4" if self.plan.quantize == "4bit"
                                                                  else "") + ", LoRA weights in fp32" + drawn, flush=True)
            if self.plan.gradient_checkpointing:
                self.model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the frozen embeddings
        self.tokenizer.padding_side = "right"
        # The StopRequest's handlers first: once run.json says "training", a SIGTERM must checkpoint, not reach
        # the previous phase's handler (a test that signals as soon as it reads the phase met that window).
        stop = StopRequest()
        stop.install_signal_handlers()
        self.enter(TRAINING)
        collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)
        callbacks, blocks, warm = [_metrics_callback(self.run_dir, self.meter)], [], None
        if self.plan.compile:
            from launcher.compile import compile_for_training

            first = collator([self.features[i] for i in range(min(self.plan.micro_batch_size, len(self.features)))])
            blocks, warm, use_cache = compile_for_training(self.model, first, self.compile_record)
            callbacks.insert(0, warm)  # before the metrics' clock starts: the ETA is the steps' own
        self.trainer = build_trainer(
            precision=self.plan.precision, keep_checkpoints=self.recipe.train.keep_checkpoints,
            max_bad_steps=guard.max_bad_steps, zero_loss_steps=guard.zero_loss_steps,
            max_time=self.recipe.train.max_time_seconds, stop=stop,
            vocab_size=self.model.config.vocab_size if guard.divergence else None, loss_logits=self.plan.loss_logits,
            model=self.model, args=self.args, train_dataset=self.features,
            # Pads labels with -100 (never with the pad id, which is EOS here) and input ids with the pad id.
            data_collator=collator, callbacks=callbacks,
        )
        if warm is not None:
            warm.trainer = self.trainer
        self.resumed_from = self._resume_point()
        t0 = time.time()
        try:
            output = self.trainer.train(resume_from_checkpoint=self.resumed_from)
        finally:
            if blocks:  # evaluation generates with a KV cache, eager: decoding shapes would only recompile
                from launcher.compile import uncompile

                uncompile(blocks)
                self.model.config.use_cache = use_cache
        self.skipped_steps = list(self.trainer.skipped_steps)
        self.overflow_steps = list(self.trainer.overflow_steps)
        if stop.signal is not None:
            raise Interrupted(stop.signal, output.global_step)
        return output, time.time() - t0, stop

    def _resume_point(self) -> str | None:
        if not self.resume:
            return None
        found = self.run_dir.last_checkpoint()
        step = RunDir.checkpoint_step(found) if found else 0
        if self.process.main:
            self.run_dir.truncate_metrics(step)
            print(f"resuming from {found} (step {step})" if found else "no checkpoint yet: training starts from step 0", flush=True)
        return str(found) if found else None

    def save(self, output) -> None:
        """Check every trained weight is finite, then save the adapter or (method full) the complete model,
        gathered from ZeRO-3 shards."""
        from launcher.distributed import every_rank

        what = output_word(self.recipe.model.method)
        bad = non_finite_weights(self.model.named_parameters())
        counts = every_rank(len(bad), self.trainer.args.device)  # ZeRO-3: each rank checked its own shards
        if any(counts):  # never save weights that cannot generate anything
            ranks = [r for r, c in enumerate(counts) if c]
            bad = bad or [f"{int(counts[ranks[0]])} weights whose shards are on rank {ranks[0]}"]
            raise TrainingHealthError(
                f"training ended with {int(sum(counts))} non-finite {what} weights (first: {bad[0]}); the {what} was not saved. "
                f"Likely cause: train.learning_rate={self.recipe.train.learning_rate:g} too high (try 10x lower), or "
                f"precision {self.plan.precision} overflow (hardware.precision=fp32 to rule it out). The last good checkpoint "
                "is in the run directory.", {"non_finite_weights": bad[:20], "step": output.global_step})
        # save_model gathers ZeRO-3 shards and writes from the main process only (safetensors; a full model
        # with its generation config, sharded when large).
        out = self.run_dir.output(self.recipe.model.method)
        if self.plan.backend == "deepspeed" and not self.full:
            state = self.master_adapter_weights()
            if self.process.main:
                self.model.save_pretrained(str(out), state_dict=state)
        else:
            self.trainer.save_model(str(out))
        if self.process.main:
            self.tokenizer.save_pretrained(out)

    def master_adapter_weights(self) -> dict:
        """The adapter's fp32 master weights from DeepSpeed's optimizer (every rank takes part: ZeRO-3 gathers).

        Trainer.save_model under DeepSpeed saves the module's weights, which the engine keeps in bf16/fp16
        (ZeRO-2: the module itself; ZeRO-3: the 16-bit gather, stage3_gather_16bit_weights_on_model_save): the
        adapter lost its low bits to the cast. deepspeed.utils.safe_get_full_fp32_param reads the optimizer's
        fp32 copy (deepspeed/utils/tensor_fragment.py); a parameter without one (fp32 training) is its own master.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                master = safe_get_full_fp32_param(p)
                state[name] = (master if master is not None else p.detach()).float().cpu().clone()
        return state

    def release_training(self) -> None:
        """Free what only training needed (optimizer state, gradients, the engine) before evaluating: the
        evaluation's own copy of the weights must not sit on top of it."""
        import gc

        import torch

        self.trainer = None
        if self.distributed:  # the engine's (sharded, half-precision) module is of no use to the evaluation
            self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.plan.device == "cpu":
            release_heap()

    def hand_over_final_evaluation(self) -> None:
        """Replace this process with a fresh one that evaluates the saved adapter or model (Plan.final_eval_fresh).

        On CPU, glibc keeps training's freed heap: after malloc_trim (release_heap) the evaluation's short-lived
        tensors are still carved from blocks scattered over it and fault pages back in. GSM8K's final evaluation
        peaked 1.42 GiB above its start after a 15.9 GiB training, against 0.50 for the same adapter in a process of
        its own. exec keeps the process id, the launcher's wait on it and the output streams; the phases recorded so
        far go along in the environment. SIGINT/SIGTERM are held (blocked, not lost) across the exec: the new
        process stops on a held one as soon as its handlers are in place (launcher.worker)."""
        from launcher.backends.base import worker_module_args
        from launcher.worker import finish_trackers

        record = self.meter.hand_over()
        finish_trackers()  # a tracker's run ends with training's: the evaluation logs nothing to it
        print("final evaluation: in a fresh process (plan: final_eval_process)", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        hold_stop_signals()
        if self.signals.pending is not None:  # came while saving, deferred until the adapter was complete: stop here
            release_stop_signals()
            self.signals.stop_now(FINAL_EVAL)
        argv = [sys.executable, *worker_module_args(self.run_dir.path, self.resume), FINAL_EVALUATION_FLAG]
        try:
            os.execve(sys.executable, argv, {**os.environ, HANDOVER_ENV: record})
        except OSError:  # nothing replaced: this process fails with the error, and answers Ctrl-C again
            release_stop_signals()
            raise

    def continue_final_evaluation(self) -> dict | None:
        """The fresh process's part: the trained model alone, loaded straight in the evaluation's precision (a LoRA
        run's base with the adapter on it, merged in place where the plan says so; a full run's saved model)."""
        self.meter.carry_on(os.environ.pop(HANDOVER_ENV, None))
        self.enter(FINAL_EVAL, fresh_process=True)
        self.setup(training=False)
        self.results["train"] = self.run_dir.training_done()
        done = self.run_dir.read_base_eval() if self.recipe.eval.compare_base else None
        if done is not None:
            self.results["base"], self.base_records = done
        self.model = load_trained(self.run_dir, self.recipe.model.method, self.model_path, device=self.plan.device,
                                  dtype=self.plan.eval_precision, trust_remote_code=self.plan.trust_remote_code)
        if self.plan.eval_merge and not self.full:
            self.model = self.model.merge_and_unload()
        return self.evaluate_trained()

    def reload_for_evaluation(self) -> None:
        """Under DeepSpeed: evaluate in this process alone, on a fresh copy (the engine's weights are sharded),
        loaded straight in the evaluation's precision: no fp32 copy, and nothing of the engine left."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained would build a ZeRO-3-partitioned model again
        self.load_for_final_evaluation(load_model(self.model_path, self.plan.trust_remote_code, dtype=self.plan.eval_precision))

    def load_for_final_evaluation(self, base) -> None:
        """The base model evaluated (unless done before), then the run's trained model loaded for the final
        evaluation: the saved adapter put on the base (method full: the saved model in its place), in the
        evaluation's precision. Nothing trains the base any more, so it is cast in place."""
        if self.plan.quantize == "4bit":  # a 4-bit model cannot be cast; its eval precision is its compute dtype
            base = base.to(self.plan.device)
        else:
            base = base.to(self.plan.device, dtype=torch_dtype(self.plan.eval_precision))
        self.evaluate_base(base)
        self.enter(FINAL_EVAL)
        if self.full:  # the saved model replaces the base: drop every reference to it first
            base = self.model = None
        self.model = load_trained(self.run_dir, self.recipe.model.method, self.model_path, device=self.plan.device,
                                  dtype=self.plan.eval_precision, trust_remote_code=self.plan.trust_remote_code, base=base)
        if self.plan.eval_merge and not self.full:  # loaded for this evaluation alone: merged in place, no copy
            self.model = self.model.merge_and_unload()

    def evaluate_saved(self, train_record: dict) -> dict | None:
        """A resumed run whose training had finished (stopped while evaluating): evaluate the saved adapter."""
        if not self.process.main:
            return None
        print(f"training finished before the stop (step {train_record.get('steps')}): evaluating the saved "
              f"{output_word(self.recipe.model.method)}", flush=True)
        self.results["train"] = train_record
        self.load_for_final_evaluation(self.model)
        return self.evaluate_trained()

    def record_training(self, output, seconds: float, stop) -> None:
        cut = stop.reason == "time budget"
        self.results["train"] = {"steps": output.global_step, "seconds": round(seconds, 1),
                                 "final_loss": self.run_dir.last_loss(), "train_loss": output.training_loss,
                                 "samples": len(self.features), "cut_by_time_budget": cut,
                                 "max_time_seconds": self.recipe.train.max_time_seconds, "skipped_steps": self.skipped_steps,
                                 "loss_scaler_overflow_steps": self.overflow_steps,
                                 "resumed_from": self.resumed_from}
        if self.compile_record:
            self.results["train"]["compile"] = dict(self.compile_record)
        if self.process.main:  # a resumed run that finds this (and the adapter) only evaluates
            self.run_dir.record_training(self.results["train"])
        if cut:
            print(f"time budget train.max_time={self.recipe.train.max_time} ran out: training stopped after step "
                  f"{output.global_step}; the adapter is saved and evaluated", flush=True)

    def evaluate_trained(self) -> dict:
        """The adapter on the same items; the comparison with the base; stop if its generations collapsed."""
        results, run_dir = self.results, self.run_dir
        t0 = time.time()
        results["trained"], records = ev.evaluate(self.model, self.tokenizer, self.task, self.eval_examples,
                                                  label="evaluating trained", **self.eval_kwargs)
        results["trained"]["seconds"] = round(time.time() - t0, 1)
        run_dir.write_predictions(records)
        print(ev.format_metrics("trained", results["trained"]), flush=True)
        # Chat without eval.metrics generates nothing: no generation can collapse, the loss is the evidence.
        collapse = collapse_report([r["generated"] for r in records if r["generated"] is not None])
        results["trained"]["collapse"] = collapse
        base_collapse = None
        if self.base_records is not None:
            base_collapse = results["base"]["collapse"] = collapse_report(
                [r["generated"] for r in self.base_records if r["generated"] is not None])
            comparison = ev.compare(self.base_records, records)
            comparison["base_model"] = self.recipe.model.name
            if "decoding" in results["trained"]:
                comparison["decoding"] = ev.shared_decoding(results["base"], results["trained"])
            comparison["trained_collapsed"] = collapse["collapsed"]
            run_dir.write_comparison(comparison)
            results["comparison"] = ev.summary_of(comparison)
        results["collapsed"] = collapse["collapsed"] and self.recipe.train.guard.collapse
        self.meter.end()
        results["phases"] = self.meter.phases
        if self.resume:
            results["phases_note"] = "this attempt's phases only (the run was resumed)"
        run_dir.write_eval(results)
        if results["collapsed"]:
            raise TrainingHealthError(
                collapse_diagnosis(collapse, max_learning_rate=self.recipe.train.learning_rate,
                                   precision=self.plan.precision, base=base_collapse),
                {"collapsed": True, "collapse": collapse, "trained": results["trained"], "train": results["train"]})
        return results
