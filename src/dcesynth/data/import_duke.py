"""Duke-Breast-Cancer-MRI (TCIA): DICOM tree, optional path mapping and lesion boxes.

Layout: ``SRC/Breast_MRI_NNN/<study>/<series>/*.dcm``, one case per patient folder.

Which series are the phases:

* with the collection's file-path mapping spreadsheet (``mapping``): the rows whose
  ``original_path_and_filename`` sits in a folder ``pre``, ``post_1``, ``post_2`` ...
  name the phase; the series folder is that of ``classic_path`` (else
  ``descriptive_path``) from the patient folder down. Consecutive phases from
  ``pre`` are kept.
* without it, from SeriesDescription: dynamic series mention ``dyn``, ``pre``,
  ``post``, ``pass``, ``ph<N>`` or ``phase <N>`` and none of T2, subtraction,
  segmentation, MIP, localizer, diffusion. Those naming a post-contrast phase
  (``post``, ``pass``, ``ph<N>``, ``phase <N>``, ``1st`` ...) and not ``pre`` are
  post-contrast; the pre phase is another dynamic series (``ax dyn pre``,
  ``ax 3d dyn``), preferring the posts' geometry, then the lowest SeriesNumber.
  The posts are ordered by AcquisitionTime after the pre.

Times: each series' AcquisitionTime (else SeriesTime) start minus the pre's, a day
added when a later series is stamped before the pre (midnight). Origin: start of the
pre acquisition (``times_origin: "pre_acquisition_start"``). ``--times`` only when a
series has no time.

Lesion boxes (``annotations``, ``Annotation_Boxes.xlsx``): rows, columns and slices
are 1-based and inclusive; rows index the DICOM pixel rows (our Y), columns the pixel
columns (our X), slices count the pre series' files in InstanceNumber order (mapped
to our Z, which follows position). The box becomes label 1, ``seg_is_box: true``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dcesynth.case import Case, validate_times
from dcesynth.data.dicom_series import (
    DAY_S,
    DicomSeries,
    most_common_geometry,
    read_volume,
    scan_folder,
    scan_tree,
    slices_in_dicom_order,
)
from dcesynth.data.import_common import (
    TIMES_ORIGIN_INJECTION,
    TIMES_ORIGIN_PRE_START,
    CaseSource,
    FolderIndex,
    assemble_case,
    header_key,
    option_times,
    read_table,
    roi_from_dir,
)
from dcesynth.io import InputError

DYNAMIC = re.compile(r"dyn|(?<![a-z])(pre|post|pass)|(?<![a-z])ph\s*\d|phase\s*\d", re.I)
NOT_DYNAMIC = re.compile(r"(?<![a-z])(t2|sub|seg|mip|loc|scout|survey|diff|dwi|adc)", re.I)
POST = re.compile(r"post|pass|(?<![a-z])ph\s*\d|phase\s*\d|\d\s*(st|nd|rd|th)(?![a-z])", re.I)
PRE = re.compile(r"(?<![a-z])pre(?![a-z])", re.I)
PATIENT = re.compile(r"breast_mri_\d+", re.I)
MAPPED_PHASE = re.compile(r"pre|post_?(\d+)", re.I)
BOX_COLUMNS = ("Patient ID", "Start Row", "End Row", "Start Column", "End Column")
BOX_COLUMNS += ("Start Slice", "End Slice")

Box = tuple[int, int, int, int, int, int]
"""(start row, end row, start column, end column, start slice, end slice), 1-based inclusive."""


class DukeSource(CaseSource):
    """Cases of a Duke-Breast-Cancer-MRI download, one per patient folder."""

    source = "duke"

    def __init__(
        self,
        src: Path,
        times_s: list[float] | None,
        roi_dir: Path | None,
        mapping: Path | None,
        annotations: Path | None,
        resample: bool,
    ):
        super().__init__(src, times_s, resample)
        self.rois = FolderIndex(roi_dir) if roi_dir is not None else None
        self.mapping_path = mapping
        self.mapping = read_mapping(mapping) if mapping is not None else None
        self.annotations = annotations
        self.boxes = read_boxes(annotations) if annotations is not None else None

    def load(self, case_id: str, folder: Path) -> Case:
        """Read one patient.

        Raises:
            InputError: no pre or post-contrast series, unreadable DICOM, times that
                are missing (and no ``--times``) or not increasing, a box outside the
                image, a missing ``--roi-dir`` mask, grids that differ without resample.
        """
        if self.mapping is not None:
            phases = self._mapped_series(case_id, folder)
        else:
            phases = classify(folder)
        times_s, origin = self._times(phases, folder)
        read = [read_volume(series) for series in phases]
        (pre, pre_affine), pre_files = read[0]
        extra = {"times_origin": origin, "seg_is_box": False}
        extra["source_series"] = [series.description for series in phases]
        seg = None
        if self.boxes is not None:
            boxes = self.boxes.get(case_id.lower())
            if not boxes:
                raise InputError(f"{self.annotations}: no lesion box for {case_id}")
            order = slices_in_dicom_order(phases[0], pre_files)
            where = f"{self.annotations} ({case_id})"
            seg = (where, (box_labels(pre.shape, boxes, order, where), pre_affine))
            extra["seg_is_box"] = True
        names = [str(series.folder) for series in phases]
        return assemble_case(
            case_id,
            self.source,
            [(name, image) for name, (image, _) in zip(names, read, strict=True)],
            times_s,
            seg=seg,
            breast=roi_from_dir(self.rois, case_id),
            resample=self.resample,
            extra=extra,
        )

    def _mapped_series(self, case_id: str, folder: Path) -> list[DicomSeries]:
        """The phases' series as the mapping spreadsheet names them."""
        phases = self.mapping.get(case_id.lower())
        if not phases or 0 not in phases:
            raise InputError(f"{self.mapping_path}: no pre series listed for {case_id}")
        chosen = []
        while len(chosen) in phases:
            name = "pre" if not chosen else f"post_{len(chosen)}"
            folders = {path for path in phases[len(chosen)] if (folder / path).is_dir()}
            if len(folders) != 1:
                state = "not found" if not folders else f"ambiguous ({len(folders)} folders)"
                raise InputError(f"{folder}: series folder for {name} from the mapping {state}")
            series_folder = folder / folders.pop()
            found = scan_folder(series_folder)
            if len(found) != 1:
                raise InputError(
                    f"{series_folder}: {len(found)} DICOM series for {name}, expected 1"
                )
            chosen.append(found[0])
        if len(chosen) < 2:
            raise InputError(f"{self.mapping_path}: no post_1 series listed for {case_id}")
        return chosen

    def _times(self, phases: list[DicomSeries], folder: Path) -> tuple[list[float], str]:
        starts = [series.start_s for series in phases]
        if any(start is None for start in starts):
            where = f"{folder} (no AcquisitionTime)"
            return option_times(self.times_s, len(phases), where), TIMES_ORIGIN_INJECTION
        times_s = [(start - starts[0]) % DAY_S for start in starts]
        return validate_times(
            times_s, len(phases), f"{folder} AcquisitionTime"
        ), TIMES_ORIGIN_PRE_START


def classify(folder: Path) -> list[DicomSeries]:
    """Pre and post-contrast series of a patient from SeriesDescription and time (module doc)."""
    series = scan_tree(folder)
    dynamic = [
        s
        for s in series
        if s.uid is not None
        and DYNAMIC.search(s.description)
        and not NOT_DYNAMIC.search(s.description)
    ]
    posts = [s for s in dynamic if POST.search(s.description) and not PRE.search(s.description)]
    pres = [s for s in dynamic if s not in posts]
    if not pres:
        unreadable = [e for s in series for e in s.errors]
        found = ", ".join(repr(s.description) for s in series if s.uid is not None) or "none"
        detail = f"; {unreadable[0]}" if unreadable else ""
        raise InputError(f"{folder}: no pre-contrast dynamic series (series: {found}){detail}")
    if not posts:
        raise InputError(f"{folder}: no post-contrast dynamic series")
    geometry = most_common_geometry(posts)
    pres.sort(key=lambda s: (s.geometry != geometry, s.number is None, s.number or 0))
    pre = pres[0]
    if pre.start_s is None or any(s.start_s is None for s in posts):
        posts.sort(key=lambda s: (s.number is None, s.number or 0))
    else:
        posts.sort(key=lambda s: (s.start_s - pre.start_s) % DAY_S)
    return [pre, *posts]


def _below_patient(path: object) -> Path | None:
    """The series folder of a mapping path, relative to the patient folder."""
    parts = [p for p in str(path or "").replace("\\", "/").split("/") if p]
    for index, part in enumerate(parts):
        if PATIENT.fullmatch(part):
            return Path(*parts[index + 1 : -1]) if len(parts) > index + 2 else None
    return None


def read_mapping(path: Path) -> dict[str, dict[int, set[Path]]]:
    """Patient (lower case) -> phase index (0 = pre) -> candidate series folders.

    Raises:
        InputError: unreadable spreadsheet or no ``original_path_and_filename`` column.
    """
    mapping: dict[str, dict[int, set[Path]]] = {}
    for row in read_table(path, required=("original_path_and_filename",)):
        parts = [p for p in str(row["original path and filename"] or "").split("/") if p]
        patient = next((p.lower() for p in parts if PATIENT.fullmatch(p)), None)
        phase = MAPPED_PHASE.fullmatch(parts[-2]) if len(parts) >= 2 else None
        if patient is None or phase is None:
            continue
        index = int(phase.group(1)) if phase.group(1) else 0
        for column in ("classic path", "descriptive path"):
            series_folder = _below_patient(row.get(column))
            if series_folder is not None:
                mapping.setdefault(patient, {}).setdefault(index, set()).add(series_folder)
    return mapping


def read_boxes(path: Path) -> dict[str, list[Box]]:
    """Patient (lower case) -> lesion boxes from ``Annotation_Boxes.xlsx`` (or .csv).

    Raises:
        InputError: unreadable file, missing columns, or bounds that are not integers.
    """
    boxes: dict[str, list[Box]] = {}
    for row in read_table(path, required=BOX_COLUMNS):
        patient = str(row["patient id"]).strip()
        try:
            box = tuple(int(float(row[header_key(c)])) for c in BOX_COLUMNS[1:])
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: box bounds of {patient} must be integers") from exc
        boxes.setdefault(patient.lower(), []).append(box)
    return boxes


def box_labels(
    shape: tuple[int, int, int], boxes: list[Box], order: list[int], where: str
) -> np.ndarray:
    """(X, Y, Z) int16 labels, 1 inside the boxes.

    Args:
        shape: the (X, Y, Z) image shape; X = DICOM columns, Y = rows.
        boxes: 1-based inclusive boxes (see :data:`Box`).
        order: volume Z index of each DICOM slice, in the series' own order.
        where: the annotation file and case named in errors.

    Raises:
        InputError: a box empty or outside the image.
    """
    labels = np.zeros(shape, dtype=np.int16)
    for row0, row1, col0, col1, slice0, slice1 in boxes:
        inside = 1 <= row0 <= row1 <= shape[1] and 1 <= col0 <= col1 <= shape[0]
        if not inside or not 1 <= slice0 <= slice1 <= shape[2]:
            raise InputError(
                f"{where}: lesion box rows {row0}-{row1}, columns {col0}-{col1}, "
                f"slices {slice0}-{slice1} is outside the image of {shape[1]} rows, "
                f"{shape[0]} columns, {shape[2]} slices"
            )
        labels[col0 - 1 : col1, row0 - 1 : row1, order[slice0 - 1 : slice1]] = 1
    return labels
