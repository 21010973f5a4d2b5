"""`sftlaunch docker build|run`: the project's image through the docker Python SDK.

No engine, no permission, no image: each is a DockerError that says which, and the command that fixes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import SftlaunchError

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_WORKDIR = "/workspace"
CONTAINER_OUTPUTS = "/workspace/outputs"
CONTAINER_RECIPES = "/workspace/host-recipes"
CONTAINER_HOME = "/home/sft"  # writable by any uid (Dockerfile)
CONTAINER_HF_CACHE = "/home/sft/.cache/huggingface"
# Secrets passed through from the environment to the container, never written to a file or printed.
PASSTHROUGH_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


class DockerError(SftlaunchError):
    exit_code = 2


def client():
    """A connected docker client, or a DockerError naming what is missing."""
    try:
        import docker
    except ImportError:
        raise DockerError("the docker Python SDK is not installed. Fix: pip install docker") from None
    try:
        c = docker.from_env()
        c.ping()
        return c
    except docker.errors.DockerException as exc:
        text = str(exc)
        if "Permission denied" in text or "permission denied" in text:
            raise DockerError("the Docker engine refused this user (permission denied on its socket). Fix: "
                              "sudo usermod -aG docker $USER, then log in again (or run as root).") from None
        raise DockerError("no Docker engine is reachable"
                          + (f" at DOCKER_HOST={os.environ['DOCKER_HOST']}" if os.environ.get("DOCKER_HOST") else "")
                          + f" ({text.splitlines()[0][:160]}). Fix: start it (sudo systemctl start docker, or dockerd &) "
                          "and check DOCKER_HOST.") from None


def default_target(has_gpus: bool) -> str:
    return "cuda" if has_gpus else "cpu"


def build(*, target: str, tag: str, context: Path = ROOT, build_args: dict[str, str] | None = None,
          network: str | None = None, log=print) -> str:
    """Build one target of the Dockerfile, streaming the build log; returns the image id."""
    import docker

    c = client()
    try:
        stream = c.api.build(path=str(context), target=target, tag=tag, buildargs=build_args or {}, rm=True,
                             decode=True, network_mode=network)
        image_id = None
        for chunk in stream:
            if chunk.get("stream", "").strip():
                log(chunk["stream"].rstrip("\n"))
            if "error" in chunk:
                raise DockerError(f"docker build failed: {chunk['error'].strip()}")
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker.errors.APIError as exc:
        raise DockerError(f"docker build failed: {exc.explanation or exc}") from None
    return image_id or c.images.get(tag).id


@dataclass(frozen=True)
class RunRequest:
    image: str
    recipe: Path
    overrides: tuple[str, ...] = ()
    outputs: Path = Path("outputs")
    hf_cache: Path = Path.home() / ".cache" / "huggingface"
    gpus: bool = False
    smoke: bool = False
    mounts: tuple[tuple[str, str], ...] = ()  # (host path, container path), read-only
    shm_size: str = "8g"
    network: str | None = None  # e.g. "none" or "host"; default: the engine's default network
    user: str = field(default_factory=lambda: f"{os.getuid()}:{os.getgid()}")


def container_args(req: RunRequest) -> dict:
    """Arguments for containers.run: pure, so tests can check them without an engine."""
    from docker.types import DeviceRequest

    recipe = req.recipe.resolve()
    command = ["run", f"{CONTAINER_RECIPES}/{recipe.name}", *req.overrides, f"output.dir={CONTAINER_OUTPUTS}"]
    if req.smoke:
        command.append("--smoke")
    volumes = {
        str(recipe.parent): {"bind": CONTAINER_RECIPES, "mode": "ro"},
        str(req.outputs.resolve()): {"bind": CONTAINER_OUTPUTS, "mode": "rw"},
        str(req.hf_cache.resolve()): {"bind": CONTAINER_HF_CACHE, "mode": "rw"},
    }
    for host, inside in req.mounts:
        volumes[str(Path(host).resolve())] = {"bind": inside, "mode": "ro"}
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    # The container runs as the caller's uid so outputs are theirs; a uid the image's /etc/passwd lacks gets HOME=/,
    # where nothing is writable (~/.cache, ~/.triton, torch's extension builds): the image's writable home instead.
    env["HOME"] = CONTAINER_HOME
    args = {"image": req.image, "command": command, "volumes": volumes, "environment": env, "user": req.user,
            "working_dir": CONTAINER_WORKDIR, "detach": True}
    if req.network:
        args["network_mode"] = req.network
    if req.gpus:
        args["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        # Dataloaders and NCCL share memory through /dev/shm; the host's IPC namespace gives all of it.
        args["ipc_mode"] = "host"
    else:
        args["shm_size"] = req.shm_size
    return args


def run(req: RunRequest, log=print) -> int:
    """Start the container, stream its log, return its exit code. The run directory lands in req.outputs."""
    import docker

    c = client()
    try:
        c.images.get(req.image)
    except docker.errors.ImageNotFound:
        raise DockerError(f"no image {req.image}. Fix: sftlaunch docker build --tag {req.image}") from None
    req.outputs.mkdir(parents=True, exist_ok=True)
    req.hf_cache.mkdir(parents=True, exist_ok=True)
    container = c.containers.run(**container_args(req))
    try:
        for line in container.logs(stream=True, follow=True):
            log(line.decode("utf-8", "replace").rstrip("\n"))
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)
