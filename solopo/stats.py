"""How sure an accuracy number is: Wilson intervals, paired bootstrap differences, exact McNemar tests, power.

Everything here works on fractions (0-1) of correct answers; callers convert to percent for reports.
Pure functions over plain numbers and numpy arrays, no solopo imports: the eval stage and its tests use them.

    wilson_interval(2, 8)                      -> (0.0715, 0.5907)   # "25.0 [7.1, 59.1] (n=8)"
    mcnemar_exact(1, 5)                        -> 0.21875            # 2 * P(Binom(6, 1/2) <= 1)
    paired_bootstrap(model_ok, base_ok, ids)   -> Bootstrap(diff, low, high, ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
POWER = 0.8  # "n questions detect d points": 80% of the time, the usual planning convention
BOOTSTRAP_RESAMPLES = 10_000


def z_value(confidence: float = CONFIDENCE) -> float:
    """Two-sided normal quantile: 1.959964 for 95%."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (no continuity correction), as fractions.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty at 0% or 100%, which is
    where small eval cells often are: 0 of 8 gives [0, 32.4%], not [0, 0].
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    z = z_value(confidence)
    z2 = z * z
    p = correct / n
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The exact bounds at k=0 / k=n are 0 / 1; clamp float noise (center - half = -1e-17).
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) two-sided McNemar p-value from the discordant counts.

    b = pairs only the first model got right, c = pairs only the second got right. Under "no difference"
    each discordant pair is a fair coin: p = min(1, 2 * P(Binom(b + c, 1/2) <= min(b, c))). No discordant
    pair at all gives p = 1. Integer arithmetic, so large counts do not underflow.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Bootstrap:
    """Mean paired difference (first - second, fraction) and its percentile bootstrap interval."""

    diff: float
    low: float
    high: float
    n_pairs: int
    n_clusters: int
    resamples: int
    seed: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (a difference of exactly 0 everywhere gives [0, 0]: not significant)."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    first: Sequence[bool] | np.ndarray,
    second: Sequence[bool] | np.ndarray,
    clusters: Sequence[object] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Bootstrap:
    """Paired bootstrap of mean(first) - mean(second) over items scored for both models.

    Resampling units are `clusters` (e.g. question ids, when one question is asked at several lengths or
    depths: those answers are not independent), or each pair when None. Each resample draws clusters with
    replacement and takes the pooled mean difference over their pairs. Vectorized: a (chunk, clusters)
    index matrix per step, chunked to bound memory. The same inputs and seed give the same interval.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no pairs to compare")
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}")
    d = a - b  # (pairs,)
    if clusters is None:
        sums, counts = d, np.ones_like(d)
    else:
        if len(clusters) != d.size:
            raise ValueError(f"{len(clusters)} cluster labels for {d.size} pairs")
        _, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
        sums = np.bincount(inverse, weights=d)  # (clusters,)
        counts = np.bincount(inverse).astype(np.float64)  # (clusters,)
    k = sums.size
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 4_000_000 // k)  # at most ~32 MB of int64 indices per step
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, k, size=(m, k))  # (m, clusters) drawn with replacement
        stats[start : start + m] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return Bootstrap(
        diff=float(d.mean()),
        low=float(low),
        high=float(high),
        n_pairs=int(d.size),
        n_clusters=int(k),
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )


def detectable_difference(n: int, rate: float = 0.5, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """Smallest true difference between two models (fraction) that n questions per cell detect with `power`.

    The paired t-test approximation of the comparison (two independent models at `rate`: the per-question
    difference has variance 2 * rate * (1 - rate)), inverted from `questions_needed`:
    (z_a + z_b) * sqrt(2 * rate * (1 - rate) / (n - z_a² / 2)). rate=0.5 is the widest case; models that agree
    on most questions are told apart with fewer. Capped at 1: for n <= 5 (at 95% confidence and 80% power) no
    difference at all, not even 100 points, is detected reliably.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    za, zb = z_value(confidence), _z_power(power)
    room = n - za * za / 2
    if room <= 0:
        return 1.0
    return min(1.0, (za + zb) * math.sqrt(2 * rate * (1 - rate) / room))


def questions_needed(difference: float, rate: float = 0.5, confidence: float = CONFIDENCE, power: float = POWER) -> int:
    """Questions per cell to detect a true `difference` (fraction) with `power` (80%) at 95% confidence:
    ceil((z_a + z_b)² * 2 * rate * (1 - rate) / difference² + z_a² / 2), Guenther's (1981) approximation of the
    paired t-test's sample size (the `+ z_a² / 2` accounts for estimating the variance). 0.10 -> 395,
    0.05 -> 1572, the smallest n whose exact noncentral-t power reaches 80% (tests/test_eval_stats.py).
    At power=0.5 this is the interval half-width rule, 0.10 -> 193 questions: half the time a true 10-point
    difference would be missed."""
    if not 0.0 < difference <= 1.0:
        raise ValueError(f"difference must be in (0, 1], got {difference}")
    za, zb = z_value(confidence), _z_power(power)
    return math.ceil((za + zb) ** 2 * 2 * rate * (1 - rate) / (difference * difference) + za * za / 2)


def _z_power(power: float) -> float:
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    return NormalDist().inv_cdf(power)


def significant(boot: Bootstrap, mcnemar_p: float) -> bool:
    """The report's rule: a difference is significant only when BOTH the paired bootstrap interval excludes 0
    AND the exact McNemar test rejects at the same level (p < 1 - confidence). The percentile bootstrap alone
    is too liberal on small cells (10-11% false positives at n = 8 where 5% is promised, bench/stats; a 3/0
    split's flag flips with the bootstrap seed); the exact test holds its level (a 3/0 split has p = 0.25), and
    the interval, which resamples whole questions, guards the rows that pool lengths."""
    return boot.significant and mcnemar_p < 1 - boot.confidence


@dataclass(frozen=True)
class FalsePositives:
    """How often each rule calls two equally good models different (simulated; 1 - confidence is promised)."""

    n: int
    rate: float
    sims: int
    bootstrap: float  # interval excludes 0
    mcnemar: float  # exact p < 1 - confidence
    both: float  # the report's rule (`significant`)


def simulate_false_positives(
    n: int, rate: float = 0.5, sims: int = 400, seed: int = 0, resamples: int = 2_000, confidence: float = CONFIDENCE
) -> FalsePositives:
    """Two independent models that are each right with probability `rate` on n questions (no true difference),
    `sims` times: the fraction of tables each rule flags. Seeded: the same arguments give the same rates."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(3, dtype=np.int64)
    for i in range(sims):
        a, b = rng.random(n) < rate, rng.random(n) < rate
        boot = paired_bootstrap(a, b, resamples=resamples, seed=i, confidence=confidence)
        p = mcnemar_exact(int(np.sum(a & ~b)), int(np.sum(b & ~a)))
        hits += [boot.significant, p < 1 - confidence, boot.significant and p < 1 - confidence]
    fb, fm, fboth = (hits / sims).tolist()
    return FalsePositives(n=n, rate=rate, sims=sims, bootstrap=fb, mcnemar=fm, both=fboth)


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "POWER",
    "Bootstrap",
    "FalsePositives",
    "detectable_difference",
    "mcnemar_exact",
    "paired_bootstrap",
    "questions_needed",
    "significant",
    "simulate_false_positives",
    "wilson_interval",
    "z_value",
]
