"""Build the Dockerfile's `cuda` target where no container registry is reachable, and run it without a GPU.

    sudo python benchmarks/cuda_image.py [--state /var/tmp/sftlaunch-cuda-image] [--torch-version 2.14.1]

A manual check (several minutes, several GB), not part of `make test`. As root it:
1. starts its own Docker engine (no bridge, no iptables) with its data under --state;
2. makes a Debian 12 base image with debootstrap (the default base, nvidia/cuda, cannot be pulled here; the
   CUDA runtime libraries come with PyTorch's CUDA wheels as nvidia-* packages, so the base needs none);
3. gathers torch (the CUDA build from the package index, --torch-version) and its dependencies with
   `pip download` into a folder served on 127.0.0.1 only for the build (PIP_FIND_LINKS build argument):
   they never become an image layer, and the image is the size a build from the index gives;
4. builds `--target cuda` through `sftlaunch docker build` and records the time and the image size;
5. runs `sftlaunch env` and `sftlaunch plan` in the image (no GPU here: none found, the CPU backend chosen)
   and a `--smoke` training of the tiny test model (tests/conftest.py) through `sftlaunch docker run`, then
   the same with model.quantize=4bit (the image's bitsandbytes, on its CPU backend).

It writes STATE/report.json and STATE/cuda_image.log and exits 1 if a step failed. The host's CA bundle
reaches pip inside the build only through the test base image (like tests/test_docker.py), never the
shipped Dockerfile.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_docker import CA_IN_BASE, HOST_CA, _ensure_tools, _mirror  # noqa: E402

BASE_TAG = "sftlaunch-cuda-base:bookworm"
IMAGE_TAG = "sftlaunch:cuda-local"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", default="/var/tmp/sftlaunch-cuda-image", help="engine data, logs and report.json")
    ap.add_argument("--torch-version", default=None,
                    help="torch release for the image (default: constraints.txt's pin); its CUDA wheel is fetched with pip")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: it starts a Docker engine and runs debootstrap", file=sys.stderr)
        return 2
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "cuda_image.log", "w", encoding="utf-8")
    report: dict = {"cpu": _cpu(), "steps": {}}

    def sh(*cmd, env=None, check=True, **kw) -> subprocess.CompletedProcess:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        r = subprocess.run(list(map(str, cmd)), env=env, text=True, capture_output=True, **kw)
        log.write(r.stdout + r.stderr + f"[exit {r.returncode}]\n")
        log.flush()
        if check and r.returncode:
            raise RuntimeError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed ({r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
        return r

    _ensure_tools()
    engine, dockerd = _start_engine(state)
    server = None
    try:
        env = {**os.environ, "DOCKER_HOST": engine}
        t0 = time.time()
        if sh("docker", "image", "inspect", BASE_TAG, env=env, check=False).returncode:
            rootfs = state / "rootfs"
            shutil.rmtree(rootfs, ignore_errors=True)
            sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", rootfs, _mirror())
            shutil.copy(HOST_CA, rootfs / CA_IN_BASE.lstrip("/"))  # this script's base only: pip reaches the index from here
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            sh("docker", "import", "-", BASE_TAG, stdin=tar.stdout, env=env)
            tar.wait()
            shutil.rmtree(rootfs, ignore_errors=True)
        report["steps"]["base_image"] = {"seconds": round(time.time() - t0)}

        torch_version = args.torch_version or next(
            line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
        wheels = state / "wheels"
        wheels.mkdir(exist_ok=True)
        t0 = time.time()
        sh(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", wheels, f"torch=={torch_version}")
        # The legacy builder (no BuildKit here) builds every stage before the target, so the cpu stage too: its
        # CPU torch wheel (the CPU index is unreachable here) is served beside the CUDA ones.
        for cpu_wheel in Path("/opt/wheels").glob("torch-*+cpu-cp311-*.whl"):
            shutil.copy(cpu_wheel, wheels)
        report["steps"]["download"] = {"seconds": round(time.time() - t0), "torch": torch_version,
                                       "wheels_bytes": sum(f.stat().st_size for f in wheels.glob("*.whl"))}
        server, url = _serve(wheels)

        context = Path(tempfile.mkdtemp(prefix="cuda-context-"))
        for name in ("Dockerfile", ".dockerignore", "constraints.txt", "pyproject.toml", "README.md", "launcher", "recipes", "docker"):
            src = ROOT / name
            (shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.whl")) if src.is_dir()
             else shutil.copy(src, context / name))
        t0 = time.time()
        sh(sys.executable, "-m", "launcher.cli", "docker", "build", "--target", "cuda", "--tag", IMAGE_TAG, "--context", context,
           "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_TAG}", "--build-arg", f"PIP_CERT={CA_IN_BASE}",
           "--build-arg", f"PIP_FIND_LINKS={url}", "--build-arg", f"TORCH_VERSION={torch_version}",
           "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple", env=env, cwd=ROOT,
           timeout=3600)
        size = json.loads(sh("docker", "image", "inspect", IMAGE_TAG, env=env).stdout)[0]["Size"]
        report["steps"]["build"] = {"seconds": round(time.time() - t0), "image_bytes": size,
                                    "image_gb": round(size / 1e9, 2)}
        shutil.rmtree(context, ignore_errors=True)

        inside = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE_TAG, "-c",
                    "import json, torch, bitsandbytes, deepspeed; print(json.dumps({'torch': torch.__version__, "
                    "'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(), "
                    "'bitsandbytes': bitsandbytes.__version__, 'deepspeed': deepspeed.__version__}))", env=env).stdout
        report["steps"]["versions"] = json.loads(inside.strip().splitlines()[-1])  # DeepSpeed logs a line before it
        if not report["steps"]["versions"]["torch_cuda"]:
            raise RuntimeError(f"the image's torch is not a CUDA build: {report['steps']['versions']}")
        out = sh("docker", "run", "--rm", "--network", "none", IMAGE_TAG, "env", env=env).stdout
        seen = json.loads(out)
        plan = json.loads(sh("docker", "run", "--rm", "--network", "none", IMAGE_TAG, "plan", "recipes/unit-conversion.yaml",
                             "--json", env=env).stdout)
        backend = plan["decisions"][0]
        report["steps"]["env"] = {"output": out, "gpus": seen["hardware"]["gpus"], "torch": seen["versions"]["torch"],
                                  "plan_backend": backend}
        if seen["hardware"]["gpus"] or plan["backend"] != "cpu":
            raise RuntimeError(f"without a GPU the image should find none and plan the CPU backend: {out}\n{backend}")

        from tests.conftest import build_tiny_model

        work = Path(tempfile.mkdtemp(prefix="cuda-smoke-"))
        tiny = build_tiny_model(work / "tiny")
        recipe = work / "tiny.yaml"
        recipe.write_text("model: {name: /models/tiny, lora: {rank: 4, alpha: 8}}\ndata: {train_size: 48, max_length: 96}\n"
                          "train: {max_steps: 4, effective_batch_size: 8, learning_rate: 1.0e-3, logging_steps: 1}\n"
                          "eval: {size: 12, batch_size: 6, max_new_tokens: 16}\n")
        t0 = time.time()
        r = sh(sys.executable, "-m", "launcher.cli", "docker", "run", recipe, "eval.limit=2", "--smoke", "--image", IMAGE_TAG,
               "--outputs", work / "outputs", "--hf-cache", work / "hf", "--mount", f"{tiny}:/models/tiny", "--network", "none",
               env=env, cwd=ROOT, timeout=1800)
        (run_dir,) = list((work / "outputs").iterdir())
        status = json.loads((run_dir / "run.json").read_text())["status"]
        report["steps"]["smoke"] = {"seconds": round(time.time() - t0), "status": status,
                                    "adapter_saved": (run_dir / "adapter" / "adapter_config.json").is_file(),
                                    "output_tail": r.stdout[-1500:]}
        # The image's bitsandbytes on its CPU backend: the 4-bit path runs in the image too.
        t0 = time.time()
        sh(sys.executable, "-m", "launcher.cli", "docker", "run", recipe, "eval.limit=2", "model.quantize=4bit", "--smoke",
           "--image", IMAGE_TAG, "--outputs", work / "outputs-qlora", "--hf-cache", work / "hf", "--mount",
           f"{tiny}:/models/tiny", "--network", "none", env=env, cwd=ROOT, timeout=1800)
        (qlora_dir,) = list((work / "outputs-qlora").iterdir())
        qlora_plan = json.loads((qlora_dir / "plan.json").read_text())
        report["steps"]["smoke_qlora"] = {"seconds": round(time.time() - t0), "quantize": qlora_plan["quantize"],
                                          "status": json.loads((qlora_dir / "run.json").read_text())["status"],
                                          "adapter_saved": (qlora_dir / "adapter" / "adapter_config.json").is_file()}
        report["ok"] = (status == "completed" and report["steps"]["smoke"]["adapter_saved"]
                        and report["steps"]["smoke_qlora"]["status"] == "completed" and qlora_plan["quantize"] == "4bit")
    except Exception as exc:  # the report says which step failed and why; the log has every command's output
        report["ok"] = False
        report["error"] = str(exc)
    finally:
        if server:
            server.shutdown()
        dockerd.send_signal(signal.SIGTERM)  # the engine this script started, by its PID
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
        (state / "report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _start_engine(state: Path) -> tuple[str, subprocess.Popen]:
    sock = state / "docker.sock"
    proc = subprocess.Popen(["dockerd", "--data-root", str(state / "data"), "--exec-root", str(state / "exec"),
                             "--pidfile", str(state / "dockerd.pid"), "-H", f"unix://{sock}", "--bridge=none",
                             "--iptables=false", "--ip-masq=false"],
                            stdout=open(state / "dockerd.log", "w"), stderr=subprocess.STDOUT)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    for _ in range(120):
        if subprocess.run(["docker", "info"], env=env, capture_output=True).returncode == 0:
            return f"unix://{sock}", proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("dockerd did not come up: " + (state / "dockerd.log").read_text()[-2000:])


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """The wheels folder over HTTP on loopback (a build with --network host reaches it) for the build only."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


if __name__ == "__main__":
    sys.exit(main())
