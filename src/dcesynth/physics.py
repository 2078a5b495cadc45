"""Contrast-agent physics of breast DCE-MRI: arterial input, tissue uptake, MR signal.

Pure functions over numpy arrays; the heavy lifting is dcmri's
(https://github.com/dcmri/dcmri), which implements the models below.

Chain of models, as in the paper's acquisition (3 T, Gd-DTPA 0.1 mmol/kg, T1w
THRIVE spoiled gradient echo, TR/TE 4.0/1.8 ms, flip angle 12 degrees):

1. Arterial input (``ArterialInput``): the population AIF of Parker et al.,
   MRM 56:993 (2006), a whole-blood concentration for a 0.1 mmol/kg bolus
   (``dcmri.aif_parker``), or the bi-exponential plasma curve of Weinmann et al.,
   Physiol Chem Phys Med NMR 16:167 (1984) as used by Tofts & Kermode,
   MRM 17:357 (1991) (dcmri has none; written out in ``aif_weinmann_plasma_mM``).
   Either may be scaled in amplitude and spread by an injection of finite length
   (convolution with a unit-area box, ``dcmri.stepconv``).
   Plasma concentration = blood / (1 - haematocrit), haematocrit 0.45.
2. Tissue: the extended Tofts model,
   ``C(t) = vp Cp(t) + Ktrans * integral Cp(s) exp(-kep (t - s)) ds``, kep = Ktrans/ve
   (Tofts et al., JMRI 10:223 (1999)); dcmri calls it the high-flow ('HF') model.
   The convolution runs on a fine 0.5 s grid and is sampled at the phase times,
   because protocol times are far too coarse for it.
3. Relaxation: fast exchange, R1 = 1/T1 + r1 C, with r1 of Gd-DTPA in plasma at
   3 T = 3.7 /mM/s and at 1.5 T = 4.1 /mM/s (Rohrer et al., Invest Radiol 40:715
   (2005), via ``dcmri.relaxivity``).
4. Signal: steady-state spoiled gradient echo,
   ``S = S0 sin(a) (1 - E1) / (1 - cos(a) E1)``, E1 = exp(-TR R1)
   (``dcmri.signal_ss``). T2* decay at TE = 1.8 ms is neglected: it scales
   every phase alike and so drops out of relative enhancement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dcmri
import numpy as np

TR_S = 4.0e-3
TE_S = 1.8e-3
FLIP_ANGLE_DEG = 12.0
FIELD_STRENGTH_T = 3.0
HAEMATOCRIT = 0.45
FINE_STEP_S = 0.5

T1_3T_S = {
    # Rakow-Penner et al., JMRI 23:87 (2006), breast at 3 T: fat 367 ms, fibroglandular 1324 ms.
    "fat": 0.37,
    "fibroglandular": 1.30,
    # Invasive carcinoma, pre-contrast, 3 T: roughly 1.4-1.6 s (e.g. Pineda et al., 2016).
    "lesion": 1.50,
    # Stanisz et al., MRM 54:507 (2005): skeletal muscle 1.41 s at 3 T.
    "muscle": 1.40,
    # Dermis at 3 T, about 0.85 s (Richard et al., J Invest Dermatol 100:705, scaled to 3 T).
    "skin": 0.85,
    # Lu et al., MRM 52:679 (2004): blood (Hct 0.42) at 3 T, 1.93 s.
    "blood": 1.90,
}
"""Pre-contrast T1 per tissue at 3 T, in seconds."""

T1_1P5T_S = {
    # Rakow-Penner et al., JMRI 23:87 (2006), breast at 1.5 T: fat 296 ms, fibroglandular 1267 ms.
    "fat": 0.30,
    "fibroglandular": 1.27,
    # The 3 T value scaled by the fibroglandular ratio 1.5 T / 3 T above (1.27 / 1.30).
    "lesion": round(1.50 * 1.27 / 1.30, 3),
    # Stanisz et al., MRM 54:507 (2005): skeletal muscle 1.008 s at 1.5 T (dcmri.T1).
    "muscle": dcmri.T1(1.5, "muscle"),
    # The 3 T value scaled by dcmri's field dependence of skin T1 (Gach 2008, B0^0.137).
    "skin": round(0.85 * dcmri.T1(1.5, "skin") / dcmri.T1(3.0, "skin"), 3),
    # Blood at 1.5 T, 1.441 s (dcmri.T1).
    "blood": dcmri.T1(1.5, "blood"),
}
"""Pre-contrast T1 per tissue at 1.5 T, in seconds."""

T1_S_BY_FIELD = {1.5: T1_1P5T_S, 3.0: T1_3T_S}
"""Pre-contrast T1 tables by field strength in tesla."""

FIELD_STRENGTHS_T = tuple(T1_S_BY_FIELD)
"""Field strengths the phantom can simulate, in tesla."""


def gd_dtpa_relaxivity_per_mM_s(field_t: float) -> float:
    """Longitudinal relaxivity of Gd-DTPA in plasma at ``field_t`` tesla, 1/(mM s)."""
    return dcmri.relaxivity(field_t, "plasma", "gadopentetate") / 1000.0


R1_GD_DTPA_PER_MM_S = gd_dtpa_relaxivity_per_mM_s(FIELD_STRENGTH_T)
"""Longitudinal relaxivity of Gd-DTPA in plasma at 3 T, in 1/(mM s) (3.7)."""


# Weinmann et al. (1984) as fitted by Tofts & Kermode (1991), for 0.1 mmol/kg Gd-DTPA:
# Cp(t) = D (a1 exp(-m1 t) + a2 exp(-m2 t)), t in minutes.
WEINMANN_DOSE_MMOL_PER_KG = 0.1
WEINMANN_AMPLITUDES_KG_PER_L = (3.99, 4.78)
WEINMANN_RATES_PER_MIN = (0.144, 0.0111)

AIF_FAMILIES = ("parker", "weinmann")
"""Population arterial input functions: ``aif_parker_blood_mM``, ``aif_weinmann_plasma_mM``."""


@dataclass(frozen=True)
class ArterialInput:
    """The arterial input of one case.

    Attributes:
        family: one of ``AIF_FAMILIES``.
        bolus_arrival_s: delay of the bolus at the breast, seconds.
        injection_duration_s: length of the injection box the curve is convolved
            with (0: the family's curve as published).
        amplitude_scale: factor on the concentration (dose, body size, cardiac output).
        rate_scale: factor on both Weinmann decay rates (renal clearance); Parker ignores it.
    """

    family: str = "parker"
    bolus_arrival_s: float = 10.0
    injection_duration_s: float = 0.0
    amplitude_scale: float = 1.0
    rate_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.family not in AIF_FAMILIES:
            raise ValueError(f"AIF family must be one of {AIF_FAMILIES}, got {self.family!r}")
        if self.injection_duration_s < 0.0 or self.amplitude_scale <= 0.0 or self.rate_scale <= 0:
            raise ValueError(f"arterial input parameters out of range: {self}")


def aif_parker_blood_mM(times_s: np.ndarray, bolus_arrival_s: float = 0.0) -> np.ndarray:
    """Parker population arterial input function (whole blood).

    Args:
        times_s: (T,) seconds after injection.
        bolus_arrival_s: delay of the bolus at the breast, in seconds.

    Returns:
        (T,) blood concentration of Gd in mM.
    """
    return 1000.0 * dcmri.aif_parker(np.asarray(times_s, dtype=float), BAT=float(bolus_arrival_s))


def aif_weinmann_plasma_mM(
    times_s: np.ndarray, bolus_arrival_s: float = 0.0, rate_scale: float = 1.0
) -> np.ndarray:
    """Bi-exponential population AIF (plasma) of Weinmann / Tofts & Kermode, 0.1 mmol/kg.

    An instantaneous bolus: 0 before ``bolus_arrival_s``, then
    ``D (a1 exp(-m1 t) + a2 exp(-m2 t))`` with D = 0.1 mmol/kg, a1 = 3.99 kg/L,
    a2 = 4.78 kg/L, m1 = 0.144 /min, m2 = 0.0111 /min (0.88 mM at arrival).

    Args:
        times_s: (T,) seconds after injection.
        bolus_arrival_s: delay of the bolus at the breast, in seconds.
        rate_scale: factor on m1 and m2.

    Returns:
        (T,) plasma concentration of Gd in mM.
    """
    t_min = (np.asarray(times_s, dtype=float) - bolus_arrival_s) / 60.0
    after = t_min >= 0.0
    t_min = np.where(after, t_min, 0.0)
    (a1, a2), (m1, m2) = WEINMANN_AMPLITUDES_KG_PER_L, WEINMANN_RATES_PER_MIN
    decay = a1 * np.exp(-m1 * rate_scale * t_min) + a2 * np.exp(-m2 * rate_scale * t_min)
    return np.where(after, WEINMANN_DOSE_MMOL_PER_KG * decay, 0.0)


def bolus_blood_mM(times_s: np.ndarray, aif: ArterialInput) -> np.ndarray:
    """Blood concentration (T,) in mM of ``aif``'s family and amplitude, without injection box."""
    if aif.family == "parker":
        blood = aif_parker_blood_mM(times_s, aif.bolus_arrival_s)
    else:
        plasma = aif_weinmann_plasma_mM(times_s, aif.bolus_arrival_s, aif.rate_scale)
        blood = plasma * (1.0 - HAEMATOCRIT)
    return aif.amplitude_scale * blood


def arterial_blood_mM(grid_s: np.ndarray, aif: ArterialInput) -> np.ndarray:
    """Blood concentration (G,) in mM on ``grid_s``, the injection box applied.

    Args:
        grid_s: (G,) sample times in seconds; with an injection box they must be a
            fine uniform grid from 0 (``fine_grid_s``), as the convolution runs on them.
        aif: the arterial input.
    """
    grid_s = np.asarray(grid_s, dtype=float)
    blood = bolus_blood_mM(grid_s, aif)
    if aif.injection_duration_s == 0.0:
        return blood
    # A box from 0 to the duration: centre T = duration / 2, half-width D T with D = 1.
    return dcmri.stepconv(blood, aif.injection_duration_s / 2.0, 1.0, t=grid_s)


def extended_tofts_from_plasma_mM(
    grid_s: np.ndarray, plasma_mM: np.ndarray, ktrans_per_min: float, ve: float, vp: float
) -> np.ndarray:
    """Extended Tofts tissue concentration for a given plasma input.

    Args:
        grid_s: (T,) increasing sample times in seconds (fine enough for the convolution).
        plasma_mM: (T,) plasma concentration at ``grid_s``, mM.
        ktrans_per_min: transfer constant Ktrans, 1/min.
        ve: extravascular extracellular volume fraction (0, 1].
        vp: plasma volume fraction [0, 1).

    Returns:
        (T,) tissue concentration in mM.
    """
    if not 0.0 < ve <= 1.0 or not 0.0 <= vp < 1.0 or ktrans_per_min < 0.0:
        raise ValueError(
            f"extended Tofts parameters out of range: ktrans_per_min={ktrans_per_min}, "
            f"ve={ve}, vp={vp}"
        )
    # dcmri's high-flow model is extended Tofts with PS = Ktrans; H=0 means the input is plasma.
    return dcmri.conc_tissue(
        np.asarray(plasma_mM, dtype=float),
        t=np.asarray(grid_s, dtype=float),
        kinetics="HF",
        H=0.0,
        vb=vp,
        vi=ve,
        PS=ktrans_per_min / 60.0,
    )


def fine_grid_s(times_s: np.ndarray) -> np.ndarray:
    """A 0.5 s grid from 0 to just past the last phase time, for the convolutions."""
    return np.arange(0.0, float(np.max(times_s)) + 2 * FINE_STEP_S, FINE_STEP_S)


def plasma_input_mM(grid_s: np.ndarray, aif: ArterialInput) -> np.ndarray:
    """Arterial input converted from blood to plasma concentration, mM, on ``grid_s`` (G,)."""
    return arterial_blood_mM(grid_s, aif) / (1.0 - HAEMATOCRIT)


@dataclass(frozen=True)
class SampledInput:
    """An arterial input evaluated once for one protocol, for every tissue of a case.

    Attributes:
        times_s: (T,) phase times in seconds after injection.
        grid_s: (G,) the fine grid of the convolutions (``fine_grid_s(times_s)``).
        plasma_mM: (G,) plasma concentration on ``grid_s``.
        blood_mM: (T,) blood concentration at the phase times (heart, large vessels).
    """

    times_s: np.ndarray
    grid_s: np.ndarray
    plasma_mM: np.ndarray
    blood_mM: np.ndarray


def sample_input(times_s: np.ndarray, aif: ArterialInput) -> SampledInput:
    """``aif`` on the fine grid of the protocol ``times_s`` (T,) and at its phase times."""
    times_s = np.asarray(times_s, dtype=float)
    grid = fine_grid_s(times_s)
    if aif.injection_duration_s == 0.0:
        blood = bolus_blood_mM(times_s, aif)
    else:
        blood = np.interp(times_s, grid, arterial_blood_mM(grid, aif))
    return SampledInput(times_s, grid, plasma_input_mM(grid, aif), blood)


def tissue_concentration_mM(
    arterial: SampledInput, ktrans_per_min: float, ve: float, vp: float
) -> np.ndarray:
    """Extended Tofts tissue concentration driven by ``arterial``, at its phase times.

    Args:
        arterial: the arterial input of the case (``sample_input``).
        ktrans_per_min: Ktrans in 1/min.
        ve: extravascular extracellular volume fraction.
        vp: plasma volume fraction.

    Returns:
        (T,) tissue concentration in mM.
    """
    conc = extended_tofts_from_plasma_mM(
        arterial.grid_s, arterial.plasma_mM, ktrans_per_min, ve, vp
    )
    return np.interp(arterial.times_s, arterial.grid_s, conc)


def relaxation_rate_per_s(
    t1_s: np.ndarray | float,
    conc_mM: np.ndarray | float,
    r1_per_mM_s: float = R1_GD_DTPA_PER_MM_S,
) -> np.ndarray:
    """R1 = 1/T1 + r1 C (fast water exchange), in 1/s; arrays broadcast, dtype kept."""
    return 1.0 / np.asarray(t1_s) + np.float32(r1_per_mM_s) * np.asarray(conc_mM)


def spgr_signal(
    proton_density: np.ndarray | float,
    r1_per_s: np.ndarray | float,
    tr_s: float = TR_S,
    flip_angle_deg: float = FLIP_ANGLE_DEG,
) -> np.ndarray:
    """Steady-state spoiled gradient-echo signal (arbitrary units); arrays broadcast.

    ``S = S0 sin(a) (1 - E1) / (1 - cos(a) E1)`` with E1 = exp(-TR R1): the same
    equation as ``dcmri.signal_ss`` for one compartment, written out here because
    dcmri evaluates it voxel by voxel in Python (tens of seconds for one case)
    while this form is one vectorised expression. The tests check the two agree.

    Args:
        proton_density: S0, equilibrium magnetisation times receive gain.
        r1_per_s: longitudinal relaxation rate in 1/s.
        tr_s: repetition time in seconds.
        flip_angle_deg: flip angle in degrees.

    Returns:
        Signal with the broadcast shape of the inputs (float32 if ``r1_per_s`` is and
        ``proton_density`` is float32 or a Python float).
    """
    # Python floats (math, no np.asarray on scalars) so that float32 inputs stay float32.
    alpha = math.radians(flip_angle_deg)
    e1 = np.exp(-tr_s * np.asarray(r1_per_s))
    return proton_density * (math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1))
