"""Worker entry point: `python -m launcher.worker RUN_DIR [--resume]`. Reads plan.json, trains, evaluates.

Under torchrun every rank runs this; only rank 0 writes the run's status and results.
"""

from __future__ import annotations

import os
import sys
import traceback

from launcher.errors import SftlaunchError
from launcher.health import TrainingHealthError
from launcher.oom import EXIT_OUT_OF_MEMORY
from launcher.rundir import RunDir


def main(argv: list[str]) -> int:
    from launcher.train import Interrupted, Process, Run
    from launcher.trainer import is_out_of_memory

    run_dir = RunDir(argv[0])
    resume = "--resume" in argv[1:]
    process = Process.from_env()

    def status(state: str, **extra) -> None:
        if process.main:
            run_dir.write_status(state, **extra)

    plan = run_dir.read_plan()
    if process.main:
        run_dir.write_versions()
    status("running", resumed=resume, worker_pid=os.getpid())
    try:
        results = Run(plan, run_dir, process, resume)()
    except TrainingHealthError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        flags = {k: True for k in ("diverged", "collapsed") if exc.details.get(k)}
        status("failed", error=str(exc), health=exc.details, **flags)
        return exc.exit_code
    except SftlaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status("failed", error=str(exc))
        return exc.exit_code
    except Interrupted as exc:
        if process.main:
            print(f"stopped at step {exc.step} with a checkpoint; continue with: sftlaunch resume {run_dir}", flush=True)
        status("interrupted", step=exc.step, signal=exc.signum)
        return 128 + exc.signum
    except BaseException as exc:
        if isinstance(exc, Exception) and is_out_of_memory(exc):
            print(f"out of memory at micro-batch {plan.micro_batch_size}: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
            status("out_of_memory", error=str(exc).splitlines()[0], micro_batch_size=plan.micro_batch_size)
            return EXIT_OUT_OF_MEMORY
        status("failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    if results is not None:
        status("completed", base=results.get("base"), trained=results["trained"], train=results["train"])
    return 0


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to exit-time destructors, a rank that
    finishes first (DeepSpeed's other ranks stop after saving; rank 0 goes on to evaluate) was once aborted
    ("terminate called without an active exception", SIGABRT) in a ZeRO-3 CPU run over gloo."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    finally:
        close_process_group()
    sys.exit(code)
