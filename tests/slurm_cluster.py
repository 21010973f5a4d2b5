"""A real one-host SLURM cluster for tests: munged, slurmctld and slurmd on this machine, under a temp folder.

Debian's `slurm-wlm` (22.05) and `munge` are installed with apt-get when missing (root only). Every daemon is
started by this module and stopped by the pid it started; nothing is written outside the temp folder except
the packages. No library starts a throw-away SLURM cluster, so this is written out here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Seconds a job credential lives; SLURM also holds a requeued job this long (+1 s) before it may start again, so
# that the old start's revoked credential has expired (slurm.conf AuthInfo cred_expire; 120 by default).
CRED_EXPIRE = 10
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def why_not_available() -> str | None:
    """None when a cluster can be started here (installing the packages if needed), else the reason."""
    if all(_which(n) for n in DAEMONS):
        return None if os.geteuid() == 0 else "slurmd and munged must run as root here (this process is not root)"
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and installing them needs root (apt-get install slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()[-400:]}"
    missing = [n for n in DAEMONS if not _which(n)]
    return f"installed slurm-wlm and munge, but {', '.join(missing)} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        """The environment a SLURM client (sbatch, scontrol) needs to reach this cluster."""
        path = os.pathsep.join([os.path.dirname(_which("sbatch")), os.environ.get("PATH", "")])
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *args: str, timeout: int = 30, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {out.returncode}: {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, NodeList...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(part.split("=", 1) for part in text.split() if "=" in part)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(root: Path, timeout: float = 60) -> Cluster:
    """munged, slurmctld and slurmd (one node with this machine's cores, partition `debug`), ready for sbatch."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    munge_socket = root / "munge" / "munge.socket"
    cluster = Cluster(root)
    cluster.conf.write_text(f"""\
ClusterName=sftlaunch-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
KillWait=10
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    try:
        cluster.procs.append(subprocess.Popen(
            [_which("munged"), "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: munge_socket.exists(), 20, "munged's socket", cluster)
        daemon_env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
        for argv in ([_which("slurmctld"), "-D", "-i"], [_which("slurmd"), "-D", "-N", host]):
            cluster.procs.append(subprocess.Popen(argv, env=daemon_env, stdout=open(root / "log" / f"{Path(argv[0]).name}.out", "w"),
                                                  stderr=subprocess.STDOUT))
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle", timeout,
              "the node to be idle in sinfo", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(predicate, timeout: float, what: str, cluster: Cluster) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; logs in {cluster.root / 'log'}")
        try:
            if predicate():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    logs = {p.name: p.read_text()[-1500:] for p in (cluster.root / "log").iterdir()}
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs: {logs}")
