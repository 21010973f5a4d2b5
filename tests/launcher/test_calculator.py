"""The calculator: exact, safe arithmetic, and its results forced into batched greedy decoding row by row."""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter

import pytest

from launcher import calculator as calc
from launcher import evaluate as ev
from launcher.tasks import gsm8k


def test_every_annotation_of_the_bundled_gsm8k_training_split_evaluates_to_the_value_written_after_it():
    rows = [json.loads(line) for line in (gsm8k.BUNDLED / "train.jsonl").read_text().splitlines()]
    annotations = [m for r in rows for m in re.findall(r"<<([^>]*)>>", r["answer"])]
    outcome = Counter()
    for a in annotations:
        expression, _, written = a.rpartition("=")
        result = calc.calculate(expression)
        if result.result is None:
            outcome[f"declined: {result.reason}"] += 1
        elif result.result == written:
            outcome["same text"] += 1
        else:  # the same number written otherwise: `<<8*18=144.00>>` (cents), `<<2*20*.01=.4>>`
            assert float(result.result) == float(written), a
            plain = written.rstrip("0").rstrip(".") if "." in written else written
            outcome["trailing zeros" if plain == result.result else "no leading zero" if "0" + written == result.result
                    else "both" if "0" + plain == result.result else a] += 1
    assert len(annotations) == 23716
    assert outcome == {"same text": 23049, "trailing zeros": 587, "no leading zero": 78, "both": 2}, outcome


@pytest.mark.parametrize("expression, result", [
    ("48/2", "24"), ("8*18", "144"), ("0.1+0.2", "0.3"), ("10/3", "3.33333"), ("100/7", "14.2857"), ("1/768", "0.00130208"), ("1234.5678*3", "3703.7034"), ("2/3", "0.666667"),
    ("-14+-8+1", "-21"), ("2-.5", "1.5"), ("(3+4)*2", "14"), ("2**10", "1024"), ("560//10", "56"), ("7//2", "3"),
    ("$1,000*5%", "50"), ("1,234+1", "1235"), ("7*0.3048", "2.1336"), ("5.", "5"), ("1/8", "0.125"),
])
def test_results_are_written_as_gsm8k_writes_them(expression, result):
    assert calc.calculate(expression) == calc.Calculation(result)


@pytest.mark.parametrize("expression, reason", [
    ("1/0", "division by zero"), ("9**9**9", "exponent"), ("10**400", "exponent"), ("2**0.5", "exponent"),
    ("10**12*10000", "beyond"), ("99999999*99999999", "beyond"), ("abc", "unexpected character 'a'"), ("\u0663+4", "unexpected character"),
    ("1e5", "unexpected character 'e'"), ("3-", "ends early"), ("(3", "unclosed"), ("3)", "unexpected ')'"),
    ("1" * 5000, "longer than"), ("(" * 40 + "1" + ")" * 40, "nested deeper"), ("-" * 40 + "1", "nested deeper"),
    ("", "empty"), ("1/3/10000000000", "too close to 0"), ("2 3", "unexpected '3'"),
])
def test_the_calculator_declines_what_it_cannot_answer_exactly_and_says_why(expression, reason):
    result = calc.calculate(expression)
    assert result.result is None and reason in result.reason


def test_fuzzed_hostile_expressions_never_raise_and_each_is_answered_within_a_millisecond_budget():
    rng = random.Random(0)
    alphabet = "0123456789+-*/().,$%= <>e\u0663\u00b2x^ " + "9" * 10
    expressions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(3000)]
    expressions += ["9**9**9**9", "10**400", "(" * 5000, "1/" * 60 + "1", "9" * 10_000, "<<1+<<2=", "<<3=>>",
                    "99999999*99999999*99999999", "1/3*" * 30 + "3", "0.1" * 40]
    worst = 0.0
    for e in expressions:
        calc.calculate.cache_clear()
        start = time.perf_counter()
        out = calc.calculate(e)
        pending = calc.pending("so <<" + e + "=")
        worst = max(worst, time.perf_counter() - start)
        assert out.result is None or re.fullmatch(r"-?\d+(\.\d+)?", out.result)
        assert pending is None or pending[1].endswith(">>")
    assert worst < 0.05  # seconds, on the slowest expression: the calculator never holds a row up


def test_pending_finishes_an_open_annotation_and_leaves_anything_else_to_the_model():
    assert calc.pending("so 48/2 = <<48/2=") == ("48/2", "24>>")
    assert calc.pending("<<48/2=2") == ("48/2", "4>>")  # the model's own first digit was right: finish it
    assert calc.pending("<<48/2=24>") == ("48/2", ">")
    assert calc.pending("<<48/2=3") is None  # the model wrote something else: its tokens stay
    assert calc.pending("<<48/2=24>>24") is None  # closed
    assert calc.pending("48/2=") is None  # no annotation opened
    assert calc.pending("<<48/2") is None  # no `=` yet
    assert calc.pending("<<1/0=") is None  # declined
    assert calc.pending("<<2+<<3=") == ("3", "3>>")  # nested: the innermost open one


def _calculator_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.models import load_tokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


def test_forcing_in_a_batch_gives_each_row_the_tokens_it_gets_alone(tiny_calculator_model, monkeypatch):
    from launcher.tasks.unit_conversion import generate as questions

    model, tok = _calculator_model(tiny_calculator_model)
    prompts = [f"Question: {e.question}\nAnswer:" for e in questions(40, 48, seed=5)[1]]
    kw = dict(max_new_tokens=48, device="cpu", calculator=True, stop_on_repetition=True)
    monkeypatch.setattr(ev, "DROP_FINISHED_EVERY", 4)  # rows leave batches while others are mid-annotation
    batched = ev.generations(model, tok, prompts, batch_size=8, **kw)
    used = [g for g in batched if g.calculator_calls]
    # Each row that used the calculator, and some that did not, generated alone (a batch of one).
    check = [i for i, g in enumerate(batched) if g.calculator_calls or i < 6]
    alone = [ev.generations(model, tok, [prompts[i]], batch_size=1, **kw)[0] for i in check]
    assert [batched[i] for i in check] == alone
    assert len(used) >= 4  # the tiny model often writes expressions the calculator declines (`10*4.4.4`)
    # Rows reached `=` at different steps: the forced spans start at different token positions.
    starts = {len(tok(g.marked.split(calc.MARK_OPEN)[0], add_special_tokens=False)["input_ids"]) for g in used}
    assert len(starts) >= 3
    # No chance missed: every annotation the model opened is answered by the calculator unless it declines.
    for g in batched:
        for expression in re.findall(r"<<([^=<>]*)=", g.marked):
            assert calc.calculate(expression).result is None or calc.MARK_OPEN in g.marked.split("<<" + expression + "=", 1)[1][:2]
    # Every marked span is the calculator's exact result of the expression just before it (cut short only where
    # max_new_tokens ends the generation).
    for g in used:
        spans = re.findall(r"<<([^=<>]*)=" + re.escape(calc.MARK_OPEN) + r"([^" + calc.MARK_CLOSE + r"]*)"
                           + re.escape(calc.MARK_CLOSE), g.marked)
        for expression, forced in spans:
            wanted = calc.calculate(expression).result + ">>"
            assert forced == wanted or (wanted.startswith(forced) and g.marked.endswith(calc.MARK_CLOSE)), g.marked
    plain = ev.generations(model, tok, prompts, batch_size=8, max_new_tokens=48, device="cpu")
    assert all(p.marked is None and p.calculator_calls == 0 for p in plain)
    assert sum(p.text != g.text for p, g in zip(plain, batched)) >= 1  # the calculator changed what was written
