"""The quality study's statistics: per-seed metrics, spread, t quantiles, per-task metrics, and the paired
intervals (the old bootstrap and `compare`'s t intervals), with their coverage measured by simulation."""

import math

import numpy as np
import pytest

from pipeline.student.statistics import (
    Measured, _crossed_variance, compare, macro, paired_difference, spread, t_quantile, task_metric,
)


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


# --- t quantiles ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q, df, table", [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776),
                                          (0.975, 30, 2.042), (0.8, 4, 0.941), (0.975, 1e6, 1.960),
                                          (0.995, 10, 3.169), (0.9, 3, 1.638)])
def test_t_quantiles_match_the_table(q, df, table):
    assert t_quantile(q, df) == pytest.approx(table, abs=6e-4)
    assert t_quantile(1 - q, df) == pytest.approx(-t_quantile(q, df), rel=1e-12)


def test_t_quantiles_match_closed_forms_and_interpolate_in_df():
    for q in (0.51, 0.6, 0.9, 0.975, 0.999, 0.2, 1e-4):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-9)
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.975, 8) < t_quantile(0.975, 7.5) < t_quantile(0.975, 7)
    assert t_quantile(0.975, 7.5) == pytest.approx(2.3330, abs=1e-4)
    assert t_quantile(0.975, 0.1) > 1e12 and math.isfinite(t_quantile(0.975, 0.1))  # very heavy tails
    for bad in ((0.0, 3), (1.0, 3), (0.9, 0), (0.9, -1), (0.9, math.nan)):
        with pytest.raises(ValueError, match="0 < q < 1 and df > 0"):
            t_quantile(*bad)


# --- per-task metrics and compare by hand --------------------------------------------------------------------

def test_task_metric_and_macro_by_hand():
    m = Measured(num=[[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]], den=[[1.0, 1.0, 2.0, 2.0], [1.0, 3.0, 1.0, 1.0]])
    tasks = ["y", "x", "y", "x"]  # "y" first: it appears first
    np.testing.assert_allclose(task_metric(m, tasks), [[4 / 3, 6 / 3], [4 / 2, 4 / 4]])
    np.testing.assert_allclose(macro(m, tasks), [(4 / 3 + 2) / 2, (2 + 1) / 2])
    with pytest.raises(ValueError, match="one label per example"):
        task_metric(m, ["x", "y"])


def test_compare_by_hand():
    ones = np.ones((3, 1))
    c = compare(Measured([[1.0], [2.0], [3.0]], ones), Measured(np.zeros((3, 1)), ones))  # d = 1, 2, 3
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2)·sd/√S with sd = 1
    assert (c.difference, c.se, c.df, c.seeds, c.level) == pytest.approx((2, 1 / math.sqrt(3), 2, 3, 0.95))
    assert c.tasks is None
    assert (c.low, c.high) == pytest.approx((2 - half, 2 + half), abs=1e-6)
    assert c.mde == pytest.approx((4.302653 + 1.060660) / math.sqrt(3), abs=1e-6)  # t(0.8, 2) = 1.06066

    # Crossed, one example per task: D = [[1, 2], [3, 6]] has MS_seed 9, MS_task 4, MS_res 1, so
    # Var = (9 + 4 − 1)/(2·2) = 3 and Satterthwaite's df = 12² / (9²/1 + 4²/1 + 1²/1) = 144/98.
    ones, zeros = np.ones((2, 2)), np.zeros((2, 2))
    c = compare(Measured([[1.0, 2.0], [3.0, 6.0]], ones), Measured(zeros, ones), tasks=["p", "q"])
    assert (c.difference, c.se, c.df, c.tasks) == pytest.approx((3, math.sqrt(3), 144 / 98, 2))
    assert c.high - c.difference == pytest.approx(t_quantile(0.975, 144 / 98) * math.sqrt(3))
    # D = [[0, 1], [1, 0]]: MS_seed = MS_task = 0 < MS_res = 1, both components truncated at zero:
    # Var = MS_res/(S·T) = 1/4 with the residual's (S − 1)(T − 1) = 1 df.
    c = compare(Measured([[0.0, 1.0], [1.0, 0.0]], ones), Measured(zeros, ones), tasks=["p", "q"])
    assert (c.difference, c.se, c.df) == pytest.approx((0.5, 0.5, 1))
    # One component truncated: Var = MS_task/(S·T) with T − 1 df; the other way round with S − 1 df.
    assert _crossed_variance(0.5, 4.0, 1.0, 3, 5) == pytest.approx((4.0 / 15, 4))
    assert _crossed_variance(4.0, 0.5, 1.0, 3, 5) == pytest.approx((4.0 / 15, 2))


@pytest.mark.parametrize("integer", [True, False])
def test_compare_gives_an_exact_shift_a_zero_width_interval(integer):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 9, size=(3, 40)).astype(float) if integer else rng.normal(3.0, 1.0, size=(3, 40))
    ones = np.ones_like(base)
    for tasks in (None, np.repeat(["t1", "t2", "t3", "t4"], 10)):
        c = compare(Measured(base + 0.25, ones), Measured(base, ones), tasks=tasks)
        assert all(math.isfinite(v) for v in (c.difference, c.low, c.high, c.se, c.df, c.mde))
        assert (c.difference, c.low, c.high) == pytest.approx((0.25, 0.25, 0.25), abs=1e-12)
        assert c.se == 0 and c.mde == 0  # the rounding in (x + 0.25) − x is not taken for spread
    # ... while a real spread, however small against the metric, is kept
    c = compare(Measured(base + 0.25 + 1e-9 * rng.normal(size=base.shape), ones), Measured(base, ones))
    assert 0 < c.se < 1e-9 and c.low < 0.25 < c.high


def test_compare_refuses_what_it_cannot_answer():
    base, ones = np.zeros((3, 4)), np.ones((3, 4))
    with pytest.raises(ValueError, match=r"same seeds and examples: \(3, 4\) vs \(2, 4\)"):
        compare(Measured(base, ones), Measured(base[:2], ones[:2]))
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        compare(Measured(base[:1], ones[:1]), Measured(base[:1], ones[:1]))
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        compare(Measured(base[:1], ones[:1]), Measured(base[:1], ones[:1]), tasks=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="at least 2 tasks, got 1"):
        compare(Measured(base, ones), Measured(base, ones), tasks=["a"] * 4)
    with pytest.raises(ValueError, match="one label per example"):
        compare(Measured(base, ones), Measured(base, ones), tasks=["a", "b"])
    with pytest.raises(ValueError, match="level and power"):
        compare(Measured(base, ones), Measured(base, ones), level=95)


# --- coverage and power by simulation ------------------------------------------------------------------------

# Standard deviations of each method's effects: per seed (data order), per task, per seed × task, and the
# per-example noise of an example's per-token value. The difference A − B gets √2 times each.
REGIMES = {
    "seed-dominated": (0.5, 0.05, 0.05, 0.3),
    "task-dominated": (0.02, 0.5, 0.05, 0.3),
    "example-noise-only": (0.0, 0.0, 0.0, 1.0),
    "mixed": (0.1, 0.1, 0.1, 1.0),
}
DESIGNS = [(3, 12), (5, 18)]  # (seeds, tasks)
DELTA = 0.3  # the population difference A − B


def study_design(rng, tasks):
    """Task labels (10–40 examples per task) and each example's token count (fixed across seeds and methods,
    as a held-out example's length is)."""
    labels = np.repeat(np.arange(tasks), rng.integers(10, 41, size=tasks))
    return labels, rng.integers(1, 20, size=labels.size).astype(float)


def simulate_study(rng, regime, trials, seeds, labels, tokens, delta, task_effects=None):
    """num of shape (2 methods, trials, seeds, examples) for den = tokens. New seed, seed × task and example
    draws every trial; new task effects too unless `task_effects` (2, tasks) fixes them."""
    seed_sd, task_sd, inter_sd, noise_sd = REGIMES[regime]
    tasks, shape = labels.max() + 1, (2, trials, seeds)
    if task_effects is None:
        task_effects = rng.normal(0, task_sd, (2, trials, 1, tasks))
    else:
        task_effects = task_effects[:, None, None, :]
    value = (rng.normal(4.0, 1.0, labels.size)  # example difficulty, shared by both methods: it cancels
             + rng.normal(0, seed_sd, shape)[..., None]
             + (task_effects + rng.normal(0, inter_sd, shape + (tasks,)))[..., labels]
             + rng.normal(0, noise_sd, shape + (labels.size,)))
    value[0] += delta
    return value * tokens


def run_compare(num, tokens, labels, trial, crossed):
    den = np.broadcast_to(tokens, num.shape[2:])
    return compare(Measured(num[0, trial], den), Measured(num[1, trial], den), labels if crossed else None)


def crossed_coverage(regime, seeds, tasks, trials=400, seed=0):
    """Tasks drawn anew each trial: how often each interval covers the population difference DELTA."""
    rng = np.random.default_rng(seed)
    labels, tokens = study_design(rng, tasks)
    num = simulate_study(rng, regime, trials, seeds, labels, tokens, DELTA)
    crossed = per_seed = 0
    for trial in range(trials):
        c = run_compare(num, tokens, labels, trial, crossed=True)
        assert c.low <= c.difference <= c.high and c.tasks == tasks and c.seeds == seeds
        crossed += c.low <= DELTA <= c.high
        c = run_compare(num, tokens, labels, trial, crossed=False)
        per_seed += c.low <= DELTA <= c.high
    return crossed / trials, per_seed / trials


def fixed_tasks_study(regime, seeds, tasks, trials, seed=0):
    """Task effects fixed across trials: (num, tokens, labels, truth), the truth being the difference over
    these tasks (their token-weighted mean, as the per-seed metric weighs them)."""
    rng = np.random.default_rng(seed)
    labels, tokens = study_design(rng, tasks)
    task_effects = rng.normal(0, REGIMES[regime][1], (2, tasks))
    truth = DELTA + np.average((task_effects[0] - task_effects[1])[labels], weights=tokens)
    return simulate_study(rng, regime, trials, seeds, labels, tokens, DELTA, task_effects), tokens, labels, truth


def per_seed_coverage(regime, seeds, tasks, trials=400, seed=0):
    num, tokens, labels, truth = fixed_tasks_study(regime, seeds, tasks, trials, seed)
    return sum(c.low <= truth <= c.high for c in (run_compare(num, tokens, labels, trial, crossed=False)
                                                  for trial in range(trials))) / trials


@pytest.mark.parametrize("seeds, tasks", DESIGNS)
@pytest.mark.parametrize("regime", REGIMES)
def test_the_crossed_interval_covers_the_population_difference(regime, seeds, tasks):
    # Conservative where the variance components of seeds and tasks are truly zero: a component is kept
    # only when its mean square exceeds the residual's, which biases the kept ones up (~0.98-0.99 with
    # example noise only: 0.987 at 3 seeds × 12 tasks over 2,000 trials). More trials there, so that the
    # few misses expected are counted well enough for the bound.
    noise_only = regime == "example-noise-only"
    crossed, per_seed = crossed_coverage(regime, seeds, tasks, trials=1000 if noise_only else 400)
    assert 0.90 <= crossed <= (0.995 if noise_only else 0.985), crossed
    if regime == "task-dominated":  # the per-seed interval is about these tasks, not tasks like these
        assert per_seed < 0.5, per_seed


@pytest.mark.parametrize("seeds, tasks", DESIGNS)
@pytest.mark.parametrize("regime", REGIMES)
def test_the_per_seed_interval_covers_the_difference_over_these_tasks(regime, seeds, tasks):
    coverage = per_seed_coverage(regime, seeds, tasks)
    assert 0.90 <= coverage <= 0.985, coverage


def test_the_bootstrap_under_covers_with_three_seeds_where_compare_holds():
    """Why `compare` replaced `paired_difference`: seed-level effects dominate, 3 seeds (module docstring)."""
    trials = 300
    num, tokens, labels, truth = fixed_tasks_study("seed-dominated", 3, 12, trials, seed=5)
    den = np.broadcast_to(tokens, num.shape[2:])
    bootstrap = t = 0
    for trial in range(trials):
        a, b = Measured(num[0, trial], den), Measured(num[1, trial], den)
        _, low, high = paired_difference(a, b, replicates=400, seed=trial)
        bootstrap += low <= truth <= high
        c = compare(a, b)
        t += c.low <= truth <= c.high
    assert bootstrap / trials < 0.88, bootstrap / trials
    assert 0.90 <= t / trials <= 0.985, t / trials


def design_mde(regime, seeds, labels, tokens, crossed, level=0.95, power=0.8):
    """(mde, df) of a design from its true variance components, as `compare` computes it from estimated ones."""
    seed_sd, task_sd, inter_sd, noise_sd = (2 * sd ** 2 for sd in REGIMES[regime])  # variances of A − B
    tasks = labels.max() + 1
    if crossed:  # the expected mean squares of the (seed, task) table of differences
        within = tokens / np.bincount(labels, tokens)[labels]  # an example's weight within its task
        residual = inter_sd + noise_sd * np.bincount(labels, within ** 2).mean()
        variance, df = _crossed_variance(residual + tasks * seed_sd, residual + seeds * task_sd, residual,
                                         seeds, tasks)
    else:  # task effects are fixed, a seed's difference varies by its seed, seed × task and example draws
        task_weight, weight = np.bincount(labels, tokens) / tokens.sum(), tokens / tokens.sum()
        variance = (seed_sd + inter_sd * (task_weight ** 2).sum() + noise_sd * (weight ** 2).sum()) / seeds
        df = seeds - 1
    return (t_quantile(1 - (1 - level) / 2, df) + t_quantile(power, df)) * math.sqrt(variance), df


@pytest.mark.parametrize("crossed", [False, True])
@pytest.mark.parametrize("seeds, tasks", DESIGNS)
def test_a_difference_of_one_mde_is_detected_with_about_the_stated_power(crossed, seeds, tasks, trials=400):
    rng = np.random.default_rng(7)
    labels, tokens = study_design(rng, tasks)
    mde, _ = design_mde("mixed", seeds, labels, tokens, crossed)
    num = simulate_study(rng, "mixed", trials, seeds, labels, tokens, mde,
                         task_effects=None if crossed else np.zeros((2, tasks)))
    detected = sum(c.low > 0 or c.high < 0 for c in (run_compare(num, tokens, labels, trial, crossed)
                                                     for trial in range(trials))) / trials
    assert 0.7 <= detected <= 0.9, detected
