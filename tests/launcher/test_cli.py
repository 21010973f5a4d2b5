"""The `sftlaunch` command line as a user meets it (the real entry point, in a fresh process)."""

from tests.conftest import run_cli


def test_help_names_both_fine_tuning_methods_and_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    first = " ".join(result.stdout.split("\n\n")[1].split())  # the description, rewrapped by click
    assert first.startswith("Fine-tune a model (LoRA, or every weight with model.method=full) from a YAML recipe")
    for command in ("run", "plan", "resume", "eval", "export", "runs"):
        assert f"\n  {command} " in result.stdout
