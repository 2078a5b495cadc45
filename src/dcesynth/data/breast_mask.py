"""Automatic breast mask for imported cases that come without one, and the paper's ROI in it.

Designed for bilateral axial breast DCE-MRI (Duke, most of MAMA-MIA); the mask is
the whole breast (skin, fat, fibroglandular tissue, lesions) anterior to the
sternum, a superset of the paper's fibroglandular + enhancing ROI. Steps, in the
image's closest RAS+ voxel order (so axial slices are the last axis and anterior
is +Y whatever the scanner's orientation):

1. Foreground: the temporal mean image, median-filtered in-plane (3x3), above the
   lower of its two three-class Otsu thresholds (SimpleITK: air, dark tissue, bright
   tissue); the largest connected component is the body.
2. Chest-wall cut, found on that foreground: per axial slice the sternum level is
   the deepest point of the cleavage, i.e. the least anterior of the columns' most
   anterior foreground voxels within the middle 20 % of the body's left-right
   extent. A slice counts only when the breasts on both sides reach
   ``min_protrusion_mm`` further anterior; slices without such a cleavage use the
   median level of those with one.
3. The foreground, closed (2 iterations) and hole-filled per axial slice so that
   fat inside the skin outline joins even on fat-suppressed images, keeps what lies
   anterior of the sternum level.
4. Components smaller than 10 % of the largest are dropped (specks left by the cut).

``fibroglandular_roi`` then derives the paper's ROI inside that mask, or inside one the
user gives, so that the ROI means the same on imported cases as on the phantom's.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dcesynth.io import InputError

SUPPLY_MASK = (
    "supply its breast mask (1 inside the breast, on its pre phase's grid) as "
    "DIR/{where}.nii.gz and pass --roi-dir DIR"
)
"""What a case whose automatic mask fails needs instead (the ``--roi-dir`` convention)."""

CLOSING_ITERATIONS = 2
SMALLEST_KEPT_FRACTION = 0.1
BAND_HALF_WIDTH = 0.1


def automatic_breast_mask(
    image: np.ndarray, affine: np.ndarray, min_protrusion_mm: float = 10.0, where: str = "case"
) -> np.ndarray:
    """The breast mask of one case (see the module docstring for the method).

    Args:
        image: (X, Y, Z) signal, e.g. the mean over the phases.
        affine: (4, 4) voxel-to-world RAS+ matrix of ``image`` (mm).
        min_protrusion_mm: how far both breasts must reach anterior of the sternum
            level for a slice to show a cleavage.
        where: the case named in errors.

    Returns:
        (X, Y, Z) uint8 mask, 1 inside the breasts.

    Raises:
        InputError: no axial slice shows two breasts (unilateral or sagittal scan,
            or an image without contrast to the background), or the mask is empty.
    """
    orientation = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(np.asarray(image, dtype=np.float32), orientation)
    ap_axis = int(np.flatnonzero(orientation[:, 0] == 1)[0])
    ap_voxel_mm = float(np.linalg.norm(np.asarray(affine)[:3, ap_axis]))
    foreground = _foreground(ras)
    levels = _sternum_levels(foreground, min_protrusion_mm / ap_voxel_mm)
    if levels is None:
        raise InputError(
            f"{where}: automatic breast mask found no cleavage between two breasts "
            f"(unilateral or non-axial scan?); {SUPPLY_MASK.format(where=where)}"
        )
    anterior = np.arange(ras.shape[1])[None, :, None] > levels[None, None, :]
    mask = _drop_specks(_filled(foreground) & anterior)
    if not mask.any():
        raise InputError(
            f"{where}: automatic breast mask is empty; {SUPPLY_MASK.format(where=where)}"
        )
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), orientation)
    return nib.orientations.apply_orientation(mask, to_source).astype(np.uint8)


def _foreground(ras: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the largest connected component above the lower of two Otsu
    thresholds (the body)."""
    # An in-plane median filter removes noise specks and, unlike a Gaussian, keeps edges
    # in place; slices are often thicker than the in-plane voxels, so it stays in-plane.
    smooth = ndimage.median_filter(ras, size=(3, 3, 1))
    # Three classes: air, dark tissue (muscle, fibroglandular, suppressed fat), bright
    # tissue. One threshold would drop the dark tissue that joins the breasts to the body.
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.Execute(sitk.GetImageFromArray(smooth))
    labels, count = ndimage.label(smooth > min(otsu.GetThresholds()))
    if count == 0:
        return np.zeros(ras.shape, dtype=bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def _filled(foreground: np.ndarray) -> np.ndarray:
    """``foreground`` closed and hole-filled per axial slice."""
    body = foreground.copy()
    pad = CLOSING_ITERATIONS
    for z in range(body.shape[2]):
        # Edge padding keeps the closing from eroding tissue cut by the field of view.
        padded = np.pad(body[:, :, z], pad, mode="edge")
        closed = ndimage.binary_closing(padded, iterations=pad)[pad:-pad, pad:-pad]
        body[:, :, z] = ndimage.binary_fill_holes(closed)
    return body


def _sternum_levels(foreground: np.ndarray, min_protrusion_voxels: float) -> np.ndarray | None:
    """(Z,) anterior-posterior voxel index of the sternum per axial slice, or None."""
    n_y, n_z = foreground.shape[1], foreground.shape[2]
    levels = np.full(n_z, np.nan)
    for z in range(n_z):
        section = foreground[:, :, z]
        columns = np.flatnonzero(section.any(axis=1))
        if columns.size < 3:
            continue
        # Most anterior foreground voxel of each left-right column (-1: none).
        front = np.where(section.any(axis=1), n_y - 1 - np.argmax(section[:, ::-1], axis=1), -1)
        low, high = columns[0], columns[-1]
        centre, half = (low + high) / 2, max(1.0, BAND_HALF_WIDTH * (high - low))
        band = columns[np.abs(columns - centre) <= half]
        if band.size == 0:
            # The breasts do not meet in this slice: its cleavage depth cannot be read.
            continue
        sternum = front[band].min()
        right_side = front[low : int(np.floor(centre - half))]
        left_side = front[int(np.ceil(centre + half)) + 1 : high + 1]
        if right_side.size and left_side.size:
            if min(right_side.max(), left_side.max()) - sternum >= min_protrusion_voxels:
                levels[z] = sternum
    if np.isnan(levels).all():
        return None
    levels[np.isnan(levels)] = np.nanmedian(levels)
    return levels


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= SMALLEST_KEPT_FRACTION * sizes.max()) + 1
    return np.isin(labels, keep)


SKIN_MM = 2.0
"""Breast skin thickness: 0.8-3 mm on mammograms (Willson et al., Clin Radiol 33:691, 1982)."""


def fibroglandular_roi(
    pre: np.ndarray, post: np.ndarray, breast: np.ndarray, affine: np.ndarray, where: str = "case"
) -> np.ndarray:
    """The paper's ROI (fibroglandular tissue, lesions included) inside a whole-breast mask.

    The skin, ``SKIN_MM`` deep (at least one voxel along each axis) from the mask's
    outside inside the field of view, is dropped; the pre-contrast intensities of the
    rest split into two classes at their Otsu threshold (SimpleITK), fat and
    fibroglandular tissue.
    Fat is the bright class without fat suppression and the dark one with it, so the
    class is chosen by contrast uptake: fibroglandular tissue (and any lesion) enhances,
    fat does not. Of the two classes the mean of pre and 1dyn splits into, the one whose
    median 1dyn − pre is larger says which: the brighter or the darker.

    Args:
        pre: (X, Y, Z) pre-contrast signal.
        post: (X, Y, Z) first post-contrast signal on the same grid.
        breast: (X, Y, Z) whole-breast mask (skin, fat, fibroglandular tissue).
        affine: (4, 4) voxel-to-world matrix (mm); its column norms are the voxel sizes.
        where: the case named in errors.

    Returns:
        (X, Y, Z) uint8 mask, 1 in the fibroglandular class.

    Raises:
        InputError: the breast mask without skin is empty, or its pre-contrast
            intensities do not form two classes.
    """
    spacing_mm = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    # The skin's depth in voxels along each axis, at least one; distances are measured in
    # those units, so that the skin is 1 deep whatever the voxels' anisotropy.
    skin_voxels = np.maximum(1, np.ceil(SKIN_MM / spacing_mm - 1e-9))
    # Edge padding: tissue cut by the field of view has no skin there.
    inside = np.pad(np.asarray(breast) > 0, 1, mode="edge")
    depth = ndimage.distance_transform_edt(inside, sampling=1.0 / skin_voxels)[1:-1, 1:-1, 1:-1]
    tissue = depth > 1.0 + 1e-9
    pre64, post64 = np.asarray(pre, dtype=np.float64), np.asarray(post, dtype=np.float64)
    values = pre64[tissue]
    if values.size < 2 or values.min() == values.max():
        raise InputError(
            f"{where}: the breast mask holds no fat and fibroglandular tissue to tell "
            f"apart ({values.size} voxels inside its skin); check the mask and the pre phase"
        )
    bright = _above_otsu(pre64, tissue)
    # Which class enhances is read on classes split on the mean of pre and 1dyn: voxels
    # picked for a high pre (noise included) show a low 1dyn - pre, those picked on the
    # mean do not, as the noise of the mean and of the difference is uncorrelated. The
    # median keeps a large, strongly enhancing lesion from deciding it.
    bright_on_mean = _above_otsu((pre64 + post64) / 2, tissue)
    bright_pre, dark_pre = tissue & bright, tissue & ~bright
    bright_mean, dark_mean = tissue & bright_on_mean, tissue & ~bright_on_mean
    if not all(part.any() for part in (bright_pre, dark_pre, bright_mean, dark_mean)):
        raise InputError(
            f"{where}: the breast's pre-contrast intensities form one class; fat and "
            "fibroglandular tissue cannot be told apart"
        )
    enhancement = post64 - pre64
    keep_bright = np.median(enhancement[bright_mean]) > np.median(enhancement[dark_mean])
    return (bright_pre if keep_bright else dark_pre).astype(np.uint8)


def _above_otsu(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: ``image`` above the Otsu threshold of its values in ``where``."""
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(np.asarray(image, dtype=np.float32)[where][None, None, :]))
    return np.asarray(image) > otsu.GetThreshold()
