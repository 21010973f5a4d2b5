import re

import pytest

from launcher.errors import ConfigError
from launcher.recipe import Recipe, load_recipe
from tests.conftest import ROOT, run_cli

RECIPE = ROOT / "recipes" / "unit-conversion.yaml"


def test_shipped_recipe_loads_with_documented_keys():
    r = load_recipe(RECIPE)
    assert r.model.name == "embedded:smollm2-135m-instruct"
    assert r.model.lora.rank == 8
    assert r.data.train_size == 1000
    assert r.train.learning_rate == 2e-3 and r.train.epochs == 3 and r.train.max_steps is None
    assert r.train.effective_batch_size == 16 and r.train.seed == 0
    assert r.eval.limit is None and r.output.dir == "outputs"


def test_overrides_are_typed_and_dotted():
    r = load_recipe(RECIPE, ["train.learning_rate=1e-4", "model.lora.rank=16", "eval.limit=5", "train.max_steps=3",
                             "model=/some/dir", "hardware.gradient_checkpointing=true"])
    assert r.train.learning_rate == 1e-4 and r.model.lora.rank == 16 and r.eval.limit == 5
    assert r.train.max_steps == 3 and r.model.name == "/some/dir" and r.hardware.gradient_checkpointing is True


def test_every_problem_is_reported_at_once_with_key_and_fix():
    with pytest.raises(ConfigError) as exc:
        load_recipe(RECIPE, ["train.lr=3", "hardware.precision=fp8", "model.lora.rank=-1", "data.train_size=abc"])
    keys = {p.key for p in exc.value.problems}
    assert keys == {"train.lr", "hardware.precision", "model.lora.rank", "data.train_size"}
    text = str(exc.value)
    assert "learning_rate" in text  # the fix for a typo lists the real keys
    assert "'fp8'" in text and "bf16" in text


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: x\ntrain:\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    (problem,) = exc.value.problems
    assert problem.key == "train.lerning_rate"
    assert problem.where == f"{path}:4"
    assert "unknown key" in problem.message


def test_missing_model_name_and_bad_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="model"):
        load_recipe(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)


def test_yaml_tags_never_construct_objects(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)


def test_override_path_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_recipe(RECIPE, ["train.epochs.x=1"])


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Recipe.__mro__[1]):
                walk(ann)
    walk(Recipe)


def test_cli_reports_config_errors_with_exit_2_and_no_traceback():
    result = run_cli("plan", str(RECIPE), "train.lr=3", "hardware.precision=fp8")
    assert result.returncode == 2
    assert "2 problems" in result.stderr and "train.lr" in result.stderr and "hardware.precision" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("overrides, message", [
    (["data.calculator_annotations=true", "data.target_style=bare"], "data.target_style=bare writes no arithmetic"),
    (["data.task=chat", "data.path=x.jsonl", "data.calculator_annotations=true"], "write the <<EXPR=RESULT>> annotations"),
    (["data.task=chat", "data.path=x.jsonl", "data.calculator_annotations=false", "eval.calculator=true"],
     "chat without eval.metrics generates nothing"),
])
def test_calculator_settings_that_would_do_nothing_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(RECIPE, overrides)


def test_calculator_settings_are_read():
    r = load_recipe(RECIPE, ["data.calculator_annotations=true", "eval.calculator=true"])
    assert r.data.calculator_annotations and r.eval.calculator
    assert not load_recipe(RECIPE, ["eval.calculator=false"]).eval.calculator


def test_a_half_precision_base_with_full_fine_tuning_is_refused_naming_key_value_and_fix():
    with pytest.raises(ConfigError) as exc:
        load_recipe(RECIPE, ["model.method=full", "model.base_dtype=bf16"])
    text = str(exc.value)
    assert "model.base_dtype=bf16" in text and "model.method=full" in text and "model.base_dtype=auto" in text
    assert load_recipe(RECIPE, ["model.method=full", "model.base_dtype=fp32"]).model.base_dtype == "fp32"
