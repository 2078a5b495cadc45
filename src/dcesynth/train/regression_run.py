"""Fit the classical regression model on a folder of cases into a run folder."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from dcesynth.case import find_cases, load_case
from dcesynth.config import RunConfig
from dcesynth.io import check_writable_dir
from dcesynth.regression import RegressionModel, fit_regression
from dcesynth.rundir import RunDir


def train_regression(
    data_dir: Path,
    run_dir: Path,
    config: RunConfig,
    resume: bool = False,
    on_case: Callable[[int, int], None] | None = None,
) -> RegressionModel:
    """Fit on every case of ``data_dir``; write the run's config and fitted model (``RunDir``).

    Args:
        data_dir: folder of training cases, of one protocol or of mixed ones.
        run_dir: run folder to write.
        config: the run's config (``model.name == "regression"``).
        resume: a finished run in ``run_dir`` is kept and returned as it is.
        on_case: progress callback, called with (cases done, cases in all).

    Raises:
        InputError: ``run_dir`` holds a run already (without ``resume``), or the
            cohort cannot be fitted (see ``fit_regression``).
    """
    run = RunDir(run_dir)
    if resume and run.regression_file.is_file():
        return RegressionModel.load(run.regression_file)
    if not resume:
        run.check_unused()
    case_dirs = find_cases(data_dir)
    check_writable_dir(run.path)
    loaders = [functools.partial(load_case, case_dir) for case_dir in case_dirs]
    model = fit_regression(
        loaders,
        config.regression,
        on_case=(lambda done: on_case(done, len(loaders))) if on_case else None,
    )
    model.save(run.regression_file)
    run.write_config(config)
    return model
