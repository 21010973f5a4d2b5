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
