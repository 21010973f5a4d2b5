"""The one probe of the machine: detect() -> HardwareInfo, and hardware profiles for planning elsewhere.

Detection never imports torch or initialises CUDA: GPUs are read through nvidia-smi (as accelerate's
NVML-based check does), so the launcher can still spawn clean worker processes.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Annotated

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


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


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


def detect() -> HardwareInfo:
    """Probe this machine (no torch import, no CUDA initialisation)."""
    flags = _cpu_flags()
    mac_arm = platform.system() == "Darwin" and platform.machine() == "arm64"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HardwareInfo(
        cpu_cores=cores,
        ram_gb=round(_ram_gb(), 1),
        cpu_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
        gpus=_nvidia_gpus(),
        mps=mac_arm,
        mps_working_set_gb=_mps_working_set_gb() if mac_arm else None,
        hub_reachable=_hub_reachable(),
    )


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
