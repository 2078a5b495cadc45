"""The paper's own layout: ``SRC/CASE/pre.nii.gz, 1dyn.nii.gz ... Ndyn.nii.gz, seg, roi``.

There is no meta.json: the phases are ``pre`` and every consecutive ``Ndyn`` present
(1dyn, 2dyn, ... up to the first missing one); the times are ``--times`` when given,
else the paper's protocol (:data:`~dcesynth.case.PAPER_TIMES_S`) when there are six
phases. ``seg`` keeps its integer labels; ``roi`` is binarised (> 0).
"""

from __future__ import annotations

from pathlib import Path

from dcesynth.case import PAPER_TIMES_S, Case, phase_names
from dcesynth.data.import_common import (
    TIMES_ORIGIN_INJECTION,
    CaseSource,
    FolderIndex,
    assemble_case,
    option_times,
    phase_files,
)
from dcesynth.io import InputError, load_nifti


class ReferenceSource(CaseSource):
    """Cases of ``src`` in the reference layout, one sub-folder each."""

    source = "reference"

    def load(self, case_id: str, folder: Path) -> Case:
        """Read one case folder.

        Raises:
            InputError: missing pre, 1dyn, seg or roi; unreadable images; times
                missing and no ``--times``; a ``--times`` count that does not match.
        """
        paths = phase_files(folder, lambda k: phase_names(k + 1)[-1])
        n_phases = len(paths)
        if self.times_s is None and n_phases == len(PAPER_TIMES_S):
            times_s = list(PAPER_TIMES_S)
        else:
            times_s = option_times(self.times_s, n_phases, where=str(folder))
        files = FolderIndex(folder)
        masks = {}
        for name in ("seg", "roi"):
            path = files.nifti(name)
            if path is None:
                raise InputError(f"{folder}: {name}.nii.gz missing")
            masks[name] = (str(path), load_nifti(path))
        return assemble_case(
            case_id,
            self.source,
            [(str(path), load_nifti(path)) for path in paths],
            times_s,
            seg=masks["seg"],
            roi=masks["roi"],
            resample=self.resample,
            extra={"times_origin": TIMES_ORIGIN_INJECTION},
        )
