"""The case bootstrap on known answers: coverage, clustering, pairing, seeding."""

import numpy as np
import pytest

from dcesynth.stats import (
    bootstrap_ci,
    clustered_means,
    paired_comparison,
    percentile_interval,
    resample_counts,
)


def test_interval_of_the_mean_covers_the_known_mean_at_the_stated_rate():
    true_mean, draws, n = 3.0, 1000, 50
    samples = np.random.default_rng(0).normal(true_mean, 2.0, size=(draws, n))
    covered = [
        low <= true_mean <= high
        for seed, values in enumerate(samples)
        for low, high in [bootstrap_ci(values, seed=seed)]
    ]
    assert 0.90 <= np.mean(covered) <= 0.98


def test_resample_counts_draw_every_case_once_per_draw_and_follow_the_seed():
    counts = resample_counts(7, resamples=500, seed=3)
    assert counts.shape == (500, 7)
    assert (counts.sum(axis=1) == 7).all()
    np.testing.assert_array_equal(counts, resample_counts(7, resamples=500, seed=3))
    assert not np.array_equal(counts, resample_counts(7, resamples=500, seed=4))
    assert counts.mean() == pytest.approx(1.0)  # every case is drawn once on average


def test_a_case_drawn_twice_counts_its_lesions_twice():
    values = np.array([1.0, 3.0, 10.0])  # case 0 has two lesions, case 1 one
    cases = np.array([0, 0, 1])
    counts = np.array([[2, 0], [0, 2], [1, 1]])
    np.testing.assert_allclose(clustered_means(values, cases, counts), [2.0, 10.0, 14.0 / 3.0])


def test_lesions_of_a_case_move_together():
    rng = np.random.default_rng(1)
    n_cases, per_case = 20, 5
    case_effect = rng.normal(size=n_cases)
    cases = np.repeat(np.arange(n_cases), per_case)
    values = case_effect[cases] + 0.1 * rng.normal(size=cases.size)
    clustered = bootstrap_ci(values, cases, seed=2)
    by_lesion = bootstrap_ci(values, seed=2)
    # Equal lesion counts: resampling cases is resampling the case means.
    case_means = np.bincount(cases, weights=values) / per_case
    np.testing.assert_allclose(clustered, bootstrap_ci(case_means, seed=2))
    # Correlated lesions carry less information than independent ones: a wider interval.
    assert clustered[1] - clustered[0] > 1.6 * (by_lesion[1] - by_lesion[0])


def test_interval_leaves_out_resamples_that_drew_no_unit():
    samples = np.array([np.nan, 1.0, 2.0, 3.0, np.nan])
    assert percentile_interval(samples, level=1.0) == [1.0, 3.0]
    assert percentile_interval(np.full(4, np.nan)) is None
    assert bootstrap_ci(np.array([])) is None


def test_paired_interval_of_identical_models_is_zero_and_their_ratio_exactly_one():
    rng = np.random.default_rng(3)
    errors, cases = rng.exponential(size=30), rng.integers(0, 10, size=30)
    counts = resample_counts(10, seed=0)
    same = paired_comparison(errors, errors.copy(), cases, counts, ratio=True)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "ratio": 1.0, "ratio_ci95": [1.0, 1.0]}


def test_paired_difference_with_a_known_large_shift_excludes_zero():
    rng = np.random.default_rng(4)
    cases = np.repeat(np.arange(25), 2)
    first = rng.exponential(size=cases.size)
    second = first + 2.0 + 0.5 * rng.normal(size=cases.size)
    result = paired_comparison(first, second, cases, resample_counts(25, seed=0), ratio=True)
    assert result["diff"] == pytest.approx(np.mean(first - second))
    low, high = result["ci95"]
    assert -2.5 < low <= result["diff"] <= high < 0.0
    assert result["ratio_ci95"][0] <= result["ratio"] <= result["ratio_ci95"][1] < 1.0


def test_ratio_to_a_zero_error_is_none():
    errors = np.array([0.5, 1.0, 2.0])
    cases = np.arange(3)
    result = paired_comparison(errors, np.zeros(3), cases, resample_counts(3, seed=0), ratio=True)
    assert result["ratio"] is None and result["ratio_ci95"] is None
    assert result["ci95"][0] > 0.0


def test_paired_difference_without_ratio_has_no_ratio_keys():
    values = np.array([0.9, 0.8, 0.7])
    result = paired_comparison(values, values - 0.1, np.arange(3), resample_counts(3, seed=0))
    assert set(result) == {"diff", "ci95"}
    assert result["ci95"] == pytest.approx([0.1, 0.1])
