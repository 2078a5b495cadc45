"""benchmarks/lesion_level.py: lesion features on known answers, the ridge predictors scored."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dcesynth.case import Case, load_case, save_case
from dcesynth.io import InputError, save_nifti

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lesion_level.py"
SPEC = importlib.util.spec_from_file_location("lesion_level", SCRIPT)
lesion_level = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lesion_level)

TIMES_S = [0.0, 85.0, 155.0, 225.0]
LATE_SLOPE = -0.3
"""Every later phase's lesion signal falls by this share of the lesion's S1 - S0 per phase."""


def cube_case(case_id: str, lesion_re: float, rng: np.random.Generator, times_s=TIMES_S) -> Case:
    """A 12x12x8 case: noisy ROI tissue enhancing 10 %, a 3x3x3 lesion of pre 100 and
    relative enhancement ``lesion_re``, washing out in proportion to its enhancement."""
    shape = (12, 12, 8)
    roi = np.zeros(shape, np.uint8)
    roi[1:11, 1:11, 1:7] = 1
    seg = np.zeros(shape, np.int16)
    seg[5:8, 5:8, 3:6] = 1
    pre = np.where(roi > 0, 100.0 + rng.normal(0, 5, shape), 10.0)
    post = np.where(roi > 0, pre * 1.1, pre)
    pre[seg > 0] = 100.0
    post[seg > 0] = 100.0 * (1 + lesion_re)
    phases = [pre, post]
    for step in range(1, len(times_s) - 1):
        late = post.copy()
        late[seg > 0] += LATE_SLOPE * step * (post - pre)[seg > 0]
        phases.append(late)
    return Case(case_id, np.stack(phases).astype(np.float32), list(times_s), seg, roi, np.eye(4))


def cohort(folder: Path, n_cases: int, seed: int, times_s=TIMES_S) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(n_cases):
        save_case(cube_case(f"case_{index:02d}", rng.uniform(0.5, 1.5), rng, times_s), folder)
    return folder


def test_features_of_a_uniform_cube_lesion(tmp_path):
    case = cube_case("cube", 0.5, np.random.default_rng(0))
    (row,) = lesion_level.case_lesions(case)
    features = dict(zip(lesion_level.FEATURES, row["features"], strict=True))
    assert features["re_mean"] == pytest.approx(0.5)
    assert features["re_p10"] == features["re_p90"] == pytest.approx(0.5)
    assert features["re_std"] == pytest.approx(0.0, abs=1e-6)
    assert features["log_volume"] == pytest.approx(math.log(27))
    assert features["boundary_share"] == pytest.approx(26 / 27)
    assert features["rim_minus_core_re"] == pytest.approx(0.0, abs=1e-6)
    assert features["shell_re"] == pytest.approx(0.1, abs=1e-5)
    roi = case.roi > 0
    mean, std = case.phases[1][roi].mean(), case.phases[1][roi].std()
    assert features["post"] == pytest.approx((150.0 - mean) / std, rel=1e-4)
    assert features["enhancement"] == pytest.approx(50.0 / std, rel=1e-4)
    assert row["curve"] == pytest.approx([100.0, 150.0, 135.0, 120.0], rel=1e-5)


def test_a_linear_late_change_is_recovered_and_copy_forward_scores_one(tmp_path):
    train = lesion_level.Lesions(cohort(tmp_path / "train", 10, seed=1))
    test = lesion_level.Lesions(cohort(tmp_path / "test", 5, seed=2))
    rows = lesion_level.compare(train, test)
    assert list(rows) == ["copy-1dyn", "ti_means", "+ relative_enhancement", "+ shape", "+ context"]
    copy = rows["copy-1dyn"]
    assert copy["ratio_to_copy"] == pytest.approx(1.0)
    # The washout is -30 % and -60 % of S1 - S0 per phase: copy-forward calls it a plateau.
    assert copy["agreement"] == 0.0
    for name in list(rows)[1:]:
        # The late change is a linear function of the lesion's enhancement in TI units.
        assert rows[name]["ratio_to_copy"] < 0.05, name
        assert rows[name]["agreement"] == 1.0
        assert rows[name]["scc"] == pytest.approx(1.0)
        low, high = rows[name]["ratio_to_copy_ci95"]
        assert low <= rows[name]["ratio_to_copy"] <= high
    text = lesion_level.table(rows, test)
    assert text.splitlines()[0] == "5 test lesions in 5 cases"
    assert "+ context" in text


def write_copy_forward(data: Path, out: Path) -> Path:
    """Predictions that copy each case's 1dyn into every later phase."""
    for folder in sorted(data.iterdir()):
        case = load_case(folder)
        (out / case.case_id).mkdir(parents=True)
        for name in case.phase_names[2:]:
            save_nifti(out / case.case_id / f"{name}.nii.gz", case.phases[1], case.affine)
    return out


def test_a_model_that_misses_what_the_numbers_hold_has_a_residual_they_explain(tmp_path):
    train = lesion_level.Lesions(cohort(tmp_path / "train", 10, seed=1))
    data = cohort(tmp_path / "test", 12, seed=2)
    copy_dir = write_copy_forward(data, tmp_path / "copy")
    test = lesion_level.Lesions(data, {"copy": copy_dir})
    rows = lesion_level.compare(train, test)
    copy, model = rows["copy-1dyn"], rows["copy"]
    for key in ("ratio_to_copy", "agreement", "scc", "enh_error_last"):
        assert model[key] == pytest.approx(copy[key]), key
    # Its residual is the late change itself, linear in the lesion's enhancement.
    assert model["residual_r2"] > 0.95
    assert model["ratio_to_ridge"] > 20
    # The cohort's parenchyma does not change after 1dyn: copy-forward gets it exactly.
    assert model["parenchyma_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert model["parenchyma_r"] is None
    assert "copy: error" in lesion_level.table(rows, test)


def test_parenchyma_change_is_in_ti_units_and_scored_across_cases():
    case = cube_case("cube", 0.5, np.random.default_rng(0))
    parenchyma = (case.roi > 0) & (case.seg == 0)
    scale = case.phases[1][case.roi > 0].std()
    series = case.phases.copy()
    series[-1][parenchyma] += 2.0 * scale
    unchanged, shifted = lesion_level.parenchyma_changes(case, [case.phases, series])
    assert unchanged == pytest.approx(0.0, abs=1e-6)
    assert shifted == pytest.approx(2.0, rel=1e-4)
    real = np.array([0.5, 1.0, 2.0, np.nan])
    scores = lesion_level.parenchyma_scores(real, np.array([1.5, 2.0, 3.0, 1.0]))
    assert scores["parenchyma_r"] == pytest.approx(1.0)
    assert scores["parenchyma_rmse"] == pytest.approx(1.0)
    assert scores["parenchyma_bias"] == pytest.approx(1.0)
    assert lesion_level.parenchyma_scores(real, np.ones(4))["parenchyma_r"] is None


def test_cohorts_of_other_protocols_are_refused(tmp_path):
    train = lesion_level.Lesions(cohort(tmp_path / "train", 3, seed=1))
    other = lesion_level.Lesions(cohort(tmp_path / "test", 2, seed=2, times_s=[0, 60, 120, 180]))
    with pytest.raises(InputError, match="differs from the test's"):
        lesion_level.compare(train, other)


def test_main_writes_the_rows_as_json(tmp_path, monkeypatch, capsys):
    cohort(tmp_path / "train", 6, seed=3)
    cohort(tmp_path / "test", 3, seed=4)
    out = tmp_path / "rows.json"
    argv = ["lesion_level.py", str(tmp_path / "train"), str(tmp_path / "test"), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    lesion_level.main()
    rows = json.loads(out.read_text())
    assert rows["copy-1dyn"]["agreement"] == 0.0
    assert "3 test lesions in 3 cases" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing folder", "reserved name"])
def test_main_refuses_bad_input_with_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, case):
    data = cohort(tmp_path / "train", 2, seed=3)
    pred = "copy-1dyn=P" if case == "reserved name" else f"m={tmp_path / 'absent'}"
    monkeypatch.setattr("sys.argv", ["lesion_level.py", str(data), str(data), "--pred", pred])
    with pytest.raises(SystemExit) as exit_info:
        lesion_level.main()
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "error:" in line
    if case == "missing folder":
        assert line.startswith("error: ") and "absent" in line
