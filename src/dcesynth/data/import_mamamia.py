"""MAMA-MIA (Garrucho et al. 2025): NIfTI phases, expert segmentations, per-patient times.

Layout (file names matched ignoring case: folders say ``DUKE_001``, files ``duke_001``)::

    SRC/images/{ID}/{id}_0000.nii.gz, {id}_0001.nii.gz, ...   (0000 = pre)
    SRC/segmentations/expert/{id}.nii.gz
    SRC/patient_info_files/{id}.json                          (optional)
    SRC/clinical_and_imaging_info.xlsx                        (optional)

Every consecutive phase from ``_0000`` is kept (3 to 8 in the collection). The
expert segmentation is binary and becomes label 1. Times come from the field
``acquisition_times``: searched anywhere in the patient's JSON first, then in the
spreadsheet row (any sheet with a ``patient_id`` column). They are seconds from the
start of the pre-contrast acquisition, which we keep as the time origin: pre = 0 and
the post-contrast offsets unchanged (``times_origin: "pre_acquisition_start"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dcesynth.case import Case, parse_times
from dcesynth.data.import_common import (
    TIMES_ORIGIN_INJECTION,
    TIMES_ORIGIN_PRE_START,
    CaseSource,
    FolderIndex,
    assemble_case,
    option_times,
    phase_files,
    read_table,
    roi_from_dir,
    times_after_pre,
)
from dcesynth.io import InputError, load_nifti

TIMES_FIELD = "acquisition_times"
CLINICAL_TABLE = "clinical_and_imaging_info.xlsx"


class MamaMiaSource(CaseSource):
    """Cases of a MAMA-MIA download, one per folder under ``SRC/images``."""

    source = "mama-mia"

    def __init__(
        self, src: Path, times_s: list[float] | None, roi_dir: Path | None, resample: bool
    ):
        top = FolderIndex(src)
        images = top.find("images")
        if images is None or not images.is_dir():
            raise InputError(f"{src}: no images/ folder (MAMA-MIA layout expected)")
        super().__init__(images, times_s, resample)
        segmentations = FolderIndex(top.find("segmentations"))
        self.segs = FolderIndex(segmentations.find("expert"))
        self.infos = FolderIndex(top.find("patient_info_files"))
        self.rois = FolderIndex(roi_dir) if roi_dir is not None else None
        self.table_path = top.find(CLINICAL_TABLE)
        self.table = {}
        if self.table_path is not None:
            rows = read_table(self.table_path, required=("patient_id",))
            self.table = {str(row["patient id"]).strip().lower(): row for row in rows}

    def load(self, case_id: str, folder: Path) -> Case:
        """Read one patient.

        Raises:
            InputError: missing pre or post-contrast image, missing expert
                segmentation or ``--roi-dir`` mask, unreadable files, unusable times.
        """
        stem = case_id.lower()
        paths = phase_files(folder, lambda k: f"{stem}_{k:04d}")
        # Images first: a damaged image is named even when the times are missing too.
        phases = [(str(path), load_nifti(path)) for path in paths]
        times_s, origin = self._times(case_id, len(paths))
        seg_path = self.segs.nifti(stem)
        if seg_path is None:
            raise InputError(
                f"{case_id}: expert segmentation segmentations/expert/{stem}.nii.gz missing"
            )
        seg_data, seg_affine = load_nifti(seg_path)
        return assemble_case(
            case_id,
            self.source,
            phases,
            times_s,
            seg=(str(seg_path), ((seg_data > 0).astype(np.int16), seg_affine)),
            breast=roi_from_dir(self.rois, stem),
            resample=self.resample,
            extra={"times_origin": origin},
        )

    def _times(self, case_id: str, n_phases: int) -> tuple[list[float], str]:
        """Contract times and their origin: patient JSON, then spreadsheet, then --times."""
        stem = case_id.lower()
        info_path = self.infos.find(f"{stem}.json")
        if info_path is not None:
            where = f"{info_path} {TIMES_FIELD}"
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{info_path}: invalid JSON ({exc})") from exc
            times = parse_times(_find_field(info, TIMES_FIELD), where)
            if times is not None:
                return times_after_pre(times, n_phases, where), TIMES_ORIGIN_PRE_START
        row = self.table.get(stem)
        if row is not None:
            where = f"{self.table_path} {TIMES_FIELD} of {case_id}"
            times = parse_times(row.get(TIMES_FIELD.replace("_", " ")), where)
            if times is not None:
                return times_after_pre(times, n_phases, where), TIMES_ORIGIN_PRE_START
        return option_times(self.times_s, n_phases, where=case_id), TIMES_ORIGIN_INJECTION


def _find_field(tree: Any, key: str) -> Any:
    """The value of the first ``key`` (ignoring case) anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            if str(name).lower() == key:
                return value
        children = list(tree.values())
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _find_field(child, key)
        if found is not None:
            return found
    return None
