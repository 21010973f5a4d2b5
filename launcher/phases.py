"""Seconds and peak memory of each phase of a run, beside what the plan predicted for it.

Written by hand: Trainer reports its own runtime only, and no library resets a process's peak resident set.
Peak memory per device: on CPU the resident set's high-water mark (Linux: VmHWM, reset at each phase's start by
writing 5 to /proc/self/clear_refs, proc(5); elsewhere the process's lifetime peak, ru_maxrss, which is said);
on CUDA torch.cuda.max_memory_allocated and max_memory_reserved, reset at each phase's start; on MPS the driver's
allocation at the phase's end (torch.mps has no peak counter). Beside the peak, the memory held when the phase
started (start_memory_gib: what earlier phases left resident, which the phase's own estimate does not count).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

GiB = 2**30


def _status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux: VmRSS, VmHWM), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_peak_bytes() -> tuple[int | None, str]:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak, "resident set peak (VmHWM)"
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), "resident set peak of the process so far (ru_maxrss)"
    except (ImportError, OSError):
        return None, "not measured"


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """`with meter.phase("training"):` records the phase's seconds and peak memory into `meter.phases`."""

    def __init__(self, device: str, predicted_seconds: dict | None = None, predicted_memory_gib: dict | None = None):
        self.device = device
        self.predicted_seconds = predicted_seconds or {}
        self.predicted_memory = predicted_memory_gib or {}
        self.phases: dict[str, dict] = {}
        self._open: tuple[str, float, bool, int | None] | None = None
        self._extra: dict = {}

    def hand_over(self) -> str:
        """The phases recorded so far, closed, for the process that carries the run on (launcher.job: the final
        evaluation in a fresh process); `carry_on` in that process takes them back."""
        self.end()
        return json.dumps(self.phases)

    def carry_on(self, handed_over: str | None) -> None:
        if handed_over:
            self.phases.update(json.loads(handed_over))

    def start(self, name: str, **extra) -> None:
        """Open a phase; `extra` goes into its record as it is (e.g. fresh_process: true)."""
        self.end()
        self._extra = extra
        reset = True
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        elif self.device == "mps":
            import torch

            held = torch.mps.driver_allocated_memory()
        else:
            reset = _reset_rss_peak()
            held = _status_bytes("VmRSS")
        self._open = (name, time.perf_counter(), reset, held)

    def end(self) -> dict | None:
        """Close the open phase (if any) and return its record."""
        if self._open is None:
            return None
        name, t0, reset, held = self._open
        self._open = None
        record: dict = {"seconds": round(time.perf_counter() - t0, 1), **self._extra}
        peak, what = self._peak()
        if peak is not None:
            record["peak_memory_gib"] = round(peak / GiB, 2)
            record["memory_measure"] = what if reset else what + ", not reset at the phase's start"
        if held is not None:
            record["start_memory_gib"] = round(held / GiB, 2)
        if self.device == "cuda":
            import torch

            record["reserved_memory_gib"] = round(torch.cuda.max_memory_reserved() / GiB, 2)
        predicted = self.predicted_seconds.get(name)
        if predicted:
            record["predicted_seconds"] = predicted
            record["time_ratio"] = round(record["seconds"] / predicted, 2)
        predicted_mem = self.predicted_memory.get(name)
        if predicted_mem and peak is not None:
            record["predicted_memory_gib"] = predicted_mem
            record["memory_ratio"] = round(record["peak_memory_gib"] / predicted_mem, 2)
        self.phases[name] = record
        return record

    def peak_gib(self) -> float | None:
        """The open phase's peak memory so far (GiB), as end() will record it; None where it is not measured."""
        peak, _ = self._peak()
        return None if peak is None else round(peak / GiB, 2)

    def _peak(self) -> tuple[int | None, str]:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        if self.device == "mps":
            import torch

            return torch.mps.driver_allocated_memory(), "MPS driver allocation at the phase's end (no peak counter)"
        return _rss_peak_bytes()
