"""The regression model: what it learns, how it is stored, train/predict through the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import CliRunner

from dcesynth.case import Case, load_case, save_case
from dcesynth.cli import app
from dcesynth.data.tinorm import fit_case_norm, fit_input_norm
from dcesynth.io import InputError
from dcesynth.kinetics import classify_curve, lesion_mean_curve
from dcesynth.regression import (
    LESION_FEATURES,
    PolynomialRidge,
    RegressionConfig,
    RegressionModel,
    arterial_enhancement,
    choose_knots,
    feature_names,
    fit_regression,
    knot_design,
    lesion_features,
    polynomial_terms,
    voxel_features,
)

TIMES = [0.0, 85.0, 155.0, 225.0]
SHAPE = (24, 24, 12)
# Each later phase k changes from 1dyn by GAINS[k] times 1dyn's enhancement over pre.
GAINS = (0.3, -0.4)


def law_case(seed: int, case_id: str = "law") -> Case:
    """A case whose later phases follow a known voxelwise law of pre and 1dyn."""
    rng = np.random.default_rng(seed)
    pre = rng.uniform(80.0, 120.0, SHAPE).astype(np.float32)
    post = pre * rng.uniform(1.0, 2.5, SHAPE).astype(np.float32)
    later = [post + gain * (post - pre) for gain in GAINS]
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[2:22, 2:22, 1:11] = 1
    seg = np.zeros(SHAPE, dtype=np.int16)
    seg[8:12, 8:12, 4:8] = 1
    phases = np.stack([pre, post, *later]).astype(np.float32)
    return Case(case_id, phases, TIMES, seg, roi, np.eye(4), source="test")


def fitted(cases, **config) -> RegressionModel:
    # No smoothing scales and no lesion stage: the law is voxelwise, and either would only
    # add terms.
    options = {"sigmas_vox": (), "degree": 2, "alpha": 1e-6, "lesion_stage": False, **config}
    return fit_regression([lambda case=case: case for case in cases], RegressionConfig(**options))


@pytest.mark.parametrize("normalisation", ["ti", "pre"])
def test_learns_a_voxelwise_law_of_pre_and_1dyn(normalisation):
    model = fitted([law_case(seed) for seed in range(4)], normalisation=normalisation)
    case = law_case(10)
    assert model.config.case_norm(case) == fit_input_norm(case.phases, case.roi, normalisation)
    predicted = model.predict_case(case)
    roi = case.roi > 0
    for k in range(2):
        np.testing.assert_allclose(predicted[k][roi], case.phases[2 + k][roi], rtol=2e-3)
    assert np.array_equal(predicted[:, ~roi], np.repeat(case.phases[1][None], 2, 0)[:, ~roi])


def test_predictions_at_other_times_interpolate_the_fitted_phases_linearly():
    model = fitted([law_case(0), law_case(1)])
    case = law_case(2)
    fitted_phases = model.predict_case(case)  # at 155 s and 225 s
    post = case.phases[1]
    at = model.predict_at(case, [155.0, 190.0, 120.0, 500.0, 40.0])
    np.testing.assert_allclose(at[0], fitted_phases[0], atol=1e-4)
    np.testing.assert_allclose(at[1], (fitted_phases[0] + fitted_phases[1]) / 2, atol=1e-3)
    np.testing.assert_allclose(at[2], (post + fitted_phases[0]) / 2, atol=1e-3)
    # Held at the last fitted phase after it, at 1dyn before 1dyn's time.
    np.testing.assert_allclose(at[3], fitted_phases[1], atol=1e-4)
    np.testing.assert_allclose(at[4], post, atol=1e-4)
    series = model.predict_series(case, [155.0, 190.0])
    np.testing.assert_array_equal(series[:2], case.phases[:2])
    np.testing.assert_array_equal(series[2:], at[:2])


def test_features_are_named_and_polynomial_terms_follow_their_powers():
    config = RegressionConfig(sigmas_vox=(1.0, 2.0))
    case = law_case(0)
    features = voxel_features(case, fit_case_norm(case.phases, case.roi), config)
    assert features.shape == (*SHAPE, len(feature_names(config))) == (*SHAPE, 11)
    assert len(set(feature_names(config))) == 11
    x = np.array([[2.0, 3.0], [-1.0, 0.5]])
    powers = np.array([[1, 0], [0, 2], [1, 1]])
    np.testing.assert_array_equal(polynomial_terms(x, powers), [[2, 9, 6], [-1, 0.25, -0.5]])


def test_save_and_load_give_the_same_predictions(tmp_path):
    model = fitted([law_case(0), law_case(1)], sigmas_vox=(1.0,), alpha=1.0, lesion_stage=True)
    assert model.lesion is not None
    model.save(tmp_path / "model.safetensors")
    loaded = RegressionModel.load(tmp_path / "model.safetensors")
    case = law_case(3)
    np.testing.assert_array_equal(loaded.predict_case(case), model.predict_case(case))
    np.testing.assert_array_equal(loaded.lesion.coef, model.lesion.coef)
    assert loaded.config == model.config and loaded.knots_s == [70.0, 140.0]


def test_foreign_or_damaged_model_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros(3, dtype=np.float32)}, foreign)
    with pytest.raises(InputError, match="foreign.safetensors: not a regression model"):
        RegressionModel.load(foreign)
    model = fitted([law_case(0)])
    model.voxel.coef[0, 0] = np.nan
    model.save(tmp_path / "nan.safetensors")
    with pytest.raises(InputError, match="nan.safetensors: regression model holds non-finite"):
        RegressionModel.load(tmp_path / "nan.safetensors")
    model = fitted([law_case(0)])
    model.knots_s = [70.0, 70.0]
    model.save(tmp_path / "knots.safetensors")
    with pytest.raises(InputError, match="knots.safetensors: regression model knots must be"):
        RegressionModel.load(tmp_path / "knots.safetensors")
    # A file whose features are not the ones computed now would be fed the wrong numbers.
    other = tmp_path / "other.safetensors"
    fitted([law_case(0)]).save(other)
    with safe_open(other, framework="numpy") as handle:
        metadata = handle.metadata()
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    metadata["features"] = metadata["features"].replace("log_first_post_min", "first_post_min")
    save_file(arrays, other, metadata=metadata)
    with pytest.raises(InputError, match="other.safetensors: .* fitted on other features than"):
        RegressionModel.load(other)


def time_law_case(seed: int, times_s: list[float]) -> Case:
    """A case whose phases move from 1dyn by 0.2 per minute after 1dyn times 1dyn's
    enhancement over pre: a law continuous in time."""
    case = law_case(seed)
    pre, post = case.phases[:2]
    later = [post + 0.2 * (t - times_s[1]) / 60.0 * (post - pre) for t in times_s[2:]]
    phases = np.stack([pre, post, *later]).astype(np.float32)
    return Case(f"time_{seed}", phases, times_s, case.seg, case.roi, case.affine, source="test")


def test_a_cohort_of_mixed_protocols_gives_a_law_at_any_time():
    # Degree 1: the law is linear in the enhancement, and with two training cases the
    # case-level products of a higher degree would stand for the cases themselves.
    model = fitted(
        [
            time_law_case(0, [0.0, 85.0, 155.0, 225.0]),
            time_law_case(1, [0.0, 60.0, 120.0, 180.0, 240.0]),
        ],
        degree=1,
    )
    # The distinct times after 1dyn are few enough to be the knots.
    assert model.knots_s == [60.0, 70.0, 120.0, 140.0, 180.0]
    case = time_law_case(2, [0.0, 85.0, 175.0, 235.0, 265.0])
    predicted = model.predict_case(case)
    roi = case.roi > 0
    # 90 and 150 s after 1dyn lie between knots; 180 s is the last knot.
    for k in range(3):
        np.testing.assert_allclose(predicted[k][roi], case.phases[2 + k][roi], rtol=2e-3)
    # After the last knot, 180 s after 1dyn, the change is held.
    held = model.predict_at(case, [400.0])[0]
    np.testing.assert_allclose(held[roi], predicted[2][roi], rtol=1e-5)


def test_knots_are_the_cohorts_times_when_few_else_a_grid_that_enough_cases_reach():
    config = RegressionConfig(knot_spacing_s=60.0, max_protocol_knots=3, knot_coverage=0.5)
    assert choose_knots([[0, 85, 155, 225]] * 3, config) == [70.0, 140.0]
    protocols = [[0, 50, 95, 140, 185], [0, 60, 160], [0, 90, 200, 310], [0, 45, 95]]
    # Seven distinct later times: a grid every 60 s up to the last knot half the cases
    # reach (their last phases are 135, 100, 220 and 50 s after 1dyn).
    assert choose_knots(protocols, config) == [60.0, 120.0]
    assert choose_knots(protocols, RegressionConfig(knot_coverage=0.0)) == [
        45.0,
        50.0,
        90.0,
        100.0,
        110.0,
        135.0,
        220.0,
    ]
    assert choose_knots(protocols, dataclasses.replace(config, knot_coverage=0.25)) == [
        60.0,
        120.0,
        180.0,
    ]


def test_features_constant_in_training_take_no_term():
    rng = np.random.default_rng(0)
    features = np.column_stack([rng.normal(size=50), np.full(50, 3.0), rng.normal(size=50)])
    targets = (features[:, 0] * features[:, 2])[:, None]
    stage = PolynomialRidge.fit([(features, targets, None, np.eye(1))], degree=2, alpha=1e-9)
    assert not stage.powers[:, 1].any()
    assert len(stage.powers) == 5  # x0, x2, x0^2, x0 x2, x2^2
    np.testing.assert_allclose(stage.predict(features), targets, atol=1e-6)
    # A target missing for half the samples is fitted on the other half.
    gap = np.where(np.arange(50) < 25, np.nan, 2 * targets[:, 0])
    gapped = PolynomialRidge.fit(
        [(features, np.column_stack([targets, gap]), None, np.eye(2))], 2, 1e-9
    )
    np.testing.assert_allclose(
        gapped.predict(features), np.column_stack([targets, 2 * targets]), atol=1e-6
    )


def test_outputs_seen_through_interpolation_are_fitted_at_the_observations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 1))
    knots = np.column_stack([2.0 * x[:, 0], 3.0 * x[:, 0] + 1.0])
    # Knots at 60 and 120 s after 1dyn: one block is seen at 120 s, the other at 90 s
    # only, half-way between them; neither observes the 60 s knot itself.
    late = (x[:20], knots[:20, 1:], None, knot_design([0, 60, 180], [60.0, 120.0]))
    between = (x[20:], knots[20:, :1] / 2 + knots[20:, 1:] / 2, None, np.array([[0.5, 0.5]]))
    stage = PolynomialRidge.fit([late, between], degree=1, alpha=1e-9)
    np.testing.assert_allclose(stage.predict(x), knots, atol=1e-6)


def test_a_phase_after_the_last_knot_is_not_fitted():
    design = knot_design([0, 60, 90, 150, 400], [30.0, 90.0])
    np.testing.assert_allclose(design, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_cli_trains_and_predicts_a_regression_run(tmp_path):
    for seed in range(3):
        save_case(law_case(seed, f"case_{seed}"), tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "regression"],
    )
    assert result.exit_code == 0, result.output
    assert "regression: change at 2 times after 1dyn (70-140 s)" in result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["name"] == "regression"
    assert config["regression"]["degree"] == 2
    result = runner.invoke(
        app,
        ["predict", str(tmp_path / "run"), str(tmp_path / "data"), "--out", str(tmp_path / "pred")],
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "pred" / "case_0").iterdir())
    assert written == ["2dyn.nii.gz", "3dyn.nii.gz", "kinetic_map.nii.gz"]
    again = runner.invoke(
        app,
        ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "regression"],
    )
    assert again.exit_code == 2 and "holds a run already" in again.stderr
    case = load_case(tmp_path / "data" / "case_0")
    more_inputs = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "run"),
            str(tmp_path / "data" / "case_0"),
            "--out",
            str(tmp_path / "pred2"),
            "--inputs",
            "pre,1dyn,2dyn",
        ],
    )
    assert more_inputs.exit_code == 2
    assert more_inputs.stderr == (
        f"error: {case.case_id}: a regression model predicts from pre and 1dyn; "
        "asked to predict from pre,1dyn,2dyn\n"
    )


# A lesion-level law: a small lesion washes out, a large one enhances on, whatever its
# voxels show; the voxels of both follow one distribution.
LESION_BOXES = {
    1: (slice(4, 8), slice(4, 8), slice(2, 6)),
    2: (slice(12, 18),) * 2 + (slice(3, 9),),
}
LESION_LATE_FACTOR = {1: 0.7, 2: 1.3}


def size_law_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    pre = rng.uniform(80.0, 120.0, SHAPE).astype(np.float32)
    post = pre * rng.uniform(1.0, 1.3, SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, dtype=np.int16)
    later = post.copy()
    for label, box in LESION_BOXES.items():
        seg[box] = label
        post[box] = pre[box] * rng.uniform(1.5, 2.5, pre[box].shape)
        later[box] = post[box] * LESION_LATE_FACTOR[label]
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[2:22, 2:22, 1:11] = 1
    phases = np.stack([pre, post, later, later]).astype(np.float32)
    return Case(f"size_{seed}", phases, TIMES, seg, roi, np.eye(4), source="test")


def test_the_lesion_stage_penalty_is_per_lesion():
    # Every case twice: twice the data and twice the penalty, so the same fit; an absolute
    # penalty would shrink the smaller cohort's fit harder.
    cohort = [size_law_case(seed) for seed in range(6)]
    once = fitted(cohort, lesion_stage=True, lesion_alpha=0.05).lesion
    twice = fitted(cohort + cohort, lesion_stage=True, lesion_alpha=0.05).lesion
    np.testing.assert_allclose(twice.coef, once.coef, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(twice.intercept, once.intercept, rtol=1e-6)
    stronger = fitted(cohort, lesion_stage=True, lesion_alpha=0.5).lesion
    assert np.linalg.norm(stronger.coef) < np.linalg.norm(once.coef)


def test_the_lesion_stage_learns_what_a_lesion_shows_as_a_whole():
    cohort = [size_law_case(seed) for seed in range(12)]
    with_stage = fitted(cohort, lesion_stage=True, lesion_alpha=1e-3)
    voxel_only = fitted(cohort)
    case = size_law_case(100)
    voxel_types_right = []
    for label in LESION_BOXES:
        real = lesion_mean_curve(case.phases, case.seg, label)
        ours = lesion_mean_curve(
            np.concatenate([case.phases[:2], with_stage.predict_case(case)]), case.seg, label
        )
        theirs = lesion_mean_curve(
            np.concatenate([case.phases[:2], voxel_only.predict_case(case)]), case.seg, label
        )
        np.testing.assert_allclose(ours, real, rtol=0.01)
        assert classify_curve(ours, TIMES) == classify_curve(real, TIMES)
        voxel_types_right.append(classify_curve(theirs, TIMES) == classify_curve(real, TIMES))
        assert np.abs(theirs - real).max() > 10 * np.abs(ours - real).max()
    # One law for the voxels of both lesions: the voxel stage alone gets one type wrong.
    assert not all(voxel_types_right)
    # Outside the lesions the stage changes nothing; a case with no lesion labelled gets
    # the voxel stage's prediction alone.
    stage_off = RegressionModel(with_stage.config, with_stage.knots_s, with_stage.voxel)
    outside = case.seg == 0
    np.testing.assert_array_equal(
        with_stage.predict_case(case)[:, outside], stage_off.predict_case(case)[:, outside]
    )
    case.seg[:] = 0
    np.testing.assert_array_equal(with_stage.predict_case(case), stage_off.predict_case(case))


def test_lesion_features_on_a_known_lesion():
    shape = (10, 10, 10)
    pre = np.full(shape, 100.0, dtype=np.float32)
    post = np.full(shape, 100.0, dtype=np.float32)
    seg = np.zeros(shape, dtype=np.int16)
    seg[3:7, 3:7, 3:7] = 2
    post[seg == 2] = 250.0
    post[4:6, 4:6, 4:6] = 150.0  # the core: the 2x2x2 voxels one erosion leaves
    roi = np.ones(shape, dtype=np.uint8)
    case = Case(
        "cube",
        np.stack([pre, post, post]),
        [0.0, 60.0, 120.0],
        seg,
        roi,
        np.diag([2.0, 2.0, 2.0, 1.0]),
    )
    norm = fit_case_norm(case.phases, case.roi)
    labels, features = lesion_features(case, norm, RegressionConfig(lesion_sigma_vox=0.0))
    assert labels == [2] and features.shape == (1, len(LESION_FEATURES))
    named = dict(zip(LESION_FEATURES, features[0], strict=True))
    assert named["log_first_post_min"] == pytest.approx(0.0)  # 1dyn at 1 min
    assert named["log_volume_mm3"] == pytest.approx(np.log(64 * 8.0))
    assert named["rim_fraction"] == pytest.approx(56 / 64)
    assert named["core_relative_enhancement"] == pytest.approx(0.5)
    assert named["rim_relative_enhancement"] == pytest.approx(1.5)
    assert named["relative_enhancement"] == pytest.approx((56 * 1.5 + 8 * 0.5) / 64)
    assert named["relative_enhancement_p10"] == pytest.approx(
        np.percentile([0.5] * 8 + [1.5] * 56, 10)
    )
    assert named["pre"] == pytest.approx(float(norm.forward(np.float32(100.0))))


def test_lesion_statistics_read_on_the_smoothed_map_resist_noise():
    rng = np.random.default_rng(3)
    shape = (24, 24, 24)
    seg = np.zeros(shape, dtype=np.int16)
    seg[6:18, 6:18, 6:18] = 1
    clean_pre = np.full(shape, 100.0)
    clean_post = np.where(seg > 0, 200.0, 110.0)

    def spread(sigma_vox: float, noise: float) -> float:
        phases = [
            (image + rng.normal(0.0, noise, shape)).astype(np.float32)
            for image in (clean_pre, clean_post, clean_post)
        ]
        case = Case("noisy", np.stack(phases), [0.0, 90.0, 180.0], seg, np.ones(shape), np.eye(4))
        norm = fit_case_norm(case.phases, case.roi)
        _, features = lesion_features(case, norm, RegressionConfig(lesion_sigma_vox=sigma_vox))
        named = dict(zip(LESION_FEATURES, features[0], strict=True))
        return named["relative_enhancement_p90"] - named["relative_enhancement_p10"]

    # The lesion is uniform: without noise its spread is its boundary's blur alone.
    blur = spread(1.0, 0.0)
    # At SNR 10 the raw percentiles spread by about 2.6 noise standard deviations of the
    # ratio; on the map smoothed at 1 voxel the noise adds a fraction of that.
    raw = spread(0.0, 10.0)
    assert raw > 0.3
    assert spread(1.0, 10.0) - blur < 0.25 * raw


def test_arterial_enhancement_is_the_blood_s_relative_enhancement_air_left_out():
    shape = (30, 30, 20)
    pre = np.full(shape, 100.0, dtype=np.float32)
    post = np.full(shape, 110.0, dtype=np.float32)
    heart = (slice(2, 18), slice(2, 18), slice(2, 18))
    post[heart] = 300.0
    # Air: no signal before contrast, noise after it, which would read as huge enhancement.
    pre[:, 25:], post[:, 25:] = 0.0, 50.0
    assert arterial_enhancement(pre, post, sigma_vox=0.0) == pytest.approx(2.0)
    # Smoothing keeps the blood's value where the heart is thicker than a few sigmas.
    assert arterial_enhancement(pre, post) == pytest.approx(2.0, abs=0.01)


# An AIF law: every lesion's pre and 1dyn follow one distribution; where the blood had
# enhanced strongly by 1dyn the lesion goes on enhancing, where weakly it washes out
# (the same early uptake then comes from faster kinetics).
HEART_BOX = (slice(14, 22), slice(14, 22), slice(2, 10))
BLOOD_ENHANCEMENT = {"strong": 3.0, "weak": 1.0}
AIF_LATE_FACTOR = {"strong": 1.25, "weak": 0.8}


def aif_law_case(seed: int, bolus: str) -> Case:
    rng = np.random.default_rng(seed)
    pre = rng.uniform(80.0, 120.0, SHAPE).astype(np.float32)
    post = pre * rng.uniform(1.0, 1.3, SHAPE).astype(np.float32)
    post[HEART_BOX] = pre[HEART_BOX] * (1.0 + BLOOD_ENHANCEMENT[bolus])
    seg = np.zeros(SHAPE, dtype=np.int16)
    seg[4:10, 4:10, 3:9] = 1
    lesion = seg > 0
    post[lesion] = pre[lesion] * rng.uniform(1.5, 2.5, lesion.sum())
    later = post.copy()
    later[lesion] *= AIF_LATE_FACTOR[bolus]
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[2:12, 2:12, 1:11] = 1
    phases = np.stack([pre, post, later, later]).astype(np.float32)
    return Case(f"{bolus}_{seed}", phases, TIMES, seg, roi, np.eye(4), source="test")


def test_a_lesion_s_uptake_is_read_against_the_blood_s():
    cohort = [aif_law_case(seed, bolus) for seed in range(6) for bolus in BLOOD_ENHANCEMENT]
    model = fitted(cohort, lesion_stage=True, lesion_alpha=1e-3)
    for bolus in BLOOD_ENHANCEMENT:
        case = aif_law_case(100, bolus)
        real = lesion_mean_curve(case.phases, case.seg, 1)
        ours = lesion_mean_curve(
            np.concatenate([case.phases[:2], model.predict_case(case)]), case.seg, 1
        )
        np.testing.assert_allclose(ours, real, rtol=0.02)
        assert classify_curve(ours, TIMES) == classify_curve(real, TIMES)


def test_a_cohort_without_lesions_fits_the_voxel_stage_alone(tmp_path):
    cases = [law_case(seed) for seed in range(2)]
    for case in cases:
        case.seg[:] = 0
    model = fitted(cases, lesion_stage=True)
    assert model.lesion is None and model.n_terms == len(model.voxel.powers)
    model.save(tmp_path / "model.safetensors")
    assert RegressionModel.load(tmp_path / "model.safetensors").lesion is None
