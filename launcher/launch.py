"""run(spec): the one place that starts processes. Any backend's LaunchSpec runs through here."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from launcher.backends.base import LaunchSpec


def run(spec: LaunchSpec, run_dir: Path) -> int:
    """Write the spec's files, start its command, forward SIGINT/SIGTERM once each, return the exit code."""
    for rel, content in spec.files.items():
        target = Path(run_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    # An argument list, never a shell string: recipe values cannot inject shell syntax. A session of its
    # own, so a terminal Ctrl-C reaches the workers once, through us, not twice (a second SIGINT aborts).
    proc = subprocess.Popen(list(spec.argv), env=env, start_new_session=True)

    def forward(signum, frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
