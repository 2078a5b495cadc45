"""What a simulated cohort may vary, and what one case drew: configuration as data.

``PhantomConfig`` holds a range per acquisition and anatomy parameter; every case
draws its own values from them (``draw_acquisition``) and records them in meta.json.
A range whose ends are equal fixes the value. ``PHANTOMS`` names two configurations:

- ``default``: the paper's scanner and protocol (3 T, TR 4 ms, flip angle 12 deg,
  pre + 85 ... 365 s, Parker AIF, Rician noise, no fat suppression), the phantom the
  experiments and tests are built on;
- ``randomised``: domain randomisation, each parameter drawn from a wide range that
  spans clinical breast DCE-MRI (sources in ``docs/phantom.md``), so that a model
  cannot rely on one setting.

Values drawn in ``dcesynth.phantom`` from the case's main random stream (bolus
arrival, FGT density, lesion size, SNR) keep their place in it; everything added for
randomisation comes from a second stream of the case seed, so the default
configuration gives the same images as before these ranges existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from scipy.spatial.transform import Rotation

from dcesynth import physics
from dcesynth.case import validate_times
from dcesynth.io import InputError

MIN_SHAPE = (32, 32, 16)
NOISE_MODELS = ("rician", "gaussian", "nc-chi-2coil")
"""Magnitude of one complex channel; real part only; root-sum-of-squares of two coils."""


@dataclass(frozen=True)
class PhantomConfig:
    """What a simulated cohort looks like; every ``*_range`` is (low, high), drawn per case.

    Attributes:
        shape: (X, Y, Z) voxels.
        times_s: one protocol for every case, pre at 0 s; None draws one per case from
            ``n_phases_range``, ``first_post_range_s`` and ``phase_spacing_range_s``.
        n_phases_range: phases including pre.
        first_post_range_s: first post-contrast phase, seconds after the pre scan.
        phase_spacing_range_s: spacing of the later phases (one per case), seconds.
        curve_mix: fractions of persistent, plateau and washout lesions.
        fov_inplane_range_mm: field of view along axes 0 and 1 (one value for both).
        fov_slab_range_mm: field of view along axis 2; with the in-plane draw it sets
            the voxel anisotropy.
        oblique_max_deg: largest rotation of the image axes about each world axis
            (written to the affine; the voxel array is not resampled).
        field_strengths_t: field strengths to choose from (T1s and relaxivity follow).
        tr_range_s: repetition time.
        flip_angle_range_deg: flip angle.
        aif_families: arterial input functions to choose from (``physics.AIF_FAMILIES``).
        bolus_arrival_range_s: bolus arrival at the breast.
        injection_duration_range_s: length of the box the AIF is convolved with.
        aif_amplitude_range: factor on the AIF concentration.
        aif_rate_scale_range: factor on the Weinmann decay rates.
        snr_range: SNR of (unsuppressed) fat in the pre phase.
        noise_models: noise models to choose from (``NOISE_MODELS``).
        bias_strength_range: factor on the coil bias field (1: +-15 %).
        fgt_density_range: fraction of the breast that is fibroglandular tissue.
        lesion_radius_range_fov: lesion radius as a fraction of the in-plane field of view.
        fat_suppression_probability: chance that a case is fat-suppressed.
        fat_residual_range: fat signal left by fat suppression, fraction of unsuppressed.
    """

    shape: tuple[int, int, int] = (128, 128, 64)
    times_s: tuple[float, ...] | None = None
    n_phases_range: tuple[int, int] = (6, 6)
    first_post_range_s: tuple[float, float] = (85.0, 85.0)
    phase_spacing_range_s: tuple[float, float] = (70.0, 70.0)
    curve_mix: tuple[float, float, float] = (0.26, 0.50, 0.24)
    fov_inplane_range_mm: tuple[float, float] = (340.0, 340.0)
    fov_slab_range_mm: tuple[float, float] = (170.0, 170.0)
    oblique_max_deg: float = 0.0
    field_strengths_t: tuple[float, ...] = (3.0,)
    tr_range_s: tuple[float, float] = (physics.TR_S, physics.TR_S)
    flip_angle_range_deg: tuple[float, float] = (physics.FLIP_ANGLE_DEG, physics.FLIP_ANGLE_DEG)
    aif_families: tuple[str, ...] = ("parker",)
    bolus_arrival_range_s: tuple[float, float] = (8.0, 20.0)
    injection_duration_range_s: tuple[float, float] = (0.0, 0.0)
    aif_amplitude_range: tuple[float, float] = (1.0, 1.0)
    aif_rate_scale_range: tuple[float, float] = (1.0, 1.0)
    snr_range: tuple[float, float] = (25.0, 45.0)
    noise_models: tuple[str, ...] = ("rician",)
    bias_strength_range: tuple[float, float] = (1.0, 1.0)
    fgt_density_range: tuple[float, float] = (0.10, 0.55)
    lesion_radius_range_fov: tuple[float, float] = (0.03, 0.07)
    fat_suppression_probability: float = 0.0
    fat_residual_range: tuple[float, float] = (0.05, 0.15)

    def validate(self) -> PhantomConfig:
        """This config, checked; InputError naming the option or field otherwise."""
        if len(self.shape) != 3 or any(s < m for s, m in zip(self.shape, MIN_SHAPE, strict=True)):
            raise InputError(f"--shape: must be at least {MIN_SHAPE}, got {tuple(self.shape)}")
        if self.times_s is not None:
            validate_times(self.times_s, where="--times")
        lower_bounds = {
            "n_phases_range": 2,
            "bolus_arrival_range_s": 0.0,
            "fgt_density_range": 0.0,
            "bias_strength_range": 0.0,
            "injection_duration_range_s": 0.0,
            "fat_residual_range": 0.0,
        }
        for item in fields(self):
            if item.name.endswith("_range") or "_range_" in item.name:
                check_range(item.name, getattr(self, item.name), lower_bounds.get(item.name))
        if not all(isinstance(n, int) for n in self.n_phases_range):
            raise InputError(
                f"phantom: n_phases_range must be whole numbers, got {self.n_phases_range}"
            )
        for name, value in (
            ("fgt_density_range", self.fgt_density_range[1]),
            ("fat_residual_range", self.fat_residual_range[1]),
            ("fat_suppression_probability", self.fat_suppression_probability),
        ):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"phantom: {name} must lie in [0, 1], got {value}")
        if not 0.0 <= self.oblique_max_deg <= 45.0:
            raise InputError(f"phantom: oblique_max_deg must be 0-45, got {self.oblique_max_deg}")
        for name, chosen, allowed in (
            ("field_strengths_t", self.field_strengths_t, physics.FIELD_STRENGTHS_T),
            ("aif_families", self.aif_families, physics.AIF_FAMILIES),
            ("noise_models", self.noise_models, NOISE_MODELS),
        ):
            if not chosen or any(value not in allowed for value in chosen):
                raise InputError(f"phantom: {name} must be taken from {allowed}, got {chosen}")
        return self


def check_range(name: str, bounds, lower: float | None) -> None:
    """InputError unless ``bounds`` is (low, high), finite, low <= high, low > 0 (or >= lower)."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise InputError(f"phantom: {name} must be (low, high), got {bounds!r}") from None
    floor_ok = low >= lower if lower is not None else low > 0.0
    if not (math.isfinite(low) and math.isfinite(high) and floor_ok and low <= high):
        least = f">= {lower:g}" if lower is not None else "> 0"
        raise InputError(
            f"phantom: {name} must be (low, high) with low {least} and low <= high, got {bounds}"
        )


PHANTOMS = {
    "default": PhantomConfig(),
    "randomised": PhantomConfig(
        n_phases_range=(3, 8),
        first_post_range_s=(45.0, 600.0),
        phase_spacing_range_s=(45.0, 150.0),
        fov_inplane_range_mm=(250.0, 480.0),
        fov_slab_range_mm=(100.0, 250.0),
        oblique_max_deg=20.0,
        field_strengths_t=(1.5, 3.0),
        tr_range_s=(3.5e-3, 7.5e-3),
        flip_angle_range_deg=(7.0, 20.0),
        aif_families=("parker", "weinmann"),
        bolus_arrival_range_s=(5.0, 40.0),
        injection_duration_range_s=(0.0, 30.0),
        aif_amplitude_range=(0.7, 1.3),
        aif_rate_scale_range=(0.5, 1.5),
        snr_range=(15.0, 80.0),
        noise_models=NOISE_MODELS,
        bias_strength_range=(0.0, 2.5),
        fgt_density_range=(0.03, 0.85),
        lesion_radius_range_fov=(0.004, 0.06),
        fat_suppression_probability=0.5,
    ),
}
"""Named configurations (``dcesynth simulate --phantom NAME``)."""


def phantom_config(name: str) -> PhantomConfig:
    """The configuration called ``name`` in ``PHANTOMS``; InputError naming the choices."""
    if name not in PHANTOMS:
        raise InputError(f"--phantom: expected one of {', '.join(PHANTOMS)}, got {name!r}")
    return PHANTOMS[name]


@dataclass(frozen=True)
class Acquisition:
    """The scanner, protocol and injection one case drew (see ``PhantomConfig``).

    ``aif`` holds the AIF family, injection and scales; its bolus arrival is set later,
    from the case's main random stream.
    """

    shape: tuple[int, int, int]
    times_s: tuple[float, ...]
    field_t: float
    tr_s: float
    flip_angle_deg: float
    fov_mm: tuple[float, float, float]
    orientation_deg: tuple[float, float, float]
    noise_model: str
    bias_strength: float
    fat_suppressed: bool
    fat_residual: float
    aif: physics.ArterialInput

    @property
    def r1_per_mM_s(self) -> float:
        return physics.gd_dtpa_relaxivity_per_mM_s(self.field_t)

    @property
    def t1_s(self) -> dict[str, float]:
        """Pre-contrast T1 per tissue at this field strength."""
        return physics.T1_S_BY_FIELD[self.field_t]

    def meta(self) -> dict:
        """The meta.json ``acquisition`` block (the protocol is ``times_s`` beside it)."""
        return {
            "field_t": self.field_t,
            "tr_ms": round(1000.0 * self.tr_s, 3),
            "flip_angle_deg": round(self.flip_angle_deg, 2),
            "fov_mm": [round(f, 2) for f in self.fov_mm],
            "spacing_mm": [round(f / n, 4) for f, n in zip(self.fov_mm, self.shape, strict=True)],
            "orientation_deg": [round(a, 2) for a in self.orientation_deg],
            "noise_model": self.noise_model,
            "bias_strength": round(self.bias_strength, 3),
            "fat_suppressed": self.fat_suppressed,
            "fat_residual": round(self.fat_residual, 3),
            "aif_family": self.aif.family,
            "injection_duration_s": round(self.aif.injection_duration_s, 2),
            "aif_amplitude": round(self.aif.amplitude_scale, 3),
            "aif_rate_scale": round(self.aif.rate_scale, 3),
        }


def uniform(rng: np.random.Generator, bounds) -> float:
    """One draw from [low, high] (exactly ``low`` when the ends are equal)."""
    low, high = bounds
    return float(rng.uniform(low, high))


def choose(rng: np.random.Generator, options):
    """One of ``options``, each equally likely."""
    return options[int(rng.integers(len(options)))]


def draw_protocol(rng: np.random.Generator, config: PhantomConfig) -> tuple[float, ...]:
    """``config.times_s``, or a protocol (T,) drawn from its protocol ranges: pre at 0 s,
    the first post-contrast phase, then evenly spaced phases."""
    if config.times_s is not None:
        return tuple(float(t) for t in config.times_s)
    low, high = config.n_phases_range
    n_phases = int(rng.integers(low, high + 1))
    first_s = uniform(rng, config.first_post_range_s)
    spacing_s = uniform(rng, config.phase_spacing_range_s)
    return (0.0,) + tuple(first_s + k * spacing_s for k in range(n_phases - 1))


def draw_acquisition(rng: np.random.Generator, config: PhantomConfig) -> Acquisition:
    """What one case's scan looks like, drawn from ``config`` with ``rng`` (its second stream)."""
    times_s = draw_protocol(rng, config)
    inplane_mm = uniform(rng, config.fov_inplane_range_mm)
    fov_mm = (inplane_mm, inplane_mm, uniform(rng, config.fov_slab_range_mm))
    limit = config.oblique_max_deg
    orientation = tuple(float(a) for a in rng.uniform(-limit, limit, size=3))
    fat_suppressed = bool(rng.random() < config.fat_suppression_probability)
    fat_residual = uniform(rng, config.fat_residual_range)
    aif = physics.ArterialInput(
        family=choose(rng, config.aif_families),
        injection_duration_s=uniform(rng, config.injection_duration_range_s),
        amplitude_scale=uniform(rng, config.aif_amplitude_range),
        rate_scale=uniform(rng, config.aif_rate_scale_range),
    )
    return Acquisition(
        shape=tuple(config.shape),
        times_s=times_s,
        field_t=float(choose(rng, config.field_strengths_t)),
        tr_s=uniform(rng, config.tr_range_s),
        flip_angle_deg=uniform(rng, config.flip_angle_range_deg),
        fov_mm=fov_mm,
        orientation_deg=orientation,
        noise_model=choose(rng, config.noise_models),
        bias_strength=uniform(rng, config.bias_strength_range),
        fat_suppressed=fat_suppressed,
        fat_residual=fat_residual if fat_suppressed else 1.0,
        aif=aif,
    )


def case_affine(shape, fov_mm, orientation_deg) -> np.ndarray:
    """Voxel-to-world (4, 4) float64: spacing ``fov_mm / shape``, rotated, centred on 0."""
    shape = np.asarray(shape)
    spacing = np.asarray(fov_mm, dtype=float) / shape
    rotation = Rotation.from_euler("xyz", orientation_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = rotation @ (-0.5 * spacing * (shape - 1))
    return affine


def add_noise(rng: np.random.Generator, clean: np.ndarray, sigma: float, model: str) -> np.ndarray:
    """``clean`` (T, X, Y, Z) float32 with noise of std ``sigma`` per channel, float32.

    ``rician``: magnitude of one complex channel; ``gaussian``: real part only (a
    phase-corrected real image, negative values kept); ``nc-chi-2coil``: root sum of
    squares of two coils of equal sensitivity, each with signal ``clean / sqrt(2)``
    (non-central chi with 4 degrees of freedom; the same std as Rician at high SNR,
    a higher floor in the background).
    """

    def gaussian() -> np.ndarray:
        return sigma * rng.standard_normal(clean.shape, dtype=np.float32)

    if model == "rician":
        return np.hypot(clean + gaussian(), gaussian())
    if model == "gaussian":
        return clean + gaussian()
    per_coil = clean / np.float32(math.sqrt(2.0))
    return np.sqrt(sum((per_coil + gaussian()) ** 2 + gaussian() ** 2 for _ in range(2)))
