"""The stages as plain calls (simulate, train, predict, evaluate) and the comparison of models.

Each stage checks its inputs and outputs, calls the library and tells a
``reporting.Reporter`` what happens: progress, results, cases it skipped. The command
line passes one that draws progress bars and prints; the default tells no one.

:func:`run_comparison` is ``dcesynth demo`` and ``dcesynth experiment``: a training
and a test cohort, one run per model variant, its predictions of the test cohort, one
report. Cohorts and the cohort page already there are kept and a run resumes from its
last checkpoint (a finished one trains no further), so an interrupted comparison
continues where it stopped; predictions and the report are made again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dcesynth import report
from dcesynth.case import PAPER_TIMES_S, expand_case_folders, load_case, phase_names
from dcesynth.config import RunConfig, preset
from dcesynth.guards import (
    check_disk_space,
    check_holds_no_cases,
    check_memory,
    check_out_apart_from_inputs,
    prediction_needs,
)
from dcesynth.io import InputError, check_output_dir, check_writable_dir
from dcesynth.manifest import PredictedCase, read_manifest, write_manifest
from dcesynth.phantom import (
    PHANTOMS,
    PhantomConfig,
    cases_for_lesions,
    check_cohort,
    cohort_exists,
    simulate_cohort,
)
from dcesynth.reporting import SILENT, CaseCount, Reporter

if TYPE_CHECKING:
    from dcesynth.infer import LoadedRun, Prediction

COMPARISON_SHAPE = (64, 64, 32)
"""(X, Y, Z) voxels of the comparison's cases: small enough to train on a CPU."""

COMPARISON_TRAINING_PHANTOM = dataclasses.replace(PHANTOMS["randomised"], times_s=PAPER_TIMES_S)
"""The comparison's training cohort: scanner, injection, noise, anatomy and orientation
drawn from the ``randomised`` ranges, at the paper's protocol, which the baseline (tied
to its training phases) and the test cohort (the ``default`` phantom) share."""

VARIANTS = {
    "iterunet": {"model": "iterunet"},
    "iterunet-prior": {"model": "iterunet", "prior": "regression"},
    "baseline": {"model": "baseline"},
    "no-warmup": {"model": "iterunet", "warmup": False},
    "no-temporal": {"model": "iterunet", "temporal": False},
    "regression": {"model": "regression"},
}
"""Each model of the paper's comparison, and iterU-Net with the regression prior (beyond
the paper), as ``config.preset`` options."""


def simulate(
    out_dir: Path,
    n_cases: int,
    seed: int = 0,
    config: PhantomConfig | None = None,
    workers: int | None = None,
    reporter: Reporter = SILENT,
) -> list[Path]:
    """Simulate a cohort into ``out_dir`` (``phantom.simulate_cohort``); its case folders.

    ``config`` None is the default ``PhantomConfig``.

    Raises:
        InputError: a bad request (``phantom.check_cohort``) or an unwritable ``out_dir``.
    """
    config = config or PhantomConfig()
    check_cohort(n_cases, seed, config)
    check_writable_dir(out_dir)
    with reporter.simulating(n_cases) as on_case:
        folders = simulate_cohort(
            out_dir, n_cases, seed=seed, config=config, workers=workers, progress=on_case
        )
    reporter.simulated(Path(out_dir), folders)
    return folders


def report_cohort(data_dir: Path, out_dir: Path, reporter: Reporter = SILENT) -> Path:
    """Write the cohort page of ``data_dir`` to ``out_dir/index.html``; its path."""
    page = report.write_cohort_report(data_dir, out_dir)
    reporter.cohort_reported(page)
    return page


def train(
    data_dir: Path,
    run_dir: Path,
    config: RunConfig,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    perceptual_weights: Path | None = None,
    reporter: Reporter = SILENT,
) -> dict[str, float]:
    """Train ``config``'s model on the cases of ``data_dir`` into the run folder ``run_dir``.

    Args:
        data_dir: folder of training cases.
        run_dir: the run folder (``RunDir``).
        config: the run's config; a resumed network run keeps its own.
        max_steps: stop after this global step (the schedule is unchanged).
        resume: continue the run in ``run_dir``.
        perceptual_weights: MedicalNet ResNet-10 weights for the perceptual loss term.
        reporter: told of progress and the result.

    Returns:
        The last validation metrics ({} for a regression run or when no step ran).

    Raises:
        InputError: ``max_steps`` below 1, ``run_dir`` overlapping the inputs or not
            writable, or what setting up the run raises (bad data, a run already there).
    """
    # Only the stages that need torch load it (`simulate` and `evaluate` start faster).
    from dcesynth.train.regression_run import train_regression
    from dcesynth.train.trainer import build_trainer

    if max_steps is not None and max_steps < 1:
        raise InputError(f"--max-steps: must be at least 1, got {max_steps}")
    check_out_apart_from_inputs(run_dir, [data_dir, perceptual_weights])
    check_output_dir(run_dir, "--out")
    if config.model.name == "regression":
        with reporter.fitting_regression() as on_case:
            model = train_regression(data_dir, run_dir, config, resume=resume, on_case=on_case)
        reporter.fitted_regression(Path(run_dir), model)
        return {}
    reporter.preparing_training()
    with build_trainer(data_dir, run_dir, config, resume, perceptual_weights) as trainer:
        total = trainer.config.train.total_steps
        stop = total if max_steps is None else min(total, max_steps)
        with reporter.training(trainer, stop) as on_step:
            metrics = trainer.fit(max_steps=max_steps, on_step=on_step)
    reporter.trained(trainer, metrics)
    return metrics


def _plan_predictions(
    folders: list[Path],
    n_inputs: int,
    times_s: list[float] | None,
    out_dir: Path,
    reporter: Reporter,
    count: CaseCount,
) -> list[Path]:
    """The case folders whose prediction fits in memory; checks the disk has room for all."""
    planned, disk_bytes = [], 0
    for folder in folders:
        try:
            case_disk, case_memory = prediction_needs(folder, n_inputs, times_s)
            check_memory(str(folder), case_memory)
        except InputError as exc:
            reporter.case_skipped(exc)
            count.skipped += 1
            continue
        planned.append(folder)
        disk_bytes += case_disk
    check_disk_space(out_dir, disk_bytes)
    return planned


def _manifest_entry(run: LoadedRun, prediction: Prediction) -> PredictedCase:
    first = prediction.n_inputs
    return PredictedCase(
        run=str(run.run_dir.resolve()),
        model=run.config.model.name,
        inputs=tuple(phase_names(first)),
        phases=tuple(prediction.names),
        times_s=tuple(prediction.times_s[first:]),
    )


def predict(
    run_dir: Path,
    cases: list[Path],
    out_dir: Path,
    inputs: str = "pre,1dyn",
    times_s: list[float] | None = None,
    overlap: float = 0.5,
    amp: bool | None = None,
    mirror: bool = False,
    reporter: Reporter = SILENT,
) -> CaseCount:
    """Predict the phases after ``inputs`` of each case into ``out_dir``, with its manifest.

    Writes ``out_dir/CASE_ID/`` per case (``infer.write_prediction``) and, after each,
    the manifest ``out_dir/predictions.json`` (``dcesynth.manifest``). A case that is
    bad, does not fit the model or would not fit in memory is skipped and reported.

    Args:
        run_dir: the run folder of the model.
        cases: case folders, or folders of cases.
        out_dir: the predictions folder.
        inputs: the observed phases, ``pre,1dyn[,2dyn...]``.
        times_s: the whole protocol's times, when the cases' meta.json lack the targets.
        overlap: sliding-window overlap, in [0, 1).
        amp: bf16 autocast (default: the run's setting).
        mirror: test-time mirroring over all three axes (``infer.WindowPredictor``): the
            prediction averages 8 mirrored passes of each window, 8 times the model's work.
        reporter: told of progress, skipped cases and the result.

    Raises:
        InputError: a bad ``overlap``, ``inputs`` or run folder; an ``out_dir`` that
            overlaps the inputs, holds cases, is not writable, lacks the disk space or
            holds a manifest that cannot be read.
    """
    from dcesynth.infer import (
        input_names,
        load_run,
        predict_case,
        progress_units,
        write_prediction,
    )

    if not 0 <= overlap < 1:
        raise InputError(f"--overlap: must be at least 0 and below 1, got {overlap:g}")
    folders = expand_case_folders(cases)
    check_out_apart_from_inputs(out_dir, [*cases, *folders])
    check_output_dir(out_dir, "--out")
    check_holds_no_cases(out_dir)
    n_inputs = len(input_names(inputs))
    loaded = load_run(run_dir)
    recorded = read_manifest(out_dir) or {}
    count = CaseCount()
    planned = _plan_predictions(folders, n_inputs, times_s, out_dir, reporter, count)
    with reporter.predicting() as progress:
        for folder in planned:
            try:
                case = load_case(folder)
                progress.start(case.case_id, progress_units(loaded, case, overlap))
                prediction = predict_case(
                    loaded,
                    case,
                    inputs=inputs,
                    times_s=times_s,
                    overlap=overlap,
                    amp=amp,
                    on_windows=progress.advance,
                    mirror_axes=(0, 1, 2) if mirror else (),
                )
            except InputError as exc:
                reporter.case_skipped(exc)
                count.skipped += 1
                continue
            write_prediction(case, prediction, out_dir)
            recorded[case.case_id] = _manifest_entry(loaded, prediction)
            write_manifest(out_dir, recorded)
            count.written += 1
            progress.finish(prediction)
    reporter.predicted(Path(out_dir), count)
    return count


def evaluate(
    data_dir: Path,
    predictions: dict[str, Path],
    out_dir: Path,
    reporter: Reporter = SILENT,
) -> dict | None:
    """Score each model's predictions of the cases of ``data_dir`` (``report.evaluate``).

    Returns:
        metrics.json's content; None when every case was skipped (each one reported).

    Raises:
        InputError: ``out_dir`` overlapping the inputs or not writable, or what
            ``report.evaluate`` raises for the cohort as a whole.
    """
    check_out_apart_from_inputs(out_dir, [data_dir, *predictions.values()])
    check_output_dir(out_dir, "--out")
    count = CaseCount()

    def skip(case_dir: Path, exc: InputError) -> None:
        reporter.case_skipped(exc)
        count.skipped += 1

    try:
        metrics = report.evaluate(data_dir, predictions, out_dir, on_skip=skip)
    except report.NothingEvaluatedError:
        metrics = None
    else:
        count.written = metrics["cases"]
    reporter.evaluated(Path(out_dir), metrics, count)
    return metrics


def run_comparison(
    out: Path,
    preset_name: str,
    variants: Sequence[str] | None,
    train_cases: int,
    test_lesions: int,
    shape: tuple[int, int, int] = COMPARISON_SHAPE,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> Path:
    """Simulate training and test cohorts, train each variant, predict the test cases, evaluate.

    The training cohort is ``COMPARISON_TRAINING_PHANTOM``, the test cohort the
    ``default`` phantom. Writes OUT/data/{train,test}, OUT/cohort/index.html (the
    training cohort's lesion curves by type), OUT/runs/VARIANT, OUT/predictions/VARIANT
    and OUT/report; what is kept on a second call: see the module docstring.

    Args:
        out: the comparison's folder.
        preset_name: the training preset of every variant.
        variants: keys of ``VARIANTS``; None for all of them.
        train_cases: cases of the training cohort (seed ``seed``).
        test_lesions: the test cohort (seed ``seed + 1``) has the fewest cases that hold
            this many lesions.
        shape: (X, Y, Z) voxels of every case.
        seed: seed of the cohorts and of training.
        reporter: told of every stage.

    Returns:
        The report page.
    """
    from dcesynth.rundir import RunDir

    out = Path(out)
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    for folder, count, cohort_seed, phantom in (
        (train_dir, train_cases, seed, COMPARISON_TRAINING_PHANTOM),
        (test_dir, cases_for_lesions(test_lesions, seed + 1), seed + 1, PHANTOMS["default"]),
    ):
        if not cohort_exists(folder, count):
            cohort = dataclasses.replace(phantom, shape=shape)
            simulate(folder, count, cohort_seed, cohort, reporter=reporter)
    if not (out / "cohort" / "index.html").is_file():
        report_cohort(train_dir, out / "cohort", reporter)
    predictions = {}
    for name in VARIANTS if variants is None else variants:
        run_dir = out / "runs" / name
        config = preset(preset_name, seed=seed, **VARIANTS[name])
        train(train_dir, run_dir, config, resume=RunDir(run_dir).started, reporter=reporter)
        predictions[name] = out / "predictions" / name
        predict(run_dir, [test_dir], predictions[name], reporter=reporter)
    evaluate(test_dir, predictions, out / "report", reporter)
    return out / "report" / "index.html"
