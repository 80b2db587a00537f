"""Statistics of repeated runs (scipy.stats): a configuration's accuracies over its seeds as mean,
standard deviation and Student's t interval, and two configurations compared paired by seed (mean
difference, its interval, the paired t-test's p-value and a verdict in words)."""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95  # of every interval
ALPHA = 0.05  # a paired difference with p below it is called better or worse


@dataclass(frozen=True)
class Spread:
    """Values over seeds: their number, mean, sample standard deviation (ddof 1) and the
    two-sided Student's t interval of the mean (nan with one value)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    def text(self, scale=100.0, digits=1, unit="%") -> str:
        """`48.4 ± 0.5%` with its interval, `48.4%` for one value."""
        m = f"{scale * self.mean:.{digits}f}"
        if self.n < 2:
            return f"{m}{unit} (one seed)"
        return (
            f"{m} ± {scale * self.sd:.{digits}f}{unit} (n = {self.n}; 95% CI "
            f"{scale * self.low:.{digits}f} to {scale * self.high:.{digits}f})"
        )


def _t_interval(mean, sd, n):
    from scipy import stats

    if n < 2:
        return math.nan, math.nan
    if sd == 0:  # scipy returns nan for a zero scale; every seed agreed exactly
        return mean, mean
    return tuple(float(v) for v in stats.t.interval(CONFIDENCE, n - 1, mean, sd / math.sqrt(n)))


def spread(values) -> Spread:
    """Mean ± sd and the 95% t interval of `values` (one per seed)."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if not len(x):
        raise ValueError("spread of no values")
    n, mean = len(x), float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    return Spread(n, mean, sd, *_t_interval(mean, sd, n))


@dataclass(frozen=True)
class Paired:
    """`a` minus `b` over the seeds both ran: the mean difference and its 95% interval, the
    paired t-test's two-sided p-value, and the verdict: better, worse, no detectable difference
    (or too few seeds: fewer than two pairs)."""

    n: int
    diff: float
    low: float
    high: float
    p: float
    verdict: str


def paired(a: dict, b: dict) -> Paired:
    """Compare {seed: value} `a` with `b`, pairing the values of the same seed."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    x = np.array([a[s] for s in seeds], dtype=float)
    y = np.array([b[s] for s in seeds], dtype=float)
    d = x - y
    n = len(d)
    if n < 2:
        diff = float(d.mean()) if n else math.nan
        return Paired(n, diff, math.nan, math.nan, math.nan, "too few seeds")
    diff, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:  # every pair differs by the same amount: a t-test is undefined
        p = 1.0 if diff == 0 else 0.0
    else:
        p = float(stats.ttest_rel(x, y).pvalue)
    low, high = _t_interval(diff, sd, n)
    verdict = "no detectable difference"
    if p < ALPHA:
        verdict = "better" if diff > 0 else "worse"
    return Paired(n, diff, low, high, p, verdict)
