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
    per_pair = Counter(" ".join(e.target.split(":")[0].split()[1:]) for e in train)  # "ft in m"
    assert max(per_pair.values()) - min(per_pair.values()) <= 1


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
    text = uc.target_text(2.1336, "reasoning", factor=0.3048, q=7, a="ft", b="m")
    assert text == "7 ft in m: 1 ft = 0.3048 m, so 7 * 0.3048 = 2.1336 <answer>2.1336</answer>"
    assert uc.target_text(2.1336, "bare") == "<answer>2.134</answer>"
    # 4 significant digits for the factor; the product is exact for the written factor.
    assert uc.target_text(7 * 1.609344, "reasoning", factor=1.609344, q=7, a="mi", b="km") == \
        "7 mi in km: 1 mi = 1.609 km, so 7 * 1.609 = 11.263 <answer>11.263</answer>"
    assert uc.target_text(10 * 1000.0, "reasoning", factor=1000.0, q=10, a="KB", b="B").endswith("= 10000 <answer>10000</answer>")


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
