"""Each phase's seconds and peak memory, beside the plan's predictions (launcher.phases)."""

import sys
import time

import pytest

from launcher.phases import PhaseMeter


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase resident peak is reset through /proc (Linux)")
def test_each_phase_has_its_own_resident_peak_and_its_ratios():
    meter = PhaseMeter("cpu", predicted_seconds={"training": 0.5}, predicted_memory_gib={"training": 0.25, "final_eval": 10.0})
    meter.start("training")
    big = bytearray(b"\x01") * (400 * 2**20)  # 400 MiB, every page written: resident
    time.sleep(0.2)
    del big  # above glibc's mmap threshold: returned to the system at once
    meter.start("final_eval")  # closes training, and resets the high-water mark
    small = bytearray(b"\x01") * (8 * 2**20)
    record = meter.end()
    del small
    training, final = meter.phases["training"], meter.phases["final_eval"]
    assert record is final and training["memory_measure"] == "resident set peak (VmHWM)"
    # The 400 MiB counted in training's peak and not in the evaluation's, which was reset when it started.
    assert training["peak_memory_gib"] - final["peak_memory_gib"] > 0.3
    assert training["seconds"] >= 0.2 and training["predicted_seconds"] == 0.5
    assert training["time_ratio"] == pytest.approx(training["seconds"] / 0.5, abs=0.01)
    assert training["memory_ratio"] == pytest.approx(training["peak_memory_gib"] / 0.25, abs=0.01)
    assert final["predicted_memory_gib"] == 10.0 and "predicted_seconds" not in final  # not predicted: no ratio
    assert meter.end() is None  # nothing open any more
