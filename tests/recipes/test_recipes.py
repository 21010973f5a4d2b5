import pytest

from launcher.memory import find_shape
from launcher.hardware import load_profile, profile_names
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from tests.conftest import RECIPES


# What each shipped profile trains on, written out (not derived by the planner's own rule): a new profile is
# added here with the backend a user of that machine expects.
EXPECTED_BACKEND = {"a100-40gb-x8": "deepspeed", "a100-80gb-x8": "deepspeed", "a10g-24gb": "cuda", "cpu-16core": "cpu",
                    "cpu-2core": "cpu", "h100-80gb-x1": "cuda", "h100-80gb-x8": "deepspeed",
                    "h100-80gb-x8-2nodes": "deepspeed", "m2-16gb": "mps", "m2-32gb": "mps", "t4-16gb": "cuda"}


def test_there_are_recipes():
    assert RECIPES


def test_every_shipped_profile_has_an_expected_backend():
    assert set(profile_names()) == set(EXPECTED_BACKEND)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_a_comment_giving_the_command(recipe):
    head = recipe.read_text().splitlines()[:8]
    assert head[0].startswith("#")
    assert any("sftlaunch" in line for line in head)


@pytest.mark.parametrize("profile", profile_names())
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans_on_every_profile(recipe, profile):
    hw = load_profile(profile)
    r = load_recipe(recipe)
    shape, source = find_shape(r.model.name)
    assert shape is not None, source  # shipped recipes use models whose shape is known offline
    plan = make_plan(r, hw, shape, source)
    assert plan.backend == EXPECTED_BACKEND[profile]
    assert plan.memory_estimate_gib <= plan.device_memory_gib * r.hardware.memory_fraction
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == plan.recipe.train.effective_batch_size
    assert all(d.reason for d in plan.decisions)
