"""run(spec): writes the spec's files, starts its argument list with its environment, returns the exit code."""

import sys

from launcher.backends.base import LaunchSpec
from launcher.launch import run


def test_a_spec_runs_with_its_files_and_environment_and_its_exit_code_comes_back(tmp_path):
    script = ("import os, pathlib, sys; folder = pathlib.Path(sys.argv[1]); "
              "(folder / 'seen.txt').write_text('|'.join([(folder / 'sub' / 'cfg.json').read_text(), os.environ['SPEC_VAR'], sys.argv[2]])); "
              "sys.exit(7)")
    spec = LaunchSpec(argv=(sys.executable, "-c", script, str(tmp_path), "a b; echo injected"),
                      env={"SPEC_VAR": "from-spec"}, files={"sub/cfg.json": '{"stage": 2}'})
    assert run(spec, tmp_path) == 7
    # The file was written before the command started; an argument with shell syntax arrived as one argument.
    assert (tmp_path / "seen.txt").read_text() == '{"stage": 2}|from-spec|a b; echo injected'
