"""The quality study's statistics: per-seed metrics, spread and the paired bootstrap CI."""

import numpy as np
import pytest

from pipeline.statistics import Measured, paired_difference, spread


def test_metrics_are_token_weighted_ratios_of_sums():
    m = Measured(num=[[2.0, 30.0], [4.0, 10.0]], den=[[1.0, 10.0], [2.0, 10.0]])
    np.testing.assert_allclose(m.per_seed(), [32 / 11, 14 / 12])
    mean, std = spread(m)
    assert mean == pytest.approx((32 / 11 + 14 / 12) / 2)
    assert std == pytest.approx(np.std([32 / 11, 14 / 12], ddof=1))
    assert spread(Measured([[1.0, 3.0]], [[1.0, 1.0]])) == (2.0, 0.0)
    with pytest.raises(ValueError, match="seeds, examples"):
        Measured([1.0, 2.0], [1.0, 1.0])


def test_an_exact_shift_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, size=(3, 50))
    ones = np.ones_like(base)
    difference, low, high = paired_difference(Measured(base + 0.25, ones), Measured(base, ones), replicates=500)
    assert difference == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same seeds and examples"):
        paired_difference(Measured(base, ones), Measured(base[:2], ones[:2]))


def simulate(rng, delta: float, seeds: int = 3, examples: int = 200):
    """Two methods on shared example difficulties: a is b's distribution shifted by delta."""
    difficulty = rng.normal(4.0, 1.0, size=examples)  # paired: the same examples for both
    tokens = rng.integers(1, 20, size=(seeds, examples)).astype(float)
    a = (difficulty + delta + rng.normal(0, 0.5, size=(seeds, examples))) * tokens
    b = (difficulty + rng.normal(0, 0.5, size=(seeds, examples))) * tokens
    return Measured(a, tokens), Measured(b, tokens)


def test_the_interval_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    delta, covered, excludes_zero, trials = 0.2, 0, 0, 200
    for trial in range(trials):
        difference, low, high = paired_difference(*simulate(rng, delta), replicates=400, seed=trial)
        assert low <= difference <= high
        covered += low <= delta <= high
        excludes_zero += low > 0
    assert 0.88 * trials <= covered <= 0.995 * trials, covered
    assert excludes_zero > 0.9 * trials  # the difference is clearly seen at this noise level


def test_no_difference_is_seldom_called_one():
    rng = np.random.default_rng(2)
    trials = 200
    false_calls = sum(not (low <= 0 <= high)
                      for low, high in (paired_difference(*simulate(rng, 0.0), replicates=400, seed=t)[1:]
                                        for t in range(trials)))
    assert false_calls <= 0.12 * trials, false_calls
