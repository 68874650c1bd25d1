"""The combining maths: Robinson's f(w), the chi-square tail, Fisher's combining, the clues."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bayes.classifier import Robinson, chi2q, combine

ROBINSON = Robinson()


# --- chi-square -------------------------------------------------------------------


def test_chi2q_with_two_degrees_of_freedom_is_exp_of_minus_half_x() -> None:
    for x2 in (0.0, 0.5, 3.0, 20.0):
        assert chi2q(x2, 2) == pytest.approx(math.exp(-x2 / 2))


def test_chi2q_with_four_and_six_degrees_of_freedom_by_hand() -> None:
    # Q(x2, 4) = e^-m (1 + m); Q(x2, 6) = e^-m (1 + m + m^2/2), m = x2/2
    assert chi2q(6.0, 4) == pytest.approx(math.exp(-3) * 4)  # 0.199148...
    assert chi2q(6.0, 6) == pytest.approx(math.exp(-3) * 8.5)  # 0.423190...
    # the table values: the 5% critical points of chi-square
    assert chi2q(5.991, 2) == pytest.approx(0.05, abs=1e-4)
    assert chi2q(9.488, 4) == pytest.approx(0.05, abs=1e-4)
    assert chi2q(18.307, 10) == pytest.approx(0.05, abs=1e-4)


def test_chi2q_is_one_at_zero_and_never_above_one() -> None:
    assert chi2q(0.0, 300) == 1.0
    assert chi2q(1e-9, 300) == 1.0


def test_chi2q_wants_even_degrees_of_freedom() -> None:
    with pytest.raises(ValueError, match="even"):
        chi2q(1.0, 3)


# --- one token -------------------------------------------------------------------


def test_token_probability_by_hand() -> None:
    # seen in 3 of 10 spams and 1 of 20 hams: Graham's p = 0.3 / (0.3 + 0.05) = 6/7,
    # Robinson's f = (0.45 * 0.5 + 4 * 6/7) / (0.45 + 4)
    expected = (0.45 * 0.5 + 4 * 6 / 7) / 4.45
    assert ROBINSON.token_probability(3, 1, 10, 20) == pytest.approx(expected)
    assert expected == pytest.approx(0.821027, abs=1e-6)


def test_an_unknown_token_is_the_unknown_probability() -> None:
    assert ROBINSON.token_probability(0, 0, 100, 100) == 0.5
    assert Robinson(unknown_prob=0.4).token_probability(0, 0, 100, 100) == 0.4


def test_a_token_seen_once_is_pulled_towards_the_middle() -> None:
    # only in spam, once: Graham says 1.0, Robinson (s = 0.45) (0.225 + 1) / 1.45
    assert ROBINSON.token_probability(1, 0, 10, 10) == pytest.approx(1.225 / 1.45)
    # seen a hundred times it is nearly certain
    assert ROBINSON.token_probability(100, 0, 100, 100) == pytest.approx(100.225 / 100.45)


def test_token_probability_compares_rates_not_counts() -> None:
    # 10 of 100 spams and 10 of 1000 hams: ten times as frequent in spam
    assert ROBINSON.token_probability(10, 10, 100, 1000) > 0.85
    # the same counts with balanced totals: no evidence
    assert ROBINSON.token_probability(10, 10, 100, 100) == pytest.approx(0.5)


# --- combining --------------------------------------------------------------------


def test_fisher_combining_by_hand() -> None:
    probability, spam, ham = combine([0.9, 0.2])
    # S = 1 - Q(-2 ln(0.1 * 0.8), 4); H = 1 - Q(-2 ln(0.9 * 0.2), 4); Q(x, 4) = e^-m (1 + m)
    m_s, m_h = -math.log(0.08), -math.log(0.18)
    expected_s = 1 - math.exp(-m_s) * (1 + m_s)
    expected_h = 1 - math.exp(-m_h) * (1 + m_h)
    assert spam == pytest.approx(expected_s)
    assert ham == pytest.approx(expected_h)
    assert probability == pytest.approx((1 + expected_s - expected_h) / 2)
    assert probability == pytest.approx(0.603303, abs=1e-6)  # (1 + 0.717942 - 0.511336) / 2


def test_no_clues_is_unsure() -> None:
    assert combine([]) == (0.5, 0.0, 0.0)


def test_strong_evidence_either_way_is_near_the_ends() -> None:
    assert combine([0.99] * 20)[0] > 0.999
    assert combine([0.01] * 20)[0] < 0.001


def test_strong_evidence_both_ways_is_unsure() -> None:
    assert combine([0.99] * 20 + [0.01] * 20)[0] == pytest.approx(0.5)


def test_many_clues_do_not_underflow() -> None:
    probability, spam, ham = combine([0.999] * 2000)
    assert probability == pytest.approx(1.0)
    assert spam == pytest.approx(1.0) and ham == pytest.approx(0.0)


@given(st.lists(st.floats(min_value=0.01, max_value=0.99), max_size=200))
def test_combining_is_symmetric_between_spam_and_ham(probabilities: list[float]) -> None:
    forward = combine(probabilities)[0]
    mirrored = combine([1 - p for p in probabilities])[0]
    assert 0.0 <= forward <= 1.0
    assert forward + mirrored == pytest.approx(1.0, abs=1e-9)


# --- the clues --------------------------------------------------------------------


def test_tokens_near_the_middle_are_not_clues() -> None:
    counts = {"strong": (50, 0), "weak": (11, 10), "hammy": (0, 50)}
    clues = ROBINSON.clues(counts, 100, 100)
    assert [clue.token for clue in clues] == ["hammy", "strong"]  # equal strength: by name


def test_only_the_strongest_clues_are_used() -> None:
    counts = {f"t{n:03d}": (n, 0) for n in range(1, 301)}
    clues = Robinson(max_clues=150).clues(counts, 300, 300)
    assert len(clues) == 150
    assert clues[0].token == "t300"  # the most often seen: the strongest
    assert "t001" not in {clue.token for clue in clues}


def test_judge_scores_from_zero_to_ten() -> None:
    spammy = ROBINSON.judge({"viagra": (90, 1), "pills": (80, 2), "cheap": (70, 5)}, 100, 100)
    hammy = ROBINSON.judge({"meeting": (1, 90), "agenda": (0, 50), "thanks": (5, 80)}, 100, 100)
    assert spammy.score > 9.9
    assert hammy.score < 0.1
    assert ROBINSON.judge({}, 100, 100).score == 5.0
    assert spammy.score == pytest.approx(10 * spammy.probability)
