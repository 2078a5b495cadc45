"""TI-norm: every phase of a case z-scored by ONE reference phase (Fonnegra et al. 2024).

``y_k = (x_k - mu_p) / sigma_p`` with mu_p, sigma_p the mean and standard deviation
of the first post-contrast phase. We take them inside the breast ROI: outside it
the volume is mostly air and chest wall, whose share changes with the field of
view and would make the scale depend on how the scan was cropped, not on the
breast. The same statistics map predictions back to signal units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcesynth.io import InputError


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
        inside = np.asarray(reference)[np.asarray(roi) > 0]
        if inside.size == 0:
            raise InputError(f"{where}: breast ROI is empty; TI-norm needs it for its statistics")
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


REFERENCE_PHASE = 1
"""Index of the TI-norm reference phase: the first post-contrast phase."""


def fit_case_norm(phases: np.ndarray, roi: np.ndarray, where: str = "case") -> TINorm:
    """TI-norm of a case from its first post-contrast phase; phases (T, X, Y, Z)."""
    return TINorm.fit(phases[REFERENCE_PHASE], roi, where=where)
