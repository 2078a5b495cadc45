"""Synthetic cohorts: determinism, cohort mix, any protocol, ground truth that the images show."""

from collections import Counter

import numpy as np
import pytest

from dcesynth.case import load_case
from dcesynth.io import InputError
from dcesynth.kinetics import CurveType, classify_curve, lesion_mean_curve
from dcesynth.phantom import PhantomConfig, plan_cohort, simulate_case, simulate_cohort

TINY = PhantomConfig(shape=(48, 48, 24))
SMALL = PhantomConfig(shape=(64, 64, 32))


def cohort_bytes(folder) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_serial(tmp_path_factory):
    """3 cases, 48x48x24, seed 11, one process."""
    folder = tmp_path_factory.mktemp("tiny_serial")
    simulate_cohort(folder, 3, seed=11, config=TINY, workers=1)
    return folder


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """The acceptance run in small: 6 cases, 64x64x32, seed 0, two processes."""
    folder = tmp_path_factory.mktemp("small_cohort")
    return [load_case(d) for d in simulate_cohort(folder, 6, seed=0, config=SMALL, workers=2)]


def test_same_seed_gives_byte_identical_files(tiny_serial, tmp_path):
    simulate_cohort(tmp_path, 3, seed=11, config=TINY, workers=1)
    first, second = cohort_bytes(tiny_serial), cohort_bytes(tmp_path)
    assert len(first) == 3 * 9  # 6 phases + seg + roi + meta.json per case
    assert first == second


def test_two_workers_give_the_same_files_as_one(tiny_serial, tmp_path):
    simulate_cohort(tmp_path, 3, seed=11, config=TINY, workers=2)
    assert cohort_bytes(tmp_path) == cohort_bytes(tiny_serial)


def test_different_seeds_give_different_anatomy():
    first = simulate_case(plan_cohort(1, seed=0)[0], TINY)
    second = simulate_case(plan_cohort(1, seed=1)[0], TINY)
    assert not np.array_equal(first.roi, second.roi)
    assert not np.array_equal(first.seg > 0, second.seg > 0)


@pytest.mark.parametrize("n_cases", [2, 3, 5, 20])
def test_plan_cohort_has_all_three_curve_types_from_three_lesions(n_cases):
    for seed in range(20):
        types = [t for plan in plan_cohort(n_cases, seed) for t in plan.lesion_types]
        if len(types) >= 3:
            assert set(types) == {CurveType.PERSISTENT, CurveType.PLATEAU, CurveType.WASHOUT}


def test_plan_cohort_follows_the_requested_mix():
    plans = plan_cohort(200, seed=3, mix=(0.2, 0.3, 0.5))
    counts = Counter(t for plan in plans for t in plan.lesion_types)
    total = sum(counts.values())
    assert all(len(plan.lesion_types) in (1, 2) for plan in plans)
    shares = {CurveType.PERSISTENT: 0.2, CurveType.PLATEAU: 0.3, CurveType.WASHOUT: 0.5}
    for curve_type, share in shares.items():
        assert abs(counts[curve_type] - share * total) < 1.0


def test_plan_cohort_seeds_are_distinct_and_repeatable():
    plans = plan_cohort(10, seed=4)
    assert plans == plan_cohort(10, seed=4)
    assert len({plan.seed for plan in plans}) == 10
    assert [plan.case_id for plan in plans[:2]] == ["phantom_0000", "phantom_0001"]


def test_any_protocol_gives_its_phases_and_meta(tmp_path):
    times_s = tuple(float(t) for t in range(0, 421, 60))  # 0, 60, ..., 420: 8 phases
    config = PhantomConfig(shape=(48, 48, 24), times_s=times_s)
    (folder,) = simulate_cohort(tmp_path, 1, seed=2, config=config, workers=1)
    case = load_case(folder)
    assert case.phases.shape == (8, 48, 48, 24)
    assert case.times_s == list(times_s)
    assert case.phase_names == ["pre"] + [f"{k}dyn" for k in range(1, 8)]
    assert (folder / "7dyn.nii.gz").is_file()


def test_every_simulated_case_passes_load_case(small_cohort):
    assert [case.case_id for case in small_cohort] == [f"phantom_{i:04d}" for i in range(6)]
    for case in small_cohort:
        assert case.source == "phantom"
        assert case.phases.shape == (6, 64, 64, 32)
        assert case.roi[case.seg > 0].all()  # lesions lie inside the breast ROI


def test_lesion_ground_truth_holds_type_and_kinetic_parameters(small_cohort):
    for case in small_cohort:
        assert [lesion["label"] for lesion in case.lesions] == sorted(np.unique(case.seg)[1:])
        for lesion in case.lesions:
            assert {"curve_type", "ktrans_per_min", "ve", "vp", "kep_per_min"} <= lesion.keys()
            assert lesion["curve_type"] in ("persistent", "plateau", "washout")
            assert lesion["kep_per_min"] == pytest.approx(
                lesion["ktrans_per_min"] / lesion["ve"], rel=1e-2
            )
            assert 0 < lesion["ve"] <= 1 and 0 <= lesion["vp"] < 1


def test_small_cohort_has_all_three_curve_types(small_cohort):
    types = {lesion["curve_type"] for case in small_cohort for lesion in case.lesions}
    assert types == {"persistent", "plateau", "washout"}


def test_noisy_lesion_mean_curve_has_the_ground_truth_type(small_cohort):
    for case in small_cohort:
        for lesion in case.lesions:
            curve = lesion_mean_curve(case.phases, case.seg, lesion["label"])
            assert classify_curve(curve, case.times_s).label == lesion["curve_type"]


def test_phantom_config_rejects_a_too_small_shape():
    with pytest.raises(InputError, match="--shape: must be at least"):
        PhantomConfig(shape=(32, 31, 16)).validate()
