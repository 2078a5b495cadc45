"""Kinetic curve type (the contract's one rule), lesion curves and the voxelwise kinetic map."""

import numpy as np
import pytest

from dcesynth.kinetics import (
    CurveRule,
    CurveType,
    classify_curve,
    kinetic_map,
    lesion_labels,
    lesion_mean_curve,
    relative_enhancement,
)

PAPER_TIMES_S = [0.0, 85.0, 155.0, 225.0, 295.0, 365.0]


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([100, 180, 200, 215, 225, 235], CurveType.PERSISTENT),  # (235 - 180) / 180 = +30.6 %
        ([100, 200, 205, 206, 204, 203], CurveType.PLATEAU),  # +1.5 %
        ([100, 250, 240, 225, 212, 200], CurveType.WASHOUT),  # -20 %
    ],
)
def test_classify_hand_made_curves(curve, expected):
    assert classify_curve(np.array(curve, dtype=float), PAPER_TIMES_S) == expected


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        (110.0, CurveType.PLATEAU),  # exactly +10 %: plateau ("within +-10 %" includes the edge)
        (110.01, CurveType.PERSISTENT),
        (90.0, CurveType.PLATEAU),  # exactly -10 %: plateau
        (89.99, CurveType.WASHOUT),
    ],
)
def test_thresholds_at_exactly_ten_percent_belong_to_plateau(last, expected):
    # Early value 100 (the 85 s phase); (last - 100) / 100 is exactly +-0.1 in float64.
    curve = np.array([50.0, 100.0, 100.0, last])
    assert classify_curve(curve, [0.0, 85.0, 200.0, 365.0]) == expected


def test_early_value_is_the_maximum_over_phases_up_to_120_s():
    times_s = [0.0, 60.0, 120.0, 300.0]
    # Early = max(200, 160) = 200 -> (175 - 200) / 200 = -12.5 % washout; taking the
    # last early phase (160) would give +9.4 % plateau.
    assert classify_curve(np.array([100.0, 200.0, 160.0, 175.0]), times_s) == CurveType.WASHOUT
    # Early = max(150, 200) = 200 (the 120 s phase counts) -> +7.5 % plateau; taking the
    # first post-contrast phase (150) would give +43 % persistent.
    assert classify_curve(np.array([100.0, 150.0, 200.0, 215.0]), times_s) == CurveType.PLATEAU


def test_without_an_early_phase_the_first_post_contrast_phase_is_early():
    # No phase at <= 120 s: early = 200 (150 s) -> (260 - 200) / 200 = +30 % persistent.
    curve = np.array([100.0, 200.0, 250.0, 260.0])
    assert classify_curve(curve, [0.0, 150.0, 300.0, 450.0]) == CurveType.PERSISTENT


def test_thresholds_are_configurable():
    curve = np.array([100.0, 200.0, 230.0])  # +15 %
    times_s = [0.0, 85.0, 365.0]
    assert classify_curve(curve, times_s) == CurveType.PERSISTENT
    wide = CurveRule(persistent_above=0.20, washout_below=-0.20)
    assert classify_curve(curve, times_s, wide) == CurveType.PLATEAU


def test_early_window_is_configurable():
    curve = np.array([100.0, 200.0, 300.0, 310.0])
    times_s = [0.0, 85.0, 155.0, 365.0]
    assert classify_curve(curve, times_s) == CurveType.PERSISTENT  # early 200: +55 %
    late_window = CurveRule(early_window_s=200.0)
    assert classify_curve(curve, times_s, late_window) == CurveType.PLATEAU  # early 300: +3.3 %


def test_classify_curve_rejects_a_curve_of_the_wrong_length():
    with pytest.raises(ValueError, match="does not match 6 times"):
        classify_curve(np.ones(5), PAPER_TIMES_S)


def test_curve_without_positive_early_signal_has_no_type():
    assert classify_curve(np.array([0.0, 0.0, 0.0]), [0.0, 85.0, 365.0]) == CurveType.NONE


def test_curve_type_labels_and_map_codes():
    assert [t.label for t in CurveType] == ["none", "persistent", "plateau", "washout"]
    assert [int(t) for t in CurveType] == [0, 1, 2, 3]


def test_relative_enhancement_is_change_over_pre():
    enhancement = relative_enhancement(
        np.array([[100.0, 150.0, 200.0, 90.0], [0.0, 1.0, 2.0, 3.0]])
    )
    np.testing.assert_allclose(enhancement[0], [0.0, 0.5, 1.0, -0.1])
    assert np.isnan(enhancement[1]).all()  # pre of 0: undefined


def test_lesion_mean_curve_averages_each_label_per_phase():
    phases = np.zeros((3, 4, 4, 2), dtype=np.float32)
    seg = np.zeros((4, 4, 2), dtype=np.int16)
    seg[0, 0, 0], seg[0, 1, 0] = 1, 1
    seg[3, 3, 1] = 2
    phases[:, 0, 0, 0] = [100.0, 200.0, 300.0]
    phases[:, 0, 1, 0] = [110.0, 220.0, 330.0]
    phases[:, 3, 3, 1] = [50.0, 60.0, 70.0]
    np.testing.assert_allclose(lesion_mean_curve(phases, seg, 1), [105.0, 210.0, 315.0])
    np.testing.assert_allclose(lesion_mean_curve(phases, seg, 2), [50.0, 60.0, 70.0])
    assert lesion_labels(seg) == [1, 2]


def test_lesion_mean_curve_rejects_an_empty_label():
    with pytest.raises(ValueError, match="lesion label 3 is empty"):
        lesion_mean_curve(np.ones((2, 3, 3, 3)), np.zeros((3, 3, 3), dtype=np.int16), 3)


def test_kinetic_map_types_enhancing_voxels_inside_the_roi_only():
    times_s = [0.0, 85.0, 225.0, 365.0]
    voxels = {
        (0, 0, 0): [100.0, 200.0, 230.0, 260.0],  # +30 % persistent
        (0, 1, 0): [100.0, 200.0, 205.0, 200.0],  # 0 % plateau
        (1, 0, 0): [100.0, 200.0, 170.0, 150.0],  # -25 % washout
        (1, 1, 0): [100.0, 140.0, 160.0, 180.0],  # early enhancement 40 % < 50 %: none
        (1, 1, 1): [100.0, 151.0, 160.0, 180.0],  # early enhancement 51 %: persistent
        (0, 0, 1): [100.0, 250.0, 200.0, 150.0],  # washout but outside the ROI
    }
    phases = np.full((4, 2, 2, 2), 100.0, dtype=np.float32)
    for index, curve in voxels.items():
        phases[(slice(None), *index)] = curve
    roi = np.ones((2, 2, 2), dtype=np.uint8)
    roi[0, 0, 1] = 0
    codes = kinetic_map(phases, times_s, roi)
    assert codes.dtype == np.uint8
    expected = np.zeros((2, 2, 2), dtype=np.uint8)
    expected[0, 0, 0], expected[0, 1, 0], expected[1, 0, 0], expected[1, 1, 1] = 1, 2, 3, 1
    np.testing.assert_array_equal(codes, expected)


def test_kinetic_map_enhancement_threshold_is_configurable():
    phases = np.array([100.0, 140.0, 150.0, 160.0], dtype=np.float32).reshape(4, 1, 1, 1)
    roi = np.ones((1, 1, 1), dtype=np.uint8)
    times_s = [0.0, 85.0, 225.0, 365.0]
    assert kinetic_map(phases, times_s, roi)[0, 0, 0] == CurveType.NONE
    low = CurveRule(min_early_enhancement=0.3)
    assert kinetic_map(phases, times_s, roi, low)[0, 0, 0] == CurveType.PERSISTENT
