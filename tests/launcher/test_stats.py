"""McNemar's exact test and Wilson intervals against values computed by hand, and the comparison they feed."""

import pytest

from launcher.evaluate import compare, format_comparison
from launcher.stats import mcnemar_exact, verdict, wilson_interval


def test_mcnemar_exact_matches_the_binomial_tail():
    # 10 vs 2 discordant pairs: 2 x P(X <= 2), X ~ Bin(12, 1/2) = 2 x 79/4096.
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0  # capped at 1


def test_wilson_interval_known_values():
    assert wilson_interval(10, 100) == pytest.approx((0.0552, 0.1744), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # no zero-width interval at 0 successes
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)


def test_verdict_names_the_direction_only_when_significant():
    assert verdict(2, 10, 200, mcnemar_exact(2, 10)) == "trained better than base, p = 0.039 (n = 200)"
    assert verdict(10, 2, 200, mcnemar_exact(10, 2)).startswith("trained worse than base")
    assert verdict(4, 6, 200, mcnemar_exact(4, 6)) == "no significant difference at n = 200 (p = 0.754)"


def _records(correct):
    return [{"question": f"q{i}", "correct": c, "parsed": 1.0, "group": "all"} for i, c in enumerate(correct)]


def test_comparison_carries_p_value_intervals_and_verdict():
    # 20 items: both right on 3, only trained on 10, only base on 2, neither on 5.
    base = [True] * 3 + [False] * 10 + [True] * 2 + [False] * 5
    trained = [True] * 3 + [True] * 10 + [False] * 2 + [False] * 5
    c = compare(_records(base), _records(trained))
    assert (c["both_correct"], c["only_base_correct"], c["only_trained_correct"]) == (3, 2, 10)
    assert c["mcnemar_p_value"] == pytest.approx(0.0386, abs=5e-5)
    assert c["base_ci95"] == pytest.approx(list(wilson_interval(5, 20)))
    assert c["trained_ci95"] == pytest.approx(list(wilson_interval(13, 20)))
    assert c["verdict"] == "trained better than base, p = 0.039 (n = 20)"
    table = format_comparison(c)
    assert "McNemar exact p = 0.03857: trained better than base" in table
    assert "[0.112, 0.469]" in table  # the base's interval, as printed


def test_comparison_refuses_different_items():
    from launcher.errors import DataError

    with pytest.raises(DataError, match="not on the same items"):
        compare(_records([True, False]), _records([True]))
