"""Statistics of the reader study, each checked against an independent computation."""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats as sst
from sklearn.metrics import roc_auc_score

from mrsynth.study.stats import auc, dprime, dprime_2afc, fleiss_kappa, proportion_ci


def test_wilson_interval_matches_closed_form():
    # Wilson score interval written out: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    for k, n in [(7, 20), (0, 12), (40, 40), (55, 168)]:
        z = NormalDist().inv_cdf(0.975)
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = proportion_ci(k, n, "wilson")
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
        assert lo <= p <= hi


def test_exact_interval_is_clopper_pearson():
    # Clopper-Pearson bounds are beta quantiles.
    for k, n in [(7, 20), (1, 9), (30, 30)]:
        lo, hi = proportion_ci(k, n, "exact")
        exp_lo = 0.0 if k == 0 else sst.beta.ppf(0.025, k, n - k + 1)
        exp_hi = 1.0 if k == n else sst.beta.ppf(0.975, k + 1, n - k)
        assert lo == pytest.approx(exp_lo, abs=1e-9)
        assert hi == pytest.approx(exp_hi, abs=1e-9)
    assert all(math.isnan(x) for x in proportion_ci(0, 0))


def test_dprime_log_linear_by_hand():
    z = NormalDist().inv_cdf
    # 8 of 10 synthetic images caught, 3 of 10 real ones called synthetic.
    assert dprime(8, 10, 3, 10) == pytest.approx(z(8.5 / 11) - z(3.5 / 11), abs=1e-12)
    # Perfect performance stays finite thanks to the correction: z(40.5/41) - z(0.5/41).
    assert dprime(40, 40, 0, 40) == pytest.approx(z(40.5 / 41) - z(0.5 / 41), abs=1e-12)
    # Chance: as many hits as false alarms gives 0.
    assert dprime(5, 10, 5, 10) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(dprime(1, 0, 0, 5))
    assert dprime_2afc(15, 20) == pytest.approx(math.sqrt(2) * z(15.5 / 21), abs=1e-12)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.random(60) < 0.4
        s = rng.integers(1, 7, 60) + y * rng.integers(0, 3, 60)  # ordinal ratings, many ties
        assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # By hand: positives {3, 2}, negatives {1, 2}: pairs (3>1, 3>2, 2>1, 2=2) -> 3.5 / 4.
    assert auc([3, 2, 1, 2], [True, True, False, False]) == pytest.approx(0.875)
    assert math.isnan(auc([1, 2], [True, True]))


def test_fleiss_kappa_worked_examples():
    # Example 1 (3 raters, 2 categories):
    #   P_i = 1, 1/3, 1/3, 1 -> P_bar = 2/3; p = (1/2, 1/2) -> P_e = 1/2
    #   kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3
    assert fleiss_kappa(np.array([[3, 0], [2, 1], [1, 2], [0, 3]])) == pytest.approx(1 / 3)
    # Example 2 (4 raters, unequal margins):
    #   P_i = 12/12, 6/12, 12/12, 4/12, 12/12 -> P_bar = 23/30
    #   p = (13/20, 7/20) -> P_e = 169/400 + 49/400 = 109/200
    #   kappa = (23/30 - 109/200) / (91/200) = 133/273 = 19/39
    table = np.array([[4, 0], [3, 1], [4, 0], [2, 2], [0, 4]])
    p_bar = Fraction(23, 30)
    p_e = Fraction(109, 200)
    assert (p_bar - p_e) / (1 - p_e) == Fraction(19, 39)
    assert fleiss_kappa(table) == pytest.approx(19 / 39, abs=1e-12)
    # Perfect agreement on mixed items is 1; items with a single rating are ignored.
    assert fleiss_kappa(np.array([[2, 0], [0, 2], [1, 0]])) == pytest.approx(1.0)
    # Example 3 (3 raters, 3 categories):
    #   P_i = 1, 0, 1, 1/3 -> P_bar = 7/12; p = (3, 4, 5)/12 -> P_e = 50/144 = 25/72
    #   kappa = (42/72 - 25/72) / (47/72) = 17/47
    t3 = np.array([[0, 0, 3], [1, 1, 1], [0, 3, 0], [2, 0, 1]])
    assert fleiss_kappa(t3) == pytest.approx(17 / 47, abs=1e-12)
    assert math.isnan(fleiss_kappa(np.array([[3, 0], [3, 0]])))  # one category only
