"""Physics chain: Parker AIF -> extended Tofts -> fast-exchange R1 -> SPGR signal.

Checked against dcmri's own functions, a direct quadrature of the convolution
integral and values computed by hand.
"""

import dcmri
import numpy as np
import pytest

from dcesynth import physics

PAPER_TIMES_S = np.array([0.0, 85.0, 155.0, 225.0, 295.0, 365.0])


def parker_input(bolus_arrival_s: float) -> physics.SampledInput:
    """The Parker AIF arriving at ``bolus_arrival_s``, sampled for the paper's protocol."""
    return physics.sample_input(
        PAPER_TIMES_S, physics.ArterialInput(bolus_arrival_s=bolus_arrival_s)
    )


def parker_blood_mM(times_s: np.ndarray) -> np.ndarray:
    """Parker et al., MRM 56:993 (2006), eq. 1 and Table 1, written out (t in minutes)."""
    t_min = np.asarray(times_s) / 60.0
    gaussians = sum(
        a / (sigma * np.sqrt(2 * np.pi)) * np.exp(-((t_min - centre) ** 2) / (2 * sigma**2))
        for a, centre, sigma in ((0.809, 0.17046, 0.0563), (0.330, 0.365, 0.132))
    )
    return gaussians + 1.050 * np.exp(-0.1685 * t_min) / (1 + np.exp(-38.078 * (t_min - 0.483)))


def test_parker_aif_at_injection_is_0_08038_mM():
    # Both Gaussians in their left tails at t = 0:
    # 0.809/(0.0563 sqrt(2 pi)) exp(-0.17046^2/(2 0.0563^2)) = 5.7327 * 0.010222 = 0.05860
    # 0.330/(0.132 sqrt(2 pi)) exp(-0.365^2/(2 0.132^2))      = 0.9974 * 0.021868 = 0.02181
    # sigmoid 1.050/(1 + exp(38.078 * 0.483)) ~ 1e-8;  sum = 0.08041 (0.08038 unrounded)
    assert physics.aif_parker_blood_mM(np.array([0.0]), 0.0)[0] == pytest.approx(0.08038, rel=1e-4)


def test_parker_aif_matches_published_equation_and_dcmri():
    times_s = np.array([0.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 365.0])
    ours = physics.aif_parker_blood_mM(times_s, bolus_arrival_s=0.0)
    np.testing.assert_allclose(ours, parker_blood_mM(times_s), rtol=1e-3)
    np.testing.assert_allclose(ours, 1000.0 * dcmri.aif_parker(times_s, BAT=0.0), rtol=1e-3)


def test_aif_bolus_arrival_delays_the_curve():
    times_s = np.array([30.0, 60.0, 200.0])
    delayed = physics.aif_parker_blood_mM(times_s, bolus_arrival_s=12.0)
    np.testing.assert_allclose(delayed, parker_blood_mM(times_s - 12.0), rtol=1e-3)


def test_plasma_input_is_blood_over_one_minus_haematocrit():
    grid_s = np.array([10.0, 60.0, 300.0])
    plasma = physics.plasma_input_mM(grid_s, physics.ArterialInput(bolus_arrival_s=0.0))
    np.testing.assert_allclose(plasma, parker_blood_mM(grid_s) / 0.55, rtol=1e-3)


def test_extended_tofts_step_input_has_closed_form():
    # Cp = 2 mM from t = 0: C(t) = vp Cp + Ktrans Cp (1 - exp(-kep t)) / kep
    #                              = vp Cp + ve Cp (1 - exp(-kep t)), kep = 0.3/0.3 = 1 /min.
    grid_s = np.arange(0.0, 300.5, 0.5)
    plasma_mM = np.full_like(grid_s, 2.0)
    conc = physics.extended_tofts_from_plasma_mM(grid_s, plasma_mM, 0.3, ve=0.3, vp=0.05)
    expected = 0.05 * 2.0 + 0.3 * 2.0 * (1.0 - np.exp(-grid_s / 60.0))
    np.testing.assert_allclose(conc, expected, rtol=1e-3)
    assert conc[-1] == pytest.approx(0.1 + 0.6 * (1 - np.exp(-5.0)), rel=1e-3)  # 0.69596 mM


@pytest.mark.parametrize(
    ("ktrans_per_min", "ve", "vp"), [(0.9, 0.3, 0.05), (0.1, 0.5, 0.01), (1.5, 0.4, 0.10)]
)
def test_tissue_concentration_matches_dcmri_on_a_fine_grid(ktrans_per_min, ve, vp):
    # dcmri on a 10x finer grid, fed the BLOOD curve with H = 0.45 so that its own
    # blood -> plasma conversion (vp = vb (1 - H), cp = cb / (1 - H)) is what we compare to.
    fine_s = np.arange(0.0, 370.0, 0.05)
    reference = 1000.0 * dcmri.conc_tissue(
        dcmri.aif_parker(fine_s, BAT=10.0),
        t=fine_s,
        kinetics="HF",
        H=0.45,
        vb=vp / 0.55,
        vi=ve,
        PS=ktrans_per_min / 60.0,
    )
    ours = physics.tissue_concentration_mM(parker_input(10.0), ktrans_per_min, ve, vp)
    np.testing.assert_allclose(ours[1:], np.interp(PAPER_TIMES_S, fine_s, reference)[1:], rtol=1e-3)


def test_tissue_concentration_matches_direct_quadrature_of_the_convolution():
    ktrans_per_min, ve, vp, bolus_arrival_s = 0.9, 0.3, 0.05, 10.0
    kep_per_s = ktrans_per_min / ve / 60.0
    expected = []
    for t_s in PAPER_TIMES_S[1:]:
        s = np.linspace(0.0, t_s, 100_001)
        plasma = parker_blood_mM(s - bolus_arrival_s) / 0.55
        integral = np.trapezoid(plasma * np.exp(-kep_per_s * (t_s - s)), s)
        expected.append(vp * plasma[-1] + ktrans_per_min / 60.0 * integral)
    ours = physics.tissue_concentration_mM(parker_input(bolus_arrival_s), ktrans_per_min, ve, vp)
    np.testing.assert_allclose(ours[1:], expected, rtol=1e-3)


def test_extended_tofts_rejects_out_of_range_parameters():
    grid_s = np.arange(0.0, 10.0, 0.5)
    with pytest.raises(ValueError, match="ve=0.0"):
        physics.extended_tofts_from_plasma_mM(grid_s, np.ones_like(grid_s), 0.1, ve=0.0, vp=0.0)


def test_gd_dtpa_relaxivity_at_3t_is_3_7_per_mM_s():
    assert physics.R1_GD_DTPA_PER_MM_S == pytest.approx(3.7)


def test_relaxation_rate_is_r10_plus_relaxivity_times_concentration():
    # R1 = 1/1.3 + 3.7 * 2.0 = 0.769231 + 7.4 = 8.169231 /s
    assert float(physics.relaxation_rate_per_s(1.3, 2.0)) == pytest.approx(8.169231, rel=1e-6)
    r1 = physics.relaxation_rate_per_s(np.array([0.37, 1.5]), np.array([[0.0], [1.0]]))
    np.testing.assert_allclose(
        r1, [[1 / 0.37, 1 / 1.5], [1 / 0.37 + 3.7, 1 / 1.5 + 3.7]], rtol=1e-6
    )


def test_spgr_signal_fibroglandular_t1_by_hand():
    # T1 1.3 s, TR 4 ms, FA 12 deg, S0 = 1:
    # E1 = exp(-0.004/1.3) = 0.9969278;  1 - E1 = 0.0030722
    # S = sin(12) (1 - E1) / (1 - cos(12) E1) = 0.2079117 * 0.0030722 / 0.0248575 = 0.0256963
    assert float(physics.spgr_signal(1.0, 1 / 1.3)) == pytest.approx(0.0256963, rel=1e-5)


@pytest.mark.parametrize("r1_per_s", [1 / 1.9, 1 / 1.3, 1 / 0.37, 2.5, 10.0])
def test_spgr_signal_matches_dcmri_signal_ss(r1_per_s):
    expected = dcmri.signal_ss(1.0, r1_per_s, physics.TR_S, physics.FLIP_ANGLE_DEG)
    assert float(physics.spgr_signal(1.0, r1_per_s)) == pytest.approx(expected, rel=1e-3)


def test_spgr_signal_keeps_float32_and_scales_with_proton_density():
    r1 = np.array([0.5, 3.0], dtype=np.float32)
    assert physics.spgr_signal(1.0, r1).dtype == np.float32
    assert physics.spgr_signal(np.full(2, 800.0, dtype=np.float32), r1).dtype == np.float32
    signal = physics.spgr_signal(800.0, r1)
    # float32 keeps ~1e-5 of 1 - E1 (E1 close to 1), far below the image noise.
    np.testing.assert_allclose(
        signal, 800.0 * physics.spgr_signal(1.0, r1.astype(float)), rtol=1e-4
    )


def test_weinmann_aif_is_0_877_mM_at_arrival_and_zero_before():
    # 0.1 mmol/kg x (3.99 + 4.78) kg/L = 0.877 mM; at 10 min: 0.1 (3.99 e^-1.44 + 4.78 e^-0.111)
    plasma = physics.aif_weinmann_plasma_mM(np.array([5.0, 20.0, 620.0]), bolus_arrival_s=20.0)
    np.testing.assert_allclose(plasma, [0.0, 0.877, 0.0945 + 0.4278], rtol=1e-3)


def test_injection_box_keeps_the_dose_and_spreads_the_peak():
    grid_s = np.arange(0.0, 600.0, 0.5)
    bolus = physics.ArterialInput(bolus_arrival_s=10.0)
    boxed = physics.ArterialInput(bolus_arrival_s=10.0, injection_duration_s=30.0)
    sharp, spread = (
        physics.arterial_blood_mM(grid_s, bolus),
        physics.arterial_blood_mM(grid_s, boxed),
    )
    assert np.trapezoid(spread, grid_s) == pytest.approx(np.trapezoid(sharp, grid_s), rel=0.01)
    assert spread.max() < 0.6 * sharp.max()
    assert grid_s[spread.argmax()] > grid_s[sharp.argmax()]


def test_sampled_input_scales_with_amplitude_and_gives_blood_at_the_phase_times():
    plain = physics.sample_input(PAPER_TIMES_S, physics.ArterialInput(family="weinmann"))
    double = physics.sample_input(
        PAPER_TIMES_S, physics.ArterialInput(family="weinmann", amplitude_scale=2.0)
    )
    np.testing.assert_allclose(double.plasma_mM, 2.0 * plain.plasma_mM)
    np.testing.assert_allclose(
        plain.blood_mM, 0.55 * physics.aif_weinmann_plasma_mM(PAPER_TIMES_S, 10.0)
    )


def test_unknown_aif_family_is_refused():
    with pytest.raises(ValueError, match="AIF family must be one of"):
        physics.ArterialInput(family="gamma")


def test_gd_dtpa_relaxivity_at_1_5t_is_4_1_per_mM_s_and_t1s_are_shorter():
    assert physics.gd_dtpa_relaxivity_per_mM_s(1.5) == pytest.approx(4.1)
    assert set(physics.T1_1P5T_S) == set(physics.T1_3T_S)
    assert all(physics.T1_1P5T_S[t] < physics.T1_3T_S[t] for t in physics.T1_3T_S)
    assert physics.T1_1P5T_S["fat"] == pytest.approx(0.30)


def test_spgr_signal_follows_tr_and_flip_angle_like_dcmri():
    expected = dcmri.signal_ss(1.0, 1 / 1.3, 6.0e-3, 18.0)
    assert float(physics.spgr_signal(1.0, 1 / 1.3, 6.0e-3, 18.0)) == pytest.approx(
        expected, rel=1e-3
    )
