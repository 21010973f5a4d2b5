"""A real container test: our own Docker engine, a base image made with debootstrap, the cpu target built
from the shipped Dockerfile, then `sftlaunch plan` and a smoke training inside the container.

No registry can be reached here, so the base image is made locally (see the README, Docker). It runs
wherever the machine allows (root, Debian's apt reachable, a CPU torch wheel for the image on disk) and
says exactly why when it is skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

STATE = Path(os.environ.get("SFTLAUNCH_DOCKER_TEST_DIR", "/var/tmp/sftlaunch-docker-test"))
BASE_TAG = "sftlaunch-test-base:bookworm"
IMAGE_TAG = "sftlaunch:test-cpu"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
CA_IN_BASE = "/usr/local/share/host-ca.crt"  # only in the test's base image, never in the shipped Dockerfile


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a Docker engine and debootstrap a base image"
    if not shutil.which("apt-get"):
        return "needs apt-get to install docker.io and debootstrap"
    if not glob.glob("/opt/wheels/torch-*+cpu-cp311-*.whl"):
        return "no CPU torch wheel for the image in /opt/wheels (the CPU index is unreachable here)"
    return None


def _sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, text=True, capture_output=True, **kw)


def _ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")) if not shutil.which(tool)]
    if missing:
        _sh("apt-get", "update", "-q")
        _sh("apt-get", "install", "-y", "-q", *missing, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _mirror() -> str:
    sources = "\n".join(Path(p).read_text() for p in glob.glob("/etc/apt/sources.list*") + glob.glob("/etc/apt/sources.list.d/*")
                        if Path(p).is_file())
    m = re.search(r"(?:URIs:|deb)\s+(?:\[[^\]]*\]\s+)?(https?://\S+?/debian)/?\s", sources)
    return m.group(1) if m else "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def engine():
    reason = _why_not()
    if reason:
        pytest.skip(f"container test skipped: {reason}")
    _ensure_tools()
    STATE.mkdir(parents=True, exist_ok=True)
    sock = STATE / "docker.sock"
    log = open(STATE / "dockerd.log", "w")
    proc = subprocess.Popen(["dockerd", "--data-root", str(STATE / "data"), "--exec-root", str(STATE / "exec"),
                             "--pidfile", str(STATE / "dockerd.pid"), "-H", f"unix://{sock}", "--bridge=none",
                             "--iptables=false", "--ip-masq=false"], stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    try:
        for _ in range(120):
            if subprocess.run(["docker", "info"], env=env, capture_output=True).returncode == 0:
                break
            assert proc.poll() is None, (STATE / "dockerd.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            raise AssertionError("dockerd did not come up: " + (STATE / "dockerd.log").read_text()[-2000:])
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)  # the daemon this test started, by its PID
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def base_image(engine):
    if subprocess.run(["docker", "image", "inspect", BASE_TAG], env=engine, capture_output=True).returncode == 0:
        return BASE_TAG
    rootfs = STATE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    _sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs), _mirror())
    # The host's CA bundle lets pip inside the build reach the registry from this network (tests only).
    shutil.copy(HOST_CA, rootfs / CA_IN_BASE.lstrip("/"))
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _sh("docker", "import", "-", BASE_TAG, stdin=tar.stdout, env=engine)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_TAG


@pytest.fixture(scope="module")
def image(engine, base_image, tmp_path_factory):
    # A copy of the build context with the CPU torch wheel in docker/wheels/ (the CPU index is unreachable).
    context = tmp_path_factory.mktemp("context")
    for name in ("Dockerfile", ".dockerignore", "constraints.txt", "pyproject.toml", "README.md", "launcher", "recipes", "docker"):
        src = ROOT / name
        (shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.whl")) if src.is_dir()
         else shutil.copy(src, context / name))
    for wheel in glob.glob("/opt/wheels/torch-*+cpu-cp311-*.whl"):
        shutil.copy(wheel, context / "docker" / "wheels")
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "docker", "build", "--target", "cpu", "--tag", IMAGE_TAG,
                             "--context", str(context), "--network", "host", "--build-arg", f"BASE_IMAGE={base_image}",
                             "--build-arg", f"PIP_CERT={CA_IN_BASE}", "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"],
                            cwd=ROOT, env=engine, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    size = json.loads(_sh("docker", "image", "inspect", IMAGE_TAG, env=engine).stdout)[0]["Size"]
    (STATE / "last-build.json").write_text(json.dumps({"seconds": round(time.time() - start), "bytes": size}))
    return IMAGE_TAG


def test_image_is_non_root_with_sftlaunch_entrypoint(engine, image):
    info = json.loads(_sh("docker", "image", "inspect", image, env=engine).stdout)[0]["Config"]
    assert info["User"] == "1000" and info["WorkingDir"] == "/workspace" and info["Entrypoint"] == ["sftlaunch"]
    out = _sh("docker", "run", "--rm", "--network", "none", image, "--help", env=engine).stdout
    assert "Fine-tune a model (LoRA, or every weight" in out


def test_plan_inside_the_container(engine, image):
    out = _sh("docker", "run", "--rm", "--network", "none", image, "plan", "recipes/unit-conversion.yaml", "--json", env=engine).stdout
    plan = json.loads(out)
    assert plan["backend"] == "cpu" and plan["micro_batch_size"] * plan["gradient_accumulation_steps"] == 16


def test_smoke_training_in_the_container_lands_on_the_host(engine, image, tiny_model, tiny_recipe, tmp_path):
    outputs = tmp_path / "host-outputs"
    secret = "hf_container_SeCrEt_123"
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "docker", "run", str(tiny_recipe), "model.name=/models/tiny",
         "eval.limit=2", "--smoke", "--image", image, "--outputs", str(outputs), "--hf-cache", str(tmp_path / "hf"),
         "--mount", f"{tiny_model}:/models/tiny", "--network", "none"],
        cwd=ROOT, env={**engine, "HF_TOKEN": secret}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "(smoke run)" in result.stdout
    (run_dir,) = list(outputs.iterdir())
    assert run_dir.name.endswith("-smoke")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert run_dir.stat().st_uid == os.getuid()  # owned by the caller, not the image's user
    for f in run_dir.rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes()


def test_run_without_the_image_says_how_to_build_it(engine, tiny_recipe):
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "docker", "run", str(tiny_recipe), "--image", "sftlaunch:absent"],
                            cwd=ROOT, env=engine, capture_output=True, text=True)
    assert result.returncode == 2 and "sftlaunch docker build --tag sftlaunch:absent" in result.stderr
