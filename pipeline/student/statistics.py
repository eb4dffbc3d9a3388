"""Comparing trained models over seeds and held-out examples: per-seed metrics, spread, and paired t intervals.

A metric is a ratio of sums over held-out examples, Σ num / Σ den: for
cross-entropy and KL, num is an example's summed nats and den its token
count (token-weighted, as `moekd eval` reports them); for ROUGE-L, num is the
example's score and den 1 (a plain mean). A method is measured per seed
(one trained model each) on the same examples, so arrays are (seeds, examples).
Two methods are paired by seed (row: same data order) and by example (column).

`compare` gives two intervals for the difference A − B; they answer different questions.

* Without tasks (the per-seed t interval): a claim about *these* held-out
  examples. Each seed s gives one paired difference d_s = metric_A(s) −
  metric_B(s) over all examples; the interval is mean(d) ± t(1−α/2, S−1)·sd(d)/√S.
  The seeds are the only random unit, and everything that varies between runs
  (data order, the seed × example interplay, per-example noise) is inside d_s,
  so the interval is exact for normal d_s whatever the mix of those sources.
* With tasks (the crossed interval): a claim about *tasks like these*, as if the
  held-out tasks were drawn from a population of tasks. Examples of one task are
  not independent (a method can be good at a task), so the task, not the
  example, is the unit. D[s, t] = metric_A − metric_B of seed s on task t; the
  estimate is the mean of D (each task weighs the same: the difference of the
  `macro` metrics) and its variance comes from the two-way crossed random-effects
  model D = μ + seed_s + task_t + residual_st (`_crossed_variance`), with
  Satterthwaite's degrees of freedom. It is wider than the per-seed interval when
  methods differ by task: that spread is what a new set of tasks would bring.

Why not the percentile bootstrap over seeds and examples (`paired_difference`,
kept for now): with 3 seeds it sees only 10 distinct seed resamples and uses
normal-like quantiles where t(2)'s 4.30 applies, so when seed-level effects
dominate it under-covers. Simulated at 3 seeds × 308 examples for a nominal 95%
(an independent check of this module, 2026-12): 72% coverage with a seed-level
effect only, 84% seed-dominated, 93% for a ROUGE-like mix, and 99.8% (intervals
~1.45× too wide) with example-level noise only. The per-seed t interval covered
93–97% in every case. tests/test_statistics.py repeats the seed-dominated case
(bootstrap ~72%, t interval ~95%) and checks both of `compare`'s intervals in
seed-, task- and noise-dominated and mixed simulations; the crossed one is
conservative (~98–99%) when seeds and tasks add nothing beyond example noise.

The minimum detectable effect (`Comparison.mde`) is the true difference that a
two-sided test at 1 − level would detect with probability `power`:
(t(1−α/2, df) + t(power, df))·se: 2.8·se for large df, 3.7·se for df = 4, 5.4·se for
df = 2 (at 95% and 80%). Its true power is a little under `power` at few df
(~0.77 at df = 2, ~0.79 at df = 4, in the tests' simulations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


@dataclass
class Measured:
    """One method's per-example sums: num and den of shape (seeds, examples), in the same example order."""

    num: np.ndarray
    den: np.ndarray

    def __post_init__(self):
        self.num, self.den = np.asarray(self.num, dtype=np.float64), np.asarray(self.den, dtype=np.float64)
        if self.num.ndim != 2 or self.num.shape != self.den.shape:
            raise ValueError(f"num and den must both be (seeds, examples), got {self.num.shape} and {self.den.shape}")

    def per_seed(self) -> np.ndarray:
        """(seeds,) the metric of each seed's model over all examples."""
        return self.num.sum(1) / self.den.sum(1)


def spread(measured: Measured) -> tuple[float, float]:
    """(mean, sample standard deviation) of the per-seed metric (std 0 for one seed)."""
    values = measured.per_seed()
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_difference(a: Measured, b: Measured, replicates: int = 4000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean over seeds of metric_a − metric_b, CI low, CI high): the percentile bootstrap CI at `level`
    over seeds and examples: each replicate draws the seeds with replacement and the examples with
    replacement (the same examples for every seed and both methods). a and b must have the same
    (seeds, examples) shape. Superseded by `compare`: with few seeds it under-covers (module docstring)."""
    if a.num.shape != b.num.shape:
        raise ValueError(f"paired methods need the same seeds and examples: {a.num.shape} vs {b.num.shape}")
    seeds, examples = a.num.shape
    difference = float((a.per_seed() - b.per_seed()).mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(replicates)
    for start in range(0, replicates, 500):  # blocks bound the (block, examples) count matrix
        block = min(500, replicates - start)
        counts = rng.multinomial(examples, np.full(examples, 1 / examples), size=block).T  # (examples, block)
        picked = rng.integers(0, seeds, size=(block, seeds))
        ratio = lambda m: (m.num @ counts) / (m.den @ counts)  # noqa: E731 - (seeds, block)
        per_seed = ratio(a) - ratio(b)
        draws[start : start + block] = np.take_along_axis(per_seed.T, picked, axis=1).mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return difference, float(low), float(high)


# --- Student's t without scipy -------------------------------------------------------------------------------

def _betainc(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), with y = 1 − x passed in exactly (so that
    x near 1 loses no digits). Continued fraction by the modified Lentz method (Numerical Recipes 6.4),
    on the side of the symmetry I_x(a, b) = 1 − I_y(b, a) where it converges fast."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, y, x)
    log_front = a * math.log(x) + b * math.log(y) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    # It converges in O(sqrt(max(a, b))) steps: ~1,000 for df = 1e6; the bound only guards against a loop.
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even, then odd step
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return math.exp(log_front) * h / a


def _t_upper(t: float, df: float) -> float:
    """P(T > t) for 0 <= t <= 1e150: I_x(df/2, 1/2)/2 with x = df/(df + t²) and 1 − x = t²/(df + t²)."""
    return 0.5 * _betainc(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t))


def _t_density(t: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` > 0 degrees of freedom (real, as Satterthwaite's df are).

    Solves P(T > t) = min(q, 1 − q) by Newton steps on the CDF, kept inside a bracket [t/2, t] found by
    doubling and bisected whenever a step would leave it (the tails can be very heavy: t(0.975, 0.1) is
    ~1.7e12). Returns ±inf beyond ±1e150, where t² nears the float range (only for df below ~0.1)."""
    q, df = float(q), float(df)
    if not (0.0 < q < 1.0 and df > 0.0):  # also refuses NaN
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    p = min(q, 1.0 - q)
    lo, hi = 0.0, 1.0
    while _t_upper(hi, df) > p:  # grow the bracket [lo, hi] until it holds the root
        lo, hi = hi, 2.0 * hi
        if hi > 1e150:
            return math.copysign(math.inf, q - 0.5)
    t = (lo + hi) / 2
    for _ in range(400):
        excess = _t_upper(t, df) - p  # > 0: t is too small (the tail decreases with t)
        lo, hi = (t, hi) if excess > 0 else (lo, t)
        # Newton: d/dt P(T > t) = −density; a step that leaves the bracket (or a density that underflowed)
        # falls back to bisection
        density = _t_density(t, df)
        step = t + excess / density if density > 0 else math.nan
        following = step if lo < step < hi else (lo + hi) / 2
        if abs(following - t) <= 1e-14 * t or hi - lo <= 1e-14 * hi:
            t = following
            break
        t = following
    return t if q > 0.5 else -t


# --- Metrics per task ----------------------------------------------------------------------------------------

def _task_columns(tasks: Sequence[Hashable], examples: int) -> np.ndarray:
    """(examples, T) one-hot matrix of each example's task, tasks in order of first appearance."""
    if len(tasks) != examples:
        raise ValueError(f"tasks needs one label per example: {len(tasks)} labels for {examples} examples")
    order: dict = {}
    index = np.array([order.setdefault(label, len(order)) for label in tasks])
    return (index[:, None] == np.arange(len(order))).astype(np.float64)


def task_metric(m: Measured, tasks: Sequence[Hashable]) -> np.ndarray:
    """(seeds, T) the metric (Σ num / Σ den) of each seed within each task; `tasks` gives each example's
    (column's) task label, and tasks come in order of first appearance."""
    columns = _task_columns(tasks, m.num.shape[1])
    return (m.num @ columns) / (m.den @ columns)


def macro(m: Measured, tasks: Sequence[Hashable]) -> np.ndarray:
    """(seeds,) per seed, the mean over tasks of the per-task metric: each task weighs the same, however
    many examples or tokens it has."""
    return task_metric(m, tasks).mean(1)


# --- Paired comparison ---------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Comparison:
    """The paired difference A − B with its `level` confidence interval [low, high] = difference ±
    t(1 − α/2, df)·se, and the minimum detectable effect at the requested power. `tasks` is the number
    of tasks for the crossed interval, None for the per-seed one (module docstring)."""

    difference: float
    low: float
    high: float
    se: float
    df: float
    mde: float
    seeds: int
    tasks: int | None
    level: float


def _crossed_variance(ms_seed: float, ms_task: float, ms_res: float, seeds: int, tasks: int) -> tuple[float, float]:
    """(variance, df) of the grand mean of a seeds × tasks table under the crossed random-effects model
    without replication, D[s, t] = μ + seed_s + task_t + e_st, from its ANOVA mean squares.

    E[MS_seed] = σ²_e + T·σ²_seed, E[MS_task] = σ²_e + S·σ²_task, E[MS_res] = σ²_e, so with
    σ²_seed = max(0, (MS_seed − MS_res)/T), σ²_task = max(0, (MS_task − MS_res)/S), σ²_e = MS_res:

        Var = σ²_seed/S + σ²_task/T + σ²_e/(S·T) = (c_seed·MS_seed + c_task·MS_task + c_res·MS_res) / (S·T)

    with c_seed = 1 if MS_seed > MS_res else 0 (the component is truncated at zero), c_task likewise and
    c_res = 1 − c_seed − c_task (−1, 0 or 1). Under normality the MS_i are independent, each
    E[MS_i]·χ²(df_i)/df_i with df_seed = S − 1, df_task = T − 1, df_res = (S − 1)(T − 1), so
    Var(MS_i) = 2·E[MS_i]²/df_i. Matching a scaled χ²(ν)/ν to the mean and variance of Σ c_i·MS_i, with
    the observed MS_i in place of their expectations, gives Satterthwaite's

        ν = (Σ_i c_i·MS_i)² / Σ_i [(c_i·MS_i)² / df_i].

    With both components kept (c_res = −1) the combination is still positive (MS_seed + MS_task − MS_res
    > MS_seed), and ν >= 1 in every case.

    When one term is left (both truncated: Var = MS_res/(ST); one truncated: Var = MS_task/(ST) or
    MS_seed/(ST)), ν is that term's df exactly. Every mean square zero (an exact shift) gives variance 0
    and ν = df_res."""
    terms = [(float(ms_seed > ms_res), ms_seed, seeds - 1), (float(ms_task > ms_res), ms_task, tasks - 1)]
    terms.append((1.0 - terms[0][0] - terms[1][0], ms_res, (seeds - 1) * (tasks - 1)))
    combination = sum(c * ms for c, ms, _ in terms)
    spread_of_it = sum((c * ms) ** 2 / df for c, ms, df in terms)
    df = combination ** 2 / spread_of_it if spread_of_it > 0 else float(terms[2][2])
    return max(combination, 0.0) / (seeds * tasks), df


def compare(a: Measured, b: Measured, tasks: Sequence[Hashable] | None = None, level: float = 0.95,
            power: float = 0.8) -> Comparison:
    """The paired difference A − B (by seed and example) with a t confidence interval at `level` and the
    minimum detectable effect at `power`. a and b must have the same (seeds, examples) shape.

    tasks None: the per-seed t interval over d_s = metric_a(s) − metric_b(s), the overall ratio of sums of
    each seed: a claim about these held-out examples; needs 2 seeds or more.
    tasks given (one label per example): the crossed interval, seeds and tasks both random, about tasks like
    these; the difference is that of the `macro` metrics (each task weighs the same); needs 2 seeds and 2
    tasks or more. See the module docstring and `_crossed_variance`."""
    if a.num.shape != b.num.shape:
        raise ValueError(f"paired methods need the same seeds and examples: {a.num.shape} vs {b.num.shape}")
    if not (0 < level < 1 and 0 < power < 1):
        raise ValueError(f"level and power must be in (0, 1), got {level} and {power}")
    seeds = a.num.shape[0]
    if seeds < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds, got {seeds}")
    if tasks is None:
        metric_a, metric_b = a.per_seed(), b.per_seed()
        D = metric_a - metric_b
        difference, variance, df, count = D.mean(), D.var(ddof=1) / seeds, float(seeds - 1), None
    else:
        metric_a, metric_b = task_metric(a, tasks), task_metric(b, tasks)
        D = metric_a - metric_b  # (seeds, T)
        count = D.shape[1]
        if count < 2:
            raise ValueError(f"the crossed interval over seeds and tasks needs at least 2 tasks, got {count}"
                             " (use tasks=None for an interval about these examples)")
        difference = D.mean()
        seed_means, task_means = D.mean(1, keepdims=True), D.mean(0, keepdims=True)
        ms_seed = count * ((seed_means - difference) ** 2).sum() / (seeds - 1)
        ms_task = seeds * ((task_means - difference) ** 2).sum() / (count - 1)
        ms_res = ((D - seed_means - task_means + difference) ** 2).sum() / ((seeds - 1) * (count - 1))
        variance, df = _crossed_variance(ms_seed, ms_task, ms_res, seeds, count)
    # Differences that agree to rounding (an exact shift: (x + c) − x is c only up to an ulp of x) are
    # equal: their spread is no evidence of variation, and the interval has zero width.
    if np.ptp(D) <= 1e-12 * max(np.abs(metric_a).max(), np.abs(metric_b).max()):
        variance = 0.0
    se = math.sqrt(variance)
    critical = t_quantile(1 - (1 - level) / 2, df)
    mde = (critical + t_quantile(power, df)) * se
    return Comparison(difference=float(difference), low=float(difference - critical * se),
                      high=float(difference + critical * se), se=se, df=float(df), mde=float(mde), seeds=seeds,
                      tasks=count, level=level)
