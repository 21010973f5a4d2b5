"""Out-of-memory back-off: halve the micro-batch, double accumulation, resume from the last checkpoint."""

from __future__ import annotations

from datetime import datetime, timezone

from launcher.errors import SftlaunchError
from launcher.plan import Decision, Plan
from launcher.rundir import RunDir

EXIT_OUT_OF_MEMORY = 75  # the worker's exit code for "out of memory" (EX_TEMPFAIL)


class OutOfMemoryError(SftlaunchError):
    """Out of memory with nothing left to halve: the worker's own code, as the README's exit-code table says."""

    exit_code = EXIT_OUT_OF_MEMORY


def no_back_off(plan: Plan, status: dict) -> None:
    """Raise when the out-of-memory happened outside training: a smaller training micro-batch cannot help there."""
    phase = status.get("phase")
    if phase in (None, "training"):
        return
    evaluating = "evaluation" in phase
    fix = (f"lower eval.batch_size (now {plan.recipe.eval.batch_size}) or eval.max_new_tokens (now "
           f"{plan.recipe.eval.max_new_tokens}), then `sftlaunch resume` (training is not repeated)" if evaluating else
           "a smaller model, or more GPUs with hardware.backend=deepspeed (ZeRO-3 shards the weights)")
    raise OutOfMemoryError(f"out of memory during {phase} ({status.get('error', 'no message')}): halving the training "
                           f"micro-batch cannot help there. Fix: {fix}.")


def back_off(plan: Plan, run_dir: RunDir) -> Plan:
    """The same plan with half the micro-batch and twice the accumulation (the effective batch is kept).

    Writes the new plan.json and appends the change to oom_backoff.jsonl; at micro-batch 1 there is
    nothing left to halve and it raises with the fixes that remain.
    """
    micro, accumulation = plan.micro_batch_size, plan.gradient_accumulation_steps
    status = run_dir.status()
    if micro == 1:
        raise OutOfMemoryError(
            f"out of memory at micro-batch 1 ({status.get('error', 'no message')}). Fix: lower data.max_length "
            f"(now {plan.max_length}), set hardware.gradient_checkpointing=true, use a smaller model, or spread the "
            "model over more GPUs with hardware.backend=deepspeed (ZeRO-3, offload).")
    new_micro, new_accumulation = micro // 2, accumulation * 2
    reason = (f"halved after out-of-memory at micro-batch {micro}; accumulation {accumulation} -> {new_accumulation} "
              f"keeps the effective batch {plan.recipe.train.effective_batch_size}")
    decisions = tuple(d for d in plan.decisions if d.field not in ("micro_batch_size", "gradient_accumulation_steps"))
    decisions += (Decision(field="micro_batch_size", value=new_micro, reason=reason),
                  Decision(field="gradient_accumulation_steps", value=new_accumulation, reason=reason))
    new = plan.model_copy(update={"micro_batch_size": new_micro, "gradient_accumulation_steps": new_accumulation,
                                  "decisions": decisions})
    run_dir.write_plan(new)
    run_dir.append_oom_backoff({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_micro_batch": micro,
                                "to_micro_batch": new_micro, "gradient_accumulation_steps": new_accumulation,
                                "error": status.get("error")})
    return new
