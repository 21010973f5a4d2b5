"""Static checks of the Dockerfile (the cuda target cannot be built here: no CUDA base image is reachable)."""

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, str]:
    """Stage name -> its instructions (the text up to the next FROM)."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)
    out = {}
    for part in parts[1:]:
        header, _, body = part.partition("\n")
        out[header.split()[-1]] = body
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(ROOT / ".venv" / "bin" / "hadolint"))
    result = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_default_target():
    stages = _stages()
    assert list(stages) == ["base", "cpu", "cuda"]  # cuda is last, so it is the default target
    assert re.search(r"^ARG BASE_IMAGE=\S+", DOCKERFILE, flags=re.M)  # overridable, declared before FROM
    assert DOCKERFILE.index("ARG BASE_IMAGE") < DOCKERFILE.index("FROM ")
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base", DOCKERFILE, flags=re.M)


def test_targets_install_with_the_constraints_and_run_as_non_root():
    stages = _stages()
    for name in ("cpu", "cuda"):
        body = stages[name]
        assert "-c /src/constraints.txt" in body and "constraints.txt" in body
        assert re.search(r"^USER 1000$", body, flags=re.M), name
    assert "deepspeed" in stages["cuda"] and "deepspeed" not in stages["cpu"]
    assert "+cpu" in stages["cpu"]  # the CPU build of torch, not PyPI's CUDA one
    base = stages["base"]
    assert 'ENTRYPOINT ["sftlaunch"]' in base and "WORKDIR /workspace" in base
    assert "useradd" in base and "python3 -m venv" in base


def test_no_host_secrets_or_certificates_are_baked_in():
    assert "ca-certificates.crt" not in DOCKERFILE and "HF_TOKEN=" not in DOCKERFILE
    assert re.search(r"^ARG PIP_CERT=$", DOCKERFILE, flags=re.M)  # empty unless a build passes one


def test_dockerignore_keeps_outputs_venvs_and_caches_out():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[0 if ignore[0] == "*" else 1] == "*"  # everything is excluded unless listed
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"constraints.txt", "pyproject.toml", "README.md", "launcher", "recipes", "docker/wheels"}


def test_a_container_run_as_the_callers_uid_has_a_writable_home(tmp_path):
    from launcher.docker_cmd import CONTAINER_HOME, RunRequest, container_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: x}\n")
    args = container_args(RunRequest(image="sftlaunch:cpu", recipe=recipe, user="4242:4242"))
    # uid 4242 is not in the image's /etc/passwd: without HOME, Docker gives it HOME=/, where nothing is writable.
    assert args["environment"]["HOME"] == CONTAINER_HOME == "/home/sft"
    assert "chmod 1777 /home/sft" in (ROOT / "Dockerfile").read_text()
