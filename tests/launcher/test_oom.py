import pytest

from launcher.errors import SftlaunchError
from launcher.hardware import load_profile
from launcher.oom import EXIT_OUT_OF_MEMORY, OutOfMemoryError, no_back_off
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from tests.conftest import ROOT


def _plan():
    return make_plan(load_recipe(ROOT / "recipes" / "unit-conversion.yaml", []), load_profile("t4-16gb"))


@pytest.mark.parametrize("phase", ["base evaluation", "final evaluation"])
def test_out_of_memory_while_evaluating_does_not_halve_the_training_batch(phase):
    # Halving the micro-batch and resuming re-ran the same evaluation into the same out-of-memory until micro-batch 1.
    plan = _plan()
    with pytest.raises(OutOfMemoryError) as err:
        no_back_off(plan, {"phase": phase, "error": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    text = str(err.value)
    assert f"during {phase}" in text and f"eval.batch_size (now {plan.recipe.eval.batch_size})" in text
    assert err.value.exit_code == EXIT_OUT_OF_MEMORY == 75


def test_out_of_memory_while_loading_names_other_fixes_and_training_backs_off():
    with pytest.raises(SftlaunchError, match="during loading.*ZeRO-3"):
        no_back_off(_plan(), {"phase": "loading", "error": "CUDA out of memory"})
    assert no_back_off(_plan(), {"phase": "training"}) is None
