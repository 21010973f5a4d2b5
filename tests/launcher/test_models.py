"""Model references: bad ones are named with their fix before anything loads; weights load in the asked dtype."""

import pytest
import torch

from launcher.errors import ModelError
from launcher.models import check_reference, load_model, resolve_model
from tests.launcher.test_job import TINY


@pytest.mark.parametrize("ref, message", [
    ("embedded:gpt-99", r"unknown embedded model\. Fix: use one of embedded:smollm2-135m-instruct"),
    ("./no-such-model", r"no such directory\. Fix: check the path"),
    ("/no/such/model.gguf", r"no such GGUF file\. Fix: check the path"),
])
def test_a_bad_reference_is_named_with_its_fix(ref, message):
    with pytest.raises(ModelError, match=f"model.name={ref}: .*{message}"):
        check_reference(ref)


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="the directory has no config.json"):
        resolve_model(str(tmp_path))


def test_a_local_model_resolves_to_its_folder_and_loads_in_the_asked_dtype():
    assert resolve_model(str(TINY)) == str(TINY)
    assert {p.dtype for p in load_model(str(TINY)).parameters()} == {torch.float32}  # training's weights
    assert {p.dtype for p in load_model(str(TINY), dtype="bf16").parameters()} == {torch.bfloat16}
