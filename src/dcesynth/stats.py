"""Percentile bootstrap over cases (clusters): intervals of means and of paired differences.

Pure numpy, no I/O. A unit is what a metric has one value of: a case (PSNR, SSIM) or a
lesion (enhancement error, SCC, DTW, agreement). The bootstrap resamples CASES with
replacement; a unit enters a resample as often as its case was drawn, so the lesions
of one case move together (a case drawn twice counts its lesions twice). One draw of
cases, ``resample_counts``, serves every metric and every model of an evaluation:
intervals of two models' difference are then paired on the same resampled cases.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
"""Coverage of the intervals; metrics.json names them ``*_ci95``."""


def resample_counts(n_cases: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each case is drawn in each bootstrap resample.

    Args:
        n_cases: number of cases C (> 0).
        resamples: number of resamples R (> 0).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        (R, C) int64; every row sums to C.
    """
    if n_cases < 1 or resamples < 1:
        raise ValueError(f"need cases and resamples, got {n_cases} cases, {resamples} resamples")
    drawn = np.random.default_rng(seed).integers(0, n_cases, size=(resamples, n_cases))
    # One bincount over (resample, case) pairs flattened, instead of one per row.
    flat = drawn + n_cases * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n_cases).reshape(resamples, n_cases)


def clustered_means(values: np.ndarray, cases: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mean of the units' values in each resample, every unit weighted by its case's count.

    Args:
        values: (N,) one value per unit.
        cases: (N,) the case index (0 .. C-1) of each unit.
        counts: (R, C) ``resample_counts``.

    Returns:
        (R,) float64 means; NaN in a resample that drew no case with a unit.
    """
    values = np.asarray(values, dtype=np.float64)
    cases = np.asarray(cases, dtype=np.int64)
    if values.shape != cases.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and cases {cases.shape} must be (N,) alike")
    n_cases = counts.shape[1]
    sums = counts @ np.bincount(cases, weights=values, minlength=n_cases)
    sizes = counts @ np.bincount(cases, minlength=n_cases)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / sizes


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The central ``level`` percentile interval of (R,) bootstrap samples, NaNs left out.

    Returns:
        ``[low, high]``, or None when no sample is a number.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if not np.isfinite(samples).any():
        return None
    tail = 50.0 * (1.0 - level)
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return [float(low), float(high)]


def bootstrap_ci(
    values: np.ndarray,
    cases: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[float] | None:
    """Percentile bootstrap interval of the mean of ``values``, resampling cases.

    Args:
        values: (N,) one value per unit.
        cases: (N,) case index of each unit, 0 .. C-1; None: every unit its own case.
        resamples: number of resamples.
        level: coverage of the interval, e.g. 0.95.
        seed: seed of the resampling.

    Returns:
        ``[low, high]`` of the mean; None when there are no values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    cases = np.arange(values.size) if cases is None else np.asarray(cases, dtype=np.int64)
    counts = resample_counts(int(cases.max()) + 1, resamples, seed)
    return percentile_interval(clustered_means(values, cases, counts), level)


def paired_comparison(
    first: np.ndarray,
    second: np.ndarray,
    cases: np.ndarray,
    counts: np.ndarray,
    ratio: bool = False,
) -> dict:
    """Two models' mean on the same units and the same resampled cases: difference and ratio.

    Args:
        first: (N,) the first model's value per unit.
        second: (N,) the second model's value of the same units.
        cases: (N,) case index of each unit.
        counts: (R, C) ``resample_counts``.
        ratio: also the ratio of the means (for errors, which are >= 0).

    Returns:
        ``{"diff", "ci95"}``: mean(first) - mean(second) and its 95 % interval; with ``ratio``
        also ``{"ratio", "ratio_ci95"}``: mean(first) / mean(second), both None unless
        the second mean is positive in the sample and in every resample (a ratio to
        zero error has no finite value).
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"paired values differ in shape: {first.shape} and {second.shape}")
    result = {
        "diff": float(np.mean(first - second)),
        "ci95": percentile_interval(clustered_means(first - second, cases, counts)),
    }
    if ratio:
        result["ratio"] = result["ratio_ci95"] = None
        first_means = clustered_means(first, cases, counts)
        second_means = clustered_means(second, cases, counts)
        drawn = np.isfinite(second_means)
        if np.mean(second) > 0 and (second_means[drawn] > 0).all():
            result["ratio"] = float(np.mean(first) / np.mean(second))
            result["ratio_ci95"] = percentile_interval(first_means / second_means)
    return result
