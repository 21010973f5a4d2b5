"""Each phase's seconds and peak memory, beside the plan's predictions (launcher.phases)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# In a fresh process: the suite's own process has a heap shaped by every test before this one.
CHILD = r'''
import json, time
from launcher.job import release_heap
from launcher.phases import PhaseMeter

meter = PhaseMeter("cpu", predicted_seconds={"training": 0.5}, predicted_memory_gib={"training": 0.25, "final_eval": 10.0})
meter.start("training")
big = bytearray(b"\x01") * (400 * 2**20)  # 400 MiB, every page written: resident
time.sleep(0.2)
del big
release_heap()  # whatever glibc kept of it goes back
meter.start("final_eval")  # closes training, and resets the high-water mark
small = bytearray(b"\x01") * (8 * 2**20)
record = meter.end()
kept = bytearray(b"\x01") * (300 * 2**20)  # held when the next phase starts
meter.start("saving")
meter.end()
print(json.dumps({"phases": meter.phases, "returned_final": record is meter.phases["final_eval"], "after": meter.end()}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase resident peak is reset through /proc (Linux)")
def test_each_phase_has_its_own_resident_peak_and_its_ratios():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    training, final = result["phases"]["training"], result["phases"]["final_eval"]
    assert result["returned_final"] and result["after"] is None  # end() returns the closed phase, then nothing
    saving = result["phases"]["saving"]
    assert training["memory_measure"] == "resident set peak (VmHWM)"
    # The 400 MiB counted in training's peak and not in the evaluation's, which was reset when it started.
    assert training["peak_memory_gib"] - final["peak_memory_gib"] > 0.3
    assert training["seconds"] >= 0.2 and training["predicted_seconds"] == 0.5
    assert training["time_ratio"] == pytest.approx(training["seconds"] / 0.5, abs=0.01)
    assert training["memory_ratio"] == pytest.approx(training["peak_memory_gib"] / 0.25, abs=0.01)
    assert final["predicted_memory_gib"] == 10.0 and "predicted_seconds" not in final  # not predicted: no ratio
    # What a phase inherits: 300 MiB allocated before saving started are in its start memory, not final_eval's.
    assert saving["start_memory_gib"] - final["start_memory_gib"] > 0.25
    assert saving["start_memory_gib"] <= saving["peak_memory_gib"] + 0.01
