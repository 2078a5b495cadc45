"""Synthetic breast DCE-MRI cohorts with ground-truth kinetics.

Every case is an axial, prone breast volume built from tissue classes, each with a
pre-contrast T1 and proton density, a contrast-agent concentration curve from
:mod:`dcesynth.physics` (population AIF -> extended Tofts -> fast-exchange R1 ->
spoiled gradient echo), a coil bias field and noise. What the scanner, protocol and
injection are is drawn per case from the ranges of a ``PhantomConfig``
(:mod:`dcesynth.phantom_config`); the values below are those of the default one.

Anatomy (voxel axes: 0 = right-left, 1 = posterior -> anterior, 2 = inferior ->
superior; breasts hang anteriorly as in a prone scan):

- thorax: an elliptic chest region with lungs (no signal to speak of), a heart
  whose blood pool follows the AIF (vp = 1), and a pectoral muscle band in front
  (muscle: Ktrans 0.05/min, ve 0.15);
- two breasts of fat (T1 0.37 s, Rakow-Penner 2006) behind a skin shell (Ktrans
  0.04/min, ve 0.3), sizes and shapes drawn per case;
- fibroglandular tissue (FGT): a smoothed random field thresholded to a random
  density (default 10-55 % of breast volume, ACR a-d), denser centrally, with background
  parenchymal enhancement (BPE) of random level (Ktrans 0.005-0.08/min, persistent,
  minimal to marked, cf. Kuhl 2007) and texture;
- 1-2 lesions inside the breast: ellipsoids whose surface is perturbed by a smooth
  random field (irregular margins) plus spicules, optional rim enhancement (a
  slower, necrotic-like core blended towards the centre) and heterogeneity.

Lesion kinetics. The target curve type of each lesion is drawn with the cohort
mix (default 26/50/24 % persistent/plateau/washout, the paper's training set),
then Ktrans and kep are drawn from overlapping type-specific ranges
(persistent: slow, kep 0.03-0.25/min; plateau: kep 0.15-0.6/min; washout: fast,
kep 0.5-4/min, higher Ktrans; Tofts-model fits of breast lesions, e.g.
El Khouli 2009, Huang 2008) until the lesion's noise-free mean curve has that
type by the contract's rule, at least 2 percentage points from a threshold (an
equivocal curve would make ground truth depend on noise). Morphology follows the
kinetics loosely, as in real lesions: irregularity and spicules are drawn from
distributions whose means rise from persistent to washout, and so do rim
enhancement and heterogeneity, with wide spread so that shape alone does not
tell the type. Ground truth per lesion (meta.json): the curve type of the
noise-free lesion-mean curve and Ktrans, ve, vp, kep.

Where a protocol leaves a lesion's target type out of reach (e.g. a persistent
curve between three phases from 600 s on), kinetics are drawn from wide ranges
instead and the lesion keeps the type its curve has, still 2 points from a threshold.

Acquisition: the paper's protocol by default (pre, 85 ... 365 s), any times
allowed. Bias field: a smooth multiplicative field, +-15 %, brighter near the
anterior (breast) coil. Noise: Rician (magnitude of complex Gaussian) at an SNR of
25-45 relative to the fat signal (without fat suppression) of the pre phase.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from dcesynth import physics
from dcesynth.case import Case, save_case
from dcesynth.io import InputError
from dcesynth.kinetics import DEFAULT_RULE, TYPED_CURVES, CurveType, classify_curve, late_change
from dcesynth.phantom_config import PHANTOMS as PHANTOMS
from dcesynth.phantom_config import (
    Acquisition,
    PhantomConfig,
    add_noise,
    case_affine,
    draw_acquisition,
)
from dcesynth.phantom_config import phantom_config as phantom_config

TYPE_MARGIN = 0.02

# Per tissue: (T1 table key, proton density, (Ktrans /min, ve, vp)); None = no enhancement.
TISSUES = {
    "fat": ("fat", 1.0, None),
    "skin": ("skin", 0.8, (0.04, 0.30, 0.01)),
    "muscle": ("muscle", 0.75, (0.05, 0.15, 0.01)),
    "lung": ("muscle", 0.06, None),
}

# Type-specific ranges of (Ktrans /min, kep /min, vp) for lesion draws.
KINETIC_RANGES = {
    CurveType.PERSISTENT: ((0.03, 0.25), (0.03, 0.25), (0.005, 0.03)),
    CurveType.PLATEAU: ((0.08, 0.6), (0.15, 0.6), (0.01, 0.05)),
    CurveType.WASHOUT: ((0.3, 1.6), (0.5, 4.0), (0.02, 0.10)),
}
# Ranges for a lesion whose target type a protocol leaves out of reach: all three and more.
WIDE_KINETIC_RANGES = ((0.01, 3.0), (0.01, 10.0), (0.005, 0.10))
TARGET_DRAWS, WIDE_DRAWS = 200, 400
# Mean irregularity / rim probability per type: real malignant (washout) lesions are
# more often irregular, spiculated and rim-enhancing (ACR BI-RADS MRI lexicon).
MORPHOLOGY = {
    CurveType.PERSISTENT: (0.15, 0.10),
    CurveType.PLATEAU: (0.35, 0.30),
    CurveType.WASHOUT: (0.55, 0.50),
}


def smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit std, float32, ``shape``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def grid(shape) -> list[np.ndarray]:
    """Normalised voxel coordinates in [0, 1] along each axis, as an open (sparse) grid."""
    axes = (np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape)
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def anatomy(
    rng: np.random.Generator, shape, fgt_density_range=(0.10, 0.55)
) -> dict[str, np.ndarray]:
    """Boolean tissue masks and FGT texture for one case; all (X, Y, Z).

    ``fgt_density_range``: (low, high) fraction of the breast that is fibroglandular.
    """
    u, v, w = grid(shape)
    chest_v = rng.uniform(0.38, 0.46)
    thorax = ((u - 0.5) / 0.47) ** 2 + ((v - (chest_v - 0.42)) / 0.42) ** 2 < 1.0
    thorax = np.broadcast_to(thorax, shape)
    heart = ((u - 0.55) / 0.16) ** 2 + ((v - chest_v + 0.17) / 0.12) ** 2 + (
        (w - 0.45) / 0.35
    ) ** 2 < 1.0
    inner = ((u - 0.5) / 0.42) ** 2 + ((v - (chest_v - 0.45)) / 0.40) ** 2 < 1.0
    lung = np.broadcast_to(inner, shape) & ~heart
    breast = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        cu = 0.5 + side * rng.uniform(0.2, 0.24)
        ru, rv, rw = rng.uniform(0.13, 0.19), rng.uniform(0.28, 0.45), rng.uniform(0.3, 0.42)
        droop = rng.uniform(-0.05, 0.05)
        breast |= ((u - cu) / ru) ** 2 + ((v - chest_v) / rv) ** 2 + (
            (w - 0.5 - droop * (v - chest_v)) / rw
        ) ** 2 < 1.0
    breast &= ~thorax
    breast &= np.broadcast_to(v > chest_v, shape)
    skin = breast & ~ndimage.binary_erosion(breast, iterations=max(1, round(shape[0] / 100)))
    muscle = thorax & ~np.broadcast_to(inner, shape) & np.broadcast_to(v > chest_v - 0.12, shape)
    tissue = breast & ~skin
    # FGT: denser near the chest wall and centrally, texture from a smoothed field.
    density = rng.uniform(*fgt_density_range)
    texture = smooth_noise(rng, shape, sigma_vox=max(1.0, shape[0] / 70))
    central = -2.0 * (v - chest_v).clip(0, None) / 0.4
    score = np.where(tissue, texture + central, -np.inf)
    cut = np.quantile(score[tissue], 1.0 - density) if tissue.any() else np.inf
    fgt = tissue & (score > cut)
    return {
        "thorax": thorax & ~lung & ~heart & ~muscle,
        "lung": lung,
        "heart": heart & thorax,
        "muscle": muscle,
        "skin": skin,
        "fat": tissue & ~fgt,
        "fgt": fgt,
        "texture": texture,
    }


def lesion_mask(rng, shape, centre, radii, irregularity: float, n_spicules: int):
    """A lesion of irregular margin with spicules, and its normalised radial distance.

    Args:
        centre: voxel centre (3,); radii: semi-axes in voxels (3,).
        irregularity: amplitude of the radial boundary perturbation, 0 = smooth oval.
        n_spicules: number of thin spikes extending to 1.3-1.8 radii.

    Returns:
        ``(mask, distance)``: (X, Y, Z) bool and float32 (0 at centre, ~1 at the edge).
    """
    idx = np.ogrid[tuple(slice(0, n) for n in shape)]
    rel = [(i - c) / r for i, c, r in zip(idx, centre, radii, strict=True)]
    dist = np.sqrt(sum(x**2 for x in rel)).astype(np.float32)
    lo = [max(0, int(c - 2 * r) - 1) for c, r in zip(centre, radii, strict=True)]
    hi = [min(n, int(c + 2 * r) + 2) for n, c, r in zip(shape, centre, radii, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    local = dist[box]
    wobble = smooth_noise(rng, local.shape, sigma_vox=max(1.0, min(radii) / 2))
    mask = np.zeros(shape, dtype=bool)
    mask[box] = local * (1.0 + 0.35 * irregularity * wobble) < 1.0
    for _ in range(n_spicules):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(1.3, 1.8)
        for s in np.linspace(0.5, length, 24):
            point = np.round(np.asarray(centre) + s * direction * np.asarray(radii)).astype(int)
            if all(0 <= p < n for p, n in zip(point, shape, strict=True)):
                mask[tuple(point)] = True
    return mask, dist


def draw_kinetics(rng, ranges) -> dict[str, float]:
    """Ktrans, ve, vp, kep from ``ranges`` ((Ktrans /min), (kep /min), (vp)); ve kept in 0.1-0.9."""
    (k_lo, k_hi), (kep_lo, kep_hi), (vp_lo, vp_hi) = ranges
    while True:
        ktrans = float(np.exp(rng.uniform(np.log(k_lo), np.log(k_hi))))
        kep = float(np.exp(rng.uniform(np.log(kep_lo), np.log(kep_hi))))
        if 0.1 <= ktrans / kep <= 0.9:
            return {
                "ktrans_per_min": ktrans,
                "ve": ktrans / kep,
                "vp": float(rng.uniform(vp_lo, vp_hi)),
                "kep_per_min": kep,
            }


def lesion_concentration(arterial: physics.SampledInput, params, core_weight):
    """Concentration (N, T) of N lesion voxels: rim kinetics blended with a slower core.

    ``core_weight`` (N,) in [0, 1]: 0 = rim kinetics, 1 = core kinetics (Ktrans x 0.35,
    kep x 0.5), modelling a hypovascular centre.
    """
    rim = physics.tissue_concentration_mM(
        arterial, params["ktrans_per_min"], params["ve"], params["vp"]
    )
    core_ktrans = 0.35 * params["ktrans_per_min"]
    core_ve = min(0.9, core_ktrans / (0.5 * params["kep_per_min"]))
    core = physics.tissue_concentration_mM(arterial, core_ktrans, core_ve, 0.5 * params["vp"])
    return (1.0 - core_weight)[:, None] * rim[None] + core_weight[:, None] * core[None]


def signal(pd, t1_s, conc_mM, acquisition: Acquisition):
    """SPGR signal of ``acquisition``'s field strength, TR and flip angle; arrays broadcast."""
    r1_per_s = physics.relaxation_rate_per_s(t1_s, conc_mM, acquisition.r1_per_mM_s)
    return physics.spgr_signal(pd, r1_per_s, acquisition.tr_s, acquisition.flip_angle_deg)


def type_margin(curve: np.ndarray, times_s: np.ndarray) -> tuple[CurveType, float]:
    """The curve type of ``curve`` (T,) and its late change's distance to the nearer threshold."""
    change = late_change(curve, times_s)
    margin = min(
        abs(change - DEFAULT_RULE.persistent_above), abs(change - DEFAULT_RULE.washout_below)
    )
    return classify_curve(curve, times_s), margin


def fit_kinetics(rng, curve_type: CurveType, mean_curve, times_s):
    """Kinetics whose lesion-mean curve has ``curve_type``, ``TYPE_MARGIN`` from a threshold.

    Draws from the type's ranges first; if the protocol leaves the type out of reach,
    from ``WIDE_KINETIC_RANGES``, taking the target type if it appears and else the
    first draw of any type with the margin.

    Args:
        curve_type: the lesion's target type.
        mean_curve: kinetics dict -> noise-free lesion-mean signal (T,).
        times_s: (T,) phase times.

    Returns:
        ``(params, curve)``: the kinetics and their mean curve (T,).
    """
    for _ in range(TARGET_DRAWS):
        params = draw_kinetics(rng, KINETIC_RANGES[curve_type])
        curve = mean_curve(params)
        found, margin = type_margin(curve, times_s)
        if found == curve_type and margin >= TYPE_MARGIN:
            return params, curve
    fallback = (params, curve)
    fallback_has_margin = False
    for _ in range(WIDE_DRAWS):
        params = draw_kinetics(rng, WIDE_KINETIC_RANGES)
        curve = mean_curve(params)
        found, margin = type_margin(curve, times_s)
        if margin >= TYPE_MARGIN and found == curve_type:
            return params, curve
        if margin >= TYPE_MARGIN and not fallback_has_margin:
            fallback, fallback_has_margin = (params, curve), True
    return fallback


@dataclass(frozen=True)
class CasePlan:
    """What the cohort decided for one case before it is simulated."""

    case_id: str
    seed: int
    lesion_types: tuple[CurveType, ...]


def plan_cohort(n_cases: int, seed: int, mix=(0.26, 0.50, 0.24)) -> list[CasePlan]:
    """Lesion counts and target curve types for the cohort, stratified to the mix."""
    rng = np.random.default_rng(seed)
    n_lesions = rng.choice([1, 2], size=n_cases, p=[0.7, 0.3])
    total = int(n_lesions.sum())
    quota = np.asarray(mix, dtype=float) / np.sum(mix) * total
    counts = np.floor(quota).astype(int)
    for i in np.argsort(quota - counts)[::-1][: total - counts.sum()]:
        counts[i] += 1
    types = rng.permutation(np.repeat(np.arange(3), counts))
    child_seeds = np.random.SeedSequence(seed).spawn(n_cases)
    plans, start = [], 0
    for i in range(n_cases):
        chosen = tuple(TYPED_CURVES[t] for t in types[start : start + n_lesions[i]])
        start += n_lesions[i]
        plans.append(CasePlan(case_id(i), int(child_seeds[i].generate_state(1)[0]), chosen))
    return plans


def case_id(index: int) -> str:
    """The name of case ``index`` (from 0) of a simulated cohort: ``phantom_NNNN``."""
    return f"phantom_{index:04d}"


def cohort_exists(out_dir: Path, n_cases: int) -> bool:
    """Whether ``out_dir`` holds a cohort of ``n_cases``, judged by its last case.

    Each case appears whole (``save_case``) and the last one is simulated last, so it
    stands for the cohort (with several workers a neighbour may finish after it).
    """
    return (Path(out_dir) / case_id(n_cases - 1) / "meta.json").is_file()


def cases_for_lesions(min_lesions: int, seed: int) -> int:
    """The fewest cases of cohort ``seed`` that hold at least ``min_lesions`` lesions."""
    n_cases = max(1, min_lesions // 2)
    while sum(len(plan.lesion_types) for plan in plan_cohort(n_cases, seed)) < min_lesions:
        n_cases += 1
    return n_cases


def place_lesion(
    rng, shape, breast_tissue: np.ndarray, taken: np.ndarray, curve_type, acquisition, radius_range
):
    """Draw a lesion's geometry inside the breast, not overlapping ``taken``.

    The radius is a fraction (``radius_range``) of the in-plane field of view, at least
    2 voxels; along axis 2 it follows the slice spacing, so the lesion is round in mm.

    Returns:
        ``(mask, distance, irregularity, rim, radius_vox)``.
    """
    irregularity_mean, rim_prob = MORPHOLOGY[curve_type]
    irregularity = float(np.clip(rng.normal(irregularity_mean, 0.2), 0.0, 1.0))
    candidates = np.argwhere(breast_tissue & ~taken)
    base = max(2.0, shape[0] * rng.uniform(*radius_range))
    fov_mm = acquisition.fov_mm
    aspect = np.array([1.0, 1.0, shape[2] / shape[1] * (fov_mm[1] / fov_mm[2])])
    radii = base * rng.uniform(0.75, 1.25, size=3) * aspect
    radii = np.maximum(radii, 1.6)
    for _ in range(50):
        centre = candidates[rng.integers(len(candidates))]
        n_spicules = int(rng.poisson(6 * irregularity)) if irregularity > 0.3 else 0
        mask, dist = lesion_mask(rng, shape, centre, radii, irregularity, n_spicules)
        mask &= breast_tissue
        if mask.sum() >= 8 and not (mask & taken).any():
            rim = rng.random() < rim_prob
            return mask, dist, irregularity, rim, base
    raise RuntimeError("could not place a lesion; the breast is too small for this shape")


def simulate_case(plan: CasePlan, config: PhantomConfig, noisy: bool = True) -> Case:
    """Simulate one case (see module docstring) from its plan; deterministic for plan.seed.

    Args:
        plan: case id, seed and target lesion types.
        config: the ranges the case draws from.
        noisy: False gives the noise-free signal, the ground truth the lesion types
            are checked against (same anatomy, kinetics and meta).

    Returns:
        The case; meta (``extra``) records every value it drew, scanner and protocol
        under ``acquisition``.
    """
    rng = np.random.default_rng(plan.seed)
    acquisition = draw_acquisition(np.random.default_rng([plan.seed, 1]), config)
    shape, times_s = tuple(config.shape), np.asarray(acquisition.times_s, dtype=float)
    t1_table = acquisition.t1_s
    parts = anatomy(rng, shape, config.fgt_density_range)
    bolus_arrival_s = float(rng.uniform(*config.bolus_arrival_range_s))
    aif = replace(acquisition.aif, bolus_arrival_s=bolus_arrival_s)
    arterial = physics.sample_input(times_s, aif)
    pd = np.zeros(shape, dtype=np.float32)
    t1 = np.full(shape, t1_table["fat"], dtype=np.float32)
    curves: list[tuple[np.ndarray, np.ndarray]] = []  # (voxel weights, conc (T,))
    for name in ("fat", "skin", "muscle", "lung"):
        t1_key, density, kinetics = TISSUES[name]
        if name == "fat":
            density *= acquisition.fat_residual
        pd[parts[name]], t1[parts[name]] = density, t1_table[t1_key]
        if kinetics is not None:
            curve = physics.tissue_concentration_mM(arterial, *kinetics)
            curves.append((parts[name].astype(np.float32), curve))
    pd[parts["thorax"]], t1[parts["thorax"]] = 0.5, t1_table["muscle"]
    pd[parts["heart"]], t1[parts["heart"]] = 0.9, t1_table["blood"]
    curves.append((parts["heart"].astype(np.float32), arterial.blood_mM))
    fgt = parts["fgt"]
    pd[fgt], t1[fgt] = 0.8 + 0.05 * parts["texture"][fgt], t1_table["fibroglandular"]
    bpe_ktrans = float(np.exp(rng.uniform(np.log(0.005), np.log(0.08))))
    bpe = physics.tissue_concentration_mM(arterial, bpe_ktrans, 0.4, 0.005)
    bpe_weight = np.where(fgt, np.clip(1.0 + 0.5 * parts["texture"], 0.2, 2.0), 0.0)
    curves.append((bpe_weight.astype(np.float32), bpe))

    seg = np.zeros(shape, dtype=np.int16)
    breast_tissue = parts["fgt"] | parts["fat"]
    taken = np.zeros(shape, dtype=bool)
    lesion_specs = []
    for label, curve_type in enumerate(plan.lesion_types, start=1):
        radius_range = config.lesion_radius_range_fov
        mask, dist, irregularity, rim, radius_vox = place_lesion(
            rng, shape, breast_tissue, taken, curve_type, acquisition, radius_range
        )
        taken |= ndimage.binary_dilation(mask, iterations=2)
        seg[mask] = label
        pd[mask], t1[mask] = 0.85, t1_table["lesion"]
        core_weight = np.clip(1.0 - dist[mask] / 0.7, 0.0, 1.0) if rim else np.zeros(mask.sum())
        heterogeneity = float(rng.uniform(0.0, 0.3))
        local = smooth_noise(rng, shape, 1.5)[mask] if heterogeneity > 0 else 0.0
        core_weight = np.clip(core_weight + heterogeneity * np.abs(local), 0.0, 1.0)
        lesion_specs.append((label, curve_type, mask, core_weight, irregularity, rim, radius_vox))

    bias = bias_field(rng, shape, acquisition.bias_strength)
    signal_scale = float(rng.uniform(800.0, 1500.0))
    base_conc = np.zeros((len(times_s),) + shape, dtype=np.float32)
    for weight, curve in curves:
        base_conc += weight[None] * curve.astype(np.float32)[:, None, None, None]
    spacing_mm = np.asarray(acquisition.fov_mm) / np.asarray(shape)
    voxel_mm3 = float(np.prod(spacing_mm))
    lesions_meta = []
    for label, curve_type, mask, core_weight, irregularity, rim, radius_vox in lesion_specs:
        gain = (pd[mask] * bias[mask] * signal_scale).astype(np.float64)
        lesion_t1 = t1[mask][:, None]

        def mean_curve(params, core_weight=core_weight, gain=gain, lesion_t1=lesion_t1):
            conc = lesion_concentration(arterial, params, core_weight)
            return (gain[:, None] * signal(1.0, lesion_t1, conc, acquisition)).mean(axis=0)

        params, curve = fit_kinetics(rng, curve_type, mean_curve, times_s)
        conc = lesion_concentration(arterial, params, core_weight)
        base_conc[:, mask] = conc.T.astype(np.float32)
        lesions_meta.append(
            {
                "label": label,
                "curve_type": classify_curve(curve, times_s).label,
                **{k: round(v, 4) for k, v in params.items()},
                "irregularity": round(irregularity, 3),
                "rim_enhancement": bool(rim),
                "volume_voxels": int(mask.sum()),
                "diameter_mm": round(2.0 * radius_vox * float(spacing_mm[0]), 2),
                "volume_mm3": round(int(mask.sum()) * voxel_mm3, 1),
            }
        )

    clean = (signal_scale * bias * pd)[None] * signal(1.0, t1[None], base_conc, acquisition)
    fat_level = float(np.median(clean[0][parts["fat"]])) / acquisition.fat_residual
    snr = float(rng.uniform(*config.snr_range))
    sigma = fat_level / snr
    phases = add_noise(rng, clean, sigma, acquisition.noise_model) if noisy else clean
    return Case(
        case_id=plan.case_id,
        phases=phases.astype(np.float32),
        times_s=[float(t) for t in times_s],
        seg=seg,
        roi=(parts["fgt"] | (seg > 0)).astype(np.uint8),
        affine=case_affine(shape, acquisition.fov_mm, acquisition.orientation_deg),
        source="phantom",
        lesions=lesions_meta,
        extra={
            "snr": round(snr, 2),
            "bpe_ktrans_per_min": round(bpe_ktrans, 4),
            "fgt_fraction": round(float(fgt.sum() / max(1, breast_tissue.sum())), 3),
            "bolus_arrival_s": round(bolus_arrival_s, 2),
            "seed": plan.seed,
            "acquisition": acquisition.meta(),
        },
    )


def bias_field(rng, shape, strength: float = 1.0) -> np.ndarray:
    """Smooth multiplicative coil field, (X, Y, Z) float32 around 1, brighter anteriorly.

    ``strength`` scales every term: 1 gives about +-15 %, 0 a flat field.
    """
    u, v, w = grid(shape)
    a = rng.uniform(-0.06, 0.06, size=4) * strength
    slope = 0.08 * strength
    field = (
        1.0 + slope * (v - 0.5) + a[0] * (u - 0.5) + a[1] * (w - 0.5) + a[2] * (u - 0.5) ** 2 * 4
    )
    field = field + a[3] * ((w - 0.5) ** 2) * 4
    return np.broadcast_to(field, shape).astype(np.float32)


def _simulate_and_save(args) -> str:
    plan, config, out_dir = args
    save_case(simulate_case(plan, config), out_dir)
    return plan.case_id


def check_cohort(n_cases: int, seed: int, config: PhantomConfig) -> None:
    """Check what ``simulate_cohort`` is asked for; InputError naming the option otherwise."""
    if n_cases < 1:
        raise InputError(f"--cases: need at least 1 case, got {n_cases}")
    if seed < 0:
        raise InputError(f"--seed: must be 0 or more, got {seed}")
    config.validate()


def simulate_cohort(
    out_dir: Path,
    n_cases: int,
    seed: int = 0,
    config: PhantomConfig = PHANTOMS["default"],
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Simulate and write ``n_cases`` cases to ``out_dir/phantom_NNNN``.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases, >= 1.
        seed: fixes every case (independent of ``workers``).
        config: the ranges the cases draw from (e.g. ``PHANTOMS["randomised"]``).
        workers: processes (default: CPU count, at most ``n_cases``).
        progress: called with each finished case id.

    Returns:
        Case folders in order.
    """
    check_cohort(n_cases, seed, config)
    plans = plan_cohort(n_cases, seed, config.curve_mix)
    workers = max(1, min(workers or os.cpu_count() or 1, n_cases))
    jobs = [(plan, config, Path(out_dir)) for plan in plans]
    if workers == 1:
        finished = map(_simulate_and_save, jobs)
        for case_id in finished:
            if progress:
                progress(case_id)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for case_id in pool.map(_simulate_and_save, jobs):
                if progress:
                    progress(case_id)
    return [Path(out_dir) / plan.case_id for plan in plans]
