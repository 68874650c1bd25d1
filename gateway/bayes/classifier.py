"""The classifier: token counts -> a spam probability, by Robinson's method and Fisher's chi-square.

The same mathematics as SpamBayes (``chi2_spamprob``) and bogofilter:

1. Each token's spam probability from how often it was seen in trained spam and
   ham (Graham's ratio of ratios), pulled towards `unknown_prob` (x) by
   Robinson's f(w) with strength `unknown_strength` (s)::

       p(w) = (spam_w / nspam) / (spam_w / nspam + ham_w / nham)
       f(w) = (s * x + n * p(w)) / (s + n)          n = spam_w + ham_w

   A token never seen is x exactly.
2. The clues: the tokens whose f(w) is at least `min_strength` away from 0.5,
   the `max_clues` strongest of them.
3. Fisher's combining: ``S = 1 - chi2Q(-2 ln prod(1 - f), 2n)`` is the evidence
   for spam, ``H = 1 - chi2Q(-2 ln prod(f), 2n)`` the evidence for ham, and the
   message's probability is ``(1 + S - H) / 2``: near 1 spam, near 0 ham, near
   0.5 when the evidence is weak or points both ways ("unsure").

The score the gateway uses is ten times that probability (0 to 10).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import attrs

__all__ = ["Clue", "Judgement", "Robinson", "chi2q"]

_LN2 = math.log(2)


def chi2q(x2: float, freedom: int) -> float:
    """P(chi-square with `freedom` (even) degrees of freedom >= x2): the upper tail.

    For even degrees of freedom the series is finite:
    ``exp(-m) * sum(m**i / i!, i < v/2)`` with m = x2 / 2.
    """
    if freedom <= 0 or freedom % 2:
        raise ValueError(f"degrees of freedom must be even and positive, not {freedom}")
    m = x2 / 2.0
    term = total = math.exp(-m)
    for i in range(1, freedom // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


@attrs.frozen
class Clue:
    """A token that weighed in on a verdict, with its probability."""

    token: str
    probability: float


@attrs.frozen
class Judgement:
    """What the classifier made of a message."""

    probability: float  # 0 (ham) to 1 (spam), 0.5 when it cannot tell
    spam_evidence: float  # S
    ham_evidence: float  # H
    clues: tuple[Clue, ...]  # the tokens used, strongest first

    @property
    def score(self) -> float:
        """The probability on the gateway's 0-10 scale."""
        return 10.0 * self.probability


@attrs.frozen
class Robinson:
    """Robinson-Fisher classification with SpamBayes's defaults (module docstring)."""

    unknown_strength: float = 0.45  # s
    unknown_prob: float = 0.5  # x
    min_strength: float = 0.1  # a clue is at least this far from 0.5
    max_clues: int = 150

    def token_probability(self, spam_count: int, ham_count: int, nspam: int, nham: int) -> float:
        """f(w) for a token seen in `spam_count` of `nspam` spams and `ham_count` of `nham` hams."""
        spam_ratio = spam_count / nspam if nspam else 0.0
        ham_ratio = ham_count / nham if nham else 0.0
        if spam_ratio + ham_ratio == 0.0:
            return self.unknown_prob
        graham = spam_ratio / (spam_ratio + ham_ratio)
        seen = spam_count + ham_count
        s = self.unknown_strength
        return (s * self.unknown_prob + seen * graham) / (s + seen)

    def clues(self, counts: Mapping[str, tuple[int, int]], nspam: int, nham: int) -> tuple[Clue, ...]:
        """The tokens that count, strongest first (ties broken by the token, so it is repeatable)."""
        candidates = []
        for token, (spam_count, ham_count) in counts.items():
            probability = self.token_probability(spam_count, ham_count, nspam, nham)
            strength = abs(probability - 0.5)
            if strength >= self.min_strength:
                candidates.append((-strength, token, probability))
        candidates.sort()
        return tuple(Clue(token, probability) for _, token, probability in candidates[: self.max_clues])

    def judge(self, counts: Mapping[str, tuple[int, int]], nspam: int, nham: int) -> Judgement:
        """Classify a message from its tokens' (spam, ham) counts."""
        clues = self.clues(counts, nspam, nham)
        probability, spam, ham = combine(clue.probability for clue in clues)
        return Judgement(probability, spam, ham, clues)


def combine(probabilities: Iterable[float]) -> tuple[float, float, float]:
    """Fisher's chi-square combining of token probabilities: (probability, S, H).

    No clues at all is 0.5 (unsure), with no evidence either way.
    """
    # the products underflow after a few hundred clues: keep the exponents apart (frexp)
    spam_product = ham_product = 1.0
    spam_exponent = ham_exponent = 0
    count = 0
    for probability in probabilities:
        count += 1
        spam_product *= 1.0 - probability
        ham_product *= probability
        if spam_product < 1e-200:
            spam_product, exponent = math.frexp(spam_product)
            spam_exponent += exponent
        if ham_product < 1e-200:
            ham_product, exponent = math.frexp(ham_product)
            ham_exponent += exponent
    if not count:
        return 0.5, 0.0, 0.0
    spam_log = _log(spam_product) + spam_exponent * _LN2
    ham_log = _log(ham_product) + ham_exponent * _LN2
    spam = 1.0 - chi2q(-2.0 * spam_log, 2 * count)
    ham = 1.0 - chi2q(-2.0 * ham_log, 2 * count)
    return (spam - ham + 1.0) / 2.0, spam, ham


def _log(value: float) -> float:
    # a probability of exactly 0 or 1 cannot come from f(w) (s > 0), but a caller may pass one
    return math.log(value) if value > 0.0 else -745.0
