"""The plan's time model: FLOPs per token counted by hand, budgets that say what they cost, and the rates it uses."""

import pytest

from launcher.hardware import HardwareInfo, load_profile
from launcher.memory import ModelShape, find_shape
from launcher.plan import make_plan
from launcher.recipe import load_recipe
from launcher.timing import CPU as CPU_CONSTANTS
from launcher.timing import DataSize, flops_per_token, predict_for_plan
from tests.conftest import ROOT, built_deepspeed_op

UNIT = ROOT / "recipes" / "unit-conversion.yaml"
# hidden 64, 2 layers, 4 heads of 16, 2 key/value heads (kv width 32), intermediate 128, vocabulary 400, tied.
SMALL = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=400, tied=True, model_type="llama")


def test_lora_flops_per_token_by_hand():
    # Layers' products: 2 FLOPs x 2 layers x (q,o: 2 x 64x64 + k,v: 2 x 64x32 + MLP: 3 x 64x128) = 4 x 36,864 = 147,456.
    # Attention at 10 tokens: 2 layers x 4 x (10 / 2 attended) x 64 = 2,560.
    # Logits at trained positions only (half of them): 2 x 64 x 400 x 0.5 = 25,600.
    # LoRA r=4 on every projection: 2 layers x 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) = 8,192 weights: 16,384.
    f = flops_per_token(SMALL, method="lora", lora_rank=4, lora_targets="all-linear", seq_len=10, trained_share=0.5,
                        trained_logits=True, checkpointing=False)
    assert (f["linear"], f["attention"], f["logits"], f["lora"]) == (147_456, 2_560, 25_600, 16_384)
    assert f["forward"] == 147_456 + 2_560 + 25_600 + 16_384 == 192_000
    # Backward through frozen weights: input gradients only (1x the products), attention 2x, LoRA's both (2x).
    assert f["backward"] == 147_456 + 25_600 + 2 * 2_560 + 2 * 16_384 == 210_944
    assert f["total"] == 402_944
    # Gradient checkpointing recomputes the layers' forward (not the logits): + 147,456 + 2,560 + 16,384.
    ckpt = flops_per_token(SMALL, method="lora", lora_rank=4, lora_targets="all-linear", seq_len=10, trained_share=0.5,
                           trained_logits=True, checkpointing=True)
    assert ckpt["total"] == 402_944 + 166_400


def test_full_finetuning_flops_per_token_by_hand():
    # Every weight's gradient too: backward is twice the forward's products. Logits at every position: 51,200.
    f = flops_per_token(SMALL, method="full", lora_rank=4, lora_targets="all-linear", seq_len=10, trained_share=0.5,
                        trained_logits=False, checkpointing=False)
    assert (f["logits"], f["lora"]) == (51_200, 0)
    assert f["forward"] == 147_456 + 2_560 + 51_200 == 201_216
    assert f["backward"] == 2 * (147_456 + 51_200) + 2 * 2_560 == 402_432
    ckpt = flops_per_token(SMALL, method="full", lora_rank=4, lora_targets="all-linear", seq_len=10, trained_share=0.5,
                           trained_logits=False, checkpointing=True)
    assert ckpt["total"] == 201_216 + 402_432 + 147_456 + 2_560


def test_smollm2_lora_flops_match_the_usual_two_n_rule():
    # SmolLM2-135M: 30 layers x (2 x 576^2 + 2 x 576x192 + 3 x 576x1536) = 106.2M weights in the layers' products.
    shape = find_shape("embedded:smollm2-135m-instruct")[0]
    f = flops_per_token(shape, method="lora", lora_rank=16, lora_targets="all-linear", seq_len=100, trained_share=1.0,
                        trained_logits=False, checkpointing=False)
    assert f["linear"] == 2 * 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) == 212_336_640
    # LoRA training costs about 4x the layers' weights + the logits' 4 x 576 x 49,152: ~0.54 GFLOP per token
    # (the figure the speed issue measured against).
    assert 0.5e9 < f["total"] < 0.6e9


@pytest.fixture(autouse=True)
def eager_steps(monkeypatch):
    """The time model of eager steps: compiled steps' measured speed-ups (plan.COMPILE_MEASURED, tested in
    test_compile.py) would make these predictions depend on which machines have been measured."""
    from launcher import plan as plan_module

    monkeypatch.setattr(plan_module, "COMPILE_MEASURED", {})


def _hardware(**kw):
    return HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True, matmul_tflops={"fp32": 0.2, "bf16": 0.88},
                        memory_bandwidth_gbs=100, elementwise_gops={"fp32": 5.0, "bf16": 6.0},
                        rates_source="test figures", **kw)


def _data(samples=1000):
    return DataSize(samples=samples, tokens=samples * 87, trainable_tokens=samples * 74, answer_tokens_max=103,
                    eval_items=150, eval_prompt_tokens=14, source="test")


def test_plan_predicts_each_phase_and_says_how():
    recipe = load_recipe(UNIT, [])
    shape, source = find_shape(recipe.model.name)
    plan = make_plan(recipe, _hardware(), shape, source, data=_data())
    seconds = plan.predicted_seconds
    assert seconds["total"] == pytest.approx(seconds["loading"] + seconds["base_eval"] + seconds["training"] + seconds["final_eval"], abs=0.2)
    decision = plan.decision("predicted_time")
    # 3 epochs of 87k tokens, the FLOPs per token, the sustained rate and where the rates came from are all said.
    assert decision.reason.startswith("training ~") and "261.0k tokens x 0.5" in decision.reason
    assert "GFLOP/s sustained" in decision.reason and "of 0.88 TFLOP/s bf16" in decision.reason
    assert "rates: test figures" in decision.reason
    assert plan.data_size == _data() and plan.summary()["predicted_seconds"] == seconds
    # Twice the data, twice the training time (the fixed costs scale with the steps too).
    double = make_plan(recipe, _hardware(), shape, source, data=_data(2000))
    assert double.predicted_seconds["training"] == pytest.approx(2 * seconds["training"], rel=0.01)
    # A profile plans without probing: its datasheet rates, and its GPU's higher rate gives a shorter training.
    gpu = make_plan(recipe, load_profile("a10g-24gb"), shape, source, data=_data())
    assert gpu.predicted_seconds["training"] < seconds["training"] / 10
    assert "not fitted on a GPU" in gpu.decision("predicted_time").reason


def test_no_rates_or_no_data_size_means_no_prediction_and_says_why():
    recipe = load_recipe(UNIT, [])
    shape, source = find_shape(recipe.model.name)
    bare = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True)
    plan = make_plan(recipe, bare, shape, source, data=_data())
    assert plan.predicted_seconds is None and "no bf16 matrix rate" in plan.decision("predicted_time").reason
    plan = make_plan(recipe, _hardware(), shape, source)
    assert plan.predicted_seconds is None and "not measured" in plan.decision("predicted_time").reason


def test_a_cpus_elementwise_work_follows_its_measured_elementwise_rate_not_its_copy_bandwidth():
    """Two CPUs that measured the same per-token cost of a step's elementwise work copied 256 MiB at 80 and 35 GB/s:
    a bandwidth-based model predicted the slower copier 0.53-0.76x too slow. The elementwise rate sets that part."""
    recipe = load_recipe(UNIT, [])
    shape, source = find_shape(recipe.model.name)
    base = make_plan(recipe, _hardware(), shape, source, data=_data())
    assert "(at 6 G elements/s bf16)" in base.decision("predicted_time").reason
    slow_copy = make_plan(recipe, _hardware().model_copy(update={"memory_bandwidth_gbs": 35}), shape, source, data=_data())
    assert slow_copy.predicted_seconds["training"] == base.predicted_seconds["training"]
    half = make_plan(recipe, _hardware().model_copy(update={"elementwise_gops": {"fp32": 2.5, "bf16": 3.0}}), shape,
                     source, data=_data())
    ours = predict_for_plan(base, shape)
    slower = predict_for_plan(half, shape)
    assert slower.parts["elementwise_pass_s"] == pytest.approx(2 * ours.parts["elementwise_pass_s"])
    # The training grows by exactly the elementwise work, and the optimizer's pass over the LoRA weights (fp32 rate).
    grown = (ours.parts["elementwise_pass_s"] * CPU_CONSTANTS["elementwise_ops_per_element"]["half"]
             + ours.parts["attention_score_s"] * CPU_CONSTANTS["attention_ops_per_score"]
             + ours.parts["optimizer_unit_s"] * CPU_CONSTANTS["optimizer_ops_per_param"])
    assert slower.training - ours.training == pytest.approx(grown, rel=1e-6) and grown > 0.3 * ours.training


def test_a_cpu_without_an_elementwise_rate_is_not_predicted_and_the_plan_says_what_to_add():
    recipe = load_recipe(UNIT, [])
    shape, source = find_shape(recipe.model.name)
    plan = make_plan(recipe, _hardware().model_copy(update={"elementwise_gops": None}), shape, source, data=_data())
    reason = plan.decision("predicted_time").reason
    assert plan.predicted_seconds is None and "no bf16 elementwise rate for this CPU" in reason
    assert "add elementwise_gops to the profile" in reason


def test_the_evaluations_time_follows_the_answer_lengths_an_earlier_run_of_the_same_evaluation_measured(tmp_path):
    """The plan gave the base and the trained model the training answers' longest length: base evaluations took
    0.59-0.75 of the prediction, final ones 1.29-1.50 (the base model answered unit conversion in 20 tokens on
    average, the 12-step model in 75, up to 128). A second run of the same evaluation knows them."""
    import json

    from launcher.history import measured_answers

    out = tmp_path / "outputs"
    recipe = load_recipe(UNIT, [f"output.dir={out}"])
    shape, source = find_shape(recipe.model.name)
    assert measured_answers(recipe) is None  # no earlier run
    before = make_plan(recipe, _hardware(), shape, source, data=_data())

    def earlier_run(name, recipe, base_steps, trained_steps):
        run = out / name
        run.mkdir(parents=True)
        (run / "plan.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
        (run / "eval.json").write_text(json.dumps({
            "base": {"answer_tokens": {"mean": 20.2, "max": 80, "decode_steps": base_steps, "batches": 3}},
            "trained": {"answer_tokens": {"mean": 74.8, "max": 128, "decode_steps": trained_steps, "batches": 3}}}))

    # Another evaluation (other max_new_tokens) tells nothing; another training of the same evaluation tells the
    # base model's lengths (greedy: the same answers) but not the trained model's.
    earlier_run("other-eval", load_recipe(UNIT, [f"output.dir={out}", "eval.max_new_tokens=64"]), 10, 10)
    assert measured_answers(recipe) is None
    earlier_run("other-training", load_recipe(UNIT, [f"output.dir={out}", "train.learning_rate=1e-3"]), 180, 99)
    assert measured_answers(recipe) == {"base": {"decode_steps": 180, "batches": 3, "run": "other-training", "mean": 20.2}}
    earlier_run("same", load_recipe(UNIT, [f"output.dir={out}", "output.name=again"]), 180, 384)  # output aside
    measured = measured_answers(recipe)  # the newest run that has each
    assert measured == {"base": {"decode_steps": 180, "batches": 3, "run": "same", "mean": 20.2},
                        "trained": {"decode_steps": 384, "batches": 3, "run": "same", "mean": 74.8}}

    after = make_plan(recipe, _hardware(), shape, source, data=_data().model_copy(update={"measured_answers": measured}))
    # 150 items in 3 batches of 50 decoded 180 steps (base) and 384 (trained) against 3 x 103 assumed before.
    assert after.predicted_seconds["base_eval"] < before.predicted_seconds["base_eval"]
    assert after.predicted_seconds["final_eval"] > before.predicted_seconds["final_eval"]
    assert after.predicted_seconds["training"] == before.predicted_seconds["training"]
    reason = after.decision("predicted_time").reason
    assert "base evaluation ~" in reason and "(180 decoding steps over 3 batches, measured in same)" in reason
    assert "384 decoding steps over 3 batches, measured in same" in reason
    assert ("answers up to 103 tokens, the training answers' longest, assumed for the base model too"
            in before.decision("predicted_time").reason)


def test_a_first_runs_evaluation_decodes_each_batch_until_its_longest_reference_answer_ends():
    """With no earlier run, every batch was given the training answers' longest (GSM8K's first 400 training samples:
    455 tokens, capped at eval.max_new_tokens 320, in every batch). A batch decodes until its own longest answer ends, and a trained model answers about as
    long as the evaluation's references: the plan now sums each batch's longest reference."""
    shape, source = find_shape("embedded:smollm2-135m-instruct")
    refs = [100] + [40] * 49 + [30] * 50 + [20] * 50  # 150 items in generation order: 3 batches of 50
    with_refs = _data().model_copy(update={"eval_answer_tokens": refs})

    def predicted(data, *overrides):
        plan = make_plan(load_recipe(UNIT, list(overrides)), _hardware(), shape, source, data=data)
        return plan, predict_for_plan(plan, shape)

    before_plan, before = predicted(_data())
    plan, after = predicted(with_refs)
    assert before.parts["eval_decode_steps"] == 3 * 103
    assert after.parts["eval_decode_steps"] == after.parts["base_eval_decode_steps"] == 100 + 30 + 20
    assert after.trained_eval < before.trained_eval and after.base_eval < before.base_eval
    assert after.training == before.training
    reason = plan.decision("predicted_time").reason
    assert "answers as long as the 150 references, 30 tokens on average" in reason
    assert "assumed for the base model too" in reason
    # eval.max_new_tokens caps each answer: the long one stops at 64.
    _, capped = predicted(with_refs, "eval.max_new_tokens=64")
    assert capped.parts["eval_decode_steps"] == 64 + 30 + 20
    # Fewer rows generate in the later steps of a batch whose answers end early: the same steps with every row
    # as long as the longest cost more.
    _, long_rows = predicted(_data().model_copy(update={"eval_answer_tokens": [100] * 50 + [30] * 50 + [20] * 50}))
    assert long_rows.parts["eval_decode_steps"] == after.parts["eval_decode_steps"]
    assert long_rows.trained_eval > after.trained_eval


def test_a_budget_shorter_than_the_training_says_what_it_will_see_and_what_fits():
    shape, source = find_shape("embedded:smollm2-135m-instruct")
    full = make_plan(load_recipe(UNIT, []), _hardware(), shape, source, data=_data())
    training = full.predicted_seconds["training"]
    budget = training / 4
    plan = make_plan(load_recipe(UNIT, [f"train.max_time={budget:.0f}s"]), _hardware(), shape, source, data=_data())
    decision = plan.decision("time_budget")
    assert decision.reason.startswith(f"warning: train.max_time={budget:.0f}s is shorter than the predicted training")
    assert "it will see about" in decision.reason and "of 3000 samples (25% of 3 epochs)" in decision.reason
    fits = decision.value["max_samples_that_fit"]
    assert f"data.max_samples={fits}" in decision.reason and 230 <= fits <= 260
    epochs = decision.value["epochs_that_fit"]
    assert f"train.epochs={epochs:g}" in decision.reason and 0.7 <= epochs <= 0.75  # a quarter of 3 epochs, steps rounding up
    # Following either advice: the budget now covers the predicted training.
    for advice, size in ((f"data.max_samples={fits}", fits), (f"train.epochs={epochs:g}", 1000)):
        followed = make_plan(load_recipe(UNIT, [f"train.max_time={budget:.0f}s", advice]), _hardware(), shape, source,
                             data=_data(size))
        assert followed.decision("time_budget").reason.startswith(f"train.max_time={budget:.0f}s covers the predicted training")


def test_a_budget_that_fits_a_few_hundredths_of_an_epoch_is_advised_not_searched_for_ever():
    """The search for the epochs that fit stepped by 3% rounded to hundredths: 0.03 x 0.97 rounds to 0.03 again, and
    `sftlaunch plan` hung on a short train.max_time over a large dataset."""
    shape, source = find_shape("embedded:smollm2-135m-instruct")
    plan = make_plan(load_recipe(UNIT, ["train.max_time=60s"]), _hardware(), shape, source, data=_data(20_000))
    advice = plan.decision("time_budget").value
    assert advice["epochs_that_fit"] <= 0.03 and advice["max_samples_that_fit"] < 20_000


def test_plan_on_a_profile_counts_the_data_without_the_machine(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("plan", str(UNIT), "--hardware", "t4-16gb", "--json")
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    decision = next(d for d in data["decisions"] if d["field"] == "predicted_time")
    assert data["predicted_seconds"]["training"] > 0 and "NVIDIA T4 datasheet" in decision["reason"]
    assert "fp16" in decision["reason"]  # a T4 trains in fp16: its fp16 rate is the one divided by


def test_a_fresh_final_evaluation_is_predicted_with_its_own_loading_and_a_plan_json_reproduces_it():
    """On one CPU process the final evaluation starts a fresh process that loads the trained model first (Plan.
    final_eval_fresh): its predicted seconds include that loading, and predict_for_plan, which the benchmarks use to
    re-derive a run's prediction from plan.json, gives the plan's own seconds."""
    from launcher.plan import Plan

    recipe = load_recipe(UNIT, [])
    shape, source = find_shape(recipe.model.name)
    fresh = make_plan(recipe, _hardware(), shape, source, data=_data())
    assert fresh.final_eval_fresh
    reload = 5.0 + shape.params * 2 / 1e9  # the trained model in bf16, as the plan's loading counts its weights
    assert "after a fresh process's loading ~5 s" in fresh.decision("predicted_time").reason
    again = Plan.model_validate_json(fresh.model_dump_json())
    assert predict_for_plan(again, shape).seconds() == fresh.predicted_seconds
    alone = predict_for_plan(again.model_copy(update={"final_eval_fresh": False}), shape).seconds()
    assert fresh.predicted_seconds["final_eval"] - alone["final_eval"] == pytest.approx(reload, abs=0.1)


def test_a_first_deepspeed_run_on_a_cpu_counts_building_deepspeeds_op_and_a_later_one_does_not(tmp_path, monkeypatch):
    """DeepSpeed's CPU process group builds its shared-memory op (two C++ files) the first time it starts with a
    deepspeed and torch install: that run's loading took 29.8 s against 5.0 s once built (2-core Xeon with AMX), and
    the plan had said 5.5 s for both."""
    from launcher.hardware import deepspeed_cpu_op_to_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    shape, source = find_shape("embedded:smollm2-135m-instruct")

    def plan(*overrides, hw=None):
        return make_plan(load_recipe(UNIT, list(overrides)), hw or _hardware(), shape, source, data=_data())

    first = plan("hardware.backend=deepspeed")
    assert deepspeed_cpu_op_to_build() == folder
    assert (f"(DeepSpeed builds its CPU shared-memory op first, once: ~25 s, in {folder})"
            in first.decision("predicted_time").reason)
    built_deepspeed_op(folder)
    later = plan("hardware.backend=deepspeed")
    assert first.predicted_seconds["loading"] - later.predicted_seconds["loading"] == pytest.approx(25, abs=0.1)
    assert "shared-memory op" not in later.decision("predicted_time").reason
    # Built for another virtual environment (its paths in the ninja file): built again for this one.
    built_deepspeed_op(folder, ninja="build shm.o: compile /elsewhere/venv/deepspeed/ops/csrc/cpu/comm/shm.cpp\n")
    assert deepspeed_cpu_op_to_build() == folder
    assert plan("hardware.backend=deepspeed").predicted_seconds["loading"] == first.predicted_seconds["loading"]
    # Built by a clone whose paths contain this install's (/tmp/ci/src/app/.venv/... holds /src/app/.venv/...):
    # a benchmark's DeepSpeed run after CI on the same machine loaded in 30.2 s against 5.5 predicted.
    built_deepspeed_op(folder)
    ours = (folder / "build.ninja").read_text()
    (folder / "build.ninja").write_text(ours.replace(" /", " /tmp/ci/"))
    assert deepspeed_cpu_op_to_build() == folder
    # Built with another compiler ($CXX then) or another Python's headers: ninja builds again.
    (folder / "build.ninja").write_text(ours.replace("cxx = ", "cxx = /usr/bin/other-"))
    assert deepspeed_cpu_op_to_build() == folder
    (folder / "build.ninja").write_text(ours.replace("-isystem /", "-isystem /elsewhere/python/").replace(
        "-isystem /elsewhere/python/", "-isystem /", 1))
    assert "/elsewhere/python/" in (folder / "build.ninja").read_text() and deepspeed_cpu_op_to_build() == folder
    (folder / "build.ninja").write_text(ours)
    assert deepspeed_cpu_op_to_build() is None
    # One CPU process never builds it; a profile's plan (another machine) does not look at this one's folders.
    assert "shared-memory op" not in plan().decision("predicted_time").reason
    profile = _hardware(name="cpu-2core")
    assert "shared-memory op" not in plan("hardware.backend=deepspeed", hw=profile).decision("predicted_time").reason


def test_a_chat_evaluation_without_metrics_is_predicted_without_generation():
    """The chat task without eval.metrics evaluates by held-out loss alone (it generates nothing): its evaluations
    were predicted with decoding steps they never take."""
    shape, source = find_shape("embedded:smollm2-135m-instruct")
    chat = ROOT / "recipes" / "chat.yaml"

    def predicted(*overrides):
        plan = make_plan(load_recipe(chat, list(overrides)), _hardware(), shape, source, data=_data())
        return plan, predict_for_plan(plan, shape)

    _, generating = predicted()
    plan, loss_only = predicted("eval.metrics=[]")
    assert generating.parts["eval_decode_steps"] > 0 and loss_only.parts["eval_decode_steps"] == 0
    assert loss_only.parts["base_eval_decode_steps"] == 0
    assert 0 < loss_only.trained_eval < generating.trained_eval and 0 < loss_only.base_eval < generating.base_eval
    assert "no generation (eval.metrics is empty): the held-out loss only" in plan.decision("predicted_time").reason
