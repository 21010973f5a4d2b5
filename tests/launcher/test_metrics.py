"""Generation metrics of the chat task: each one on replies a user would recognise as right or wrong."""

import sys

import pytest

from launcher.chat_data import to_example
from launcher.errors import DataError
from launcher.evaluate import compare
from launcher.metrics import Metrics


def item(answer: str):
    return to_example("prompt_completion", {"prompt": "q", "completion": answer}, "d.jsonl:7")


def test_exact_and_contains_normalise_whitespace():
    m = Metrics(["exact", "contains"])
    assert m.one("exact", "  The  answer\nis 4 ", item("The answer is 4"))[0] is True
    assert m.one("exact", "The answer is 4.", item("The answer is 4"))[0] is False
    assert m.one("contains", "Well,  the answer is 4, surely", item("the answer is 4"))[0] is True
    assert m.one("contains", "", item("4"))[0] is False


def test_numeric_compares_last_numbers_within_rel_tol():
    exact = Metrics(["numeric"])
    assert exact.one("numeric", "so 3 * 2 = $1,000.", item("#### 1000"))[0] is True
    assert exact.one("numeric", "about 999.9", item("1000"))[0] is False
    assert exact.one("numeric", "no number", item("1000")) == (False, None)
    assert Metrics(["numeric"], rel_tol=1e-3).one("numeric", "about 999.9", item("1000"))[0] is True


def test_regex_compares_the_one_group_of_reply_and_reference():
    m = Metrics(["regex"], answer_regex=r"<answer>(.*?)</answer>")
    assert m.one("regex", "so <answer> 2.5 </answer>", item("x <answer>2.5</answer>")) == (True, "2.5")
    assert m.one("regex", "2.5", item("<answer>2.5</answer>")) == (False, None)
    with pytest.raises(DataError, match=r"d.jsonl:7: eval.answer_regex=.* does not match the reference .*Fix: change"):
        m.check_references([item("2.5 without tags")])


def test_numeric_refuses_a_reference_without_a_number_before_any_model_runs():
    with pytest.raises(DataError, match=r"d.jsonl:7: the reference .* has no number .*Fix: remove numeric"):
        Metrics(["numeric"]).check_references([item("no number here")])


@pytest.fixture
def judges(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def first_word(reply, reference, row):\n"
        "    assert row['messages'][-1]['content'] == reference\n"
        "    return reply.split()[:1] == reference.split()[:1]\n"
        "def broken(reply, reference, row):\n    raise ValueError('no verdict')\n"
        "def not_bool(reply, reference, row):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_judges", None)


def test_judge_is_imported_and_called_with_reply_reference_and_row(judges):
    m = Metrics(["judge"], judge="my_judges:first_word")
    assert m.one("judge", "Paris is the capital", item("Paris")) == (True, True)
    assert m.one("judge", "London", item("Paris")) == (False, False)


def test_a_judge_that_cannot_be_imported_raises_or_returns_no_bool_is_an_error_naming_it(judges):
    with pytest.raises(DataError, match=r"eval.judge=no_such_module:f: cannot import no_such_module .*Fix: make the module importable"):
        Metrics(["judge"], judge="no_such_module:f")
    with pytest.raises(DataError, match=r"eval.judge=my_judges:missing: my_judges has no function 'missing'"):
        Metrics(["judge"], judge="my_judges:missing")
    with pytest.raises(DataError, match=r"eval.judge=my_judges:broken raised ValueError: no verdict on d.jsonl:7. Fix:"):
        Metrics(["judge"], judge="my_judges:broken").one("judge", "x", item("y"))
    with pytest.raises(DataError, match=r"returned str .* on d.jsonl:7, not True or False. Fix: return a bool"):
        Metrics(["judge"], judge="my_judges:not_bool").one("judge", "x", item("y"))


def test_each_metric_gets_its_own_comparison_and_the_first_is_the_accuracy():
    m = Metrics(["contains", "exact"])
    items = [item(f"answer {i}") for i in range(12)]
    _, base = m.score(items, ["no"] * 12)
    _, trained = m.score(items, [f"the answer {i}" for i in range(12)])
    c = compare(base, trained)
    assert c["trained"]["accuracy"] == 1.0 and c["only_trained_correct"] == 12
    assert c["metrics"]["contains"]["trained_accuracy"] == 1.0 and c["metrics"]["contains"]["mcnemar_p_value"] == pytest.approx(2 / 2**12)
    assert c["metrics"]["exact"]["trained_accuracy"] == 0.0 and c["metrics"]["exact"]["mcnemar_p_value"] == 1.0
    assert c["metrics"]["exact"]["trained_ci95"][1] == pytest.approx(0.2425, abs=1e-4)  # Wilson, 0 of 12
