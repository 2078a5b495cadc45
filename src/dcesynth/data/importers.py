"""Import public breast DCE-MRI cohorts into the case layout of the contract (SPEC.md).

One entry point, :func:`import_cohort`, for three source layouts:

=============  ==========================================  ====================================
kind           source                                      options that apply
=============  ==========================================  ====================================
reference      ``SRC/CASE/pre.nii.gz ... roi.nii.gz``      times_s, case_ids, resample
mama-mia       ``SRC/images``, ``segmentations/expert``    times_s (fallback), case_ids,
               ``patient_info_files``, clinical xlsx       roi_dir, resample
duke           ``SRC/Breast_MRI_NNN/<study>/<series>``     times_s (fallback), case_ids,
               DICOM                                       roi_dir, mapping, annotations,
                                                           resample
=============  ==========================================  ====================================

Each case is written whole with :func:`~dcesynth.case.save_case` (atomic) or skipped
with a reason; see ``import_reference``, ``import_mamamia`` and ``import_duke`` for
the per-source conventions (times, masks, series selection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dcesynth.case import save_case, validate_times
from dcesynth.data.import_duke import DukeSource
from dcesynth.data.import_mamamia import MamaMiaSource
from dcesynth.data.import_reference import ReferenceSource
from dcesynth.io import InputError, check_writable_dir

KINDS = ("reference", "mama-mia", "duke")


@dataclass
class ImportSummary:
    """What an import did.

    Attributes:
        written: ids of the cases written, in order.
        skipped: (case id, reason) for each case not written.
    """

    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class NothingImportedError(InputError):
    """No case could be imported; ``summary`` holds the reasons for the CLI's table."""

    def __init__(self, message: str, summary: ImportSummary):
        super().__init__(message)
        self.summary = summary


def import_cohort(
    kind: str,
    src: Path,
    out: Path,
    times_s: list[float] | None = None,
    case_ids: list[str] | None = None,
    roi_dir: Path | None = None,
    mapping: Path | None = None,
    annotations: Path | None = None,
    resample: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> ImportSummary:
    """Import every case of ``src`` (or those named) into ``out/CASE_ID``.

    Args:
        kind: ``"reference"``, ``"mama-mia"`` or ``"duke"``.
        src: the source folder.
        out: the data folder the cases are written to (created if needed).
        times_s: seconds after injection per phase, pre first (``--times``). For
            ``reference`` it replaces the default (the paper's times, six phases
            only); for ``mama-mia`` and ``duke`` it is used only for cases whose
            source gives no times. Its count must match a case's phases.
        case_ids: import only these cases (matched ignoring case); the others
            listed but not found are skipped with a reason.
        roi_dir: folder of ``{case_id}.nii.gz`` whole-breast masks (mama-mia, duke);
            without it the automatic breast mask is used (``roi_automatic``). The
            ROI is derived inside the breast mask (``roi_derived``).
        mapping: Duke's file-path mapping spreadsheet (duke only).
        annotations: Duke's ``Annotation_Boxes.xlsx`` (duke only).
        resample: resample phases and masks whose grid differs from the pre
            phase's onto it, instead of skipping the case.
        progress: called as ``progress(case_id, done, total)`` after each case.

    Returns:
        The ids written and the (id, reason) pairs skipped.

    Raises:
        InputError: unknown kind, missing ``src``, an option given for a kind it
            does not apply to, bad ``times_s``, unreadable ``mapping`` or
            ``annotations``; :class:`NothingImportedError` when no case was written.
    """
    src = Path(src)
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if not src.is_dir():
        raise InputError(f"{src}: source folder not found")
    _check_options(kind, roi_dir, mapping, annotations)
    if times_s is not None:
        times_s = validate_times(times_s, where="--times")
    if kind == "reference":
        source = ReferenceSource(src, times_s, resample)
    elif kind == "mama-mia":
        source = MamaMiaSource(src, times_s, roi_dir, resample)
    else:
        source = DukeSource(src, times_s, roi_dir, mapping, annotations, resample)

    summary = ImportSummary()
    found = source.cases()
    selected = list(found)
    if case_ids is not None:
        by_lower = {case_id.lower(): case_id for case_id in found}
        selected = []
        for wanted in dict.fromkeys(case_ids):
            if wanted.lower() in by_lower:
                selected.append(by_lower[wanted.lower()])
            else:
                summary.skipped.append((wanted, f"--cases {wanted}: not found in {src}"))
    out = Path(out)
    out_existed = out.exists()
    check_writable_dir(out)
    for done, case_id in enumerate(selected, start=1):
        try:
            save_case(source.load(case_id, found[case_id]), out)
            summary.written.append(case_id)
        except InputError as exc:
            summary.skipped.append((case_id, str(exc)))
        if progress is not None:
            progress(case_id, done, len(selected))
    if not summary.written:
        if not out_existed:
            out.rmdir()
        first = f"; {summary.skipped[0][0]}: {summary.skipped[0][1]}" if summary.skipped else ""
        raise NothingImportedError(
            f"{src}: no case could be imported as {kind} ({len(summary.skipped)} skipped{first})",
            summary,
        )
    return summary


def _check_options(kind: str, roi_dir: Path | None, mapping: Path | None, annotations: Path | None):
    """Refuse options the kind does not use, and paths that do not exist."""
    allowed = {
        "reference": set(),
        "mama-mia": {"roi_dir"},
        "duke": {"roi_dir", "mapping", "annotations"},
    }[kind]
    given = {"roi_dir": roi_dir, "mapping": mapping, "annotations": annotations}
    for name, value in given.items():
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if name not in allowed:
            raise InputError(f"{option}: does not apply to {kind} imports")
        path = Path(value)
        exists = path.is_dir() if name == "roi_dir" else path.is_file()
        if not exists:
            raise InputError(f"{path}: {option} not found")
