"""The repository needs nothing beside it: no tracked file reads a path outside the clone."""

import re
import subprocess

from tests.conftest import ROOT

# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"ROOT\.parent", r"parents\[2\]", "/" + "work/"]))


def test_no_tracked_file_names_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "launcher/tasks/data/gsm8k/test.jsonl" in files  # the data the tests use ships inside
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in {".jsonl", ".json"} or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{n}: {line.strip()[:100]}")
    assert offenders == []
