"""run(spec): the one place that starts processes. Any backend's LaunchSpec runs through here."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from backends.base import LaunchSpec


def run(spec: LaunchSpec, run_dir: Path) -> int:
    for rel, content in spec.files.items():
        target = Path(run_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    # An argument list, never a shell string: recipe values cannot inject shell syntax.
    proc = subprocess.Popen(list(spec.argv), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The worker got the same SIGINT from the terminal; give it time to stop cleanly.
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            return proc.wait()
