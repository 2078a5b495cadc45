"""The regression model: what it learns, how it is stored, train/predict through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from dcesynth.case import Case, load_case, save_case
from dcesynth.cli import app
from dcesynth.data.tinorm import fit_case_norm
from dcesynth.io import InputError
from dcesynth.kinetics import classify_curve, lesion_mean_curve
from dcesynth.regression import (
    LESION_FEATURES,
    RegressionConfig,
    RegressionModel,
    feature_names,
    fit_regression,
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


def test_learns_a_voxelwise_law_of_pre_and_1dyn():
    model = fitted([law_case(0), law_case(1)])
    case = law_case(2)
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
    assert features.shape == (*SHAPE, len(feature_names(config))) == (*SHAPE, 9)
    assert len(set(feature_names(config))) == 9
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
    assert loaded.config == model.config and loaded.times_s == TIMES


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


def test_cases_of_another_protocol_are_refused():
    other = law_case(1, "other")
    other.times_s = [0.0, 85.0, 160.0, 225.0]
    with pytest.raises(InputError, match="other: protocol"):
        fitted([law_case(0), other])
    with pytest.raises(InputError, match="other: this regression model predicts the protocol"):
        fitted([law_case(0)]).predict_case(other)


def test_cli_trains_and_predicts_a_regression_run(tmp_path):
    for seed in range(3):
        save_case(law_case(seed, f"case_{seed}"), tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "regression"],
    )
    assert result.exit_code == 0, result.output
    assert "2 target phases" in result.stdout
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
    assert f"{case.case_id}: this regression model predicts" in more_inputs.stderr


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


def test_the_lesion_stage_learns_what_a_lesion_shows_as_a_whole():
    cohort = [size_law_case(seed) for seed in range(8)]
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
    stage_off = RegressionModel(with_stage.config, with_stage.times_s, with_stage.voxel)
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
    labels, features = lesion_features(case, norm)
    assert labels == [2] and features.shape == (1, len(LESION_FEATURES))
    named = dict(zip(LESION_FEATURES, features[0], strict=True))
    assert named["log_volume_mm3"] == pytest.approx(np.log(64 * 8.0))
    assert named["rim_fraction"] == pytest.approx(56 / 64)
    assert named["core_relative_enhancement"] == pytest.approx(0.5)
    assert named["rim_relative_enhancement"] == pytest.approx(1.5)
    assert named["relative_enhancement"] == pytest.approx((56 * 1.5 + 8 * 0.5) / 64)
    assert named["relative_enhancement_p10"] == pytest.approx(
        np.percentile([0.5] * 8 + [1.5] * 56, 10)
    )
    assert named["pre"] == pytest.approx(float(norm.forward(np.float32(100.0))))


def test_a_cohort_without_lesions_fits_the_voxel_stage_alone(tmp_path):
    cases = [law_case(seed) for seed in range(2)]
    for case in cases:
        case.seg[:] = 0
    model = fitted(cases, lesion_stage=True)
    assert model.lesion is None and model.n_terms == len(model.voxel.powers)
    model.save(tmp_path / "model.safetensors")
    assert RegressionModel.load(tmp_path / "model.safetensors").lesion is None
