import json

import pytest

from launcher.errors import ConfigError
from launcher.hardware import HardwareInfo, detect, load_profile, profile_names
from tests.conftest import ROOT, run_cli

EXPECTED_PROFILES = {"cpu-2core", "cpu-16core", "m2-16gb", "m2-32gb", "t4-16gb", "a10g-24gb", "a100-40gb-x8",
                     "a100-80gb-x8", "h100-80gb-x1", "h100-80gb-x8", "h100-80gb-x8-2nodes"}


def test_shipped_profiles_load():
    assert set(profile_names()) == EXPECTED_PROFILES
    t4 = load_profile("t4-16gb")
    assert t4.gpus[0].compute_capability == (7, 5) and t4.name == "t4-16gb"
    assert load_profile("h100-80gb-x8-2nodes").nodes == 2
    assert len(load_profile("a100-80gb-x8").gpus) == 8


def test_profile_from_file_and_bad_profiles(tmp_path):
    f = tmp_path / "box.yaml"
    f.write_text("cpu_cores: 4\nram_gb: 8\ncpu_bf16: false\n")
    assert load_profile(str(f)).cpu_cores == 4
    f.write_text("cpu_cores: 4\nram_gb: 8\ncpu_bf16: false\ngpu: 1\n")
    with pytest.raises(ConfigError, match="gpu"):
        load_profile(str(f))
    with pytest.raises(ConfigError, match="cpu-2core"):
        load_profile("no-such-box")


def test_detect_is_frozen_and_sane():
    hw = detect()
    assert isinstance(hw, HardwareInfo) and hw.cpu_cores >= 1 and hw.ram_gb > 0
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        hw.cpu_cores = 99


def test_env_command_prints_hardware_and_versions():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hardware"]["cpu_cores"] >= 1
    assert data["versions"]["torch"].startswith("2.")


def test_help_does_not_import_torch():
    import subprocess, sys

    code = "import sys; from launcher.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().endswith("False")


NVIDIA_SMI = """#!/bin/sh
# A 4-GPU box as nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap reports it (PCI bus order).
echo "0, GPU-aaaa0000-0000, NVIDIA A10G, 23028, 8.6"
echo "1, GPU-bbbb1111-1111, NVIDIA A10G, 23028, 8.6"
echo "2, GPU-cccc2222-2222, NVIDIA A10G, 23028, 8.6"
echo "3, GPU-dddd3333-3333, NVIDIA A10G, 23028, 8.6"
"""


@pytest.fixture
def four_gpus(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text(NVIDIA_SMI)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    return monkeypatch


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2, 3]),
    ("3", [3]),                                         # the plan is made for GPU 3, and the backend pins GPU 3
    ("2,0", [2, 0]),
    ("GPU-dddd3333-3333", [3]),                         # UUIDs were read as "no GPU": a silent CPU fallback
    ("GPU-cccc,GPU-aaaa0000-0000", [2, 0]),             # a unique prefix, as CUDA accepts
    ("", []),
    ("-1", []),                                         # CUDA stops at a negative index: the usual way to hide GPUs
    ("1,-1,2", [1]),
])
def test_cuda_visible_devices_indices_and_uuids(four_gpus, visible, expected):
    from launcher.hardware import _nvidia_gpus

    if visible is None:
        four_gpus.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        four_gpus.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = _nvidia_gpus()
    assert [g.index for g in gpus] == expected
    assert all(g.name == "NVIDIA A10G" and g.compute_capability == (8, 6) for g in gpus)


@pytest.mark.parametrize("visible", ["7", "GPU-ffff", "MIG-0c3c1b1e-aaaa", "GPU-"])
def test_cuda_visible_devices_naming_no_gpu_is_an_error_not_a_cpu_fallback(four_gpus, visible):
    from launcher.hardware import _nvidia_gpus

    four_gpus.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ConfigError) as err:
        _nvidia_gpus()
    text = str(err.value)
    assert "CUDA_VISIBLE_DEVICES" in text and visible in text and "nvidia-smi -L" in text


@pytest.mark.parametrize("text, key", [
    ("cpu_cores: 100000000\nram_gb: 16\ncpu_bf16: false\n", "cpu_cores"),
    ("cpu_cores: 4\nram_gb: .inf\ncpu_bf16: false\n", "ram_gb"),
    ("cpu_cores: 4\nram_gb: 16\ncpu_bf16: false\ngpus: [{name: x, memory_gb: 16, compute_capability: [99, -1]}]\n",
     "compute_capability"),
    ("cpu_cores: 4\nram_gb: 16\ncpu_bf16: false\ngpus: [{name: x, memory_gb: .nan, compute_capability: [8, 0]}]\n",
     "memory_gb"),
])
def test_hand_written_profiles_are_bounded(tmp_path, text, key):
    path = tmp_path / "box.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_profile(str(path))


def test_a_profile_that_is_not_text_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "box.yaml"
    path.write_bytes(b"\xff\xfe\x00cpu_cores")
    result = run_cli("plan", str(ROOT / "recipes" / "unit-conversion.yaml"), "--hardware", str(path))
    assert result.returncode == 2 and "not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_commands_that_detect_report_a_bad_cuda_visible_devices_as_a_mistake(four_gpus):
    four_gpus.setenv("CUDA_VISIBLE_DEVICES", "7")
    for args in (["env"], ["plan", str(ROOT / "recipes" / "unit-conversion.yaml")]):
        result = run_cli(*args)
        assert result.returncode == 2 and "CUDA_VISIBLE_DEVICES" in result.stderr and "Traceback" not in result.stderr, args


def test_a_rate_probe_taken_while_the_cpus_are_busy_is_used_once_and_not_cached(tmp_path, monkeypatch):
    """A probe that shares the cores with a training run measures the sharing; cached, it would make every later
    plan on this machine over-predict its time."""
    import subprocess

    from launcher import hardware

    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    probes = []

    def probe(cmd, **kw):
        probes.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"matmul_tflops": {"fp32": 0.06}, "memory_bandwidth_gbs": 9.0, '
                                                         '"elementwise_gops": {"fp32": 1.1}}\n')

    monkeypatch.setattr(hardware.subprocess, "run", probe)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (3.4, 2.0, 1.0))
    rates, source = hardware._rates("cpu", 2, ["fp32"], "test cpu")
    assert rates["matmul_tflops"] == {"fp32": 0.06} and "while its CPUs were busy (load average 3.4 on 2 cores)" in source
    assert "not cached" in source and list(tmp_path.glob("rates-*.json")) == []
    # Quiet again: probed again (nothing was kept), and now cached for the next plan.
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.2, 0.5, 1.0))
    assert hardware._rates("cpu", 2, ["fp32"], "test cpu")[1] == "measured on this machine just now"
    assert len(probes) == 2 and len(list(tmp_path.glob("rates-*.json"))) == 1
    assert hardware._rates("cpu", 2, ["fp32"], "test cpu")[1].startswith("measured on this machine, cached in")
    assert len(probes) == 2


def test_a_probe_started_ahead_is_waited_for_by_detect_not_run_twice_and_then_cached(tmp_path, monkeypatch):
    """`sftlaunch plan` starts the probe before reading the recipe (its child's torch import overlaps that work);
    detection must take that child's figures rather than probe again, and later plans read the cache."""
    import subprocess

    from launcher import hardware

    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    started, ran = [], []

    class Child:
        returncode = 0
        args = ["probe"]

        def __init__(self, cmd, **kw):
            started.append(cmd)

        def communicate(self, input=None, timeout=None):
            assert input == "go\n"  # the child measures only when the plan is ready to wait for it
            return ('{"matmul_tflops": {"fp32": 0.2, "bf16": 0.9}, "memory_bandwidth_gbs": 80.0, '
                    '"elementwise_gops": {"fp32": 5.0, "bf16": 6.0}}\n', "")

        def kill(self):
            pass

    monkeypatch.setattr(hardware.subprocess, "Popen", Child)
    monkeypatch.setattr(hardware.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    hardware.start_rate_probe()
    assert len(started) == 1 and hardware.RATE_PROBE in started[0]
    hw = hardware.detect()
    assert ran == [] and hw.rates_source == "measured on this machine just now"
    assert hw.memory_bandwidth_gbs == 80.0 and hw.matmul_tflops["fp32"] == 0.2 and hw.elementwise_gops == {"fp32": 5.0, "bf16": 6.0}
    hardware.start_rate_probe()  # cached now: nothing to start, and detect reads the cache
    assert len(started) == 1 and hardware.detect().rates_source.startswith("measured on this machine, cached in")


def test_the_rate_probe_can_be_turned_off_and_then_nothing_is_started(tmp_path, monkeypatch):
    from launcher import hardware

    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    monkeypatch.setenv("SFTLAUNCH_RATE_PROBE", "0")
    monkeypatch.setattr(hardware.subprocess, "Popen", lambda *a, **k: pytest.fail("a probe was started"))
    hardware.start_rate_probe()
    hw = hardware.detect()
    assert hw.matmul_tflops is None and hw.rates_source is None


def test_a_low_probe_is_not_kept_for_good_finished_runs_probe_again_and_the_cache_keeps_each_figures_best(tmp_path, monkeypatch):
    """A probe reads low, never high: one taken while something else ran was cached for good before (0.11 TFLOP/s
    fp32 against 0.39-0.42). After a run, the machine is probed again once quiet, up to PROBES_KEPT times."""
    import json
    import subprocess

    from launcher import hardware

    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    figures = iter([
        {"matmul_tflops": {"fp32": 0.11, "bf16": 1.3}, "memory_bandwidth_gbs": 30.0, "elementwise_gops": {"fp32": 6.0, "bf16": 2.0}},
        {"matmul_tflops": {"fp32": 0.40, "bf16": 1.1}, "memory_bandwidth_gbs": 35.0, "elementwise_gops": {"fp32": 5.0, "bf16": 6.5}},
        {"matmul_tflops": {"fp32": 0.38, "bf16": 1.4}, "memory_bandwidth_gbs": 20.0, "elementwise_gops": {"fp32": 6.2, "bf16": 6.0}},
    ])
    monkeypatch.setattr(hardware.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(next(figures)) + "\n"))
    started = []
    monkeypatch.setattr(hardware.subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)))
    hw = hardware.detect()  # the first plan: one probe, a low fp32 figure among the others
    assert hw.matmul_tflops["fp32"] == 0.11 and hw.rates_source == "measured on this machine just now"
    for k in range(2):
        hardware.refresh_rates_later()  # a run ended: a detached child (nothing waits for it) probes again
        hardware.refresh_rates_later()  # another ended before that child ran: one re-probe at a time
        assert len(started) == k + 1
        assert started[-1][1]["start_new_session"] and "_refresh_rates()" in started[-1][0][-1]
        assert hardware._refresh_rates()  # what that child does
    hw = hardware.detect()
    assert hw.matmul_tflops == {"fp32": 0.40, "bf16": 1.4} and hw.memory_bandwidth_gbs == 35.0
    assert hw.elementwise_gops == {"fp32": 6.2, "bf16": 6.5} and "(the best of 3 probes)" in hw.rates_source
    hardware.refresh_rates_later()  # three probes kept: no more
    assert len(started) == 2


def test_the_re_probe_after_a_run_waits_for_the_runs_load_to_fade_and_gives_up_rather_than_measure_it(tmp_path, monkeypatch):
    import json

    from launcher import hardware

    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    device, precisions, identity = hardware._probe_target(hardware._cpu_flags(), hardware._nvidia_gpus(), hardware._mac_arm())
    cached = hardware._rates_cache(device, hardware._cores(), precisions, identity)
    cached.write_text(json.dumps({"matmul_tflops": {"fp32": 0.4}, "memory_bandwidth_gbs": 30.0, "elementwise_gops": {"fp32": 6.0},
                                  "probes": 1}))
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(hardware.subprocess, "run", lambda *a, **k: pytest.fail("probed under load"))
    assert hardware._refresh_rates() is False
    assert json.loads(cached.read_text())["probes"] == 1
