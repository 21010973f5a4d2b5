"""Compiled training steps (train.compile): torch.compile of the model's repeated decoder blocks, in place.

Regional compilation, as PyTorch's recipe "Reducing torch.compile cold start compilation time with regional
compilation" and accelerate.utils.compile_regions do it: every decoder layer runs the same code, so inductor
compiles one and reuses the code for the others (one block's compile time, not the whole model's). Written here
rather than taken from those two because they wrap each block in an OptimizedModule, which puts "_orig_mod." into
every parameter name (PEFT's saved adapter, checkpoints, the plan's memory accounting would all see it);
nn.Module.compile compiles in place (the module's _compiled_call_impl) and names stay as they are. dynamic=True:
micro-batches of varying length (dynamic padding) share one graph instead of compiling one per length.

The compile happens in a warm-up forward and backward on the first micro-batch before the first step, so its
time is measured and shown on its own, and a failure to compile undoes it and training runs uncompiled, saying
why (never silently: torch._dynamo's suppress_errors would fall back without a word).
"""

from __future__ import annotations

import time


def decoder_blocks(model) -> list:
    """The model's repeated blocks: modules whose class the model names in _no_split_modules (transformers'
    own list of blocks that must stay whole: LlamaDecoderLayer, Qwen2DecoderLayer, ...), found through any wrapper."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model) -> list:
    """Compile the decoder blocks in place (lazily: inductor runs at their first call); the blocks compiled."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return blocks


def uncompile(blocks: list) -> None:
    """Back to eager (nn.Module.__call__ uses _compiled_call_impl when it is set)."""
    for block in blocks:
        block._compiled_call_impl = None


def warm_up(trainer, model, batch) -> float:
    """One forward and backward of `batch` as a training step computes it (the trainer's loss, its autocast),
    without touching the weights, the optimizer or the random state: the compile happens here. Seconds taken."""
    import torch

    start = time.monotonic()
    model.train()  # as training_step does: dropout and the training flag are part of what the graph is keyed on
    with torch.random.fork_rng(devices=[]):
        inputs = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.monotonic() - start


def warm_up_callback(blocks: list, batch, record: dict):
    """A TrainerCallback whose on_train_begin (the model prepared, checkpointing switched on, no step taken yet)
    runs the warm-up: the compile's seconds go into `record`, or, when compiling fails, the blocks go back to
    eager and `record` says why. Set its `trainer` before training."""
    from transformers import TrainerCallback

    class CompileWarmUp(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            print(f"train.compile: compiling {len(blocks)} decoder blocks (inductor) on the first micro-batch ...", flush=True)
            try:
                seconds = warm_up(self.trainer, model, batch)
            except Exception as exc:  # any compiler failure: training goes on uncompiled, and says so
                from launcher.trainer import is_out_of_memory

                if is_out_of_memory(exc):  # not the compiler's failure: the back-off halves the micro-batch
                    raise
                uncompile(blocks)
                model.zero_grad(set_to_none=True)
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                record.update(compiled=False, fallback=reason)
                print(f"warning: train.compile: compiling failed ({reason}); training runs uncompiled (eager). "
                      "Fix: train.compile=false to skip the attempt", flush=True)
                return
            record.update(compiled=True, blocks=len(blocks), seconds=round(seconds, 1))
            print(f"train.compile: compiled in {seconds:.1f} s (a forward and backward included)", flush=True)

    return CompileWarmUp()


def compile_for_training(model, first_batch, record: dict):
    """Everything train.compile does before training, as the worker and the benchmarks do it: no KV cache (with one,
    every block's graph would be keyed on its own layer_idx), the blocks compiled, and the warm-up callback on
    `first_batch`. Returns (blocks, callback, the model's use_cache to restore with uncompile after training)."""
    use_cache, model.config.use_cache = model.config.use_cache, False
    blocks = compile_blocks(model)
    return blocks, warm_up_callback(blocks, first_batch, record), use_cache
