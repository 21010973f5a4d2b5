"""SIGINT/SIGTERM in the worker, phase by phase, and how a worker's end is told in run.json.

The worker moves through phases (loading, base evaluation, training, saving, final evaluation). Training
stops at a step boundary with a checkpoint (the trainer's StopRequest). Every other phase stops at once:
nothing of a half-finished load or evaluation is worth the grace period a spot instance gives before
SIGKILL, and `sftlaunch resume` re-runs that phase. Saving is the exception: the signal waits for the
adapter to be complete, so a resumed run never finds half an adapter.

Light on purpose (no torch): the worker installs these handlers before its heavy imports.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

LOADING, BASE_EVAL, TRAINING, SAVING, FINAL_EVAL = "loading", "base evaluation", "training", "saving", "final evaluation"

# What `sftlaunch resume` does after a stop in each phase (training says which checkpoint itself).
RESUME_DOES = {
    LOADING: "resume starts the run from the beginning (nothing was trained yet)",
    BASE_EVAL: "resume evaluates the base model again (unless it had finished), then trains",
    SAVING: "resume evaluates the saved adapter (training is done)",
    FINAL_EVAL: "resume evaluates the saved adapter again, without training",
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(BaseException):
    """A SIGINT/SIGTERM ended the worker in a phase; `resume_does` says what `sftlaunch resume` will do.

    A BaseException, as KeyboardInterrupt is: the handler raises it wherever the worker happens to be, often deep
    in transformers or torch, and their `except Exception` (optional imports, lazy modules) must not swallow it."""

    def __init__(self, signum: int, phase: str, resume_does: str | None = None, step: int | None = None):
        self.signum, self.phase, self.step = signum, phase, step
        self.resume_does = resume_does or RESUME_DOES.get(phase, "resume re-runs the unfinished phase")
        super().__init__(f"{signal_name(signum)} during {phase}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class PhaseSignals:
    """The worker's SIGINT/SIGTERM handler outside training: stop now, or (while saving) after the save."""

    def __init__(self):
        self.phase = LOADING
        self.pending: int | None = None
        self.raised: Stopped | None = None  # raised by the handler and not yet seen by the worker

    def raise_swallowed(self) -> None:
        """Raise again a Stopped that library code caught and dropped (a bare `except:`), at the next phase."""
        if self.raised is not None:
            raise self.raised

    def seen(self) -> None:
        """The worker has the Stopped in hand."""
        self.raised = None

    def stop_now(self, phase: str) -> None:
        """From here on a signal raises Stopped where the worker is (after the save, one that came during it)."""
        self.phase = phase
        self._install(self._raise)
        if self.pending is not None:
            self._raise(self.pending, None)

    def defer(self, phase: str) -> None:
        """From here on a signal is remembered and raised by the next stop_now()."""
        self.phase = phase
        self._install(self._remember)

    def _raise(self, signum, frame):
        self.pending = None
        self.raised = Stopped(signum, self.phase)
        raise self.raised

    def _remember(self, signum, frame):
        self.pending = signum
        print(f"\n{signal_name(signum)} received during {self.phase}: stopping when it is complete", flush=True)

    @staticmethod
    def _install(handler) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)


def stop_behind(exc: BaseException) -> Stopped | None:
    """The Stopped behind an exception that library code raised in its place: Python 3.11 turns any exception
    from a `__set_name__` (the handler firing while a module being imported defines a class) into a RuntimeError,
    and lazy importers re-raise what failed an import as their own error `from` it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def hold_stop_signals() -> None:
    """Block SIGINT/SIGTERM: one that comes now waits, pending, and the block outlives an exec (signal(7)), so the
    process that replaces this one receives it once its handlers are installed and it calls release_stop_signals."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# -- the launcher's side: the worker has exited; what run.json must say ---------------------------------

def oom_kills(cgroup_file: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The kernel's out-of-memory kill count for this process's memory cgroup (v2 or v1), None if unreadable.

    Read before and after a worker runs: a rise while it ran and a SIGKILL mean the kernel killed it for memory.
    (The paths are parameters so that a test can give it both layouts.)
    """
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            candidates.append(cgroup_root / path.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):  # cgroup v1
            candidates.append(cgroup_root / "memory" / path.lstrip("/") / "memory.oom_control")
    for file in candidates:
        try:
            m = re.search(r"^oom_kill (\d+)$", file.read_text(), re.M)
        except OSError:
            continue
        if m:
            return int(m.group(1))
    return None


def shell_exit_code(returncode: int) -> int:
    """Popen's -N for a death by signal N as the shell's 128 + N (sys.exit(-15) would show 241)."""
    return 128 - returncode if returncode < 0 else returncode


def worker_end(returncode: int, oom_before: int | None, oom_after: int | None) -> dict:
    """run.json fields for a worker that exited without recording its end (it was killed, or crashed hard).

    Popen reports a death by signal N as -N; passed on as an exit status it would reach the user as 256 - N
    (241 for SIGTERM), so the conventional 128 + N is returned instead.
    """
    if returncode >= 0:
        return {"status": "failed", "exit_code": returncode,
                "error": f"the worker exited with code {returncode} without recording why; its output above says more"}
    signum = -returncode
    name = signal_name(signum)
    end = {"signal": name, "exit_code": 128 + signum}
    if signum == signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before:
        return {**end, "status": "out_of_memory",
                "error": "the kernel's out-of-memory killer ended the worker (SIGKILL): the run needs more memory than "
                         "this machine gives it. Fix: a smaller hardware.micro_batch_size, data.max_length or eval.batch_size, "
                         "or hardware.gradient_checkpointing=true"}
    if signum == signal.SIGKILL:
        return {**end, "status": "killed",
                "error": "the worker was killed by SIGKILL, which sftlaunch never sends; on Linux the usual sender is the "
                         "kernel's out-of-memory killer (see `dmesg | grep -i oom`), else a scheduler or a person"}
    return {**end, "status": "killed", "error": f"the worker was killed by {name} before it could record its end"}


def pid_alive(pid: int | None, *markers: str) -> bool:
    """True if process pid runs and its command line holds one of markers (a reused pid of another program is not it)."""
    if not pid or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        try:  # no /proc (macOS): existence only
            os.kill(int(pid), 0)
        except (OSError, ValueError):
            return False
        return True
    return any(m in cmdline for m in markers)
