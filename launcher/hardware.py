"""The one probe of the machine: detect() -> HardwareInfo, and hardware profiles for planning elsewhere.

Detection never imports torch or initialises CUDA: GPUs are read through nvidia-smi (as accelerate's
NVML-based check does), so the launcher can still spawn clean worker processes.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import ConfigError, Problem


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuInfo(_Frozen):
    name: str = Field(description="Device name as the driver reports it.")
    memory_gb: float = Field(gt=0, le=4096, allow_inf_nan=False, description="Total device memory in GiB.")
    compute_capability: tuple[Annotated[int, Field(ge=1, le=20)], Annotated[int, Field(ge=0, le=9)]] = Field(
        description="CUDA compute capability (major, minor).")
    index: int | None = Field(None, ge=0, description="nvidia-smi's index (PCI bus order); the workers are pinned to it.")
    uuid: str | None = Field(None, description="The driver's GPU UUID (GPU-...), as CUDA_VISIBLE_DEVICES may name it.")


class HardwareInfo(_Frozen):
    name: str = Field("detected", description="Profile name, or 'detected' for this machine.")
    cpu_cores: int = Field(ge=1, le=4096, description="CPU cores this process may use.")
    ram_gb: float = Field(gt=0, le=65536, allow_inf_nan=False, description="Total system memory in GiB.")
    cpu_bf16: bool = Field(description="The CPU has native bf16 instructions (avx512_bf16 / AMX).")
    gpus: tuple[GpuInfo, ...] = Field((), max_length=64, description="CUDA devices on this node.")
    mps: bool = Field(False, description="Apple-silicon GPU available through Metal (MPS).")
    mps_working_set_gb: float | None = Field(
        None, gt=0, le=65536, allow_inf_nan=False, description="Metal's recommendedMaxWorkingSetSize in GiB: what PyTorch's MPS watermark ratios "
                                "multiply (None: not reported; the planner then estimates it from RAM and says so).")
    nodes: int = Field(1, ge=1, le=4096, description="Nodes in the job (profiles of clusters).")
    hub_reachable: bool | None = Field(
        None, description="The Hugging Face Hub answered a connection (None: not probed, as for a profile)."
    )
    matmul_tflops: dict[Literal["fp32", "bf16", "fp16"], Annotated[float, Field(gt=0, le=100000, allow_inf_nan=False)]] | None = Field(
        None, description="Matrix-multiply rate per precision in TFLOP/s, of one device (CPU: all its cores): measured "
                          "on the detected machine, the datasheet's dense peak in a profile. The plan's time prediction "
                          "divides the run's FLOPs by it (None: time not predicted).")
    memory_bandwidth_gbs: float | None = Field(
        None, gt=0, le=100000, allow_inf_nan=False, description="Device memory bandwidth in GB/s (measured copy rate on the "
                                                                "detected machine, the datasheet's figure in a profile).")
    elementwise_gops: dict[Literal["fp32", "bf16", "fp16"], Annotated[float, Field(gt=0, le=100000, allow_inf_nan=False)]] | None = Field(
        None, description="CPU elementwise rate per precision in G elements/s (an MLP activation's SiLU x mul + add on "
                          "cache-sized tensors, all cores): measured on the detected machine, from a measured machine "
                          "in a CPU profile. A CPU plan's time prediction divides a step's elementwise work by it "
                          "(None: a CPU's time is not predicted; unused on GPUs, whose bandwidth sets that part).")
    rates_source: str | None = Field(None, description="Where matmul_tflops, memory_bandwidth_gbs and elementwise_gops come from.")


@functools.cache  # read once per process: the plan asks for the probe's target up to three times
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _mac_arm() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=False)
        return int(out.stdout.strip() or 0) / 2**30 or 1.0


def _nvidia_gpus() -> tuple[GpuInfo, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    query = ["--query-gpu=index,uuid,name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run([exe, *query], capture_output=True, text=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        # nvidia-smi present but failing means a broken driver: report no usable GPU rather than
        # guess; `sftlaunch env` shows the count so the user sees it.
        return ()
    gpus = []
    for line in out.stdout.strip().splitlines():
        index, uuid, name, mem_mib, cap = (part.strip() for part in line.split(","))
        major, minor = cap.split(".")
        gpus.append(GpuInfo(name=name, memory_gb=float(mem_mib) / 1024, compute_capability=(int(major), int(minor)),
                            index=int(index), uuid=uuid))
    return visible_gpus(tuple(gpus), os.environ.get("CUDA_VISIBLE_DEVICES"))


def visible_gpus(gpus: tuple[GpuInfo, ...], visible: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs CUDA_VISIBLE_DEVICES lets a process see, in its order.

    nvidia-smi lists GPUs in PCI bus order; the workers are started with CUDA_DEVICE_ORDER=PCI_BUS_ID so
    that an index means the same GPU to both (CUDA's own default order is fastest first). Entries are
    indices or GPU UUIDs (a unique prefix, as CUDA accepts); as in CUDA, a negative index ends the list
    ("-1" hides every GPU). An entry that names no GPU here is an error, never a silent CPU fallback.
    """
    if visible is None:
        return gpus
    chosen: list[GpuInfo] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry == "":
            continue
        if entry.lstrip("-").isdigit():
            if int(entry) < 0:
                break
            found = [g for g in gpus if g.index == int(entry)]
        else:
            found = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        if len(found) != 1:
            listed = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
            raise ConfigError([Problem("CUDA_VISIBLE_DEVICES", "names no single GPU of this machine" if not found else
                                       "matches several GPUs", f"use indices or GPU UUIDs from `nvidia-smi -L` (here: {listed}); "
                                       "MIG instances are not supported", got=entry)])
        chosen.append(found[0])
    return tuple(chosen)


MPS_PROBE = ("import torch; print(torch.mps.recommended_max_memory() if torch.backends.mps.is_available() else 0)")


def _mps_working_set_gb() -> float | None:
    """Metal's recommendedMaxWorkingSetSize, asked of torch in a child process (this one never imports torch)."""
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", MPS_PROBE], capture_output=True, text=True, timeout=60, check=True)
        size = int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None
    return round(size / 2**30, 2) if size > 0 else None


HUB_TIMEOUT_SECONDS = 3.0


def _hub_reachable() -> bool:
    """Whether the Hub can be reached: HF_HUB_OFFLINE says no, else one TCP connection to its endpoint."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=HUB_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


# The rate probe, run in a child process (the launcher never imports torch): the best of repeated square
# matrix products per precision on the device that will train (CPU: with as many threads as the plan gives one
# process), a copy of a large buffer for the memory bandwidth, and on a CPU the elementwise rate per precision (an
# MLP's copy, SiLU, mul and add over 2,048 tokens' activations, 6-12 MiB, in place: what a training step's norms,
# activations and casts run at; compute-bound on a CPU, not bound by the copy's bandwidth). About 0.7 s after torch's
# import (1.3-2 s on a 2-core EPYC).
RATE_PROBE = r"""
import json, sys, time, torch
sys.stdin.readline()  # measure on the word: a probe started early imports torch while its parent works, not the products
device, cores, precisions = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
torch.set_num_threads(cores)
# CPU: bf16 at 2048 (AMX tiles: the 135M model's products, 1540x576x1536 and the like, ran at 2.45-2.88 TFLOP/s on a
# 2-core Xeon where 1024x1024 squares ran at 1.41 and 2048 at 2.51), fp32 at 1024 (flat there: 0.35-0.38 at every
# size, and a 2048 product takes 50 ms).
sizes = {"cuda": {}, "mps": {}}.get(device, {"bf16": 2048, "fp16": 2048})
sync = {"cuda": getattr(torch.cuda, "synchronize", None), "mps": getattr(torch.mps, "synchronize", None)}.get(device) or (lambda: None)
def best(fn, seconds=0.12):
    fn(); sync()
    fastest, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter(); fn(); sync(); fastest = min(fastest, time.perf_counter() - t)
    return fastest
out = {}
for name in precisions:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    n = 4096 if device == "cuda" else sizes.get(name, 1024)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    out[name] = round(2 * n**3 / best(lambda: a @ b) / 1e12, 4)
big = torch.empty(64 * 2**20, device=device)  # 256 MiB: read once and written once per copy
dst = torch.empty_like(big)
bandwidth = round(2 * big.numel() * 4 / best(lambda: dst.copy_(big)) / 1e9, 1)
elementwise = {}
if device == "cpu":
    for name in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        a, b, y = (torch.full((2048, 1536), v, dtype=dtype) for v in (0.5, 1.5, 0.0))
        def mix():  # in place: a fresh output per operation measured glibc's page faults (0.14-5 G/s between probes)
            y.copy_(a); torch.nn.functional.silu(y, inplace=True); y.mul_(b); y.add_(a)
        elementwise[name] = round(4 * a.numel() / best(mix, 0.05) / 1e9, 2)
print(json.dumps({"matmul_tflops": out, "memory_bandwidth_gbs": bandwidth, "elementwise_gops": elementwise or None}))
"""


PROBE_VERSION = 2  # 2: the elementwise rate, and bf16/fp16 products at 2048 on a CPU


def _rates_cache(device: str, cores: int, precisions: list[str], identity: str) -> Path | None:
    """Where this machine's rates are cached (per machine, device, cores, precisions and torch version); None
    without torch."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from launcher.models import cache_dir

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        return None
    # PROBE_VERSION: a probe that measures more makes the older cached files stale.
    key = hashlib.sha256(f"{identity}|{device}|{cores}|{','.join(precisions)}|{torch_version}|{PROBE_VERSION}".encode()).hexdigest()[:16]
    return cache_dir() / f"rates-{key}.json"


def _probe_command(device: str, cores: int, precisions: list[str]) -> list[str]:
    import sys

    return [sys.executable, "-c", RATE_PROBE, device, str(cores), ",".join(precisions)]


# Rate probes started ahead of with_rates() (start_rate_probe), by cache file, waiting for the word to measure.
_STARTED: dict[Path, subprocess.Popen] = {}


def _probe_target(flags: frozenset[str], gpus: tuple[GpuInfo, ...], mac_arm: bool) -> tuple[str, list[str], str]:
    """(device, precisions, identity) the rate probe measures: the device that trains (the first GPU: the plan's
    processes each have one) in the precisions it may train in."""
    if gpus:
        return ("cuda", ["fp32", "fp16"] + (["bf16"] if gpus[0].compute_capability >= (8, 0) else []),
                f"{gpus[0].name}|{gpus[0].memory_gb}")
    if mac_arm:
        return "mps", ["fp32"], "mps"
    return ("cpu", ["fp32"] + (["bf16"] if flags & {"avx512_bf16", "amx_bf16"} else []),
            f"{_cpu_model()}|{' '.join(sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}")


def _probing() -> bool:
    return os.environ.get("SFTLAUNCH_RATE_PROBE", "1") != "0"


def _this_machine() -> tuple[str, int, list[str], Path | None]:
    """(device, cores, precisions, cache file) of this machine's rate probe, without detect()'s other probes."""
    device, precisions, identity = _probe_target(_cpu_flags(), _nvidia_gpus(), _mac_arm())
    cores = _cores()
    return device, cores, precisions, _rates_cache(device, cores, precisions, identity)


def _run_probe(device: str, cores: int, precisions: list[str]) -> dict:
    """The rate probe's figures, measured now in a child process (raises what running or parsing it raises)."""
    import json

    stdout = subprocess.run(_probe_command(device, cores, precisions), input="go\n", capture_output=True, text=True,
                            timeout=120, check=True).stdout
    return json.loads(stdout.strip().splitlines()[-1])


def start_rate_probe() -> None:
    """Start this machine's rate probe now, in the background, when with_rates() will need one (not cached), so that
    its child's torch import (1.3-2 s of its 2-2.5 s on a 2-core EPYC) overlaps what the caller does before
    with_rates(): reading the recipe, counting the data. The child then waits for with_rates() to say go before it
    measures, so the products do not share the cores with that work (they did: 0.44-0.6 TFLOP/s bf16 against 0.86-0.9
    measured alone). Best effort: any failure here leaves the probe to with_rates()."""
    if not _probing():
        return
    try:
        device, cores, precisions, cached = _this_machine()
        if cached is None or cached.is_file() or cached in _STARTED:
            return
        child = subprocess.Popen(_probe_command(device, cores, precisions), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except (OSError, ConfigError):
        return
    if not _STARTED:  # a plan that stops early (a recipe error) leaves no probe running behind it
        import atexit

        atexit.register(lambda: [waiting.kill() for waiting in _STARTED.values()])
    _STARTED[cached] = child


RATE_KEYS = ("matmul_tflops", "memory_bandwidth_gbs", "elementwise_gops")


def _rates(device: str, cores: int, precisions: list[str], identity: str) -> tuple[dict | None, str]:
    """({matmul_tflops, memory_bandwidth_gbs, elementwise_gops} or None, source) of this machine, probed once and
    cached per machine and torch version."""
    import json

    from launcher.models import store_in_cache

    cached = _rates_cache(device, cores, precisions, identity)
    if cached is None:
        return None, "torch is not installed: no rate probe"
    try:
        data = json.loads(cached.read_text())
        probes = data.get("probes", 1)
        return {k: data[k] for k in RATE_KEYS}, ("measured on this machine" + (f" (the best of {probes} probes)" if probes > 1 else "")
                                                 + f", cached in {cached}")
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    started = _STARTED.pop(cached, None)
    busy = _busy_cpus(cores) if device == "cpu" else None
    try:
        if started:
            stdout, stderr = started.communicate(input="go\n", timeout=120)
            if started.returncode:
                raise subprocess.CalledProcessError(started.returncode, started.args, stdout, stderr)
            data = json.loads(stdout.strip().splitlines()[-1])
        else:
            data = _run_probe(device, cores, precisions)
        data = {k: data[k] for k in RATE_KEYS}
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError) as exc:
        if started:
            started.kill()
        return None, f"the rate probe failed ({type(exc).__name__}): time not predicted"
    if busy:  # a probe that shared the cores measures the sharing: used once, never kept for later plans
        return data, (f"measured on this machine just now while its CPUs were busy ({busy}): the rates may be low and "
                      "the time over-predicted; not cached, so the next plan probes again")
    store_in_cache(cached, json.dumps({**data, "probes": 1}))
    return data, "measured on this machine just now"


# A probe reads low, never high (other work on the cores, a clock not yet up): a cached probe is measured again
# after each finished run until PROBES_KEPT probes have been taken, and the cache keeps each figure's best. Before,
# one low probe was cached for good (two probes cached on one machine read 0.11 and 0.33 TFLOP/s fp32; three taken
# by hand there read 0.39-0.42).
PROBES_KEPT = 3
QUIET_WAIT_SECONDS = 120  # how long the re-probe waits for the finished run's load to fade before giving up


def _merge_probes(old: dict, new: dict) -> dict:
    """Each figure's best of the cached probes and a new one, and how many probes that is."""
    merged = {"probes": old.get("probes", 1) + 1}
    for key in RATE_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            merged[key] = {p: max(a.get(p, 0.0), b.get(p, 0.0)) for p in {**a, **b}} or None
        else:
            merged[key] = max((v for v in (a, b) if v is not None), default=None)
    return merged


REFRESH_LOCK_SECONDS = 600  # a re-probe's lock older than this is from one that died


def _refresh_lock(cached: Path) -> Path:
    return cached.with_name(cached.name + ".refreshing")


def refresh_rates_later() -> None:
    """After a finished run: when this machine's cached probe has fewer than PROBES_KEPT probes, measure again in a
    detached child (nothing waits for it) once the run's load has faded, keeping each figure's best. Best effort."""
    import json
    import sys
    import time

    if not _probing():
        return
    try:
        cached = _this_machine()[3]
        if cached is None or json.loads(cached.read_text()).get("probes", 1) >= PROBES_KEPT:
            return
        lock = _refresh_lock(cached)
        if lock.is_file() and time.time() - lock.stat().st_mtime < REFRESH_LOCK_SECONDS:
            return  # one re-probe at a time (runs ending one after another each asked for one: 6 probes were kept)
        lock.write_text(str(os.getpid()))
        subprocess.Popen([sys.executable, "-c", "from launcher.hardware import _refresh_rates; _refresh_rates()"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except (OSError, ValueError, AttributeError, ConfigError):
        return


def _refresh_rates() -> bool:
    """The detached child of refresh_rates_later(): wait for quiet CPUs, probe, merge into the cache. True when a
    probe was merged."""
    import json
    import time

    from launcher.models import store_in_cache

    device, cores, precisions, cached = _this_machine()
    try:
        deadline = time.monotonic() + QUIET_WAIT_SECONDS
        while device == "cpu" and _busy_cpus(cores):
            if time.monotonic() > deadline:
                return False
            time.sleep(10)
        try:
            new = _run_probe(device, cores, precisions)
            old = json.loads(cached.read_text())
        except (subprocess.SubprocessError, OSError, ValueError, IndexError, AttributeError):
            return False
        store_in_cache(cached, json.dumps(_merge_probes(old, new)))
        return True
    finally:
        _refresh_lock(cached).unlink(missing_ok=True)


def _busy_cpus(cores: int) -> str | None:
    """Why the CPUs count as busy for the probe (other processes running on them), or None. The load average
    over the last minute above half the cores: on 2 cores a training run beside the plan gave 2-4, an idle machine
    below 0.5. Cached rates measured under such load were 2.2x low (0.063 against 0.14 TFLOP/s fp32) for good."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): nothing to judge by
        return None
    return f"load average {load:.1f} on {cores} cores" if load > cores / 2 else None


# DeepSpeed on a CPU (its CPU accelerator, Linux) builds its shared-memory collectives, the op deepspeed_shm_comm
# (two C++ files), with torch's JIT extension loader as its process group starts (deepspeed/comm/torch.py
# build_shm_op; ops/op_builder/cpu/comm.py ShareMemCommBuilder): in torch's extensions folder
# (torch/utils/cpp_extension.py _get_build_directory), once per machine and install, and again for another virtual
# environment or torch, whose paths and headers the build's ninja file records. Without a C++ compiler the build
# fails and every rank stops with "Error building extension 'deepspeed_shm_comm'".
DEEPSPEED_CPU_OP = "deepspeed_shm_comm"


def deepspeed_cpu_op_to_build() -> Path | None:
    """The folder where DeepSpeed's CPU shared-memory op will be built when a DeepSpeed run starts on this machine's
    CPU, or None when there is nothing to build: built there already for this deepspeed and torch, installed
    prebuilt (DS_BUILD_SHM_COMM), not Linux (DeepSpeed takes plain gloo there), or DeepSpeed or torch not installed.
    Read from files, without importing either (the plan never imports torch)."""
    import importlib.util
    import re
    import sys
    import sysconfig

    if sys.platform != "linux":
        return None
    ds, torch = importlib.util.find_spec("deepspeed"), importlib.util.find_spec("torch")
    if ds is None or torch is None or not ds.origin or not torch.origin:
        return None
    ds_dir, torch_dir = Path(ds.origin).parent, Path(torch.origin).parent

    def text(path: Path) -> str:
        try:
            return path.read_text()
        except OSError:
            return ""

    if re.search(rf"['\"]{DEEPSPEED_CPU_OP}['\"]\s*:\s*True", text(ds_dir / "git_version_info_installed.py")):
        return None
    version = text(torch_dir / "version.py")

    def field(name: str) -> str | None:
        m = re.search(rf"^{name}\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", version, re.M)
        return m.group(1) if m else None

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # torch's: $XDG_CACHE_HOME or ~/.cache (torch._appdirs.user_cache_dir), then python and build
        hip, cuda = field("hip"), field("cuda")
        accelerator = f"rocm{hip.replace('.', '')}" if hip else f"cu{cuda.replace('.', '')}" if cuda else "cpu"
        cache = os.path.realpath(os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "torch_extensions"))
        root = os.path.join(cache, f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accelerator}")
    folder = Path(root) / DEEPSPEED_CPU_OP
    source = ds_dir / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp"
    try:
        built = (folder / f"{DEEPSPEED_CPU_OP}.so").stat().st_mtime
        newest_input = max(source.stat().st_mtime, (torch_dir / "version.py").stat().st_mtime)
    except OSError:
        return folder
    # Ninja builds again when a command changed: compare the parts of the command torch's JIT loader would write now
    # that can differ on one machine (torch/utils/cpp_extension.py: _write_ninja_file_to_build_library's sources, its
    # torch and Python.h include folders from sysconfig, get_cxx_compiler's $CXX or c++). Each path whole: compared
    # as substrings, a build from a clone at /tmp/x/src/app (whose paths contain /src/app's) passed for this one's.
    # Seen once: after another checkout's tests had built the op on this machine, a DeepSpeed run loaded in 30.2 s
    # against 5.5 predicted, building it again.
    commands = text(folder / "build.ninja")

    def has(path) -> bool:
        return re.search(rf"(?:^|\s){re.escape(str(path))}(?:\s|$)", commands, re.M) is not None

    python_include = sysconfig.get_path("include", scheme="posix_prefix")
    compiler = re.search(r"^cxx\s*=\s*(\S+)\s*$", commands, re.M)
    same = (has(source) and has(torch_dir / "include") and (python_include is None or has(python_include))
            and compiler is not None and compiler.group(1) == os.environ.get("CXX", "c++"))
    return None if same and built >= newest_input else folder


def cxx_compiler() -> str | None:
    """The C++ compiler torch's JIT extensions build with ($CXX, else c++: torch/utils/cpp_extension.py), if found."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect(probe_rates: bool = True) -> HardwareInfo:
    """Probe this machine (no torch import, no CUDA initialisation; the rate probe runs in a child process)."""
    flags = _cpu_flags()
    mac_arm = _mac_arm()
    cores = _cores()
    gpus = _nvidia_gpus()
    cpu_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    hw = HardwareInfo(
        cpu_cores=cores,
        ram_gb=round(_ram_gb(), 1),
        cpu_bf16=cpu_bf16,
        gpus=gpus,
        mps=mac_arm,
        mps_working_set_gb=_mps_working_set_gb() if mac_arm else None,
        hub_reachable=_hub_reachable(),
    )
    return with_rates(hw) if probe_rates else hw


def with_rates(hw: HardwareInfo) -> HardwareInfo:
    """The detected machine with its measured rates (cached, else probed: a probe start_rate_probe started is
    waited for); unchanged with SFTLAUNCH_RATE_PROBE=0."""
    if not _probing():
        return hw
    device, precisions, identity = _probe_target(_cpu_flags(), hw.gpus, hw.mps)
    rates, source = _rates(device, hw.cpu_cores, precisions, identity)
    return hw.model_copy(update={**(rates or dict.fromkeys(RATE_KEYS)), "rates_source": source})


def profile_names() -> list[str]:
    folder = resources.files("launcher") / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> HardwareInfo:
    """A hardware profile: a YAML file, or the name of one shipped in launcher/profiles/."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        source, label = path, str(path)
    else:
        source = resources.files("launcher") / "profiles" / f"{name_or_path}.yaml"
        label = name_or_path
        if not source.is_file():
            raise ConfigError([Problem("--hardware", "no such hardware profile", f"use a YAML file or one of: {', '.join(profile_names())}", got=name_or_path)])
    try:
        text = source.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError([Problem("--hardware", "the profile is not UTF-8 text", "pass a YAML file (see "
                                   "launcher/profiles/cpu-2core.yaml)", got=label)]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([Problem("--hardware", f"cannot read profile: {exc}", "check the file")]) from None
    from launcher.recipe import yaml_key_lines  # one duplicate-key rule for recipes and profiles

    duplicates: list[Problem] = []
    yaml_key_lines(text, duplicates, label)
    if duplicates:
        raise ConfigError(duplicates)
    if not isinstance(data, dict):
        raise ConfigError([Problem("--hardware", "a profile must be a mapping", "see launcher/profiles/cpu-2core.yaml")])
    data.setdefault("name", label)
    try:
        return HardwareInfo.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([Problem(f"{label}:{'.'.join(map(str, e['loc']))}", e["msg"], "see launcher/profiles/cpu-2core.yaml", got=e.get("input")) for e in exc.errors()]) from None
