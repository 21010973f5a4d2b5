import pytest

from launcher.errors import PlanError
from launcher.hardware import load_profile, profile_names
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from tests.conftest import RECIPES


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_a_comment_giving_the_command(recipe):
    head = recipe.read_text().splitlines()[:8]
    assert head[0].startswith("#")
    assert any("sftlaunch" in line for line in head)


@pytest.mark.parametrize("profile", profile_names())
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans_on_every_profile(recipe, profile):
    hw = load_profile(profile)
    try:
        plan = make_plan(load_recipe(recipe), hw)
    except PlanError as exc:
        # Only multi-GPU machines may be refused in this version, and the message must say what to do.
        assert len(hw.gpus) * hw.nodes > 1, exc
        assert "hardware.backend=cuda" in str(exc)
        return
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == plan.recipe.train.effective_batch_size
    assert all(d.reason for d in plan.decisions)
