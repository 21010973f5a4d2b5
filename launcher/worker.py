"""Worker entry point: `python -m launcher.worker RUN_DIR [--resume] [--final-evaluation]`. Reads plan.json, trains, evaluates.

Under torchrun every rank runs this; only rank 0 writes the run's status and results. Whatever ends the
worker, run.json says so: completed, failed (with the error), out_of_memory, or interrupted (with the
signal, the phase it stopped in and what `sftlaunch resume` will do). A worker killed outright (SIGKILL)
cannot write; the launcher records that end (launcher.signals.worker_end).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from launcher.errors import SftlaunchError, StorageError
from launcher.process import FINAL_EVALUATION_FLAG, Process
from launcher.rundir import RunDir
from launcher.signals import (LOADING, RESUME_DOES, FINAL_EVAL, TRAINING, PhaseSignals, Stopped, release_stop_signals,
                              signal_name, stop_behind)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
ENDED: dict = {}  # this rank's last recorded state (every rank keeps it; rank 0 also writes run.json)


def main(argv: list[str], process: Process) -> int:
    # First, before torch and transformers load (seconds): a SIGTERM from here on stops the worker cleanly.
    # After training, in the process that replaced the one that trained: only the final evaluation is left.
    final_evaluation = FINAL_EVALUATION_FLAG in argv[1:]
    signals = PhaseSignals()
    signals.stop_now(FINAL_EVAL if final_evaluation else LOADING)
    run_dir = RunDir(argv[0])
    resume = "--resume" in argv[1:]

    def status(state: str, **extra) -> None:
        ENDED.clear()
        ENDED.update(status=state, **{k: v for k, v in extra.items() if k in ("error", "phase", "exit_code", "health",
                                                                                 "micro_batch_size", "signal")})
        if process.main:
            run_dir.write_status(state, **extra)

    try:
        # A signal held across the exec into this process (launcher.job.hand_over_final_evaluation) is raised here.
        release_stop_signals()
        plan = run_dir.read_plan()
        if final_evaluation:
            status("running", worker_pid=os.getpid(), phase=FINAL_EVAL)
        else:
            if process.main:
                run_dir.write_versions()
            status("running", resumed=resume, worker_pid=os.getpid(), phase=LOADING)
        code = _run(plan, run_dir, process, resume, signals, status, final_evaluation)
        if process.main:
            draw_plots(run_dir)
        return code
    except Stopped as exc:
        signals.seen()
        signals.defer("stopping")  # a second signal must not cut the status write short
        does = exc.resume_does
        if exc.phase != TRAINING and run_dir.training_done() is not None:
            does = RESUME_DOES[FINAL_EVAL]
        if process.main:
            nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's node count (1 without torchrun)
            again = (f"on every node: sftlaunch resume {run_dir} --node-rank N --master-addr NODE0_ADDRESS" if nodes > 1
                     else f"sftlaunch resume {run_dir}")
            print(f"\n{signal_name(exc.signum)}: stopped during {exc.phase}; {does}: {again}", flush=True)
        extra = {"step": exc.step} if exc.step is not None else {}
        status("interrupted", phase=exc.phase, signal=signal_name(exc.signum), exit_code=exc.exit_code, resume=does, **extra)
        if process.main and exc.phase == TRAINING:
            draw_plots(run_dir)  # the curve so far; a resumed run redraws it whole
        return exc.exit_code
    except SftlaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status("failed", error=str(exc), exit_code=exc.exit_code)
        return exc.exit_code


def _run(plan, run_dir: RunDir, process: Process, resume: bool, signals: PhaseSignals, status,
         final_evaluation: bool = False) -> int:
    from launcher.health import TrainingHealthError
    from launcher.oom import EXIT_OUT_OF_MEMORY
    from launcher.job import Run
    from launcher.trainer import is_out_of_memory

    try:
        results = Run(plan, run_dir, process, resume, signals, final_evaluation)()
        signals.raise_swallowed()
        signals.defer("recording the results")
    except TrainingHealthError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        flags = {k: True for k in ("diverged", "collapsed") if exc.details.get(k)}
        status("failed", error=str(exc), health=exc.details, exit_code=exc.exit_code, **flags)
        return exc.exit_code
    except (Stopped, SftlaunchError):
        raise
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # A full disk while writing results: the error and its fix, not a traceback.
        error = StorageError(f"cannot write {exc.filename or 'a file of the run'}: {exc.strerror}. Fix: free space in "
                             f"{run_dir}, then `sftlaunch resume {run_dir}`.")
        print(f"error: {error}", file=sys.stderr, flush=True)
        status("failed", error=str(error), exit_code=error.exit_code)
        return error.exit_code
    except BaseException as exc:
        stopped = stop_behind(exc)
        if stopped is not None:  # library code raised its own error in place of the signal's Stopped
            raise stopped from None
        if isinstance(exc, Exception) and is_out_of_memory(exc):
            print(f"out of memory at micro-batch {plan.micro_batch_size}: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
            status("out_of_memory", error=str(exc).splitlines()[0], micro_batch_size=plan.micro_batch_size,
                   exit_code=EXIT_OUT_OF_MEMORY, phase=signals.phase)
            return EXIT_OUT_OF_MEMORY
        status("failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), exit_code=1)
        raise
    if results is not None:
        status("completed", base=results.get("base"), trained=results["trained"], train=results["train"],
               phases=results.get("phases"), exit_code=0, phase=None)
    return 0


def draw_plots(run_dir: RunDir) -> None:
    """plots/training.png and plots/comparison.png for whatever the run produced (failed runs too: the curve
    is what a diverged run needs most). A plot that cannot be drawn is reported, and never fails the run."""
    from launcher.plots import draw

    try:
        written = draw(run_dir)
    except Exception as exc:  # the run's result is already recorded; say what went wrong with its picture
        print(f"warning: could not draw the run's plots ({type(exc).__name__}: {exc}); `sftlaunch plot {run_dir}` retries",
              file=sys.stderr, flush=True)
        return
    if written:
        print("plots: " + ", ".join(str(p) for p in written), flush=True)


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits (one process, or a worker that failed)."""
    if "torch" not in sys.modules:  # stopped before torch loaded: nothing to tear down
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_trackers() -> None:
    """W&B and MLflow finish their runs in exit hooks; a distributed worker leaves without those (below)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run()


def record_rank_end(argv: list[str], process: Process, code: int) -> None:
    """Distributed: leave this rank's end in the run directory (torchrun passes on only "some worker failed")."""
    import time

    if process.world_size <= 1 or not argv:
        return
    import socket

    # The node (torchrun's GROUP_RANK) and its host: a multi-node run's run.json says where a rank failed.
    record = {**ENDED, "exit_code": code, "time": time.time(), "pid": os.getpid(),
              "node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname()}
    if code != 0 and record.get("status") in (None, "running", "completed"):
        record["status"] = "failed"
    try:
        RunDir(argv[0]).write_rank_end(process.rank, record)
    except OSError as exc:  # the run's own status is already written where it could be; say why this one is not
        print(f"warning: could not record this rank's end ({exc})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    process = Process.from_env()
    try:
        code = main(sys.argv[1:], process)
    except BaseException as exc:
        record_rank_end(sys.argv[1:], process, exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        close_process_group()
        raise
    record_rank_end(sys.argv[1:], process, code)
    if process.world_size > 1:
        # Every file is written and closed by now. A rank's teardown under DeepSpeed over gloo sometimes
        # aborts in C++ destructors ("terminate called without an active exception", SIGABRT; seen in about
        # one in ten ZeRO-3 CPU runs, also with the process group destroyed first), which turned finished
        # runs into failed ones: leave without the teardown.
        finish_trackers()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    close_process_group()
    sys.exit(code)
