"""User-facing errors: one message naming the key, the bad value and the fix; problems merged and capped."""

from launcher.errors import MAX_PROBLEMS_SHOWN, ConfigError, Problem


def test_a_problem_names_key_place_value_and_fix():
    text = Problem("train.lr", "unknown key", "use train.learning_rate", got=0.1, where="r.yaml:7").render()
    assert text == "train.lr [r.yaml:7]: unknown key (got 0.1). Fix: use train.learning_rate"


def test_two_problems_with_one_key_become_one_line_with_both_messages():
    error = ConfigError([Problem("data.path", "no such file", "check it"), Problem("data.path", "not JSONL", "convert it"),
                         Problem("data.path", "no such file", "check it")])
    assert str(error) == "1 problem in the configuration:\n  - data.path: no such file; or not JSONL. Fix: check it"
    assert error.exit_code == 2


def test_a_flood_of_problems_is_capped_and_a_huge_value_is_shortened():
    error = ConfigError([Problem(f"k{i}", "unknown key", "remove it", got=list(range(10**6))) for i in range(MAX_PROBLEMS_SHOWN + 5)])
    lines = str(error).splitlines()
    assert lines[0] == f"{MAX_PROBLEMS_SHOWN + 5} problems in the configuration:"
    assert len(lines) == 1 + MAX_PROBLEMS_SHOWN + 1 and lines[-1] == "  ... and 5 more (fix these first)"
    assert len(lines[1]) < 200  # the million-item list is shown as its first few items
