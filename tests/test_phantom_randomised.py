"""Named phantoms: the default one unchanged, the randomised one drawing every value in range."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from dcesynth.io import InputError
from dcesynth.kinetics import classify_curve, lesion_mean_curve
from dcesynth.phantom import PHANTOMS, PhantomConfig, phantom_config, plan_cohort, simulate_case
from dcesynth.phantom_config import NOISE_MODELS, add_noise, case_affine, draw_acquisition

RANDOMISED = PHANTOMS["randomised"]
SMALL = replace(RANDOMISED, shape=(48, 48, 32))
TINY = replace(RANDOMISED, shape=(32, 32, 16))

# Computed with the phantom before these ranges existed, for seed 7, cases 0 and 1 of
# each config: sha256 of seg + roi + affine bytes, of the meta.json keys it wrote, and
# the mean of each phase.
BEFORE_RANGES = [
    (
        PhantomConfig(shape=(48, 48, 32)),
        [
            (
                "882735ca009b6df6",
                "a95d874baa7bc76b",
                [8.09641631, 10.6913378, 10.6457523, 10.5162885, 10.341104, 10.1468324],
            ),
            (
                "3b138309efde844d",
                "c805903684b45ebe",
                [5.71165647, 7.75711047, 7.71707401, 7.62425109, 7.49072198, 7.34744601],
            ),
        ],
    ),
    (
        PhantomConfig(shape=(48, 48, 24), times_s=(0.0, 60.0, 420.0)),
        [
            ("f3fce521073b938c", "0733780b686d8b41", [5.9474073, 7.8151004, 7.28153995]),
            ("5d250959f22f783d", "ad64a53422380e76", [6.43050739, 8.87884647, 8.28952133]),
        ],
    ),
]
LESION_KEYS_BEFORE = [
    "label",
    "curve_type",
    "ktrans_per_min",
    "ve",
    "vp",
    "kep_per_min",
    "irregularity",
    "rim_enhancement",
    "volume_voxels",
]
META_KEYS_BEFORE = [
    "case_id",
    "source",
    "phases",
    "times_s",
    "lesions",
    "snr",
    "bpe_ktrans_per_min",
    "fgt_fraction",
    "bolus_arrival_s",
    "seed",
]


def short_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture(scope="module")
def randomised_cases():
    """Six randomised cases, 32x32x16, seed 21, with their plans."""
    plans = plan_cohort(6, seed=21)
    return [(plan, simulate_case(plan, TINY)) for plan in plans]


@pytest.mark.parametrize(("config", "expected"), BEFORE_RANGES, ids=["paper-protocol", "3-phase"])
def test_default_config_gives_the_images_and_meta_of_the_phantom_before_ranges(config, expected):
    for plan, (masks_sha, meta_sha, phase_means) in zip(
        plan_cohort(2, seed=7), expected, strict=True
    ):
        case = simulate_case(plan, config)
        masks = b"".join(
            np.ascontiguousarray(a).tobytes()
            for a in (case.seg, case.roi, np.asarray(case.affine, dtype=np.float64))
        )
        meta = case.meta()
        before = {key: meta[key] for key in META_KEYS_BEFORE}
        before["lesions"] = [
            {k: lesion[k] for k in LESION_KEYS_BEFORE} for lesion in meta["lesions"]
        ]
        assert short_sha(masks) == masks_sha
        assert short_sha(json.dumps(before, sort_keys=True).encode()) == meta_sha
        np.testing.assert_allclose(
            case.phases.astype(np.float64).mean(axis=(1, 2, 3)), phase_means, rtol=1e-7
        )


def test_default_phantom_is_the_plain_config():
    assert phantom_config("default") == PhantomConfig()


def test_randomised_case_is_repeatable_for_its_seed():
    plan = plan_cohort(1, seed=4)[0]
    first, second = simulate_case(plan, TINY), simulate_case(plan, TINY)
    np.testing.assert_array_equal(first.phases, second.phases)
    np.testing.assert_array_equal(first.seg, second.seg)
    np.testing.assert_array_equal(first.affine, second.affine)
    assert first.meta() == second.meta()


def test_randomised_cases_differ_in_scanner_and_protocol(randomised_cases):
    metas = [case.meta() for _, case in randomised_cases]
    assert len({tuple(meta["times_s"]) for meta in metas}) == len(metas)
    assert len({meta["acquisition"]["tr_ms"] for meta in metas}) == len(metas)


def within(value: float, bounds, slack: float = 1e-6) -> bool:
    low, high = bounds
    return low - slack <= value <= high + slack


def test_every_drawn_value_lies_in_its_configured_range(randomised_cases):
    config = TINY
    for _, case in randomised_cases:
        acq, times_s = case.extra["acquisition"], case.times_s
        inplane_mm, _, slab_mm = acq["fov_mm"]
        drawn = [
            (len(times_s), config.n_phases_range),
            (times_s[1], config.first_post_range_s),
            (times_s[2] - times_s[1], config.phase_spacing_range_s),
            (acq["tr_ms"] / 1000, config.tr_range_s),
            (acq["flip_angle_deg"], config.flip_angle_range_deg),
            (inplane_mm, config.fov_inplane_range_mm),
            (slab_mm, config.fov_slab_range_mm),
            (acq["bias_strength"], config.bias_strength_range),
            (acq["injection_duration_s"], config.injection_duration_range_s),
            (acq["aif_amplitude"], config.aif_amplitude_range),
            (acq["aif_rate_scale"], config.aif_rate_scale_range),
            (case.extra["snr"], config.snr_range),
            (case.extra["bolus_arrival_s"], config.bolus_arrival_range_s),
            *((abs(angle), (0.0, config.oblique_max_deg)) for angle in acq["orientation_deg"]),
        ]
        assert all(within(value, bounds) for value, bounds in drawn), drawn
        assert within(case.extra["fgt_fraction"], config.fgt_density_range, slack=0.02)
        assert np.allclose(np.diff(times_s[1:]), times_s[2] - times_s[1])
        assert acq["field_t"] in config.field_strengths_t
        assert acq["noise_model"] in config.noise_models
        assert acq["aif_family"] in config.aif_families
        if acq["fat_suppressed"]:
            assert within(acq["fat_residual"], config.fat_residual_range)
        else:
            assert acq["fat_residual"] == 1.0
        low, high = config.lesion_radius_range_fov
        floor_mm = 2 * 2.0 * inplane_mm / config.shape[0]  # a radius of at least 2 voxels
        for lesion in case.lesions:
            assert within(
                lesion["diameter_mm"],
                (2 * low * inplane_mm, max(2 * high * inplane_mm, floor_mm)),
                0.01,
            )


def test_affine_holds_the_drawn_spacing_and_orientation(randomised_cases):
    for _, case in randomised_cases:
        acq = case.extra["acquisition"]
        columns = np.linalg.norm(case.affine[:3, :3], axis=0)
        np.testing.assert_allclose(columns, acq["spacing_mm"], rtol=1e-3)
        rotation = case.affine[:3, :3] / columns
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    assert not np.allclose(case.affine[:3, :3], np.diag(columns))  # oblique


def test_an_unrotated_affine_is_diagonal_and_centred():
    affine = case_affine((10, 10, 4), (100.0, 100.0, 20.0), (0.0, 0.0, 0.0))
    np.testing.assert_array_equal(affine[:3, :3], np.diag([10.0, 10.0, 5.0]))
    np.testing.assert_array_equal(affine[:3, 3], [-45.0, -45.0, -7.5])


@pytest.mark.parametrize("n_phases", [3, 8])
def test_protocols_of_3_to_8_phases_are_drawn_with_even_spacing(n_phases):
    config = replace(RANDOMISED, n_phases_range=(n_phases, n_phases))
    for seed in range(20):
        times_s = draw_acquisition(np.random.default_rng(seed), config).times_s
        assert len(times_s) == n_phases and times_s[0] == 0.0
        np.testing.assert_allclose(np.diff(times_s[1:]), times_s[2] - times_s[1])
    lengths = {
        len(draw_acquisition(np.random.default_rng(s), RANDOMISED).times_s) for s in range(60)
    }
    assert lengths == set(range(3, 9))


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        replace(SMALL, n_phases_range=(3, 3), first_post_range_s=(500.0, 600.0)),
        replace(SMALL, n_phases_range=(3, 3), first_post_range_s=(45.0, 60.0)),
    ],
    ids=["randomised", "3-phases-late", "3-phases-early"],
)
def test_ground_truth_type_is_the_type_of_the_noise_free_lesion_curve(config):
    for plan in plan_cohort(4, seed=13):
        case = simulate_case(plan, config, noisy=False)
        for lesion in case.lesions:
            curve = lesion_mean_curve(case.phases, case.seg, lesion["label"])
            assert classify_curve(curve, case.times_s).label == lesion["curve_type"]


def test_fixed_times_override_the_drawn_protocol():
    config = replace(TINY, times_s=(0.0, 60.0, 120.0, 180.0))
    case = simulate_case(plan_cohort(1, seed=2)[0], config)
    assert case.times_s == [0.0, 60.0, 120.0, 180.0]


@pytest.mark.parametrize("model", NOISE_MODELS)
def test_noise_models_have_the_asked_std_at_high_snr_and_their_own_floor(model):
    rng = np.random.default_rng(0)
    bright = add_noise(rng, np.full((1, 64, 64, 16), 100.0, dtype=np.float32), 1.0, model)
    dark = add_noise(rng, np.zeros((1, 64, 64, 16), dtype=np.float32), 1.0, model)
    assert bright.dtype == np.float32
    assert float(bright.std()) == pytest.approx(1.0, rel=0.05)
    floor = {"gaussian": 0.0, "rician": np.sqrt(np.pi / 2), "nc-chi-2coil": 1.88}[model]
    assert float(dark.mean()) == pytest.approx(floor, abs=0.03)


def test_unknown_phantom_name_is_refused_naming_the_choices():
    with pytest.raises(InputError, match="--phantom: expected one of default, randomised"):
        phantom_config("wild")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"snr_range": (50.0, 20.0)}, "phantom: snr_range must be (low, high)"),
        ({"n_phases_range": (1, 4)}, "phantom: n_phases_range must be (low, high) with low >= 2"),
        ({"field_strengths_t": (7.0,)}, "phantom: field_strengths_t must be taken from (1.5, 3.0)"),
        ({"noise_models": ("poisson",)}, "phantom: noise_models must be taken from"),
        ({"fat_suppression_probability": 1.5}, "phantom: fat_suppression_probability"),
    ],
    ids=["reversed", "too-few-phases", "field", "noise", "probability"],
)
def test_bad_ranges_are_refused_naming_the_field(change, problem):
    with pytest.raises(InputError) as caught:
        replace(PhantomConfig(), **change).validate()
    assert str(caught.value).startswith(problem)
