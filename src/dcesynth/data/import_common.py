"""Pieces every importer shares: file look-up, spreadsheets, times, grids, case assembly.

Each importer turns one source case into images with their own affines; this module
puts them on the pre phase's grid (or refuses), derives the paper's ROI inside the
whole-breast mask (given or automatic) where the source has no ROI, and builds the
:class:`~dcesynth.case.Case` that ``save_case`` writes. Problems with one case raise
:class:`InputError`; the cohort loop turns that into a skip with the message as the
reason.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openpyxl
from openpyxl.utils.exceptions import InvalidFileException
from scipy import ndimage

from dcesynth.case import Case, check_integer_labels, validate_times
from dcesynth.data.breast_mask import automatic_breast_mask, fibroglandular_roi
from dcesynth.io import AFFINE_ATOL, InputError, load_nifti

Image = tuple[np.ndarray, np.ndarray]
"""An (X, Y, Z) array and its 4x4 RAS+ affine."""

TIMES_ORIGIN_INJECTION = "injection"
TIMES_ORIGIN_PRE_START = "pre_acquisition_start"
"""``meta.json`` ``times_origin``: what the source's 0 s is (see docs/importers.md)."""


class FolderIndex:
    """Case-insensitive file look-up in one folder, listed once (sources mix DUKE_001/duke_001)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        entries = sorted(folder.iterdir()) if folder is not None and folder.is_dir() else []
        self._by_lower = {path.name.lower(): path for path in entries}

    def find(self, *names: str) -> Path | None:
        """The first entry whose name equals one of ``names``, ignoring case."""
        for name in names:
            path = self._by_lower.get(name.lower())
            if path is not None:
                return path
        return None

    def nifti(self, stem: str) -> Path | None:
        """The NIfTI image called ``stem`` (``stem.nii.gz`` or ``stem.nii``), if there."""
        return self.find(f"{stem}.nii.gz", f"{stem}.nii")

    def consecutive(self, stem: Callable[[int], str]) -> list[Path]:
        """NIfTI files named ``stem(0), stem(1), ...`` up to the first one missing."""
        found: list[Path] = []
        while (path := self.nifti(stem(len(found)))) is not None:
            found.append(path)
        return found


def phase_files(folder: Path, stem: Callable[[int], str]) -> list[Path]:
    """The phases' NIfTI files in ``folder``: ``stem(0)`` (pre), ``stem(1)``, ... to a gap.

    Raises:
        InputError: no pre-contrast image, or no post-contrast image after it.
    """
    paths = FolderIndex(folder).consecutive(stem)
    if not paths:
        raise InputError(f"{folder}: {stem(0)}.nii.gz missing (pre-contrast image)")
    if len(paths) < 2:
        raise InputError(f"{folder}: no post-contrast image {stem(1)}.nii.gz")
    return paths


def roi_from_dir(rois: FolderIndex | None, stem: str) -> tuple[str, Image] | None:
    """The ``--roi-dir`` breast mask ``stem.nii(.gz)`` with its file name; None without one.

    Raises:
        InputError: ``--roi-dir`` has no such mask, or it cannot be read.
    """
    if rois is None:
        return None
    path = rois.nifti(stem)
    if path is None:
        raise InputError(f"{rois.folder}: breast mask {stem}.nii.gz missing")
    return str(path), load_nifti(path)


class CaseSource:
    """A cohort on disk with one case per visible sub-folder of ``case_folders``.

    Each importer subclasses it with ``source`` (meta.json's ``"source"``) and ``load``.

    Args:
        case_folders: the folder holding one folder per case.
        times_s: the ``--times`` fallback (see ``option_times``).
        resample: resample grids that differ from the pre phase's instead of refusing them.
    """

    source = ""

    def __init__(self, case_folders: Path, times_s: list[float] | None, resample: bool):
        self.case_folders = case_folders
        self.times_s = times_s
        self.resample = resample

    def cases(self) -> dict[str, Path]:
        """Case id (the folder name) -> case folder."""
        return visible_subfolders(self.case_folders)

    def load(self, case_id: str, folder: Path) -> Case:
        """Read one case into the contract's layout; InputError naming the bad file."""
        raise NotImplementedError


def visible_subfolders(folder: Path) -> dict[str, Path]:
    """Name -> path of every sub-folder of ``folder`` not starting with a dot, sorted."""
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_dir() and not path.name.startswith(".")
    }


def header_key(value: Any) -> str:
    return re.sub(r"[\s_]+", " ", str(value)).strip().lower()


def read_table(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Rows of a spreadsheet (``.xlsx``, every sheet tried) or ``.csv`` as dicts, streamed.

    The header is the first row (among the first 10 of a sheet) that holds all
    ``required`` columns; only that sheet's rows are given. Keys are normalised:
    lower case, ``_`` and runs of spaces turned into one space (``"Patient ID"`` and
    ``"patient_id"`` both give ``"patient id"``). Empty rows are left out.

    Raises:
        InputError: unreadable file, or no sheet with the required columns.
    """
    wanted = {header_key(name) for name in required}
    try:
        for rows in _sheets(path):
            keys = None
            for number, row in enumerate(rows):
                if keys is not None:
                    if any(cell not in (None, "") for cell in row):
                        yield dict(zip(keys, row, strict=False))
                elif number >= 10:
                    break
                elif wanted <= {header_key(cell) for cell in row if cell is not None}:
                    keys = [header_key(cell) if cell is not None else "" for cell in row]
            if keys is not None:
                return
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, InvalidFileException) as exc:
        raise InputError(f"{path}: cannot read spreadsheet ({exc})") from exc
    raise InputError(f"{path}: no sheet with the columns {', '.join(sorted(required))}")


def _sheets(path: Path) -> Iterator[Iterator[tuple]]:
    """Row iterators of each sheet of an ``.xlsx`` file, or of a ``.csv`` file."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield (tuple(row) for row in csv.reader(handle))
        return
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        for sheet in book.worksheets:
            yield sheet.iter_rows(values_only=True)
    finally:
        book.close()


def times_after_pre(times: list[float], n_phases: int, where: str) -> list[float]:
    """Source acquisition times -> contract ``times_s`` (pre at 0 s, one per phase).

    A list with one time per phase is taken relative to its first entry (the pre
    phase); a list one shorter holds only the post-contrast offsets and gets pre = 0
    in front.

    Raises:
        InputError: a count that fits neither, or times not strictly increasing.
    """
    if len(times) == n_phases:
        times_s = [t - times[0] for t in times]
    elif len(times) == n_phases - 1:
        times_s = [0.0, *times]
    else:
        raise InputError(f"{where}: {len(times)} acquisition times for {n_phases} phases")
    return validate_times(times_s, n_phases, where=where)


def option_times(times_s: list[float] | None, n_phases: int, where: str) -> list[float]:
    """The ``--times`` fallback for a case with ``n_phases`` phases.

    Raises:
        InputError: no ``--times`` ("times missing and no --times"), or a count mismatch.
    """
    if times_s is None:
        raise InputError(f"{where}: times missing and no --times")
    if len(times_s) != n_phases:
        raise InputError(f"{where}: --times gives {len(times_s)} times for {n_phases} phases")
    return list(times_s)


def on_grid(
    name: str, image: Image, grid: tuple[tuple[int, ...], np.ndarray], resample: bool, order: int
) -> np.ndarray:
    """``image`` on ``grid`` = (shape, affine): as it is, resampled, or refused.

    Args:
        name: what to name in the error (a file or phase).
        image: (X, Y, Z) array and its affine.
        grid: the target (X, Y, Z) shape and 4x4 affine (the pre phase's).
        resample: resample a different grid (trilinear for ``order=1``, nearest
            neighbour for ``order=0``; zero outside the source's field of view).
        order: spline order, 1 for images, 0 for masks.

    Raises:
        InputError: the grids differ and ``resample`` is False.
    """
    data, affine = image
    shape, target_affine = grid
    if data.shape == tuple(shape) and np.allclose(affine, target_affine, atol=AFFINE_ATOL):
        return data
    if not resample:
        raise InputError(
            f"{name}: grid (shape {data.shape}) differs from the pre phase's (shape {shape}); "
            "pass --resample to resample it onto the pre grid"
        )
    # Target voxel -> world -> source voxel.
    matrix = np.linalg.inv(affine) @ target_affine
    return ndimage.affine_transform(
        data, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(shape), order=order, cval=0.0
    )


def integer_labels(name: str, data: np.ndarray) -> np.ndarray:
    """A mask as int16 labels; InputError when it holds fractions or non-finite values."""
    return np.asarray(check_integer_labels(name, data)).astype(np.int16)


def given_mask(mask: tuple[str, Image], grid, resample: bool, what: str) -> np.ndarray:
    """A user's mask binarised (> 0) on the pre phase's grid; InputError when empty."""
    name, (data, affine) = mask
    binary = (integer_labels(name, data) > 0).astype(np.uint8)
    on_pre = on_grid(name, (binary, affine), grid, resample, 0)
    if not on_pre.any():
        raise InputError(f"{name}: {what} is empty")
    return on_pre


def assemble_case(
    case_id: str,
    source: str,
    phases: list[tuple[str, Image]],
    times_s: list[float],
    seg: tuple[str, Image] | None,
    resample: bool,
    extra: dict[str, Any],
    roi: tuple[str, Image] | None = None,
    breast: tuple[str, Image] | None = None,
) -> Case:
    """Put everything on the pre phase's grid and build the case.

    Args:
        case_id: the case folder name.
        source: ``"reference"``, ``"mama-mia"`` or ``"duke"``.
        phases: (name, image) per phase, pre first.
        times_s: contract times, one per phase.
        seg: (name, integer label image), or None for no lesion labels (all 0).
        resample: resample images on another grid instead of refusing them.
        extra: further ``meta.json`` fields.
        roi: (name, mask image) of the paper's ROI, used as given.
        breast: (name, whole-breast mask image) to derive the ROI in
            (``fibroglandular_roi``, lesion outlines added; ``roi_derived`` in
            ``meta.json``). Without ``roi`` and ``breast``, the automatic breast mask
            is derived from, which sets ``roi_automatic``.

    Raises:
        InputError: non-finite phases, grids that differ without ``resample``,
            non-integer masks, or an empty mask; the message names the file.
    """
    for name, (data, _) in phases:
        if not np.isfinite(data).all():
            raise InputError(f"{name}: contains NaN or infinite values")
    grid = (phases[0][1][0].shape, phases[0][1][1])
    stack = np.stack(
        [on_grid(name, (d.astype(np.float32), a), grid, resample, 1) for name, (d, a) in phases]
    )
    if seg is None:
        labels = np.zeros(grid[0], np.int16)
    else:
        labels = on_grid(seg[0], (integer_labels(seg[0], seg[1][0]), seg[1][1]), grid, resample, 0)
    extra = dict(extra)
    if roi is not None:
        mask = given_mask(roi, grid, resample, "the breast ROI")
        extra.setdefault("roi_automatic", False)
    else:
        if breast is None:
            whole = automatic_breast_mask(stack.mean(axis=0), grid[1], where=case_id)
        else:
            whole = given_mask(breast, grid, resample, "the breast mask")
        mask = fibroglandular_roi(stack[0], stack[1], whole, grid[1], where=case_id)
        if not extra.get("seg_is_box", False):
            # Lesions belong to the paper's ROI whatever their pre-contrast intensity.
            mask = mask | (labels > 0)
        extra["roi_automatic"] = breast is None
        extra["roi_derived"] = True
    lesions = [{"label": int(label)} for label in np.unique(labels) if label > 0]
    return Case(
        case_id=case_id,
        phases=stack,
        times_s=times_s,
        seg=labels.astype(np.int16),
        roi=np.asarray(mask).astype(np.uint8),
        affine=np.asarray(grid[1], dtype=np.float64),
        source=source,
        lesions=lesions,
        extra=extra,
    )
