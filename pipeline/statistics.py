"""Comparing trained models over seeds and held-out examples: per-seed metrics, spread, paired bootstrap CIs.

A metric is a ratio of sums over held-out examples, Σ num / Σ den: for
cross-entropy and KL, num is an example's summed nats and den its token
count (token-weighted, as `moekd eval` reports them); for ROUGE-L, num is the
example's score and den 1 (a plain mean). A method is measured per seed
(one trained model each) on the same examples, so arrays are (seeds, examples).

The paired difference of two methods A and B is the mean over seeds of
metric_A(seed) − metric_B(seed), pairing runs by seed (same data order) and
examples by row. Its 95% confidence interval is a percentile bootstrap over
both sources of variation: each replicate draws the seeds with replacement
and the examples with replacement (the same examples for every seed and both
methods), and recomputes the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    over seeds and examples (module docstring). a and b must have the same (seeds, examples) shape."""
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
