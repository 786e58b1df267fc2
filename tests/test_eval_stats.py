"""solopo.stats against hand-worked values and peers (scipy; statsmodels where installed), and the eval
report's paired comparison on a constructed table with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from solopo import stats
from solopo.stages.eval_report import compare


# --- Wilson ------------------------------------------------------------------------------------------
def test_wilson_hand_worked():
    # 2 of 8, z = 1.959964: center (0.25 + z²/16) / (1 + z²/8) = 0.33111, half z*sqrt(0.25*0.75/8 + z²/256) /
    # (1 + z²/8) = 0.25963 -> [0.07148, 0.59072]: the report cell "25.0 [7.1, 59.1] (n=8)".
    lo, hi = stats.wilson_interval(2, 8)
    assert (lo, hi) == (pytest.approx(0.071479, abs=1e-6), pytest.approx(0.590725, abs=1e-6))
    # 0 of 8: [0, z²/(8 + z²)] = [0, 0.32441]; 8 of 8 mirrors it. Never the empty [0, 0] of a Wald interval.
    assert stats.wilson_interval(0, 8) == (0.0, pytest.approx(3.841459 / 11.841459, abs=1e-6))
    lo, hi = stats.wilson_interval(8, 8)
    assert hi == 1.0 and lo == pytest.approx(8 / 11.841459, abs=1e-6)
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 2)
    with pytest.raises(ValueError):
        stats.wilson_interval(0, 0)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (2, 8), (5, 8), (0, 50), (17, 50), (50, 50), (431, 1000)])
def test_wilson_matches_scipy(k, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = stats.wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


@pytest.mark.parametrize(("k", "n"), [(2, 8), (17, 50), (431, 1000)])
def test_wilson_matches_statsmodels(k, n):
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    lo, hi = proportion.proportion_confint(k, n, alpha=0.05, method="wilson")
    assert stats.wilson_interval(k, n) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))


# --- McNemar -----------------------------------------------------------------------------------------
def test_mcnemar_hand_worked():
    # b=1, c=5: 6 discordant pairs, P(X <= 1) = (1 + 6) / 64, two-sided 14/64.
    assert stats.mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert stats.mcnemar_exact(5, 1) == stats.mcnemar_exact(1, 5)
    assert stats.mcnemar_exact(0, 8) == pytest.approx(2 / 256)
    assert stats.mcnemar_exact(3, 3) == 1.0  # capped: the doubled tail exceeds 1
    assert stats.mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence either way
    # Large counts: exact integer tails, no float overflow in comb(n, i) / 2**n; a tiny but positive p.
    assert 0 < stats.mcnemar_exact(3, 1000) < 1e-290


@pytest.mark.parametrize(("b", "c"), [(1, 5), (0, 8), (7, 7), (12, 30), (100, 140)])
def test_mcnemar_matches_scipy_binomial_test(b, c):
    scipy_stats = pytest.importorskip("scipy.stats")
    assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_matches_statsmodels():
    ct = pytest.importorskip("statsmodels.stats.contingency_tables")
    for b, c in [(1, 5), (12, 30)]:
        table = [[10, b], [c, 20]]
        assert stats.mcnemar_exact(b, c) == pytest.approx(ct.mcnemar(table, exact=True).pvalue, rel=1e-9)


# --- bootstrap ---------------------------------------------------------------------------------------
def _pair(n: int, p_a: float, p_b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(n) < p_a, rng.random(n) < p_b


def test_bootstrap_reproducible_for_a_seed():
    a, b = _pair(3000, 0.5, 0.4, seed=1)
    r1 = stats.paired_bootstrap(a, b, seed=7)
    r2 = stats.paired_bootstrap(a, b, seed=7)
    r3 = stats.paired_bootstrap(a, b, seed=8)
    assert r1 == r2
    assert (r1.low, r1.high) != (r3.low, r3.high)
    assert r1.resamples == stats.BOOTSTRAP_RESAMPLES == 10_000 and r1.n_pairs == 3000 == r1.n_clusters
    assert r1.diff == pytest.approx(a.mean() - b.mean())


def test_bootstrap_degenerate_tables_have_known_intervals():
    ones, zeros = np.ones(8, bool), np.zeros(8, bool)
    r = stats.paired_bootstrap(ones, zeros)
    assert (r.diff, r.low, r.high, r.significant) == (1.0, 1.0, 1.0, True)  # every pair favours the model
    r = stats.paired_bootstrap(ones, ones)
    assert (r.diff, r.low, r.high, r.significant) == (0.0, 0.0, 0.0, False)  # identical answers: no difference
    with pytest.raises(ValueError):
        stats.paired_bootstrap([True], [True, False])


def test_bootstrap_matches_scipy():
    """The paired bootstrap of the mean difference is scipy's one-sample percentile bootstrap of a - b."""
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = _pair(400, 0.55, 0.45, seed=3)
    d = a.astype(float) - b.astype(float)
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", random_state=0)
    ours = stats.paired_bootstrap(a, b, seed=0)
    # Different random streams: the interval ends agree to Monte-Carlo error (~0.3 points here).
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.006)
    # ...and both are close to the normal approximation for a paired difference.
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert ours.high - ours.low == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_clusters_resample_whole_questions():
    """A question asked at 4 lengths is one unit: duplicating every pair 4x must not narrow the interval."""
    a, b = _pair(60, 0.6, 0.4, seed=5)
    single = stats.paired_bootstrap(a, b, seed=0)
    ids = np.repeat(np.arange(60), 4)
    clustered = stats.paired_bootstrap(np.repeat(a, 4), np.repeat(b, 4), clusters=ids, seed=0)
    naive = stats.paired_bootstrap(np.repeat(a, 4), np.repeat(b, 4), seed=0)
    assert clustered.n_pairs == 240 and clustered.n_clusters == 60
    assert clustered.diff == pytest.approx(single.diff)
    width = lambda r: r.high - r.low  # noqa: E731
    assert width(clustered) == pytest.approx(width(single), rel=0.15)
    assert width(naive) < 0.7 * width(clustered)  # treating copies as independent halves the width


# --- detectable difference -------------------------------------------------------------------------
def test_detectable_difference_and_questions_needed():
    # 80% power, 95% confidence, 50% accuracy: (z_a + z_b)² = (1.959964 + 0.841621)² = 7.848879;
    # n = ceil(7.848879 * 0.5 / d² + z_a² / 2): d = 0.10 -> ceil(392.444 + 1.921) = 395, d = 0.05 -> 1572.
    assert stats.questions_needed(0.10) == 395 and stats.questions_needed(0.05) == 1572
    # At 50% power the z_b term vanishes: the old half-width rule (193 + the variance term 1.92 -> 194).
    assert stats.questions_needed(0.10, power=0.5) == 194
    # Inverse: d = (z_a + z_b) * sqrt(0.5 / (n - z_a²/2)): n=8 -> 2.801585 * sqrt(0.5 / 6.079270) = 0.80346.
    assert stats.detectable_difference(8) == pytest.approx(2.801585 * math.sqrt(0.5 / (8 - 3.841459 / 2)), abs=1e-6)
    assert stats.detectable_difference(8) == pytest.approx(0.803458, abs=1e-6)
    assert stats.detectable_difference(stats.questions_needed(0.05)) <= 0.05
    assert stats.detectable_difference(stats.questions_needed(0.10)) <= 0.10
    # Capped at 1 up to n=5 (no difference at all is detected 80% of the time), below 1 from n=6.
    assert [stats.detectable_difference(n) for n in (1, 2, 5)] == [1.0, 1.0, 1.0]
    assert stats.detectable_difference(6) < 1.0
    with pytest.raises(ValueError, match="power"):
        stats.questions_needed(0.1, power=1.0)


@pytest.mark.parametrize(("difference", "n"), [(0.10, 395), (0.05, 1572)])
def test_questions_needed_is_the_smallest_n_with_80pct_exact_power(difference, n):
    """Peer: the exact power of the paired t-test (noncentral t, scipy) on per-question differences of two
    independent models at 50% (sd sqrt(0.5)) first reaches 80% at n."""
    scipy_stats = pytest.importorskip("scipy.stats")

    def power(k: int) -> float:
        df, nc = k - 1, difference / math.sqrt(0.5) * math.sqrt(k)
        crit = scipy_stats.t.ppf(0.975, df)
        return 1 - scipy_stats.nct.cdf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)

    assert stats.questions_needed(difference) == n
    assert power(n) >= 0.8 > power(n - 1)


def test_significance_rule_false_positive_rate_by_simulation():
    """Equally good models (no true difference): the report's rule (bootstrap interval AND exact McNemar) flags
    at most the promised 5% at n=8 and n=30, while the percentile bootstrap alone exceeds it at n=8."""
    small = stats.simulate_false_positives(8, rate=0.5, sims=600, seed=3, resamples=2000)
    assert small.both <= small.mcnemar and small.both <= small.bootstrap
    assert small.both <= 0.05 < small.bootstrap
    mid = stats.simulate_false_positives(30, rate=0.4, sims=300, seed=4, resamples=2000)
    assert mid.both <= 0.05
    again = stats.simulate_false_positives(8, rate=0.5, sims=600, seed=3, resamples=2000)
    assert again == small  # seeded


def test_a_3_0_split_is_never_significant():
    """8 questions, 3 only the model got right, none only the reference: McNemar p = 2/8 = 0.25. Whether the
    percentile bootstrap interval excludes 0 depends on its seed (2.5% quantile 0 or 12.5 points); the rule's
    verdict does not: not significant for every seed."""
    model = [True] * 3 + [True] * 2 + [False] * 3
    ref = [False] * 3 + [True] * 2 + [False] * 3
    out = [compare(_rows("m", model) + _rows("r", ref), "m", "r", seed=seed)[0] for seed in range(20)]
    assert {c["bootstrap_excludes_0"] for c in out} == {True, False}  # the old flag flipped with the seed
    assert all(c["mcnemar_p"] == pytest.approx(0.25) and not c["significant"] for c in out)


# --- the report's paired comparison on a constructed table ------------------------------------------
def _rows(model: str, correct: list[bool], target_len: int = 1024) -> list[dict]:
    return [
        {"model": model, "dataset": "musique", "id": f"q{i}", "target_len": target_len, "depth": -1.0, "sub_em": ok}
        for i, ok in enumerate(correct)
    ]


def test_compare_constructed_table_known_answer():
    # 20 questions: both right 4, only model 9, only reference 1, both wrong 6.
    model = [True] * 4 + [True] * 9 + [False] * 1 + [False] * 6
    ref = [True] * 4 + [False] * 9 + [True] * 1 + [False] * 6
    (c,) = compare(_rows("solo", model) + _rows("base", ref), "solo", "base", seed=0)
    assert (c["n_pairs"], c["model_pct"], c["reference_pct"]) == (20, 65.0, 25.0)
    assert c["diff_pct_points"] == 40.0
    assert (c["model_only_correct"], c["reference_only_correct"]) == (9, 1)
    assert c["mcnemar_p"] == pytest.approx(2 * 11 / 2**10)  # P(X <= 1), X ~ Binom(10, 1/2), doubled
    # The bootstrap interval of a 9-vs-1 split over 20 questions: about 40 ± 2 * 14 points, excluding 0.
    assert 10 < c["ci95_low_pct_points"] < 25 and 55 < c["ci95_high_pct_points"] < 70
    assert c["significant"] and c["pairs_independent"]
    # Swapped roles: the same evidence, the opposite sign.
    (s,) = compare(_rows("solo", model) + _rows("base", ref), "base", "solo", seed=0)
    assert s["diff_pct_points"] == -40.0 and s["mcnemar_p"] == c["mcnemar_p"] and s["significant"]


def test_compare_pools_lengths_by_question():
    # Same 10 questions at two lengths; the reference misses 2 of them at 2K only.
    model = _rows("m", [True] * 10, 1024) + _rows("m", [True] * 10, 2048)
    ref = _rows("r", [True] * 10, 1024) + _rows("r", [True] * 8 + [False] * 2, 2048)
    out = compare(model + ref, "m", "r", seed=0)
    assert [c["target_len"] for c in out] == [1024, 2048, None]
    at_1k, at_2k, pooled = out
    assert at_1k["diff_pct_points"] == 0.0 and not at_1k["significant"] and at_1k["mcnemar_p"] == 1.0
    assert at_2k["diff_pct_points"] == 20.0 and at_2k["mcnemar_p"] == pytest.approx(0.5)
    assert not at_2k["significant"] or at_2k["ci95_low_pct_points"] > 0
    assert pooled["n_pairs"] == 20 and pooled["n_questions"] == 10 and not pooled["pairs_independent"]
    assert pooled["diff_pct_points"] == 10.0
    # A mismatched question (only one model answered it) is not paired.
    lone = _rows("m", [True], 4096)
    assert all(c["target_len"] != 4096 for c in compare(model + ref + lone, "m", "r", seed=0))
