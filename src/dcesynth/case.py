"""A DCE-MRI case: named phases with acquisition times, lesion labels, breast ROI, one affine.

On disk (the contract in SPEC.md)::

    CASE/pre.nii.gz 1dyn.nii.gz ... Ndyn.nii.gz seg.nii.gz roi.nii.gz meta.json

Every image of a case shares one (X, Y, Z) shape and one 4x4 affine; the case is
the unit that flows through simulate -> train -> predict -> evaluate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcesynth.io import (
    AFFINE_ATOL,
    InputError,
    atomic_write_json,
    load_nifti,
    save_nifti,
    staged_directory,
)

PAPER_TIMES_S = (0.0, 85.0, 155.0, 225.0, 295.0, 365.0)
"""The paper's protocol: pre and five post-contrast phases, seconds after injection."""


def phase_names(n_phases: int) -> list[str]:
    """Contract names of ``n_phases`` phases: ``pre, 1dyn, 2dyn, ...``."""
    return ["pre"] + [f"{k}dyn" for k in range(1, n_phases)]


def validate_times(times_s: Any, n_phases: int | None = None, where: str = "times") -> list[float]:
    """Check acquisition times: finite, pre at 0 s, strictly increasing, one per phase.

    Args:
        times_s: sequence of seconds after injection, pre first.
        n_phases: expected count, if known.
        where: what to name in the error message (a file or an option).

    Returns:
        The times as a list of floats.
    """
    try:
        times = [float(t) for t in times_s]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: times must be numbers in seconds, got {times_s!r}") from exc
    if len(times) < 2:
        raise InputError(f"{where}: need at least 2 times (pre and one post-contrast phase)")
    if not all(math.isfinite(t) for t in times):
        raise InputError(f"{where}: times must be finite, got {times}")
    if times[0] != 0.0:
        raise InputError(f"{where}: the pre-contrast phase must be at 0 s, got {times[0]:g}")
    if any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise InputError(f"{where}: times must be strictly increasing, got {times}")
    if n_phases is not None and len(times) != n_phases:
        raise InputError(f"{where}: {len(times)} times for {n_phases} phases")
    return times


def parse_times(value: Any, where: str) -> list[float] | None:
    """Seconds from a list, a number, or text such as ``"0,85,155"`` or ``"[0, 84.5, 169]"``.

    Text is split at commas, semicolons and white space, brackets aside. A missing value
    (None, empty text, NaN anywhere: a blank spreadsheet cell) gives None, so that a
    fallback applies. The times are not checked as a protocol (``validate_times`` does).

    Args:
        value: the times as the source holds them.
        where: the file and field, or the option, named in errors.

    Raises:
        InputError: a value that is present but not numbers.
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [t for t in re.split(r"[\s,;]+", value.strip().strip("[]()")) if t]
        if not items:
            return None
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, int | float):
        items = [value]
    else:
        raise InputError(f"{where}: expected comma-separated seconds, got {value!r}")
    try:
        times = [float(item) for item in items]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: expected comma-separated seconds, got {value!r}") from exc
    if not times or any(math.isnan(t) for t in times):
        return None
    return times


def check_integer_labels(where: str, data: np.ndarray) -> np.ndarray:
    """``data`` itself when it holds only whole, finite values (mask labels).

    Raises:
        InputError: a fraction or a non-finite value; ``where`` names the file.
    """
    if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
        raise InputError(f"{where}: mask must hold integer labels")
    return data


@dataclass
class Case:
    """One DCE-MRI examination.

    Attributes:
        case_id: unique name, also the folder name.
        phases: (T, X, Y, Z) float32 signal intensities, pre first.
        times_s: (T,) seconds after contrast injection; pre is 0.
        seg: (X, Y, Z) int16 lesion labels, 0 = background, 1.. = lesions.
        roi: (X, Y, Z) uint8 breast mask (fibroglandular tissue + lesions).
        affine: (4, 4) float64 voxel-to-world (RAS+, mm) matrix shared by all images.
        source: where the case came from ("phantom", "reference", "mama-mia", "duke").
        lesions: per-lesion ground truth, ``{"label", "curve_type", ...}``.
        extra: any further meta.json fields, kept as they are.
    """

    case_id: str
    phases: np.ndarray
    times_s: list[float]
    seg: np.ndarray
    roi: np.ndarray
    affine: np.ndarray
    source: str = "unknown"
    lesions: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def phase_names(self) -> list[str]:
        return phase_names(len(self.times_s))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.phases.shape[1:])

    def phase(self, name: str) -> np.ndarray:
        """The (X, Y, Z) image of phase ``name`` (e.g. ``"pre"``, ``"3dyn"``)."""
        return self.phases[self.phase_names.index(name)]

    def meta(self) -> dict[str, Any]:
        """The meta.json content of this case."""
        return {
            "case_id": self.case_id,
            "source": self.source,
            "phases": self.phase_names,
            "times_s": [round(t, 3) for t in self.times_s],
            "lesions": self.lesions,
            **self.extra,
        }

    def validate(self, where: str | None = None) -> Case:
        """Check shapes, dtypes, finiteness, times and masks; raise InputError naming ``where``."""
        where = where or self.case_id
        if self.phases.ndim != 4:
            raise InputError(f"{where}: phases must be (T, X, Y, Z), got {self.phases.shape}")
        validate_times(self.times_s, self.phases.shape[0], where=where)
        for name, mask in (("seg", self.seg), ("roi", self.roi)):
            if mask.shape != self.shape:
                raise InputError(f"{where}: {name} shape {mask.shape} != image shape {self.shape}")
        if not np.isfinite(self.phases).all():
            raise InputError(f"{where}: phases contain NaN or infinite values")
        if not self.roi.any():
            raise InputError(f"{where}: the breast ROI is empty")
        if np.asarray(self.affine).shape != (4, 4):
            raise InputError(f"{where}: affine must be 4x4")
        return self


def save_case(case: Case, out_dir: Path) -> Path:
    """Write ``case`` to ``out_dir/case_id`` atomically (the whole folder appears at once).

    Images are gzipped NIfTI (float32 phases, int16 seg, uint8 roi); meta.json is
    written last.

    Returns:
        The case folder.
    """
    case.validate()
    target = Path(out_dir) / case.case_id
    with staged_directory(target) as staging:
        for name, image in zip(case.phase_names, case.phases, strict=True):
            save_nifti(staging / f"{name}.nii.gz", image.astype(np.float32), case.affine)
        save_nifti(staging / "seg.nii.gz", case.seg.astype(np.int16), case.affine)
        save_nifti(staging / "roi.nii.gz", case.roi.astype(np.uint8), case.affine)
        atomic_write_json(staging / "meta.json", case.meta())
    return target


def read_meta(case_dir: Path) -> dict[str, Any]:
    """Parse and check ``case_dir/meta.json`` (phases and times agree)."""
    path = Path(case_dir) / "meta.json"
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict) or "times_s" not in meta:
        raise InputError(f"{path}: missing 'times_s'")
    names = meta.get("phases") or phase_names(len(meta["times_s"]))
    if list(names) != phase_names(len(names)):
        raise InputError(f"{path}: phases must be named pre, 1dyn, 2dyn, ..., got {names}")
    meta["times_s"] = validate_times(meta["times_s"], len(names), where=str(path))
    meta["phases"] = list(names)
    return meta


def load_images(
    case_dir: Path, names: list[str], shape: tuple[int, ...] | None = None, affine=None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Load ``case_dir/{name}.nii.gz`` for each name, checking one shape and one affine.

    Returns:
        The (X, Y, Z) arrays in order and the shared affine.
    """
    images = []
    first = None
    for name in names:
        path = Path(case_dir) / f"{name}.nii.gz"
        data, this_affine = load_nifti(path)
        if shape is None:
            shape, affine, first = data.shape, this_affine, path
        elif data.shape != tuple(shape):
            raise InputError(f"{path}: shape {data.shape} differs from {first or 'case'} {shape}")
        elif not np.allclose(this_affine, affine, atol=AFFINE_ATOL):
            raise InputError(f"{path}: affine differs from {first or 'case'}")
        images.append(data)
    return images, affine


def load_case(case_dir: Path) -> Case:
    """Load and validate a case folder (see module docstring).

    Raises:
        InputError: a missing or unreadable file, a non-3-D image, mismatched shapes or
            affines, non-finite values, non-integer masks, an empty ROI, or times that
            are not strictly increasing or do not match the phases. The message names
            the offending file.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"{case_dir}: case folder not found")
    meta = read_meta(case_dir)
    names = meta["phases"]
    images, affine = load_images(case_dir, names)
    for name, data in zip(names, images, strict=True):
        if not np.isfinite(data).all():
            raise InputError(f"{case_dir / (name + '.nii.gz')}: contains NaN or infinite values")
    (seg, roi), _ = load_images(case_dir, ["seg", "roi"], images[0].shape, affine)
    seg = check_integer_labels(str(case_dir / "seg.nii.gz"), seg).astype(np.int16)
    roi = check_integer_labels(str(case_dir / "roi.nii.gz"), roi)
    if not np.isin(roi, (0, 1)).all():
        raise InputError(f"{case_dir / 'roi.nii.gz'}: breast ROI must be 0/1")
    if not roi.any():
        raise InputError(f"{case_dir / 'roi.nii.gz'}: the breast ROI is empty")
    known = {"case_id", "source", "phases", "times_s", "lesions"}
    return Case(
        case_id=str(meta.get("case_id", case_dir.name)),
        phases=np.stack(images).astype(np.float32),
        times_s=meta["times_s"],
        seg=seg,
        roi=roi.astype(np.uint8),
        affine=affine,
        source=str(meta.get("source", "unknown")),
        lesions=list(meta.get("lesions", [])),
        extra={k: v for k, v in meta.items() if k not in known},
    )


def is_case_folder(folder: Path) -> bool:
    """A folder holding a meta.json, or NIfTI images without one (an incomplete case)."""
    folder = Path(folder)
    return (folder / "meta.json").is_file() or (folder.is_dir() and any(folder.glob("*.nii*")))


def find_cases(data_dir: Path) -> list[Path]:
    """Case folders directly under ``data_dir`` (see ``is_case_folder``), sorted by name.

    A folder of images without meta.json is listed too, so that ``load_case`` reports
    it rather than it being left out unseen; hidden folders (a case being written) are not.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data folder not found")
    cases = sorted(
        p for p in data_dir.iterdir() if not p.name.startswith(".") and is_case_folder(p)
    )
    if not cases:
        raise InputError(f"{data_dir}: no case folders (with meta.json) found")
    return cases


def expand_case_folders(paths: list[Path]) -> list[Path]:
    """Case folders from paths that are each a case folder or a folder of cases."""
    out: list[Path] = []
    for path in paths:
        out.extend([path] if is_case_folder(path) else find_cases(path))
    return out
