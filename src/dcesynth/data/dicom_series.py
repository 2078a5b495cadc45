"""DICOM series -> RAS+ NIfTI-style volumes: headers with pydicom, pixels with SimpleITK.

SimpleITK (GDCM) sorts the slices by position along the slice normal and gives an
LPS image whose arrays are (Z, Y, X). We hand out (X, Y, Z) arrays and the 4x4
RAS+ affine ``diag(-1, -1, 1, 1) @ [direction * spacing | origin]``, so oblique
acquisitions keep their exact geometry.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from dcesynth.io import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DAY_S = 86400.0
HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "AcquisitionTime",
    "SeriesTime",
    "InstanceNumber",
    "Rows",
    "Columns",
    "ImageOrientationPatient",
]


@dataclass
class DicomSeries:
    """One series found in a folder, from its files' headers.

    Attributes:
        folder: the folder holding the files.
        uid: SeriesInstanceUID (None for a folder where no file could be read).
        description: SeriesDescription.
        number: SeriesNumber, if set.
        files: the readable files of the series.
        instance_numbers: InstanceNumber per file (None where missing).
        times_of_day_s: AcquisitionTime (else SeriesTime) per file that has one,
            seconds after midnight.
        geometry: (rows, columns, slice count, rounded orientation) for comparisons.
        errors: ``"path: unreadable DICOM (...)"`` for files of the folder that failed.
    """

    folder: Path
    uid: str | None
    description: str = ""
    number: int | None = None
    files: list[Path] = field(default_factory=list)
    instance_numbers: dict[Path, int | None] = field(default_factory=dict)
    times_of_day_s: list[float] = field(default_factory=list)
    geometry: tuple = ()
    errors: list[str] = field(default_factory=list)

    @property
    def start_s(self) -> float | None:
        """Seconds after midnight at which the series started (wrap past midnight handled)."""
        if not self.times_of_day_s:
            return None
        times = sorted(self.times_of_day_s)
        if times[-1] - times[0] > DAY_S / 2:
            times = sorted(t + DAY_S if t < DAY_S / 2 else t for t in times)
        return times[0] % DAY_S


def dicom_time_s(value: object) -> float | None:
    """DICOM TM ``HHMMSS.frac`` (also ``HH:MM:SS``) -> seconds after midnight; None if unusable."""
    text = str(value or "").strip().replace(":", "")
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d*)?)?)?", text):
        return None
    return int(text[:2]) * 3600.0 + int(text[2:4] or 0) * 60.0 + float(text[4:] or 0.0)


def _integer(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def scan_folder(folder: Path) -> list[DicomSeries]:
    """The series whose ``*.dcm`` files lie directly in ``folder``.

    Files that cannot be parsed are recorded in every returned series' ``errors``;
    a folder without any readable file gives one series with ``uid`` None.
    """
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    found: dict[str, DicomSeries] = {}
    errors = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
            errors.append(f"{path}: unreadable DICOM ({exc})")
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        series = found.get(uid)
        if series is None:
            series = found[uid] = DicomSeries(
                folder=folder,
                uid=uid,
                description=str(header.get("SeriesDescription", "") or ""),
                number=_integer(header.get("SeriesNumber")),
            )
            orientation = tuple(
                np.round(np.asarray(header.get("ImageOrientationPatient") or [], float), 3)
            )
            series.geometry = (
                _integer(header.get("Rows")),
                _integer(header.get("Columns")),
                orientation,
            )
        series.files.append(path)
        series.instance_numbers[path] = _integer(header.get("InstanceNumber"))
        time_s = dicom_time_s(header.get("AcquisitionTime"))
        if time_s is None:
            time_s = dicom_time_s(header.get("SeriesTime"))
        if time_s is not None:
            series.times_of_day_s.append(time_s)
    for series in found.values():
        series.geometry = (*series.geometry, len(series.files))
        series.errors = list(errors)
    if not found and errors:
        return [DicomSeries(folder=folder, uid=None, errors=errors)]
    return list(found.values())


def scan_tree(root: Path) -> list[DicomSeries]:
    """Every series in folders under ``root`` (itself included) that hold ``*.dcm`` files."""
    folders = sorted(
        {p.parent for p in root.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file()}
    )
    return [series for folder in folders for series in scan_folder(folder)]


def most_common_geometry(series: list[DicomSeries]) -> tuple | None:
    """The geometry shared by most of ``series``, or None for an empty list."""
    counts = Counter(s.geometry for s in series)
    return counts.most_common(1)[0][0] if counts else None


def read_volume(series: DicomSeries) -> tuple[tuple[np.ndarray, np.ndarray], list[Path]]:
    """Pixels and geometry of one series.

    Returns:
        ``((array, affine), files)``: the (X, Y, Z) float32 array (rescale slope and
        intercept applied), its 4x4 RAS+ affine, and the file of each Z slice.

    Raises:
        InputError: unreadable files in the series' folder, or a series SimpleITK
            cannot stack into one 3-D volume.
    """
    if series.errors:
        raise InputError(series.errors[0])
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(series.folder), series.uid or "")
    if not names:
        raise InputError(f"{series.folder}: no readable DICOM series {series.uid}")
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise InputError(f"{series.folder}: cannot read DICOM series ({reason})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{series.folder}: expected a 3-D scalar series, got size {image.GetSize()}"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    return (array, ras_affine(image)), [Path(name) for name in names]


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-world RAS+ affine of a 3-D SimpleITK (LPS) image, indices (X, Y, Z)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def slices_in_dicom_order(series: DicomSeries, files: list[Path]) -> list[int]:
    """Volume Z indices listed in the series' own order (InstanceNumber ascending).

    Falls back to the volume order when any slice lacks an InstanceNumber.
    """
    numbers = [series.instance_numbers.get(Path(f)) for f in files]
    if any(n is None for n in numbers):
        return list(range(len(files)))
    return [int(k) for k in np.argsort(numbers, kind="stable")]
