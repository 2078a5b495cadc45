"""What the stages of ``dcesynth.pipeline`` tell their caller: progress, results, skipped cases.

The classes here tell no one; the command line subclasses them with progress bars
and printed results. Kept free of heavy imports, so the command line loads it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcesynth.infer import Prediction
    from dcesynth.io import InputError
    from dcesynth.regression import RegressionModel
    from dcesynth.train.trainer import Trainer


@dataclass
class CaseCount:
    """Cases a multi-case stage wrote (or scored) and skipped."""

    written: int = 0
    skipped: int = 0


class CaseProgress:
    """Progress through the cases of ``predict``; this one tells no one."""

    def start(self, case_id: str, units: int) -> None:
        """A case starts; ``advance`` will be called with ``units`` units in all."""

    def advance(self, units: int) -> None:
        """``units`` more units of the case are done (sliding windows)."""

    def finish(self, prediction: Prediction) -> None:
        """The case is predicted and written."""


class Reporter:
    """What the stages tell their caller as they go; this one tells no one.

    Progress comes from context managers around a stage's loop, which yield what the
    loop calls; results come once a stage is done.
    """

    @contextmanager
    def simulating(self, n_cases: int) -> Iterator[Callable[[str], None]]:
        """Around a cohort's simulation; yields what is called with each case id written."""
        yield lambda case_id: None

    def simulated(self, out_dir: Path, folders: list[Path]) -> None:
        """A cohort is written: its case folders."""

    def cohort_reported(self, page: Path) -> None:
        """A cohort's page is written."""

    def preparing_training(self) -> None:
        """A training run is being set up (data, model, resume)."""

    @contextmanager
    def training(
        self, trainer: Trainer, stop: int
    ) -> Iterator[Callable[[int, str, dict[str, float], float], None]]:
        """Around ``trainer.fit`` up to step ``stop``; yields its ``on_step`` callback."""
        yield lambda step, stage, terms, speed: None

    def trained(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Training stopped; ``metrics`` of the last validation ({} when no step ran)."""

    @contextmanager
    def fitting_regression(self) -> Iterator[Callable[[int, int], None]]:
        """Around a regression fit; yields what is called with (cases done, cases in all)."""
        yield lambda done, total: None

    def fitted_regression(self, run_dir: Path, model: RegressionModel) -> None:
        """A regression model is fitted (or was there already) in ``run_dir``."""

    def case_skipped(self, exc: InputError) -> None:
        """``predict`` or ``evaluate`` left a case out for the reason ``exc``."""

    @contextmanager
    def predicting(self) -> Iterator[CaseProgress]:
        """Around ``predict``'s loop over the cases."""
        yield CaseProgress()

    def predicted(self, out_dir: Path, count: CaseCount) -> None:
        """``predict`` is done."""

    def evaluated(self, out_dir: Path, metrics: dict | None, count: CaseCount) -> None:
        """``evaluate`` is done: metrics.json's content, None when every case was skipped."""


SILENT = Reporter()
