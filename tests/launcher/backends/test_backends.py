import json
import sys
import typing
from pathlib import Path

from launcher.backends import BACKENDS
from launcher.backends.base import Rendezvous
from launcher.hardware import load_profile
from launcher.memory import find_shape
from launcher.plan import make_plan, runnable_here
from launcher.recipe import BACKEND_NAMES, HardwareSection, load_recipe
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "unit-conversion.yaml"


def test_registry_matches_the_schema():
    schema_names = set(typing.get_args(HardwareSection.model_fields["backend"].annotation)) - {"auto"}
    assert set(BACKENDS) == schema_names == set(BACKEND_NAMES)
    assert all(name == b.name for name, b in BACKENDS.items())


def _spec(backend, profile, tmp_path, *overrides, **build):
    recipe = load_recipe(RECIPE, [f"hardware.backend={backend}", *overrides])
    plan = make_plan(recipe, load_profile(profile), find_shape(recipe.model.name)[0])
    return plan, BACKENDS[backend].build(plan, tmp_path, **build)


def test_cpu_launch_spec(tmp_path):
    plan, spec = _spec("cpu", "cpu-2core", tmp_path)
    assert spec.argv == (sys.executable, "-m", "launcher.worker", str(tmp_path))
    assert spec.env["OMP_NUM_THREADS"] == "2" and spec.env["CUDA_VISIBLE_DEVICES"] == ""
    assert runnable_here(plan, load_profile("cpu-2core")) == []


def test_cpu_launch_bounds_onednns_primitive_cache_unless_the_user_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert _spec("cpu", "cpu-2core", tmp_path)[1].env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in _spec("cpu", "cpu-2core", tmp_path)[1].env  # the user's passes through


def test_cuda_launch_spec(tmp_path):
    plan, spec = _spec("cuda", "t4-16gb", tmp_path)
    assert spec.argv[-2:] == ("launcher.worker", str(tmp_path))
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert runnable_here(plan, load_profile("t4-16gb")) == []
    # Resumed on a machine without its GPU: the planner says so (backends no longer judge hardware).
    assert runnable_here(plan, load_profile("cpu-2core")) == [
        "the plan needs 1 CUDA GPU(s) per node, this node has 0 (start a new run here instead of resuming: hardware.backend=auto)"]


def test_mps_launch_spec(tmp_path):
    plan, spec = _spec("mps", "m2-16gb", tmp_path)
    assert spec.env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    high, low = float(spec.env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"]), float(spec.env["PYTORCH_MPS_LOW_WATERMARK_RATIO"])
    # torch's MPSAllocator refuses LOW > HIGH at the first allocation; its unified-memory default LOW is 1.4, so a
    # HIGH below 1.4 without a LOW crashed every MPS run at start-up.
    assert 0 < low <= high <= 2.0
    assert plan.precision == "fp32"


def test_mps_budget_is_the_metal_working_set_torch_multiplies_not_total_ram(tmp_path):
    plan, spec = _spec("mps", "m2-16gb", tmp_path)
    # torch allows HIGH x recommendedMaxWorkingSetSize (10.67 GiB on a 16 GB M2), so that is what the batch is sized for.
    assert plan.device_memory_gib == round(10.67 * float(spec.env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"]), 1)
    assert plan.memory_estimate_gib <= plan.device_memory_gib * plan.recipe.hardware.memory_fraction
    assert "recommended working set 10.67 GiB (recorded in profile m2-16gb)" in plan.decision("memory_estimate_gib").reason
    # A Mac whose working set was not reported: estimated from RAM, and the plan says so.
    hw = load_profile("m2-16gb").model_copy(update={"mps_working_set_gb": None, "name": "mac"})
    recipe = load_recipe(RECIPE, ["hardware.backend=mps"])
    unreported = make_plan(recipe, hw, find_shape(recipe.model.name)[0])
    assert unreported.device_memory_gib == 10.7
    assert "not reported: estimated as 67% of 16 GB RAM" in unreported.decision("memory_estimate_gib").reason


def _gpu(index, memory=16.0):
    from launcher.hardware import GpuInfo

    return GpuInfo(name="Tesla T4", memory_gb=memory, compute_capability=(7, 5), index=index, uuid=f"GPU-{index}aaa-{index}")


def test_cuda_keeps_the_gpu_the_user_chose_by_its_pci_index(tmp_path):
    from launcher.hardware import HardwareInfo

    # CUDA_VISIBLE_DEVICES=3 on a 4-GPU box: detection keeps GPU 3, and the worker must run there, not on GPU 0.
    hw = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(_gpu(3),))
    plan = make_plan(load_recipe(RECIPE, []), hw, find_shape("embedded:smollm2-135m-instruct")[0])
    spec = BACKENDS[plan.backend].build(plan, tmp_path)
    assert plan.backend == "cuda"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "3" and spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_deepspeed_pins_the_planned_gpus_and_gives_a_stopping_worker_time_to_checkpoint(tmp_path):
    from launcher.backends.deepspeed import STOP_GRACE_SECONDS
    from launcher.hardware import HardwareInfo

    hw = HardwareInfo(cpu_cores=8, ram_gb=64, cpu_bf16=False, gpus=(_gpu(2), _gpu(5)))
    plan = make_plan(load_recipe(RECIPE, []), hw, find_shape("embedded:smollm2-135m-instruct")[0])
    spec = BACKENDS[plan.backend].build(plan, tmp_path)
    assert plan.backend == "deepspeed" and plan.world_size == 2
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,5" and spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # torchrun SIGKILLs workers 30 s after passing on a SIGTERM unless told otherwise.
    assert int(spec.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == STOP_GRACE_SECONDS >= 120


def test_specs_are_argument_lists_not_shell_strings(tmp_path):
    weird = tmp_path / "dir; rm -rf ~"
    for name, profile in (("cpu", "cpu-2core"), ("cuda", "t4-16gb"), ("mps", "m2-16gb"), ("deepspeed", "a100-40gb-x8")):
        plan = make_plan(load_recipe(RECIPE, [f"hardware.backend={name}"]), load_profile(profile))
        spec = BACKENDS[name].build(plan, weird)
        assert str(weird) in spec.argv  # one argument, passed verbatim


def test_deepspeed_launch_spec_on_eight_gpus(tmp_path):
    plan, spec = _spec("deepspeed", "a100-40gb-x8", tmp_path, "train.effective_batch_size=64")
    argv = list(spec.argv)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=8" in argv and "--nnodes=1" in argv and "--node_rank=0" in argv
    assert argv[-3:] == ["-m", "launcher.worker", str(tmp_path)]  # not resuming: no --resume after the run dir
    assert "DS_ACCELERATOR" not in spec.env  # GPUs: DeepSpeed's CUDA accelerator
    ds = json.loads(spec.files["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == plan.zero_stage == 2
    # Batch sizes, clipping and precision are "auto": the Trainer fills them from the same plan.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto" and "offload_optimizer" not in ds["zero_optimization"]
    assert "hostfile" not in spec.files


def test_deepspeed_zero3_offload_config(tmp_path):
    _, spec = _spec("deepspeed", "a100-40gb-x8", tmp_path, "hardware.zero_stage=3", "hardware.offload=true")
    zero = json.loads(spec.files["ds_config.json"])["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_deepspeed_multi_node_spec_places_nodes_by_torchrun_rendezvous_without_a_hostfile(tmp_path):
    plan, spec = _spec("deepspeed", "h100-80gb-x8-2nodes", tmp_path, "train.effective_batch_size=64",
                       resume=True, rendezvous=Rendezvous(node_rank=1, master_addr="10.0.0.1", master_port=29511))
    # torchrun's flags first, then the worker exactly as one process is started: -m launcher.worker RUN_DIR --resume
    assert spec.argv == (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
                         "--master_addr=10.0.0.1", "--master_port=29511", "-m", "launcher.worker", str(tmp_path), "--resume")
    assert plan.world_size == 16
    assert list(spec.files) == ["ds_config.json"]  # torchrun never read a hostfile: none is written


def test_deepspeed_on_cpu_uses_gloo_and_the_cpu_accelerator(tmp_path):
    plan, spec = _spec("deepspeed", "cpu-2core", tmp_path)
    assert plan.device == "cpu" and plan.world_size == 2 and plan.threads == 1
    assert spec.env["DS_ACCELERATOR"] == "cpu" and "--nproc_per_node=2" in spec.argv
