"""Known answers of the image, curve and agreement metrics."""

import math

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs

from dcesynth.kinetics import CurveType
from dcesynth.metrics import (
    PSNR_CAP_DB,
    capped_psnr,
    confusion_matrix,
    curve_type_agreement,
    dtw_distance,
    enhancement_error,
    kinetic_map_agreement,
    psnr,
    spearman,
    ssim,
    ssim_map,
)

SHAPE = (32, 32, 16)
P, PL, W, N = CurveType.PERSISTENT, CurveType.PLATEAU, CurveType.WASHOUT, CurveType.NONE


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE)


@pytest.fixture
def roi() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[4:28, 4:28, 2:14] = 1
    return mask


def test_psnr_of_identical_images_is_infinite_and_capped_for_averaging(image, roi):
    assert psnr(image, image, roi) == math.inf
    assert capped_psnr(math.inf) == PSNR_CAP_DB
    assert capped_psnr(35.0) == 35.0


def test_psnr_uses_the_real_range_inside_the_roi(roi):
    real = np.zeros(SHAPE)
    real[roi > 0] = np.linspace(0.0, 4.0, int(roi.sum()))
    real[0, 0, 0] = 1000.0  # outside the ROI: must not set the peak
    synth = real + 0.1 * roi
    assert psnr(real, synth, roi) == pytest.approx(10 * math.log10(4.0**2 / 0.01))


def test_psnr_ignores_differences_outside_the_roi(image, roi):
    synth = np.where(roi > 0, image, image + 5.0)
    assert psnr(image, synth, roi) == math.inf


def test_ssim_of_identical_images_is_one(image, roi):
    assert ssim(image, image, roi) == pytest.approx(1.0, abs=1e-9)


def test_ssim_decreases_with_noise(image, roi):
    noise = np.random.default_rng(1).normal(size=SHAPE)
    mild = ssim(image, image + 0.1 * noise, roi)
    strong = ssim(image, image + 1.0 * noise, roi)
    assert 0.0 < strong < mild < 1.0


def test_ssim_does_not_depend_on_a_common_intensity_offset(image, roi):
    synth = image + 0.2 * np.random.default_rng(1).normal(size=SHAPE)
    assert ssim(image + 7.0, synth + 7.0, roi) == pytest.approx(ssim(image, synth, roi))


def test_ssim_map_matches_monai_away_from_the_border(image):
    synth = image + 0.3 * np.random.default_rng(2).normal(size=SHAPE)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))[None, None]  # noqa: E731
    monai_map, _ = compute_ssim_and_cs(
        as_tensor(synth), as_tensor(image), 3, [11] * 3, [1.5] * 3, data_range=4.0
    )
    ours = ssim_map(image, synth, data_range=4.0)[5:-5, 5:-5, 5:-5]
    np.testing.assert_allclose(ours, monai_map[0, 0].numpy(), atol=1e-5)


def test_enhancement_error_of_a_constant_shift_is_its_square(image):
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[10:16, 10:16, 5:9] = True
    shifted = np.where(lesion, image + 0.3, image)
    assert enhancement_error(image, image, lesion) == 0.0
    assert enhancement_error(image, shifted, lesion) == pytest.approx(0.09)


def test_spearman_is_one_for_identical_and_minus_one_for_reversed_curves():
    curve = np.array([100.0, 180.0, 200.0, 190.0, 185.0, 170.0])
    assert spearman(curve, curve) == pytest.approx(1.0)
    assert spearman(curve, 2 * curve + 5) == pytest.approx(1.0)
    assert spearman(curve, -curve) == pytest.approx(-1.0)


def test_spearman_of_constant_curves_is_defined():
    flat = np.full(6, 3.0)
    assert spearman(flat, flat) == 1.0
    assert spearman(flat, np.arange(6.0)) == 0.0


def test_dtw_of_identical_curves_is_zero_and_repeats_are_free():
    curve = np.array([0.0, 1.0, 2.0, 1.5])
    assert dtw_distance(curve, curve) == 0.0
    assert dtw_distance([0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0]) == 0.0


def test_dtw_of_a_shifted_curve_by_hand():
    # a = 0 1 2 3, b = a + 1: best path (0,0) (1,0) (2,1) (3,2) (3,3) costs 1 + 0 + 0 + 0 + 1.
    assert dtw_distance([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.0)
    # constant offset d on flat curves: every step costs d, the shortest path has 3 steps.
    assert dtw_distance([0.0, 0.0, 0.0], [0.5, 0.5, 0.5]) == pytest.approx(1.5)


def test_curve_type_agreement_is_the_fraction_equal():
    assert curve_type_agreement([P, PL, W, W], [P, W, W, W]) == pytest.approx(0.75)


def test_confusion_matrix_counts_real_rows_and_synth_columns_without_none():
    matrix = confusion_matrix([P, PL, W, W, N], [P, W, W, PL, W])
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


def test_kinetic_map_agreement_counts_lesion_voxels_only():
    real = np.zeros(SHAPE, dtype=np.uint8)
    synth = np.zeros(SHAPE, dtype=np.uint8)
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[0:2, 0:2, 0:1] = True  # 4 voxels
    real[lesion] = W
    synth[0, 0, 0] = W
    synth[5, 5, 5] = P  # outside the lesion: ignored
    assert kinetic_map_agreement(real, synth, lesion) == pytest.approx(0.25)
