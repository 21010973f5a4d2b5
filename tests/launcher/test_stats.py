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


def test_wilcoxon_exact_p_matches_the_published_value_for_darwins_zea_mays_data():
    # Darwin's paired plant heights (Fisher 1935), the example of scipy.stats.wilcoxon's documentation:
    # W- = 24 (ranks of -48 and -67: 10 + 14), two-sided exact p = 0.041259765625 (= 1352 / 2^15).
    from launcher.stats import wilcoxon_signed_rank

    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    w_plus, p = wilcoxon_signed_rank(d)
    assert w_plus == 120 - 24
    assert p == pytest.approx(0.041259765625, abs=1e-12)
    assert wilcoxon_signed_rank([-x for x in d])[1] == p  # two-sided


def test_wilcoxon_exact_small_cases_computed_by_hand():
    from launcher.stats import wilcoxon_signed_rank

    # n = 5, all positive: only 1 of 32 sign patterns is as extreme on each side: p = 2/32.
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5])[1] == pytest.approx(2 / 32)
    # Zeros are dropped (scipy's zero_method='wilcox'): the same as n = 5.
    assert wilcoxon_signed_rank([0, 1, 2, 0, 3, 4, 5])[1] == pytest.approx(2 / 32)
    # n = 4, W+ = 1 + 2 = 3 (ranks of 0.1, 0.2), W- = 7: P(W+ <= 3) = #{sums <= 3} / 16 = 5/16 -> p = 10/16.
    assert wilcoxon_signed_rank([0.1, 0.2, -0.3, -0.4])[1] == pytest.approx(10 / 16)
    assert wilcoxon_signed_rank([0.0, 0.0]) == (0.0, 1.0)


def test_wilcoxon_normal_approximation_with_ties_agrees_with_a_hand_computation():
    import math

    from launcher.stats import wilcoxon_signed_rank

    # Ties -> the normal approximation. |d| = 1,1,2,2,2,3: ranks 1.5,1.5,4,4,4,6; positive: 1, 2, 2, 3 -> W+ =
    # 1.5 + 4 + 4 + 6 = 15.5. Mean 10.5; var = 6*7*13/24 - ((2^3-2) + (3^3-3))/48 = 22.75 - 0.625 = 22.125;
    # z = (5 - 0.5) / sqrt(22.125) = 0.9567; p = erfc(z / sqrt 2) = 0.3387.
    w_plus, p = wilcoxon_signed_rank([1, -1, 2, 2, -2, 3])
    assert w_plus == 15.5
    assert p == pytest.approx(math.erfc((4.5 / math.sqrt(22.125)) / math.sqrt(2)), rel=1e-12)
    assert p == pytest.approx(0.3387, abs=1e-4)


def test_wilcoxon_normal_approximation_is_close_to_the_exact_p_at_the_switch():
    from launcher import stats

    # 25 differences, no ties: exact; the same with one tie added goes through the normal approximation.
    d = [i + 1 for i in range(25)]
    for i in (2, 7, 11, 19):
        d[i] = -d[i]
    exact = stats.wilcoxon_signed_rank(d)[1]
    tied = stats.wilcoxon_signed_rank(d + [26, 26])[1]  # n = 27 with a tie: normal
    n27 = stats.wilcoxon_signed_rank(d + [26, 27])[1]  # n = 27 without ties: also normal (above the exact limit)
    assert exact == pytest.approx(0.0010, abs=3e-4)
    assert tied == pytest.approx(n27, rel=0.05)


def test_comparison_has_the_paired_loss_test_and_prints_it():
    base = _records([True] * 10)
    trained = _records([True] * 10)
    for i, (b, t) in enumerate(zip(base, trained)):
        b["loss"], t["loss"] = 2.0 + i / 10, 1.0 + i / 20
    c = compare(base, trained)
    assert c["loss_base"] == pytest.approx(2.45) and c["loss_trained"] == pytest.approx(1.225)
    assert c["loss_p_value"] == pytest.approx(2 / 2**10)  # every item lower after training: exact, n = 10
    assert c["loss_lower_for_trained_items"] == 10
    assert "held-out loss" in format_comparison(c) and "Wilcoxon signed-rank p = 0.001953" in format_comparison(c)
