"""Contrast-agent physics of breast DCE-MRI: arterial input, tissue uptake, MR signal.

Pure functions over numpy arrays; the heavy lifting is dcmri's
(https://github.com/dcmri/dcmri), which implements the models below.

Chain of models, as in the paper's acquisition (3 T, Gd-DTPA 0.1 mmol/kg, T1w
THRIVE spoiled gradient echo, TR/TE 4.0/1.8 ms, flip angle 12 degrees):

1. Arterial input: the population AIF of Parker et al., MRM 56:993 (2006), a
   whole-blood concentration for a 0.1 mmol/kg bolus (``dcmri.aif_parker``).
   Plasma concentration = blood / (1 - haematocrit), haematocrit 0.45.
2. Tissue: the extended Tofts model,
   ``C(t) = vp Cp(t) + Ktrans * integral Cp(s) exp(-kep (t - s)) ds``, kep = Ktrans/ve
   (Tofts et al., JMRI 10:223 (1999)); dcmri calls it the high-flow ('HF') model.
   The convolution runs on a fine 0.5 s grid and is sampled at the phase times,
   because protocol times are far too coarse for it.
3. Relaxation: fast exchange, R1 = 1/T1 + r1 C, with r1 of Gd-DTPA in plasma at
   3 T = 3.7 /mM/s (Rohrer et al., Invest Radiol 40:715 (2005), via
   ``dcmri.relaxivity``).
4. Signal: steady-state spoiled gradient echo,
   ``S = S0 sin(a) (1 - E1) / (1 - cos(a) E1)``, E1 = exp(-TR R1)
   (``dcmri.signal_ss``). T2* decay at TE = 1.8 ms is neglected: it scales
   every phase alike and so drops out of relative enhancement.
"""

from __future__ import annotations

import math

import dcmri
import numpy as np

TR_S = 4.0e-3
TE_S = 1.8e-3
FLIP_ANGLE_DEG = 12.0
FIELD_STRENGTH_T = 3.0
HAEMATOCRIT = 0.45
FINE_STEP_S = 0.5

R1_GD_DTPA_PER_MM_S = dcmri.relaxivity(FIELD_STRENGTH_T, "plasma", "gadopentetate") / 1000.0
"""Longitudinal relaxivity of Gd-DTPA in plasma at 3 T, in 1/(mM s) (3.7)."""

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


def aif_parker_blood_mM(times_s: np.ndarray, bolus_arrival_s: float = 0.0) -> np.ndarray:
    """Parker population arterial input function (whole blood).

    Args:
        times_s: (T,) seconds after injection.
        bolus_arrival_s: delay of the bolus at the breast, in seconds.

    Returns:
        (T,) blood concentration of Gd in mM.
    """
    return 1000.0 * dcmri.aif_parker(np.asarray(times_s, dtype=float), BAT=float(bolus_arrival_s))


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


def plasma_input_mM(grid_s: np.ndarray, bolus_arrival_s: float) -> np.ndarray:
    """Parker AIF converted from blood to plasma concentration, mM, on ``grid_s``."""
    return aif_parker_blood_mM(grid_s, bolus_arrival_s) / (1.0 - HAEMATOCRIT)


def tissue_concentration_mM(
    times_s: np.ndarray,
    ktrans_per_min: float,
    ve: float,
    vp: float,
    bolus_arrival_s: float = 10.0,
) -> np.ndarray:
    """Extended Tofts tissue concentration driven by the Parker AIF, at the phase times.

    Args:
        times_s: (T,) phase times in seconds after injection.
        ktrans_per_min: Ktrans in 1/min.
        ve: extravascular extracellular volume fraction.
        vp: plasma volume fraction.
        bolus_arrival_s: bolus arrival delay in seconds.

    Returns:
        (T,) tissue concentration in mM.
    """
    times_s = np.asarray(times_s, dtype=float)
    grid = fine_grid_s(times_s)
    conc = extended_tofts_from_plasma_mM(
        grid, plasma_input_mM(grid, bolus_arrival_s), ktrans_per_min, ve, vp
    )
    return np.interp(times_s, grid, conc)


def blood_concentration_mM(times_s: np.ndarray, bolus_arrival_s: float = 10.0) -> np.ndarray:
    """Blood-pool concentration (heart, large vessels) at the phase times, mM, shape (T,)."""
    return aif_parker_blood_mM(np.asarray(times_s, dtype=float), bolus_arrival_s)


def relaxation_rate_per_s(t1_s: np.ndarray | float, conc_mM: np.ndarray | float) -> np.ndarray:
    """R1 = 1/T1 + r1 C (fast water exchange), in 1/s; arrays broadcast, dtype kept."""
    return 1.0 / np.asarray(t1_s) + np.float32(R1_GD_DTPA_PER_MM_S) * np.asarray(conc_mM)


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
