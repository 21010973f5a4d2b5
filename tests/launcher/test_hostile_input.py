"""Hostile input: generated recipes and overrides either validate or fail cleanly; secrets never leak."""

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import cli
from launcher.recipe import Recipe
from tests.conftest import ROOT, SUMMARY, run_cli

KEYS = ["model.name", "model.lora.rank", "model.lora.alpha", "model.lora.target_modules", "model.trust_remote_code",
        "data.task", "data.train_size", "data.max_length", "data.path", "data.max_samples", "train.learning_rate",
        "train.epochs", "train.max_steps", "train.max_time", "train.effective_batch_size", "train.seed",
        "train.guard.max_bad_steps", "eval.limit", "eval.size", "hardware.backend", "hardware.precision",
        "hardware.micro_batch_size", "hardware.threads", "output.name", "bogus", "train.bogus", "model.lora.r",
        "train.epochs.deeper", "model"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "auto", "bf16", "fp8", "1e-4", "15m", "-1", "0", "1e400", "cuda", "gsm8k", "[1, 2]", "{a: 1}",
                     "!!python/object:os.system", "&a x", "*a", "null", "~", "yes", "embedded:smollm2-135m-instruct"]),
)
value_yaml = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=8), scalars, max_size=3))


def _nest(pairs):
    doc = {}
    for key, value in pairs:
        node = doc
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[last] = value
    return doc


recipe_text = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYS), value_yaml), max_size=8).map(lambda pairs: yaml.safe_dump(_nest(pairs))),
    st.text(max_size=200),  # arbitrary text, tags and anchors included by chance
    st.sampled_from(["model: &m {name: x}\ndata: *m\n", "model: !!python/object/apply:os.system ['true']\n",
                     "model: {name: x}\nmodel: {name: y}\n", "- a\n- b\n", "model:\n  name: x\n  lora: {rank: 1e9}\n",
                     "model: !custom {name: x}\n", "model: {name: x}\ntrain: {learning_rate: .nan}\n"]),
    # Aliases (nested a few levels), duplicate keys, huge numbers and long strings.
    st.builds(lambda depth, key: "a0: &a0 [x, x, x]\n" + "".join(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}]\n" for i in range(1, depth))
              + f"model: {{name: some/model}}\n{key.split('.')[0]}: *a{depth - 1}\n", st.integers(1, 7), st.sampled_from(KEYS)),
    st.builds(lambda key, a, b: yaml.safe_dump(_nest([("model.name", "some/model")])) + f"{key.split('.')[0]}:\n  x: {a}\n  x: {b}\n",
              st.sampled_from(KEYS), st.integers(), st.integers()),
    st.builds(lambda key, v: yaml.safe_dump(_nest([("model.name", "some/model"), (key, v)])), st.sampled_from(KEYS),
              st.one_of(st.text(min_size=300, max_size=3000), st.integers(min_value=10**100, max_value=10**400))),
).map(lambda t: t.encode())
raw_bytes = st.binary(max_size=120)  # non-UTF-8 input
VALID_VALUES = ["1", "16", "auto", "bf16", "fp32", "cpu", "0.001", "1e-4", "true", "false", "15m", "gsm8k",
                "unit_conversion", "x", "all-linear", "[q_proj, v_proj]", "3", "run-1"]
overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.one_of(st.text(max_size=12), st.sampled_from(VALID_VALUES))),
    st.text(max_size=20)), max_size=5)

COUNT = {"n": 0, "valid": 0}


# A model that resolves offline (a Hub id not in the cache is refused where the Hub cannot be reached), so that the
# overrides decide the outcome.
VALID_BASE = st.just(b"model: {name: \"embedded:smollm2-135m-instruct\"}\n")
SAFE_OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["train.seed", "train.epochs", "eval.limit", "model.lora.rank"]),
                                    st.sampled_from(["1", "3", "16", "0", "-2", "abc"])), max_size=2)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=st.one_of(VALID_BASE, recipe_text, raw_bytes), extra=st.one_of(SAFE_OVERRIDES, overrides))
def test_generated_recipes_validate_or_exit_2_naming_the_key(tmp_path_factory, monkeypatch_session, content, extra):
    COUNT["n"] += 1
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "r.yaml"
    path.write_bytes(content)
    out = folder / "outputs"
    result = CliRunner().invoke(cli.main, ["run", str(path), *extra, f"output.dir={out}", "hardware.backend=cpu"])
    # Validation, planning and the run directory happen; the launch itself is replaced (see fixture).
    if result.exit_code == 0:
        if "--help" in extra or "-h" in extra:
            assert result.output.startswith("Usage:")
            return
        COUNT["valid"] += 1
        assert len(list(out.iterdir())) == 1
        return
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    text = result.output
    assert len(text) < 20_000  # bounded, whatever the input (values are shown shortened, problems capped)
    assert "Traceback" not in text
    if text.startswith("Usage:"):  # click's own usage error, e.g. an override that looks like an option
        assert "Error: " in text and "--help" in text
    else:
        assert text.startswith("error: ") and ("Fix" in text or "fix" in text), text
    assert not out.exists() or not list(out.iterdir())  # no partially created run directory


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "_launch", lambda *args, **kwargs: None)
    yield mp
    mp.undo()
    SUMMARY.append(f"fuzzed {COUNT['n']} generated recipes and override lists: {COUNT['valid']} valid, "
                   f"{COUNT['n'] - COUNT['valid']} rejected with exit 2 and a message naming the key")
    assert COUNT["n"] >= 500 and COUNT["valid"] > 0


def test_trust_remote_code_is_off_by_default_and_shown():
    assert Recipe.model_fields["model"].annotation.model_fields["trust_remote_code"].default is False
    recipe = ROOT / "recipes" / "unit-conversion.yaml"
    shown = CliRunner().invoke(cli.main, ["plan", str(recipe), "--hardware", "cpu-2core"])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"trust_remote_code += False +# off \(default\): no code from the model repository runs", shown.output)
    on = CliRunner().invoke(cli.main, ["plan", str(recipe), "--hardware", "cpu-2core", "model.trust_remote_code=true"])
    assert re.search(r"trust_remote_code += True +# set in the recipe: the model repository's Python code will run", on.output)


SECRETS = {"HF_TOKEN": "hf_sEcReT1234567890", "WANDB_API_KEY": "wandb-sEcReT-0987", "HUGGING_FACE_HUB_TOKEN": "hf_oTheR5ecret",
           "OPENAI_API_KEY": "sk-sEcReT42"}


def test_secrets_never_reach_the_run_directory_logs_or_plans(tiny_recipe, tmp_path):
    # With both trackers on: W&B (offline) and TensorBoard write into the run directory too.
    result = run_cli(str(tiny_recipe), "train.report_to=[tensorboard, wandb]", env=SECRETS)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = next((tmp_path / "outputs").iterdir())
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    plan = run_cli("plan", str(tiny_recipe), "--json", env=SECRETS)
    env_out = run_cli("env", env=SECRETS)
    texts = [result.stdout, result.stderr, plan.stdout, plan.stderr, env_out.stdout]
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert len(files) > 10
    blobs = [p.read_bytes() for p in files]
    for secret in SECRETS.values():
        assert all(secret not in t for t in texts), secret
        assert all(secret.encode() not in b for b in blobs), secret


def _alias_bomb() -> str:
    # Nine keys, each a list of nine aliases of the previous one: 9^9 (387 million) leaves once expanded.
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, key in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{key}: &{key} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["recipe", "hardware"])
def test_a_yaml_alias_bomb_is_refused_in_bounded_time_and_output(tmp_path, where):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert len(bomb.read_bytes()) < 400
    args = ["plan", str(bomb)] if where == "recipe" else ["plan", str(ROOT / "recipes" / "unit-conversion.yaml"), "--hardware", str(bomb)]
    result = run_cli(*args, timeout=60)  # unbounded, it ran past 15 GB and 2 GB of output
    assert result.returncode == 2
    # At most 20 problems, each bad value shortened to a few levels and items: bounded, not 2 GB.
    assert len(result.stderr) < 12_000 and "Traceback" not in result.stderr
    assert "..." in result.stderr
    assert "i:" in result.stderr or "i " in result.stderr  # the offending key is named


def test_a_million_style_flood_of_unknown_keys_lists_twenty_and_counts_the_rest(tmp_path):
    recipe = tmp_path / "flood.yaml"
    recipe.write_text("model: {name: embedded:smollm2-135m-instruct}\n" + "".join(f"junk{i}: 1\n" for i in range(3000)))
    result = run_cli("plan", str(recipe), timeout=120)
    assert result.returncode == 2
    assert "3000 problems in the configuration" in result.stderr and "... and 2980 more (fix these first)" in result.stderr
    assert result.stderr.count("junk") == 20 and len(result.stderr) < 10_000


def test_run_dir_onto_an_existing_run_is_refused_and_leaves_it_untouched(tmp_path):
    from launcher.rundir import RunDir

    old = RunDir(tmp_path / "old-run")
    old.path.mkdir()
    old.file(RunDir.PLAN).write_text('{"kept": true}')
    old.write_status("completed")
    before = {p.name: p.read_bytes() for p in old.path.iterdir()}
    result = run_cli(str(ROOT / "recipes" / "unit-conversion.yaml"), "--run-dir", str(old.path), timeout=120)
    assert result.returncode == 2
    assert "already holds a run (completed)" in result.stderr and f"sftlaunch resume {old.path}" in result.stderr
    assert {p.name: p.read_bytes() for p in old.path.iterdir()} == before


UC = str(ROOT / "recipes" / "unit-conversion.yaml")


@pytest.mark.parametrize("args, key, says", [
    ([f"model.name={'a' * 300}"], "model.name", "too long to be a model reference"),
    (["model=embedded:nope"], "embedded:nope", "unknown embedded model"),
    (["model=./no/such/model"], "model.name=./no/such/model", "no such directory"),
    (["data.path=no-such.json"], "data.path", "no such file or folder"),
    (["eval.path=/no/such/eval.json"], "eval.path", "no such file or folder"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules", "names no module"),
    (["train.epochs=true"], "train.epochs", "must be a number, not true/false"),
    (["hardware.micro_batch_size=65536"], "hardware.micro_batch_size", "at micro-batch 65536"),
])
def test_mistakes_plan_can_see_are_errors_before_any_run_directory(tmp_path, args, key, says):
    for command in (["plan", UC], [UC]):  # `plan` finds them, and `run` before it makes a run directory
        result = run_cli(*command, *args, f"output.dir={tmp_path / 'outputs'}", timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert key in result.stderr and says in result.stderr and "Fix" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr) < 2000
    assert not (tmp_path / "outputs").exists()


def test_duplicate_keys_name_both_lines_in_recipes_and_profiles(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("model:\n  name: embedded:smollm2-135m-instruct\ntrain:\n  learning_rate: 1e-3\n  epochs: 2\n  learning_rate: 1\n")
    result = run_cli("plan", str(recipe))
    assert result.returncode == 2
    assert "train.learning_rate" in result.stderr and "lines 4 and 6" in result.stderr and f"{recipe}:6" in result.stderr
    profile = tmp_path / "hw.yaml"
    profile.write_text("cpu_cores: 2\nram_gb: 8\ncpu_cores: 64\n")
    result = run_cli("plan", UC, "--hardware", str(profile))
    assert result.returncode == 2 and "cpu_cores" in result.stderr and "lines 1 and 3" in result.stderr


def test_a_section_override_merges_into_the_recipe_section():
    from launcher.recipe import load_recipe

    base = load_recipe(UC)
    merged = load_recipe(UC, ["train={epochs: 2}"])
    assert merged.train.epochs == 2 and base.train.epochs != 2
    assert merged.train.learning_rate == base.train.learning_rate  # not dropped with the rest of the section
    assert merged.train.model_dump(exclude={"epochs"}) == base.train.model_dump(exclude={"epochs"})
    with pytest.raises(Exception, match="unknown key 'lr' in train"):
        load_recipe(UC, ["train={lr: 3}"])


def test_eval_data_with_nan_or_infinity_answers_is_refused_naming_the_item(tmp_path):
    data = tmp_path / "items.json"
    data.write_text('[["1 m in cm?", 100], ["2 m in cm?", NaN], ["3 m in cm?", Infinity]]')
    result = run_cli("eval", UC, "--data", str(data), timeout=120)
    assert result.returncode == 2
    assert f"{data}: item 1" in result.stderr and "NaN or infinity" in result.stderr and "Traceback" not in result.stderr


def test_eval_predictions_into_a_missing_folder_is_refused_before_generating(tiny_model, tmp_path):
    target = tmp_path / "missing" / "predictions.jsonl"
    result = run_cli("eval", UC, f"model.name={tiny_model}", "--limit", "2", "--predictions", str(target), timeout=120)
    assert result.returncode == 2
    assert "--predictions" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert "evaluating" not in result.stdout + result.stderr  # refused before a single generation


def test_a_model_defined_by_repository_code_is_an_error_naming_trust_remote_code(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="acme_lm", architectures=["AcmeForCausalLM"],
                  auto_map={"AutoConfig": "acme.AcmeConfig", "AutoModelForCausalLM": "acme.AcmeForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("eval", UC, f"model.name={model}", "--limit", "1", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.trust_remote_code=true" in result.stderr and "Traceback" not in result.stderr


def test_a_target_module_typo_stops_the_run_before_the_base_evaluation(tiny_recipe, tmp_path):
    result = run_cli(str(tiny_recipe), "model.lora.target_modules=[q_proj, v_prj]", timeout=300)
    assert result.returncode == 2
    assert "no module called v_prj" in result.stderr and "v_proj" in result.stderr and "Traceback" not in result.stderr
    run_dir = next((tmp_path / "outputs").iterdir())
    assert not (run_dir / "eval-base.json").exists()  # found seconds after loading, not after evaluating
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and "v_prj" in status["error"]


def test_a_full_disk_when_the_run_directory_is_made_leaves_nothing_half_made(tmp_path, monkeypatch):
    import errno

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(Path, "write_text", full)
    result = CliRunner().invoke(cli.main, ["run", UC, f"output.dir={tmp_path / 'outputs'}"])
    monkeypatch.undo()
    assert result.exit_code == 74, result.output
    assert "No space left on device" in result.output and "Fix:" in result.output and "removed" in result.output
    assert list((tmp_path / "outputs").iterdir()) == []  # no run directory with a 0-byte recipe.yaml


def test_run_names_are_claimed_atomically(tmp_path):
    from launcher.rundir import _claim

    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-1-2").mkdir()
    assert _claim(tmp_path, "run-1") == tmp_path / "run-1-3"  # taken names are skipped, never shared


def test_docker_run_checks_the_recipe_before_contacting_an_engine(tmp_path):
    result = run_cli("docker", "run", UC, "train.epochs=true", env={"DOCKER_HOST": "tcp://127.0.0.1:9"}, timeout=60)
    assert result.returncode == 2
    assert "train.epochs" in result.stderr and "docker" not in result.stderr.lower()


def test_plan_refuses_a_model_that_resolves_nowhere_offline(tmp_path):
    # HF_HUB_OFFLINE=1 (tests/conftest.py): not a path, not embedded, not cached.
    result = run_cli("plan", UC, "model=nonexistent-org/nonexistent-model")
    assert result.returncode == 2 and "not in the Hugging Face cache" in result.stderr and "Fix:" in result.stderr
    run = run_cli(UC, "model=nonexistent-org/nonexistent-model", f"output.dir={tmp_path}")
    assert run.returncode == 2 and not list(tmp_path.iterdir())  # refused before a run directory exists


def test_a_recipe_named_like_an_option_gives_a_run_directory_that_commands_can_take(tmp_path, tiny_model):
    import shutil

    from launcher.plan import make_plan
    from launcher.hardware import load_profile
    from launcher.recipe import load_recipe
    from launcher.rundir import create_run_dir

    recipe = tmp_path / "-rf.yaml"
    shutil.copy(UC, recipe)
    plan = make_plan(load_recipe(recipe, [f"output.dir={tmp_path / 'out'}"]), load_profile("cpu-2core"))
    run_dir = create_run_dir(plan, recipe)
    assert not run_dir.path.name.startswith("-") and run_dir.path.name.startswith("rf-")


def test_resume_refuses_a_status_sftlaunch_never_writes_and_changes_nothing(tmp_path):
    from launcher.plan import make_plan
    from launcher.hardware import load_profile
    from launcher.recipe import load_recipe
    from launcher.rundir import RunDir, create_run_dir

    plan = make_plan(load_recipe(UC, [f"output.dir={tmp_path}"]), load_profile("cpu-2core"))
    run_dir = create_run_dir(plan, UC)
    run_dir.write_status("weird", train={"steps": 189, "seconds": 940.0})
    before = {p.name: p.read_bytes() for p in run_dir.path.iterdir()}
    result = run_cli("resume", str(run_dir.path))
    assert result.returncode == 2 and "status='weird'" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.path.iterdir()} == before
    assert RunDir(run_dir.path).status()["train"]["seconds"] == 940.0


def test_the_plan_warns_about_a_learning_rate_far_outside_the_methods_range():
    full = run_cli("plan", UC, "model.method=full", "--hardware", "cpu-2core", "--json")
    assert full.returncode == 0, full.stderr
    (decision,) = [d for d in json.loads(full.stdout)["decisions"] if d["field"] == "learning_rate"]
    assert decision["reason"].startswith("warning: train.learning_rate=0.002 is far above") and "1e-5 to 5e-5" in decision["reason"]
    lora = json.loads(run_cli("plan", UC, "--hardware", "cpu-2core", "--json").stdout)
    assert not [d for d in lora["decisions"] if d["field"] == "learning_rate"]  # the recipe's LoRA rate is fine


def test_inputs_nested_hundreds_deep_or_not_regular_files_are_refused_cleanly(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text('model: {name: "embedded:smollm2-135m-instruct"}\ntrain: ' + "[" * 600 + "]" * 600 + "\n")
    nested_data = tmp_path / "deep.json"
    nested_data.write_text("[" * 5000 + "]" * 5000)
    cases = [
        (["plan", str(deep)], 2, "nested too deeply"),
        (["plan", UC, "train.seed=" + "[" * 600 + "]" * 600], 2, "nested too deeply"),
        (["plan", "/dev/zero"], 2, "not a regular file"),
        (["eval", UC, "--data", str(nested_data), "--limit", "1"], 2, "nested too deeply"),
        (["eval", UC, "--data", "/dev/zero", "--limit", "1"], 2, "not a regular file"),  # read until memory ran out
    ]
    for args, code, text in cases:
        result = run_cli(*args, timeout=120)
        assert (result.returncode, text in result.stderr, "Traceback" in result.stderr) == (code, True, False), (args, result.stderr[-500:])


def test_a_gsm8k_reference_too_large_to_compare_is_a_data_error(tmp_path):
    from launcher.errors import DataError
    from launcher.tasks.gsm8k import load_file

    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "How many?", "answer": "So many.\n#### " + "9" * 400}) + "\n")
    with pytest.raises(DataError, match="too large to compare"):
        load_file(data)


@pytest.fixture(scope="module")
def no_launch():
    """resume's checks and writes run for real; starting the worker is replaced."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "_launch", lambda *args, **kwargs: None)
    yield
    mp.undo()
    SUMMARY.append(f"fuzzed {READER_COUNT['n']} cut or edited run directories with runs, plot, resume, eval, export: "
                   f"{READER_COUNT['refused']} refusals, no traceback, no file changed by a refusing command")


READER_FILES = ("run.json", "plan.json", "metrics.jsonl", "eval.json")
READER_COUNT = {"n": 0, "refused": 0}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run directory as a finished LoRA run leaves it (plan, status, metrics, results, an adapter's files)."""
    from launcher.hardware import load_profile
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe
    from launcher.rundir import create_run_dir

    out = tmp_path_factory.mktemp("readers")
    plan = make_plan(load_recipe(UC, [f"output.dir={out}"]), load_profile("cpu-2core"))
    rd = create_run_dir(plan, UC)
    rd.write_status("completed", exit_code=0, train={"steps": 3, "seconds": 9.5, "final_loss": 0.5})
    rd.metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": 1.0}) + "\n" for s in (1, 2, 3)))
    rd.file("eval.json").write_text(json.dumps({"train": {"steps": 3, "final_loss": 0.5}, "trained": {"accuracy": 0.5}}))
    rd.adapter.mkdir()
    (rd.adapter / "adapter_config.json").write_text("{}")
    (rd.adapter / "adapter_model.safetensors").write_bytes(b"")
    return rd.path


def _edit(text: str, how: str, at: float, junk: str) -> str:
    cut = int(len(text) * at)
    return {"truncate": text[:cut], "insert": text[:cut] + junk + text[cut:], "replace": text[:cut] + junk,
            "empty": "", "wrong type": json.dumps([junk])}[how]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(READER_FILES), how=st.sampled_from(["truncate", "insert", "replace", "empty", "wrong type"]),
       at=st.floats(0, 1), junk=st.sampled_from(['"', "{", "]", "null", '"status": 7', "\x00", "9" * 400, '{"step": "x"}\n']))
def test_run_directory_readers_survive_files_cut_short_or_edited(finished_run, no_launch, tmp_path_factory, name, how, at,
                                                                 junk):
    import shutil

    READER_COUNT["n"] += 1
    run = tmp_path_factory.mktemp("edited") / "run"
    shutil.copytree(finished_run, run)
    path = run / name
    path.write_text(_edit(path.read_text(), how, at, junk))
    gens = run.parent / "gens.jsonl"
    gens.write_text("\n".join(json.dumps({"generated": "<answer>1</answer>"}) for _ in range(200)) + "\n")
    for args in (["runs", str(run.parent)], ["plot", str(run)], ["resume", str(run)],
                 ["eval", str(run), "--generations", str(gens), "--limit", "2"], ["export", str(run), str(run.parent / "out")]):
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        result = CliRunner().invoke(cli.main, args)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (args, repr(result.exception))
        assert result.exit_code in (0, 2, 3, 74) and "Traceback" not in result.output, (args, result.output[-800:])
        if result.exit_code:
            READER_COUNT["refused"] += 1
            assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, args
        shutil.rmtree(run.parent / "out", ignore_errors=True)
