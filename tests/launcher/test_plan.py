import pytest

from launcher.errors import PlanError
from launcher.hardware import GpuInfo, HardwareInfo
from launcher.memory import KNOWN_SHAPES, ModelShape
from launcher.plan import choose_precision, make_plan
from launcher.recipe import load_recipe
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "unit-conversion.yaml"

CPU_BF16 = HardwareInfo(cpu_cores=2, ram_gb=24, cpu_bf16=True)
CPU_OLD = HardwareInfo(cpu_cores=16, ram_gb=64, cpu_bf16=False)
T4 = HardwareInfo(cpu_cores=4, ram_gb=16, cpu_bf16=False, gpus=(GpuInfo(name="Tesla T4", memory_gb=15, compute_capability=(7, 5)),))
V100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="V100", memory_gb=16, compute_capability=(7, 0)),))
A100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="A100", memory_gb=40, compute_capability=(8, 0)),))
H100 = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(GpuInfo(name="H100", memory_gb=80, compute_capability=(9, 0)),))
M2 = HardwareInfo(cpu_cores=8, ram_gb=16, cpu_bf16=False, mps=True)
A100x8 = HardwareInfo(cpu_cores=96, ram_gb=1152, cpu_bf16=False, gpus=(A100.gpus[0],) * 8)


SMOL = ModelShape(*KNOWN_SHAPES["embedded:smollm2-135m-instruct"])
LLAMA8B = ModelShape(*KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"])


def plan_for(hw, *overrides, shape=SMOL):
    return make_plan(load_recipe(RECIPE, list(overrides)), hw, shape)


@pytest.mark.parametrize("hw, backend, precision", [
    (CPU_BF16, "cpu", "bf16"),
    (CPU_OLD, "cpu", "fp32"),
    (T4, "cuda", "fp16"),
    (V100, "cuda", "fp16"),
    (A100, "cuda", "bf16"),
    (H100, "cuda", "bf16"),
    (M2, "mps", "fp32"),
])
def test_precision_table(hw, backend, precision):
    plan = plan_for(hw)
    assert (plan.backend, plan.precision) == (backend, precision)
    assert plan.decision("precision").reason  # every choice says why


def test_fp16_reason_says_master_weights_stay_fp32():
    reason = plan_for(T4).decision("precision").reason
    assert "fp32" in reason and "loss scaler" in reason


@pytest.mark.parametrize("hw, precision, match", [
    (T4, "bf16", "hardware.precision=fp16"),
    (CPU_BF16, "fp16", "needs a CUDA GPU"),
    (M2, "bf16", "MPS"),
])
def test_impossible_precision_is_an_error_with_the_fix(hw, precision, match):
    with pytest.raises(PlanError, match=match):
        plan_for(hw, f"hardware.precision={precision}")


def test_explicit_precision_is_honoured_where_possible():
    assert plan_for(A100, "hardware.precision=fp32").precision == "fp32"
    plan = plan_for(CPU_OLD, "hardware.precision=bf16")
    assert plan.precision == "bf16" and "emulated" in plan.decision("precision").reason


@pytest.mark.parametrize("effective", [1, 6, 16, 24, 64, 96, 7])
def test_batch_layout_keeps_the_effective_batch(effective):
    for hw in (CPU_BF16, T4):
        plan = plan_for(hw, f"train.effective_batch_size={effective}")
        assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == effective
        assert plan.micro_batch_size & (plan.micro_batch_size - 1) == 0  # a power of two
        assert str(effective) in plan.decision("gradient_accumulation_steps").reason


def test_cpu_takes_the_whole_effective_batch_in_one_pass_when_small():
    plan = plan_for(CPU_BF16)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (16, 1)
    assert plan.threads == 2 and plan.gradient_checkpointing is False


def test_explicit_micro_batch_must_divide_the_effective_batch():
    assert plan_for(CPU_BF16, "hardware.micro_batch_size=4").gradient_accumulation_steps == 4
    with pytest.raises(PlanError, match="hardware.micro_batch_size=5"):
        plan_for(CPU_BF16, "hardware.micro_batch_size=5")


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(PlanError, match="no CUDA GPU"):
        plan_for(CPU_BF16, "hardware.backend=cuda")
    with pytest.raises(PlanError, match="not an Apple-silicon"):
        plan_for(T4, "hardware.backend=mps")
    assert plan_for(A100x8).backend == "deepspeed"
    assert plan_for(A100x8, "hardware.backend=cuda").backend == "cuda"
    with pytest.raises(PlanError, match="hardware.processes=2 needs hardware.backend=deepspeed"):
        plan_for(CPU_BF16, "hardware.processes=2")
    with pytest.raises(PlanError, match="not divisible by the 8 training processes"):
        plan_for(A100x8, "train.effective_batch_size=12")
    assert plan_for(T4, "hardware.backend=cpu").backend == "cpu"


def test_trust_remote_code_is_shown():
    assert plan_for(CPU_BF16).trust_remote_code is False
    assert plan_for(CPU_BF16, "model.trust_remote_code=true").decision("trust_remote_code").value is True


def test_plan_is_frozen_and_serialises():
    from launcher.plan import Plan

    from pydantic import ValidationError

    plan = plan_for(CPU_BF16)
    with pytest.raises(ValidationError, match="frozen"):
        plan.precision = "fp32"
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    summary = plan.summary()
    for key in ("backend", "precision", "world_size", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "decisions"):
        assert key in summary
    assert {"field", "value", "reason"} == set(summary["decisions"][0])


def test_choose_precision_depends_only_on_its_arguments_and_leaves_them_unchanged():
    before = A100.model_dump()
    first = choose_precision("auto", "cuda", A100)
    assert first[0] == "bf16" and "8.0" in first[1]
    assert choose_precision("auto", "cuda", T4)[0] == "fp16"  # a different GPU gives a different answer...
    assert choose_precision("auto", "cuda", A100) == first and A100.model_dump() == before  # ...the same one the same


A10G = HardwareInfo(cpu_cores=8, ram_gb=32, cpu_bf16=False, gpus=(GpuInfo(name="A10G", memory_gb=22, compute_capability=(8, 6)),))
A10Gx8 = HardwareInfo(cpu_cores=96, ram_gb=384, cpu_bf16=False, gpus=(A10G.gpus[0],) * 8)
T4x4 = HardwareInfo(cpu_cores=48, ram_gb=192, cpu_bf16=False, gpus=(T4.gpus[0],) * 4)
T4x2 = HardwareInfo(cpu_cores=24, ram_gb=96, cpu_bf16=False, gpus=(T4.gpus[0],) * 2)


def test_multi_gpu_plans_deepspeed_with_one_process_per_gpu():
    plan = plan_for(A100x8, "train.effective_batch_size=64")
    assert (plan.backend, plan.world_size, plan.processes_per_node, plan.zero_stage) == ("deepspeed", 8, 8, 2)
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * 8 == 64
    two_nodes = make_plan(load_recipe(RECIPE, ["train.effective_batch_size=64"]), A100x8.model_copy(update={"nodes": 2}), SMOL)
    assert (two_nodes.nodes, two_nodes.world_size) == (2, 16)
    assert plan_for(T4x4).precision == "fp16"  # the oldest GPU decides


def test_memory_planner_shrinks_the_micro_batch_for_long_samples():
    short = plan_for(A10G, "train.effective_batch_size=64", "data.max_length=128")
    long = plan_for(A10G, "train.effective_batch_size=64", "data.max_length=4096")
    assert long.micro_batch_size < short.micro_batch_size
    assert long.micro_batch_size * long.gradient_accumulation_steps == 64
    for p in (short, long):
        assert p.memory_estimate_gib <= 22 * 0.85
        assert "GiB" in p.decision("micro_batch_size").reason


def test_checkpointing_turns_on_only_when_needed():
    assert plan_for(A10G, "data.max_length=256").gradient_checkpointing is False
    plan = plan_for(A10G, "data.max_length=24576")
    assert plan.gradient_checkpointing is True and "even micro-batch 1" in plan.decision("gradient_checkpointing").reason


def test_evaluation_precision_follows_training_precision_and_says_why():
    plan = plan_for(A100)
    assert plan.precision == "bf16" and plan.eval_precision == "bf16"
    assert "copy of the weights" in plan.decision("eval_precision").reason
    assert plan_for(T4).eval_precision == "fp16"
    assert plan_for(M2).eval_precision == "fp32"


def test_checkpointing_chosen_for_a_usable_micro_batch_says_what_it_bought():
    # Qwen2.5-0.5B at 1024 tokens on a 16 GB Mac: micro-batch 2 fits without checkpointing, 32 with it (the
    # loss's logits are a chunk of positions at a time, so checkpointed activations are nearly all that grows).
    qwen = ModelShape(*KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"])
    plan = plan_for(M2, "data.max_length=1024", "train.effective_batch_size=32", shape=qwen)
    reason = plan.decision("gradient_checkpointing").reason
    assert plan.gradient_checkpointing is True and plan.micro_batch_size == 32
    assert "largest micro-batch that fits is 2" in reason and "with it 32" in reason
    assert "even micro-batch" not in reason


A10Gx2 = HardwareInfo(cpu_cores=16, ram_gb=128, cpu_bf16=False,
                      gpus=(GpuInfo(name="NVIDIA A10G", memory_gb=22, compute_capability=(8, 6)),) * 2)


def test_zero3_and_offload_when_the_model_does_not_fit_a_device():
    z = plan_for(A10Gx8, "train.effective_batch_size=64", "data.max_length=8192", shape=LLAMA8B)
    # 8B weights in bf16 (16 GB) plus the activations of an 8192-token sample exceed a 22 GB GPU at stage 2.
    assert z.backend == "deepspeed" and z.zero_stage == 3
    assert "stage 2 does not fit" in z.decision("zero_stage").reason
    # On two 22 GB A10Gs even ZeRO-3 (8 GB of weights each) plus an 8192-token sample does not fit: offload. (Two
    # 15 GB T4s would train it so too, but could not evaluate it: tests/launcher/test_eval_memory.py.)
    off = plan_for(A10Gx2, "train.effective_batch_size=64", "data.max_length=8192", shape=LLAMA8B)
    assert off.zero_stage == 3 and off.offload is True
    assert "even ZeRO-3 does not fit" in off.decision("offload").reason


def test_a_model_that_cannot_fit_is_an_error_naming_the_numbers():
    with pytest.raises(PlanError, match=r"does not fit: .*GiB.*data.max_length"):
        plan_for(T4, "data.max_length=1024", shape=LLAMA8B)


def test_without_a_model_shape_the_plan_says_memory_was_not_estimated():
    plan = plan_for(A10G, shape=None)
    assert plan.memory_estimate_gib is None and "not estimated" in plan.decision("micro_batch_size").reason


GSM8K_RECIPE = ROOT / "recipes" / "gsm8k.yaml"


def test_gsm8k_without_the_hub_uses_the_bundled_copy_and_says_so():
    from launcher.tasks.gsm8k import BUNDLED

    offline = CPU_OLD.model_copy(update={"hub_reachable": False})
    plan = make_plan(load_recipe(GSM8K_RECIPE), offline, SMOL)
    assert plan.data_path == str(BUNDLED)
    d = plan.decision("data_source")
    assert d.value == "bundled" and "not reachable" in d.reason and "MIT" in d.reason
    online = make_plan(load_recipe(GSM8K_RECIPE), CPU_OLD.model_copy(update={"hub_reachable": True}), SMOL)
    assert online.data_path is None and online.decision("data_source").value == "hub"
    # A local copy named by the recipe is used as it is: no decision to make.
    local = make_plan(load_recipe(GSM8K_RECIPE, ["data.path=/data/gsm8k"]), offline, SMOL)
    assert local.data_path == "/data/gsm8k" and "data_source" not in {x.field for x in local.decisions}


def test_another_hub_dataset_without_the_hub_is_refused_at_plan_time():
    offline = CPU_OLD.model_copy(update={"hub_reachable": False})
    with pytest.raises(PlanError, match="data.dataset=someone/gsm8k-variant: .*Fix: set data.path"):
        make_plan(load_recipe(GSM8K_RECIPE, ["data.dataset=someone/gsm8k-variant"]), offline, SMOL)


def test_eval_plan_ignores_training_only_constraints_on_eight_gpus():
    # Effective batch 12 over 8 GPUs cannot train (not divisible), but evaluating needs one process only.
    from launcher.plan import make_eval_plan

    with pytest.raises(PlanError, match="not divisible by the 8 training processes"):
        plan_for(A100x8, "train.effective_batch_size=12")
    plan = make_eval_plan(load_recipe(RECIPE, ["train.effective_batch_size=12"]), A100x8)
    assert (plan.device, plan.eval_precision, plan.threads) == ("cuda", "bf16", 96)
    assert "one process, on GPU 0" in next(d.reason for d in plan.decisions if d.field == "device")
    cpu = make_eval_plan(load_recipe(RECIPE, []), CPU_OLD)
    assert (cpu.device, cpu.eval_precision) == ("cpu", "fp32")


def test_sftlaunch_eval_merges_a_runs_adapter_and_says_what_it_costs():
    from launcher.plan import make_eval_plan

    def merge(hw, *overrides):
        plan = make_eval_plan(load_recipe(RECIPE, list(overrides)), hw, SMOL)
        return plan.eval_merge, next((d.reason for d in plan.decisions if d.field == "eval_merge"), None)

    # The run's base is loaded in fp32: a bf16 evaluation casts every weight into its copy, the merge writes there.
    assert merge(CPU_BF16)[0] and "costs no memory" in merge(CPU_BF16)[1]
    assert merge(CPU_OLD)[0] and "fp32 (0.40 GiB)" in merge(CPU_OLD)[1]  # 106.2M adapted weights x 4 bytes
    assert merge(CPU_BF16, "model.method=full") == (False, None)


def test_fp16_training_evaluates_qwen2_models_in_fp32():
    from launcher.memory import find_shape
    from launcher.plan import make_eval_plan

    # A T4 trains in fp16; Qwen2-family activations overflow fp16 in generation, so evaluation runs in fp32.
    from launcher.memory import find_shape as shape_of

    qwen = plan_for(T4, "model.name=Qwen/Qwen2.5-0.5B-Instruct", shape=shape_of("Qwen/Qwen2.5-0.5B-Instruct")[0])
    assert (qwen.precision, qwen.eval_precision) == ("fp16", "fp32")
    assert "transformers#33294" in qwen.decision("eval_precision").reason
    llama = plan_for(T4, "model.name=HuggingFaceTB/SmolLM2-135M-Instruct", shape=shape_of("HuggingFaceTB/SmolLM2-135M-Instruct")[0])
    assert (llama.precision, llama.eval_precision) == ("fp16", "fp16")
    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["model.name=Qwen/Qwen2.5-1.5B-Instruct"])
    assert make_eval_plan(recipe, T4, find_shape(recipe.model.name)[0]).eval_precision == "fp32"


def test_model_type_is_read_from_a_local_config(tmp_path):
    import json

    from launcher.memory import find_shape

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 400}))
    assert find_shape(str(tmp_path))[0].model_type == "qwen2"


def test_eight_gpu_processes_loading_fp32_weights_must_fit_host_ram():
    from launcher.memory import find_shape

    # 8 x A100-80GB with 128 GB of RAM: each of the 8 processes loads Qwen2.5-7B in fp32 (28.4 GiB) before it moves.
    box = HardwareInfo(cpu_cores=64, ram_gb=128, cpu_bf16=True,
                       gpus=(GpuInfo(name="A100-80GB", memory_gb=80, compute_capability=(8, 0)),) * 8)
    shape = find_shape("Qwen/Qwen2.5-7B-Instruct")[0]
    with pytest.raises(PlanError) as err:
        plan_for(box, "model.name=Qwen/Qwen2.5-7B-Instruct", "train.effective_batch_size=64", shape=shape)
    assert "needs 227.0 GiB of host RAM" in str(err.value) and "hardware.zero_stage=3" in str(err.value)
    # ZeRO-3 builds the model inside zero.Init: each process holds its shard, an eighth.
    plan = plan_for(box, "model.name=Qwen/Qwen2.5-7B-Instruct", "train.effective_batch_size=64", "hardware.zero_stage=3",
                    shape=shape)
    assert plan.decision("host_memory_gib").value == pytest.approx(28.37, abs=0.01)


def test_calculator_annotations_lengthen_the_default_max_length_so_no_gsm8k_solution_is_cut():
    from launcher import tasks  # noqa: F401

    plain = make_plan(load_recipe(GSM8K_RECIPE, ["data.calculator_annotations=false"]), CPU_OLD, SMOL)
    annotated = make_plan(load_recipe(GSM8K_RECIPE, ["data.calculator_annotations=true"]), CPU_OLD, SMOL)
    assert plain.max_length == 512 and annotated.max_length == 576
    assert "543 tokens" in annotated.decision("max_length").reason
    # A length the recipe sets is kept.
    assert make_plan(load_recipe(GSM8K_RECIPE, ["data.calculator_annotations=true", "data.max_length=600"]),
                     CPU_OLD, SMOL).max_length == 600


def test_lora_base_dtype_follows_native_mixed_precision_and_says_why():
    plan = plan_for(CPU_BF16)
    assert (plan.precision, plan.base_dtype) == ("bf16", "bf16")
    assert "2 bytes per frozen weight" in plan.decision("base_dtype").reason
    assert plan_for(A100).base_dtype == "bf16"
    assert plan_for(CPU_OLD).base_dtype == "fp32" and plan_for(M2).base_dtype == "fp32"
    t4 = plan_for(T4)  # fp16 autocast: an fp16 base only on request
    assert t4.base_dtype == "fp32" and "only on request" in t4.decision("base_dtype").reason
    assert plan_for(T4, "model.base_dtype=fp16").base_dtype == "fp16"
    assert plan_for(CPU_BF16, "model.base_dtype=fp32").base_dtype == "fp32"


def test_full_fine_tuning_keeps_an_fp32_base_whatever_the_hardware():
    for hw in (CPU_BF16, A100, T4):
        plan = plan_for(hw, "model.method=full")
        assert plan.base_dtype == "fp32" and "master weights" in plan.decision("base_dtype").reason


@pytest.mark.parametrize("hw, overrides, match", [
    (CPU_BF16, ["model.base_dtype=fp16"], r"model.base_dtype=fp16 needs fp16 mixed precision.*Fix: "),
    (CPU_OLD, ["model.base_dtype=bf16"], r"model.base_dtype=bf16 needs bf16 mixed precision, and the plan trains in fp32.*Fix: "),
    (A100x8, ["model.base_dtype=bf16"], r"model.base_dtype=bf16: DeepSpeed casts the module.*Fix: model.base_dtype=auto"),
])
def test_a_half_base_that_cannot_be_honoured_is_an_error_with_the_fix(hw, overrides, match):
    with pytest.raises(PlanError, match=match):
        plan_for(hw, *overrides)


def test_a_bf16_base_halves_the_weights_in_the_memory_estimate():
    bf16, fp32 = plan_for(CPU_BF16), plan_for(CPU_BF16, "model.base_dtype=fp32")
    assert "weights 0.25 " in bf16.decision("memory_estimate_gib").reason  # 134.5M x 2 bytes, no autocast copy
    assert "weights 0.75 " in fp32.decision("memory_estimate_gib").reason  # fp32 weights + autocast's bf16 copy
    assert bf16.memory_estimate_gib < fp32.memory_estimate_gib
    # Evaluation: generation shares the bf16 base (only the LoRA weights are cast), instead of a copy beside fp32.
    shared, copied = bf16.decision("eval_memory_gib"), fp32.decision("eval_memory_gib")
    assert "shares the bf16 base" in shared.reason and "training weights 0.25 " in shared.reason
    assert "evaluation weights 0.25" in copied.reason and shared.value < copied.value


def test_the_final_evaluation_merges_the_adapter_and_the_plan_counts_the_copy_where_the_base_is_shared():
    # On a GPU the process that trained evaluates: the merge writes into a copy where generation would share the base.
    bf16, fp32 = plan_for(A100), plan_for(A100, "model.base_dtype=fp32")
    assert bf16.decision("final_eval_process").value == "same" and not bf16.final_eval_fresh
    assert bf16.eval_merge and fp32.eval_merge and bf16.summary()["eval_merge"] is True
    # SmolLM2's decoder linear layers: 30 x (2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536) = 106.2M weights, in bf16.
    assert SMOL.lora_target_params("all-linear") == 106_168_320 == SMOL.linear_params
    assert "merged copy of the adapted weights 0.2 " in bf16.decision("eval_memory_gib").reason
    assert "0.20 GiB" in bf16.decision("eval_merge").reason
    # An fp32 base evaluated in bf16 is cast weight by weight anyway: the merge writes into that copy for free.
    assert "merged copy" not in fp32.decision("eval_memory_gib").reason
    assert "costs no memory" in fp32.decision("eval_merge").reason
    two = plan_for(A100, "model.lora.target_modules=[q_proj, v_proj]")
    assert "merged copy of the adapted weights 0.02 " in two.decision("eval_memory_gib").reason  # 30 x 442k x 2 B
    full = plan_for(A100, "model.method=full")
    assert not full.eval_merge and "eval_merge" not in [d.field for d in full.decisions]


def test_on_one_cpu_process_the_final_evaluation_runs_in_a_fresh_process_that_merges_in_place():
    plan = plan_for(CPU_BF16)
    assert plan.final_eval_fresh and plan.summary()["final_eval_fresh"] is True
    assert plan.decision("final_eval_process").value == "fresh"
    assert "training's freed heap" in plan.decision("final_eval_process").reason
    # The fresh process loads the trained model for the evaluation alone: merging the adapter there takes no copy.
    assert plan.eval_merge and "costs no memory (merged in place" in plan.decision("eval_merge").reason
    limit = plan.decision("eval_memory_gib")
    assert "merged copy" not in limit.reason and "the final one, in a fresh process" in limit.reason
    # Several processes, a GPU, or a 4-bit base: the evaluation stays in the process that trained, and says why.
    assert not plan_for(CPU_BF16, "hardware.backend=deepspeed").final_eval_fresh
    assert not plan_for(A100).final_eval_fresh
    qlora = plan_for(CPU_BF16, "model.quantize=4bit")
    assert not qlora.final_eval_fresh and "4-bit base" in qlora.decision("final_eval_process").reason


def test_an_adapter_stays_unmerged_for_evaluation_where_the_merged_copy_would_not_fit():
    # Llama-3.1-8B with a bf16 base on a 24 GB GPU: training fits (16 GB of weights, small micro-batches), a merged
    # copy of its 7B linear weights beside them does not; the evaluation then runs the unmerged adapter.
    a10g = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False,
                        gpus=(GpuInfo(name="A10G", memory_gb=24, compute_capability=(8, 6)),))
    plan = plan_for(a10g, "model.name=meta-llama/Llama-3.1-8B-Instruct", "eval.batch_size=4", shape=LLAMA8B)
    assert not plan.eval_merge
    assert "would not fit" in plan.decision("eval_merge").reason
    assert "merged copy" not in plan.decision("eval_memory_gib").reason


def test_loss_logits_at_trained_positions_where_the_model_and_backend_allow_it():
    plan = plan_for(CPU_BF16)
    assert plan.loss_logits == "trained" and "never held whole" in plan.decision("loss_logits").reason
    assert plan_for(CPU_BF16, "model.lora.target_modules=[q_proj, lm_head]").loss_logits == "all"
    gemma = ModelShape(*KNOWN_SHAPES["embedded:smollm2-135m-instruct"][:7], "gemma2")  # soft-capped logits
    assert plan_for(CPU_BF16, shape=gemma).loss_logits == "all"
    assert plan_for(CPU_BF16, shape=None).loss_logits == "all"
    z3 = plan_for(A10Gx8, "train.effective_batch_size=64", "data.max_length=8192", shape=LLAMA8B)
    assert z3.zero_stage == 3 and z3.loss_logits == "all" and "ZeRO-3" in z3.decision("loss_logits").reason


QWEN7B = ModelShape(*KNOWN_SHAPES["Qwen/Qwen2.5-7B"])


def gsm8k_7b(profile: str, *overrides):
    from launcher.hardware import load_profile

    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", ["model.name=Qwen/Qwen2.5-7B", *overrides])
    return make_plan(recipe, load_profile(profile), QWEN7B)


def test_7b_lora_with_a_bf16_base_fits_an_a10g_and_qlora_7b_fits_a_t4():
    lora = gsm8k_7b("a10g-24gb")
    assert (lora.backend, lora.base_dtype, lora.quantize) == ("cuda", "bf16", "none")
    assert lora.memory_estimate_gib <= 22.0 * 0.85
    t4 = gsm8k_7b("t4-16gb", "model.quantize=4bit")
    assert (t4.backend, t4.precision, t4.quantize, t4.eval_precision) == ("cuda", "fp16", "4bit", t4.base_dtype)
    assert t4.memory_estimate_gib <= 15.0 * 0.85
    assert "NF4 with double quantization" in t4.decision("quantize").reason
    # Without 4-bit the T4 cannot hold 7B (fp32 base; an fp16 base is refused for qwen2), and the refusal says so.
    with pytest.raises(PlanError, match=r"does not fit.*Fix: model.quantize=4bit"):
        gsm8k_7b("t4-16gb")


def test_4bit_counts_about_half_a_byte_per_linear_weight_and_keeps_the_rest_in_the_base_dtype():
    from launcher.memory import NF4_BYTES_PER_PARAM, GiB, estimate_memory

    common = dict(micro_batch=1, seq_len=512, precision="bf16", checkpointing=True, lora_rank=8, lora_targets="all-linear",
                  base_dtype="bf16")
    q = estimate_memory(QWEN7B, quantize="4bit", **common)
    bf16 = estimate_memory(QWEN7B, **common)
    embeddings = 2 * QWEN7B.vocab * QWEN7B.hidden  # input embeddings and the untied lm_head, 2 bytes each
    assert 0.515 < NF4_BYTES_PER_PARAM < 0.517
    assert q.weights / GiB == pytest.approx((QWEN7B.linear_params * NF4_BYTES_PER_PARAM + embeddings * 2) / GiB, abs=0.3)
    assert 4.5 < q.weights / GiB < 6 < 14 < bf16.weights / GiB
    assert (q.activations, q.lora_states) == (bf16.activations, bf16.lora_states)


@pytest.mark.parametrize("hw, overrides, match", [
    (A100x8, [], r"model.quantize=4bit: 4-bit QLoRA runs in one process, not under DeepSpeed.*Fix: hardware.backend=cuda"),
    (M2, [], r"model.quantize=4bit: 4-bit QLoRA has not been run on Apple silicon.*Fix: model.quantize=none"),
])
def test_4bit_where_it_cannot_run_is_an_error_with_the_fix(hw, overrides, match):
    with pytest.raises(PlanError, match=match):
        plan_for(hw, "model.quantize=4bit", *overrides)


def test_4bit_with_full_fine_tuning_is_refused_in_the_recipe():
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.quantize=4bit with model.method=full.*model.method=lora"):
        load_recipe(RECIPE, ["model.method=full", "model.quantize=4bit"])


def test_4bit_without_bitsandbytes_installed_names_the_extra(monkeypatch):
    import importlib.util

    from launcher.plan import runnable_here

    plan = plan_for(CPU_BF16, "model.quantize=4bit")
    assert plan.quantize == "4bit" and plan.backend == "cpu"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert runnable_here(plan, CPU_BF16) == [
        "model.quantize=4bit needs bitsandbytes, which is not installed here (pip install 'sftlaunch[qlora]')"]
    assert runnable_here(plan_for(CPU_BF16), CPU_BF16) == []


def test_qlora_is_evaluated_on_the_4bit_base_in_its_compute_dtype():
    plan = plan_for(CPU_BF16, "model.quantize=4bit")
    assert plan.eval_precision == plan.base_dtype == "bf16"
    assert "NF4 weights cannot be cast" in plan.decision("eval_precision").reason
    assert "generation runs on the 4-bit base" in plan.decision("eval_memory_gib").reason
    assert [d.field for d in plan_for(CPU_BF16).decisions].count("quantize") == 0  # no 4-bit, no line about it


def test_deepspeed_on_a_cpu_without_a_cpp_compiler_stops_before_starting_and_says_what_to_install(tmp_path, monkeypatch):
    """DeepSpeed's CPU process group builds its shared-memory op with a C++ compiler as it starts; with none, every
    rank died on "Error building extension 'deepspeed_shm_comm'" after the launch (a traceback per rank)."""
    from launcher.plan import runnable_here
    from tests.conftest import built_deepspeed_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    plan = plan_for(CPU_BF16, "hardware.backend=deepspeed")
    assert plan.backend == "deepspeed" and plan.device == "cpu"
    (problem,) = runnable_here(plan, CPU_BF16)
    assert problem.startswith("DeepSpeed on a CPU builds its shared-memory op (deepspeed_shm_comm) as the run starts, "
                              "with a C++ compiler, and none was found")
    assert "Fix: install one (apt-get install g++), or hardware.backend=cpu" in problem
    assert runnable_here(plan_for(CPU_BF16), CPU_BF16) == []  # one process builds nothing
    built_deepspeed_op(tmp_path / "deepspeed_shm_comm")  # built already: no compiler needed
    assert runnable_here(plan, CPU_BF16) == []


def test_the_training_peak_is_predicted_at_the_datas_longest_sample_and_the_fit_checked_at_data_max_length():
    """Micro-batches are padded to their longest sample, so a run's training peak comes from the data's longest, not
    from data.max_length: the chat recipe (max_length 256, its longest sample 185 tokens) was predicted at 7.22 GiB
    for training that peaked at 5.21 (benchmarks/time_estimate.py's chat case). The micro-batch is still fitted at
    data.max_length, the bound no sample exceeds."""
    from launcher.memory import CPU_RUNTIME_GIB, GiB, estimate_memory
    from launcher.timing import DataSize

    recipe = load_recipe(ROOT / "recipes" / "chat.yaml", [])
    data = DataSize(samples=573, tokens=60_978, trainable_tokens=26_630, answer_tokens_max=58, eval_items=32,
                    eval_prompt_tokens=53, eval_prompt_tokens_max=113, sample_tokens_max=185, source="test")
    plan = make_plan(recipe, CPU_BF16, SMOL, data=data)
    assert plan.max_length == 256 and plan.micro_batch_size == 16

    def at(tokens):
        return estimate_memory(SMOL, micro_batch=16, seq_len=tokens, precision=plan.precision,
                               checkpointing=plan.gradient_checkpointing, lora_rank=recipe.model.lora.rank,
                               lora_targets=recipe.model.lora.target_modules, device="cpu", base_dtype=plan.base_dtype,
                               trained_logits=plan.loss_logits == "trained").total / GiB

    assert plan.memory_estimate_gib == round(at(256), 2)
    assert plan.predicted_memory_gib["training"] == round(at(185) + CPU_RUNTIME_GIB, 2)
    assert at(256) - at(185) > 1.0  # the activations scale with the padded length: over a GiB here
    # A count kept by an older sftlaunch, without the longest sample: data.max_length, as before.
    older = make_plan(recipe, CPU_BF16, SMOL, data=data.model_copy(update={"sample_tokens_max": None}))
    assert older.predicted_memory_gib["training"] == round(at(256) + CPU_RUNTIME_GIB, 2)
    # The time model's start counts the first step's first touch of that peak (the first batch is the longest), in
    # the plan and in predict_for_plan (what benchmarks/time_estimate.py fits with) alike.
    from launcher.timing import CPU, predict_for_plan

    rates = CPU_BF16.model_copy(update={"matmul_tflops": {"fp32": 0.2, "bf16": 0.88}, "memory_bandwidth_gbs": 100,
                                        "elementwise_gops": {"fp32": 5.0, "bf16": 6.0}, "rates_source": "test"})
    timed = make_plan(load_recipe(ROOT / "recipes" / "chat.yaml", ["train.compile=false"]), rates, SMOL, data=data)
    prediction = predict_for_plan(timed, SMOL)
    assert prediction.parts["start_s"] == pytest.approx(CPU["start_seconds"] + CPU["first_touch_seconds_per_gib"] * at(185))
    assert timed.predicted_seconds["training"] == pytest.approx(prediction.training, abs=0.5)
