"""TI-norm: every phase of a case z-scored by ONE reference phase (Fonnegra et al. 2024).

``y_k = (x_k - mu_p) / sigma_p`` with mu_p, sigma_p the mean and standard deviation
of the first post-contrast phase. We take them inside the breast ROI: outside it
the volume is mostly air and chest wall, whose share changes with the field of
view and would make the scale depend on how the scan was cropped, not on the
breast. The same statistics map predictions back to signal units.

TI-norm keeps no trace of a voxel's signal relative to its own pre-contrast value, the
relative enhancement ``(S1 - S0) / S0`` that the signal equations tie to the contrast
agent's concentration: ``relative_enhancement`` gives it, as an input beside the
normalised phases.

TI-norm's scale is the spread of 1dyn, so it moves with everything that sets how much a
case enhances (AIF, dose, field strength, timing of 1dyn). ``fit_input_norm`` offers the
alternative of referencing every phase to the pre-contrast phase instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcesynth.io import InputError


def roi_values(image: np.ndarray, roi: np.ndarray, where: str) -> np.ndarray:
    """The voxels of ``image`` (X, Y, Z) inside ``roi`` (X, Y, Z), for a normalisation's
    statistics.

    Raises:
        InputError: an empty ROI.
    """
    inside = np.asarray(image)[np.asarray(roi) > 0]
    if inside.size == 0:
        raise InputError(f"{where}: breast ROI is empty; normalisation needs it for its statistics")
    return inside


@dataclass(frozen=True)
class TINorm:
    """Mean and standard deviation of the reference phase inside the breast ROI."""

    mean: float
    std: float

    @classmethod
    def fit(cls, reference: np.ndarray, roi: np.ndarray, where: str = "case") -> TINorm:
        """Statistics of ``reference`` (X, Y, Z) inside ``roi`` (X, Y, Z).

        Raises:
            InputError: empty ROI, or a constant reference phase inside it.
        """
        inside = roi_values(reference, roi, where)
        std = float(inside.std(dtype=np.float64))
        if not std > 0:
            raise InputError(f"{where}: reference phase is constant inside the breast ROI")
        return cls(mean=float(inside.mean(dtype=np.float64)), std=std)

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Signal -> normalised units, any shape, float32."""
        return ((np.asarray(images, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        """Normalised units -> signal, any shape, float32."""
        return (np.asarray(normalised, dtype=np.float32) * self.std + self.mean).astype(np.float32)


RELATIVE_ENHANCEMENT_RANGE = (-1.0, 6.0)
"""Clip of ``(S1 - S0) / S0``: dark pre-contrast voxels would otherwise give huge ratios."""


def relative_enhancement(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """``(post - pre) / pre`` of two signal images of one shape, clipped, float32.

    Voxels whose pre-contrast signal is below 1e-3 of the post-contrast maximum (air)
    are divided by that floor instead.
    """
    pre = np.asarray(pre, dtype=np.float32)
    post = np.asarray(post, dtype=np.float32)
    floor = 1e-3 * max(float(np.abs(post).max()), 1e-12)
    ratio = (post - pre) / np.maximum(pre, floor)
    return np.clip(ratio, *RELATIVE_ENHANCEMENT_RANGE).astype(np.float32)


REFERENCE_PHASE = 1
"""Index of the TI-norm reference phase: the first post-contrast phase."""


def fit_case_norm(phases: np.ndarray, roi: np.ndarray, where: str = "case") -> TINorm:
    """TI-norm of a case from its first post-contrast phase; phases (T, X, Y, Z)."""
    return TINorm.fit(phases[REFERENCE_PHASE], roi, where=where)


NORMALISATIONS = ("ti", "pre")
"""The networks' input normalisations (``ModelConfig.normalisation``)."""

PRE_UNIT = 0.25
"""One unit of the ``"pre"`` normalisation, as a fraction of the pre-contrast ROI mean.

On the phantom the within-ROI std of 1dyn is 0.20-0.26 of that mean (median of 40 cases,
in the paper-protocol and the randomised cohorts), so the losses see values of TI-norm's
size and the loss weights keep their balance."""


def fit_input_norm(
    phases: np.ndarray, roi: np.ndarray, normalisation: str = "ti", where: str = "case"
) -> TINorm:
    """The affine map a network's inputs and outputs go through; phases (T, X, Y, Z).

    ``"ti"``: TI-norm (``fit_case_norm``), the paper's. ``"pre"``: referenced to the
    pre-contrast phase's mean ``m`` inside ``roi``, ``y = (x - m) / (PRE_UNIT * m)``: the
    breast's mean pre-contrast signal is 0, a voxel's enhancement ``y_k - y_0`` is in units
    of ``PRE_UNIT * m`` and its relative enhancement survives the map. Contrast uptake does
    not change the scale, and noise barely does.

    Raises:
        InputError: empty ROI, a constant reference phase (``"ti"``) or a pre-contrast
            mean that is not positive (``"pre"``) inside it.
        ValueError: an unknown ``normalisation``.
    """
    if normalisation == "ti":
        return fit_case_norm(phases, roi, where=where)
    if normalisation != "pre":
        raise ValueError(f"unknown normalisation {normalisation!r}; choose from {NORMALISATIONS}")
    inside = roi_values(phases[0], roi, where)
    mean = float(inside.mean(dtype=np.float64))
    if not mean > 0:
        raise InputError(f"{where}: pre-contrast mean inside the breast ROI is not positive")
    return TINorm(mean=mean, std=PRE_UNIT * mean)


def context_channels(phases: np.ndarray, relative: bool) -> np.ndarray:
    """``(C, X, Y, Z)`` inputs besides the normalised phases, from signal phases (T, X, Y, Z).

    C is 1 with ``relative`` (the relative enhancement of the first post-contrast phase
    over pre), else 0.
    """
    if not relative:
        return np.zeros((0, *phases.shape[1:]), dtype=np.float32)
    return relative_enhancement(phases[0], phases[REFERENCE_PHASE])[None]


CASE_FEATURES = (
    "pre_mean",
    "pre_std",
    "post_mean",
    "post_std",
    "post_signal_to_spread",
    "relative_enhancement_median",
)
"""Names of ``case_features``' values, in order."""


def case_features(phases: np.ndarray, roi: np.ndarray, norm: TINorm) -> np.ndarray:
    """``(len(CASE_FEATURES),)`` float32 statistics of the breast's pre and 1dyn inside ``roi``.

    The mean and standard deviation of pre and of 1dyn in the network's normalised units
    (``norm``), the 1dyn signal's mean over its standard deviation, and the median
    relative enhancement. They say how much the whole breast enhanced, which sets how
    the parenchyma goes on enhancing; a network cannot read that from its input once
    instance norm has removed each patch's own mean and scale.

    Args:
        phases: ``(T, X, Y, Z)`` signal phases, pre and 1dyn first.
        roi: ``(X, Y, Z)`` breast ROI, not empty.
        norm: the case's input normalisation (``fit_input_norm``).
    """
    inside = np.asarray(roi) > 0
    pre, post = phases[0][inside], phases[REFERENCE_PHASE][inside]
    pre_normalised, post_normalised = norm.forward(pre), norm.forward(post)
    spread = max(float(post.std(dtype=np.float64)), 1e-12)
    values = [
        pre_normalised.mean(dtype=np.float64),
        pre_normalised.std(dtype=np.float64),
        post_normalised.mean(dtype=np.float64),
        post_normalised.std(dtype=np.float64),
        post.mean(dtype=np.float64) / spread,
        np.median(relative_enhancement(pre, post)),
    ]
    return np.asarray(values, dtype=np.float32)
