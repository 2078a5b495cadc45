"""Image and kinetic-curve metrics of synthesized phases (Chung et al. 2025, Tables 1 and 2).

Pure functions over numpy arrays; no I/O. Image metrics compare one real and one
synthesized (X, Y, Z) phase inside the breast ROI; curve metrics compare (T,)
lesion curves; agreement metrics compare curve-type codes (``kinetics.CurveType``).

Conventions the paper does not state, decided here:

- Images are compared in TI-normalised units (``data.tinorm``), and ``data_range``
  defaults to max - min of the REAL phase inside the ROI.
- PSNR of identical images is ``math.inf``; aggregations cap it at ``PSNR_CAP_DB``
  (see ``capped_psnr``) so means stay finite and JSON stays standard.
- SSIM is MONAI's 3-D Gaussian SSIM map (11 voxels, sigma 1.5) of both images
  measured from the real ROI minimum (SSIM expects intensities in [0, data_range])
  and set to 0 outside the ROI (the paper zeroes the output outside the breast for
  evaluation), zero-padded so every ROI voxel has a window, averaged over the ROI.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from dcesynth.kinetics import TYPED_CURVES

PSNR_CAP_DB = 100.0
"""PSNR used for identical images when averaging: above any real synthesis result."""

SSIM_KERNEL_SIZE = 11
SSIM_KERNEL_SIGMA = 1.5
SSIM_TRUNCATE = (SSIM_KERNEL_SIZE // 2) / SSIM_KERNEL_SIGMA
"""scipy's truncation in sigmas that gives the 11-voxel window."""
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _mask_and_range(real: np.ndarray, synth: np.ndarray, mask: np.ndarray, data_range):
    real = np.asarray(real, dtype=np.float64)
    synth = np.asarray(synth, dtype=np.float64)
    inside = np.asarray(mask) > 0
    if real.shape != synth.shape or inside.shape != real.shape:
        raise ValueError(
            f"shapes differ: real {real.shape}, synth {synth.shape}, mask {inside.shape}"
        )
    if not inside.any():
        raise ValueError("mask is empty")
    if data_range is None:
        data_range = float(real[inside].max() - real[inside].min())
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return real, synth, inside, float(data_range)


def psnr(real: np.ndarray, synth: np.ndarray, mask: np.ndarray, data_range=None) -> float:
    """Peak signal-to-noise ratio inside ``mask``, in dB.

    ``10 log10(data_range^2 / MSE)`` with the MSE over the voxels inside the mask.

    Args:
        real: (X, Y, Z) real phase (TI-normalised units in this project).
        synth: (X, Y, Z) synthesized phase, same units.
        mask: (X, Y, Z) breast ROI, nonzero inside.
        data_range: peak value range; default max - min of ``real`` inside the mask.

    Returns:
        PSNR in dB; ``math.inf`` when the images agree exactly inside the mask.
    """
    real, synth, inside, data_range = _mask_and_range(real, synth, mask, data_range)
    mse = float(np.mean((real[inside] - synth[inside]) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def capped_psnr(value: float) -> float:
    """``value`` limited to ``PSNR_CAP_DB``, so identical images (inf) average finitely."""
    return min(float(value), PSNR_CAP_DB)


def ssim_map(real: np.ndarray, synth: np.ndarray, data_range: float) -> np.ndarray:
    """Voxelwise 3-D SSIM, zero padding at the borders.

    The map of MONAI's ``compute_ssim_and_cs`` (sampled Gaussian window, 11 voxels,
    sigma 1.5, k1 0.01, k2 0.03; away from the borders the numbers agree, a test
    checks it), computed with scipy's separable Gaussian filter: about 100 times
    faster on CPU than MONAI's dense 11^3 convolution, which matters for full-size
    breast volumes.

    Args:
        real: (X, Y, Z) real image.
        synth: (X, Y, Z) synthesized image, same units.
        data_range: value range for the stability constants.

    Returns:
        (X, Y, Z) float64 SSIM per voxel.
    """
    x = np.asarray(synth, dtype=np.float64)
    y = np.asarray(real, dtype=np.float64)

    def local_mean(image: np.ndarray) -> np.ndarray:
        return gaussian_filter(image, SSIM_KERNEL_SIGMA, truncate=SSIM_TRUNCATE, mode="constant")

    mu_x, mu_y = local_mean(x), local_mean(y)
    sigma_x = local_mean(x * x) - mu_x**2
    sigma_y = local_mean(y * y) - mu_y**2
    sigma_xy = local_mean(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)


def ssim(real: np.ndarray, synth: np.ndarray, mask: np.ndarray, data_range=None) -> float:
    """3-D structural similarity averaged over the voxels inside ``mask``.

    SSIM's luminance term assumes intensities in [0, data_range]; TI-normalised
    images have zero mean in the ROI, where that term is unstable (it even turns
    negative), so both images are first measured from the real ROI minimum. Then
    both are set to 0 outside the mask and cropped to its bounding box; the
    ``ssim_map`` of the crop (zero padded, so every ROI voxel has a window, also at
    the volume border) is averaged over the mask.

    Args:
        real: (X, Y, Z) real phase.
        synth: (X, Y, Z) synthesized phase, same units.
        mask: (X, Y, Z) breast ROI, nonzero inside.
        data_range: value range for the stability constants; default max - min of
            ``real`` inside the mask.

    Returns:
        Mean SSIM in [-1, 1]; 1 for identical images.
    """
    real, synth, inside, data_range = _mask_and_range(real, synth, mask, data_range)
    corners = np.argwhere(inside)
    box = tuple(slice(a, b + 1) for a, b in zip(corners.min(0), corners.max(0), strict=True))
    inside = inside[box]
    floor = real[box][inside].min()
    values = ssim_map(
        np.where(inside, real[box] - floor, 0.0),
        np.where(inside, synth[box] - floor, 0.0),
        data_range,
    )
    return float(values[inside].mean())


def enhancement_error(real: np.ndarray, synth: np.ndarray, lesion_mask: np.ndarray) -> float:
    """Squared error of the mean intensity inside a lesion (the paper's enhancement error).

    Args:
        real: (X, Y, Z) real phase, TI-normalised units.
        synth: (X, Y, Z) synthesized phase, same units.
        lesion_mask: (X, Y, Z) one lesion, nonzero inside.

    Returns:
        ``(mean(real[lesion]) - mean(synth[lesion]))^2`` in squared TI-normalised units.
    """
    inside = np.asarray(lesion_mask) > 0
    if not inside.any():
        raise ValueError("lesion mask is empty")
    difference = (
        np.asarray(real, np.float64)[inside].mean() - np.asarray(synth, np.float64)[inside].mean()
    )
    return float(difference**2)


def spearman(real_curve: np.ndarray, synth_curve: np.ndarray) -> float:
    """Spearman rank correlation (SCC) of two (T,) kinetic curves.

    Undefined for a constant curve; defined here from the rankings themselves: 1.0
    when both curves are constant (identical all-tied rankings, which includes two
    identical constant curves), 0.0 when only one is.
    """
    real_curve = np.asarray(real_curve, dtype=np.float64)
    synth_curve = np.asarray(synth_curve, dtype=np.float64)
    if real_curve.shape != synth_curve.shape or real_curve.ndim != 1:
        raise ValueError(
            f"curves must be (T,) of one length: {real_curve.shape}, {synth_curve.shape}"
        )
    real_constant = np.ptp(real_curve) == 0
    synth_constant = np.ptp(synth_curve) == 0
    if real_constant or synth_constant:
        return 1.0 if real_constant and synth_constant else 0.0
    return float(spearmanr(real_curve, synth_curve).statistic)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Dynamic time warping distance of two 1-D curves, cost ``|a_i - b_j|``.

    Classic DTW: the least total cost of a monotone path from (0, 0) to (n-1, m-1)
    taking steps (1, 0), (0, 1) or (1, 1); not normalised by path length. Kinetic
    curves have a handful of points, so a plain O(n m) table suffices.

    Args:
        a: (n,) curve.
        b: (m,) curve.

    Returns:
        The distance, in the curves' units; 0 for identical curves.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.size == 0 or b.size == 0:
        raise ValueError(f"curves must be non-empty and 1-D, got {a.shape} and {b.shape}")
    cost = np.abs(a[:, None] - b[None, :])
    total = np.full((a.size + 1, b.size + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, a.size + 1):
        for j in range(1, b.size + 1):
            total[i, j] = cost[i - 1, j - 1] + min(
                total[i - 1, j], total[i, j - 1], total[i - 1, j - 1]
            )
    return float(total[-1, -1])


def _codes(types, name: str) -> np.ndarray:
    codes = np.asarray([int(t) for t in types], dtype=np.int64)
    if codes.size == 0:
        raise ValueError(f"{name} is empty")
    return codes


def curve_type_agreement(real_types, synth_types) -> float:
    """Fraction of lesions whose synthesized curve type equals the real one.

    Args:
        real_types: (L,) ``CurveType`` values or their integer codes.
        synth_types: (L,) the same for the synthesized curves.
    """
    real, synth = _codes(real_types, "real_types"), _codes(synth_types, "synth_types")
    if real.shape != synth.shape:
        raise ValueError(f"{real.size} real types but {synth.size} synthesized types")
    return float(np.mean(real == synth))


def confusion_matrix(real_types, synth_types) -> np.ndarray:
    """Counts of (real type, synthesized type) pairs.

    Args:
        real_types: (L,) ``CurveType`` values or codes.
        synth_types: (L,) the same for the synthesized curves.

    Returns:
        (3, 3) int64; rows real, columns synthesized, both in the order persistent,
        plateau, washout (``kinetics.TYPED_CURVES``). Pairs where either type is NONE are not
        counted.
    """
    real, synth = _codes(real_types, "real_types"), _codes(synth_types, "synth_types")
    if real.shape != synth.shape:
        raise ValueError(f"{real.size} real types but {synth.size} synthesized types")
    matrix = np.zeros((3, 3), dtype=np.int64)
    for row, real_type in enumerate(TYPED_CURVES):
        for col, synth_type in enumerate(TYPED_CURVES):
            matrix[row, col] = np.sum((real == real_type) & (synth == synth_type))
    return matrix


def kinetic_map_agreement(
    real_map: np.ndarray, synth_map: np.ndarray, lesion_mask: np.ndarray
) -> float:
    """Fraction of lesion voxels whose kinetic-map codes agree (NONE counts as a code).

    Args:
        real_map: (X, Y, Z) codes from ``kinetics.kinetic_map`` on the real series.
        synth_map: (X, Y, Z) codes on the synthesized series.
        lesion_mask: (X, Y, Z) nonzero inside the lesion(s).
    """
    inside = np.asarray(lesion_mask) > 0
    if not inside.any():
        raise ValueError("lesion mask is empty")
    return float(np.mean(np.asarray(real_map)[inside] == np.asarray(synth_map)[inside]))
