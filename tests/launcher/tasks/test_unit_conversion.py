import math

import pytest

from launcher.tasks import unit_conversion as uc


def test_generator_is_deterministic_per_seed():
    a = uc.generate(200, 30, seed=7)
    b = uc.generate(200, 30, seed=7)
    c = uc.generate(200, 30, seed=8)
    assert a == b
    assert a != c


def test_train_and_heldout_never_share_a_question():
    train, evals = uc.generate(1000, 150, seed=0)
    # The same quantity and unit pair is the same question, whatever the phrasing.
    def key(ex):
        return ex.target.split(":")[0]  # "7 ft in m"
    assert not {key(e) for e in train} & {key(e) for e in evals}
    assert len(train) == 1000 and len(evals) == 150


def test_heldout_phrasings_never_appear_in_training():
    train, evals = uc.generate(1000, 150, seed=0)
    unseen = [e for e in evals if e.group == "unseen_phrasing"]
    assert len(unseen) == 50
    starts = {p.split("{")[0] for p in uc.HELDOUT_PHRASINGS if not p.startswith("{")}
    for ex in train:
        assert not any(ex.question.startswith(s) for s in starts), ex.question
        assert "is the same as how many" not in ex.question


def test_every_unit_pair_is_trained_about_equally_often():
    from collections import Counter

    train, _ = uc.generate(1000, 150, seed=0)
    conversions = [e for e in train if e.group == "train"]
    per_pair = Counter(" ".join(e.target.split(":")[0].split()[1:]) for e in conversions)  # "ft in m"
    assert len(conversions) == 875 and max(per_pair.values()) - min(per_pair.values()) <= 1
    # Every eighth item states one unit's fact on its own; the 125 of them cover all 34 units (not references).
    facts = Counter(e.target.split(" <answer>")[0] for e in train if e.group == "fact")  # "1 qt = 946.4 mL"
    assert sum(facts.values()) == 125 and len(facts) == 34 and set(facts.values()) == {3, 4}
    assert [e.group for e in train[:16]] == ["train"] * 7 + ["fact"] + ["train"] * 7 + ["fact"]


def test_each_unit_is_recalled_by_one_fact_against_its_dimension_reference():
    train, evals = uc.generate(1000, 150, seed=0)
    qt_to_tsp = uc._example("volume", 7, 2, 7, "Convert {q} {a} to {b}.", "reasoning", "x")
    assert qt_to_tsp.target == ("7 qt in tsp: 1 qt = 946.4 mL and 1 tsp = 4.929 mL, so 7 * 946.4 / 4.929 = 1344.05 "
                                "<answer>1344.05</answer>")
    in_to_ft = uc._example("length", 4, 5, 7, "Convert {q} {a} to {b}.", "reasoning", "x")
    assert in_to_ft.target == "7 in in ft: 1 m = 39.37 in and 1 m = 3.281 ft, so 7 / 39.37 * 3.281 = 0.583363 <answer>0.583363</answer>"
    to_reference = uc._example("volume", 7, 0, 7, "Convert {q} {a} to {b}.", "reasoning", "x", calculator=True)
    assert to_reference.target == "7 qt in mL: 1 qt = 946.4 mL, so 7 * 946.4 = <<7*946.4=6624.8>>6624.8 <answer>6624.8</answer>"
    facts = set()
    for ex in train + evals:
        if ex.group != "fact":
            assert uc.is_correct(uc.parse_answer(ex.target), ex.reference), ex.target
            statements = ex.target.split(": ", 1)[1].split(", so ")[0].split(" and ")
            assert 1 <= len(statements) <= 2 and all(float(x.split(" = ")[1].split()[0]) >= 1 for x in statements)
            facts.update(statements)
    assert len(facts) == 34  # one per unit, whichever the direction of the question


def test_error_kinds_tell_a_wrong_factor_from_a_wrong_product():
    ex = uc._example("volume", 2, 3, 7, "Convert {q} {a} to {b}.", "reasoning", "x")  # 7 tsp in tbsp
    assert ex.target.startswith("7 tsp in tbsp: 1 tsp = 4.929 mL and 1 tbsp = 14.79 mL, so 7 * 4.929 / 14.79 = 2.33286")
    kinds = {"7 tsp in tbsp: 1 tsp = 4.929 mL and 1 tbsp = 14.79 mL, so 7 * 4.929 / 14.79 = 2.33286 <answer>2.33286</answer>": "correct",
             "7 tsp in tbsp: 1 tsp = 4.929 mL and 1 tbsp = 14.79 mL, so 7 * 4.929 / 14.79 = 2.1 <answer>2.1</answer>": "wrong_product",
             "7 tsp in tbsp: 1 tbsp = 3 tsp, so 7 * 3 = 3.1 <answer>3.1</answer>": "wrong_product",  # a true fact, badly used
             "7 tsp in tbsp: 1 tsp = 4.929 mL and 1 tbsp = 17.79 mL, so 7 * 4.929 / 17.79 = 1.94 <answer>1.94</answer>": "wrong_factor",
             "7 tsp in tbsp: 1 tsp = 3 tbsp, so 7 * 3 = 21 <answer>21</answer>": "wrong_factor",  # the inverse
             "7 tsp in tbsp: 1 qt = 946.4 mL, so <answer>28</answer>": "wrong_factor",  # a true fact of other units
             "7 tsp in tbsp: 1 tsp = 4.929 m, so <answer>28</answer>": "wrong_factor",  # units of two dimensions
             "so <answer>28</answer>": "wrong_factor",  # no fact stated
             "7 tsp in tbsp: 1 tbsp = 3 tsp, so 7 / 3 = ": "no_answer"}
    records = [{"generated": g, "parsed": uc.parse_answer(g), "correct": uc.is_correct(uc.parse_answer(g), ex.reference)}
               for g in kinds]
    counts = uc.error_kinds([ex] * len(records), records)
    assert [r["error_kind"] for r in records] == list(kinds.values())
    assert counts == {"correct": 1, "no_answer": 1, "wrong_factor": 5, "wrong_product": 2, "wrong": 0}


def test_all_dimensions_are_covered():
    train, _ = uc.generate(1500, 100, seed=0)
    text = " ".join(e.question for e in train)
    for word in ("hours", "feet", "pounds", "gallons", "knots", "megabytes"):
        assert word in text


@pytest.mark.parametrize("question_units, factor", [
    (("yr", "d"), 365.2425),
    (("mo", "d"), 365.2425 / 12),
    (("KB", "B"), 1000.0),
    (("gal", "qt"), 4.0),
    (("ft", "m"), 0.3048),
])
def test_conversion_factors(question_units, factor):
    src, dst = question_units
    units = {u[0]: u[3] for dim in uc.UNITS.values() for u in dim}
    assert math.isclose(units[src] / units[dst], factor, rel_tol=1e-12)


def test_reasoning_target_states_factor_product_and_tag():
    text = uc.target_text(2.1336, "reasoning", q=7, a="ft", b="m")
    # The foot's fact against the metre (stated from the larger unit), the quotient by the calculator's rules, the tag.
    assert text == "7 ft in m: 1 m = 3.281 ft, so 7 / 3.281 = 2.1335 <answer>2.1335</answer>"
    assert uc.target_text(2.1336, "bare") == "<answer>2.134</answer>"
    # 4 significant digits for each fact; the product is exact for the written facts.
    assert uc.target_text(7 * 1.609344, "reasoning", q=7, a="mi", b="km") == \
        "7 mi in km: 1 mi = 1609 m and 1 km = 1000 m, so 7 * 1609 / 1000 = 11.263 <answer>11.263</answer>"
    assert uc.target_text(10 * 1000.0, "reasoning", q=10, a="KB", b="B").endswith("= 10000 <answer>10000</answer>")


@pytest.mark.parametrize("text, value", [
    ("so 7 * 0.3048 = 2.1336 <answer>2.1336</answer>", 2.1336),
    ("<answer> 42 </answer> trailing", 42.0),
    ("<answer>3.5", 3.5),                         # no closing tag: up to the end
    ("<answer>-12.5</answer>", -12.5),            # negative
    ("<answer>1e12</answer>", 1e12),              # huge
    ("<answer>1</answer><answer>2</answer>", 1.0),  # the first tag counts
    ("The answer is 5", None),                    # missing tag
    ("<answer>5 m</answer>", None),               # units inside the tag
    ("<answer></answer>", None),
    ("<answer>inf</answer>", None),               # not a finite number
    ("<answer>1,000</answer>", None),
])
def test_parse_answer(text, value):
    assert uc.parse_answer(text) == value


@pytest.mark.parametrize("pred, ref, ok", [
    (2.1336, 2.1336, True),
    (2.2, 2.1336, True),       # within 5%
    (2.3, 2.1336, False),      # 7.8% off
    (None, 1.0, False),
    (-12.5, -12.5, True),
    (1.0e12, 1.02e12, True),
    # A reference that is 0 at 3 decimals: 5% of it is nothing, so the answer must round to 0 too.
    (0.0, 0.0, True),
    (0.0004, 0.0001, True),
    (0.0006, 0.0, False),      # rounds to 0.001
    (-0.01, 0.0, False),
])
def test_is_correct(pred, ref, ok):
    assert uc.is_correct(pred, ref) is ok


def test_reference_from_answer():
    assert uc.reference_from_answer(3) == 3.0
    assert uc.reference_from_answer("2.5") == 2.5
    assert uc.reference_from_answer("x <answer>4</answer>") == 4.0
    with pytest.raises(ValueError):
        uc.reference_from_answer("many")
    with pytest.raises(ValueError):
        uc.reference_from_answer(True)
    for bad in (float("nan"), float("inf"), "-Infinity"):
        with pytest.raises(ValueError, match="NaN or infinity"):
            uc.reference_from_answer(bad)
