"""Kinetic curves and their type: persistent (I), plateau (II), washout (III).

The rule (SPEC.md, one function used everywhere):

- curve S(t) = mean signal inside the lesion per phase;
- early value S_early = max of S over post-contrast phases with t <= 120 s
  (the first post-contrast phase when none is that early);
- late change = (S_last - S_early) / S_early;
- > +10 % persistent, within +-10 % plateau, < -10 % washout.

The voxelwise kinetic map applies the same rule per voxel where the early relative
enhancement (S_early - S_pre) / S_pre exceeds a threshold (50 % by default), as
breast CAD systems colour it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class CurveType(IntEnum):
    """Kinetic curve type; the values are the kinetic-map codes."""

    NONE = 0
    PERSISTENT = 1
    PLATEAU = 2
    WASHOUT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


TYPED_CURVES = (CurveType.PERSISTENT, CurveType.PLATEAU, CurveType.WASHOUT)
"""The three curve types in their order everywhere: tables, mixes, confusion matrices."""


@dataclass(frozen=True)
class CurveRule:
    """Thresholds of the curve-type rule.

    Attributes:
        early_window_s: post-contrast phases up to this time count as early.
        persistent_above: late change above this is persistent (fraction, 0.10 = 10 %).
        washout_below: late change below this is washout.
        min_early_enhancement: kinetic maps type a voxel only above this early
            relative enhancement (fraction).
    """

    early_window_s: float = 120.0
    persistent_above: float = 0.10
    washout_below: float = -0.10
    min_early_enhancement: float = 0.50


DEFAULT_RULE = CurveRule()


def early_index_mask(times_s: np.ndarray, rule: CurveRule = DEFAULT_RULE) -> np.ndarray:
    """(T,) bool: the post-contrast phases that count as early (pre excluded)."""
    times_s = np.asarray(times_s, dtype=float)
    early = (times_s > 0) & (times_s <= rule.early_window_s)
    early[0] = False
    if not early.any():
        early[1] = True
    return early


def early_value(curves: np.ndarray, times_s: np.ndarray, rule: CurveRule = DEFAULT_RULE):
    """S_early of curves (..., T) at times_s (T,): shape (...), max over the early phases."""
    return np.asarray(curves)[..., early_index_mask(times_s, rule)].max(axis=-1)


def late_change(curves: np.ndarray, times_s: np.ndarray, rule: CurveRule = DEFAULT_RULE):
    """(S_last - S_early) / S_early, shape (...) for curves (..., T); NaN where S_early <= 0."""
    curves = np.asarray(curves, dtype=np.float64)
    early = early_value(curves, times_s, rule)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(early > 0, (curves[..., -1] - early) / early, np.nan)


def relative_enhancement(curves: np.ndarray) -> np.ndarray:
    """E(t) = (S(t) - S_pre) / S_pre for curves (..., T); NaN where S_pre <= 0."""
    curves = np.asarray(curves, dtype=np.float64)
    pre = curves[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pre > 0, (curves - pre) / pre, np.nan)


def curve_type_codes(curves: np.ndarray, times_s: np.ndarray, rule: CurveRule = DEFAULT_RULE):
    """Curve-type code per curve (0 none where undefined, 1 persistent, 2 plateau, 3 washout).

    Args:
        curves: (..., T) signal per phase.
        times_s: (T,) seconds after injection.

    Returns:
        (...) uint8 codes.
    """
    change = late_change(curves, times_s, rule)
    codes = np.full(change.shape, CurveType.PLATEAU, dtype=np.uint8)
    codes[change > rule.persistent_above] = CurveType.PERSISTENT
    codes[change < rule.washout_below] = CurveType.WASHOUT
    codes[~np.isfinite(change)] = CurveType.NONE
    return codes


def classify_curve(curve: np.ndarray, times_s, rule: CurveRule = DEFAULT_RULE) -> CurveType:
    """Curve type of one (T,) curve by the contract's rule."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim != 1 or curve.shape[0] != len(times_s):
        raise ValueError(f"curve shape {curve.shape} does not match {len(times_s)} times")
    return CurveType(int(curve_type_codes(curve, times_s, rule)))


def lesion_mean_curve(phases: np.ndarray, seg: np.ndarray, label: int = 1) -> np.ndarray:
    """Mean signal inside lesion ``label`` per phase.

    Args:
        phases: (T, X, Y, Z) images.
        seg: (X, Y, Z) integer labels.
        label: lesion label.

    Returns:
        (T,) float64 curve.
    """
    mask = np.asarray(seg) == label
    if not mask.any():
        raise ValueError(f"lesion label {label} is empty")
    return np.asarray(phases)[:, mask].astype(np.float64).mean(axis=1)


def lesion_labels(seg: np.ndarray) -> list[int]:
    """Lesion labels present in ``seg`` (background 0 excluded), ascending."""
    return [int(v) for v in np.unique(seg) if v != 0]


def kinetic_map(
    phases: np.ndarray, times_s, roi: np.ndarray, rule: CurveRule = DEFAULT_RULE
) -> np.ndarray:
    """Voxelwise curve type inside the ROI where early enhancement is high enough.

    Args:
        phases: (T, X, Y, Z) signal per phase.
        times_s: (T,) seconds after injection.
        roi: (X, Y, Z) mask where the map is computed.

    Returns:
        (X, Y, Z) uint8: 0 none, 1 persistent, 2 plateau, 3 washout.
    """
    phases = np.asarray(phases)
    out = np.zeros(phases.shape[1:], dtype=np.uint8)
    inside = np.asarray(roi) > 0
    curves = np.moveaxis(phases[:, inside].astype(np.float64), 0, -1)
    pre = curves[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        early_enh = np.where(pre > 0, (early_value(curves, times_s, rule) - pre) / pre, 0.0)
    codes = curve_type_codes(curves, times_s, rule)
    codes[~(early_enh > rule.min_early_enhancement)] = CurveType.NONE
    out[inside] = codes
    return out
