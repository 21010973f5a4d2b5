import sys
import typing
from pathlib import Path

from backends import BACKENDS
from launcher.hardware import load_profile
from launcher.plan import make_plan
from launcher.recipe import BACKEND_NAMES, HardwareSection, load_recipe
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "unit-conversion.yaml"


def test_registry_matches_the_schema():
    schema_names = set(typing.get_args(HardwareSection.model_fields["backend"].annotation)) - {"auto"}
    assert set(BACKENDS) == schema_names == set(BACKEND_NAMES)
    assert all(name == b.name for name, b in BACKENDS.items())


def _spec(backend, profile, tmp_path):
    plan = make_plan(load_recipe(RECIPE, [f"hardware.backend={backend}"]), load_profile(profile))
    return plan, BACKENDS[backend].build(plan, tmp_path)


def test_cpu_launch_spec(tmp_path):
    plan, spec = _spec("cpu", "cpu-2core", tmp_path)
    assert spec.argv == (sys.executable, "-m", "launcher.worker", str(tmp_path))
    assert spec.env["OMP_NUM_THREADS"] == "2" and spec.env["CUDA_VISIBLE_DEVICES"] == ""
    assert BACKENDS["cpu"].check(plan, load_profile("cpu-2core")) == []


def test_cuda_launch_spec(tmp_path):
    plan, spec = _spec("cuda", "t4-16gb", tmp_path)
    assert spec.argv[-2:] == ("launcher.worker", str(tmp_path))
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert BACKENDS["cuda"].check(plan, load_profile("cpu-2core"))  # no GPU: a problem is reported


def test_mps_launch_spec(tmp_path):
    plan, spec = _spec("mps", "m2-16gb", tmp_path)
    assert spec.env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert 0 < float(spec.env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"]) < 1
    assert plan.precision == "fp32"


def test_specs_are_argument_lists_not_shell_strings(tmp_path):
    weird = tmp_path / "dir; rm -rf ~"
    for name, profile in (("cpu", "cpu-2core"), ("cuda", "t4-16gb"), ("mps", "m2-16gb")):
        plan = make_plan(load_recipe(RECIPE, [f"hardware.backend={name}"]), load_profile(profile))
        spec = BACKENDS[name].build(plan, weird)
        assert str(weird) in spec.argv  # one argument, passed verbatim
