"""The `dcesynth` command line: one command per stage; each parses, calls the library, prints.

Bad input ends with exit code 2 and one ``error: ...`` line on stderr (``--debug``
shows the traceback instead). A multi-case command (predict, evaluate, import) skips
a bad case with one ``error:`` line, finishes the others, prints ``N written, M
skipped`` and exits 3 when it skipped any (2 when it wrote none).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dcesynth.io import InputError
from dcesynth.reporting import CaseProgress, Reporter

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Synthesize delayed-phase breast DCE-MRI and kinetic curves (iterU-Net).",
)
console = Console(stderr=True)
debug_mode = {"on": False}


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Options of every command."""
    debug_mode["on"] = debug


def print_error(exc: Exception | str) -> None:
    """One ``error:`` line on stderr."""
    print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)


def exits_on_input_error(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError and OS errors (a full disk, a read-only folder) into one line, exit 2.

    Python warnings raised meanwhile are shown after the command, so that an `error:`
    line is always the first line on stderr.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                return command(*args, **kwargs)
        except (InputError, OSError) as exc:
            if debug_mode["on"]:
                raise
            if isinstance(exc, InputError):
                print_error(exc)
            else:
                print_error(f"{exc.filename or 'output'}: {exc.strerror or exc}")
            raise typer.Exit(code=2) from None
        finally:
            for message in caught:
                warnings.showwarning(
                    message.message, message.category, message.filename, message.lineno
                )

    return wrapper


def finish_cases(written: int, skipped: int, what: str) -> None:
    """A multi-case command's summary line on stdout; exit 3 when it skipped a case (2 when
    it wrote none)."""
    print(f"{written} written, {skipped} skipped ({what})")
    if skipped:
        raise typer.Exit(code=3 if written else 2)


def times_option(text: str | None) -> list[float] | None:
    """``--times`` '0,85,155' -> [0.0, 85.0, 155.0], checked as acquisition times."""
    if text is None:
        return None
    from dcesynth.case import parse_times, validate_times

    return validate_times(parse_times(text, where="--times") or [], where="--times")


def progress_bar() -> Progress:
    """A progress bar on stderr, shown only on a terminal (so that `error:` lines come first)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not console.is_terminal,
    )


class BarCaseProgress(CaseProgress):
    """One progress bar per predicted case, with its window counts once done."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = None

    def start(self, case_id: str, units: int) -> None:
        self.task = self.bar.add_task(f"predict {case_id}", total=units, status="")

    def advance(self, units: int) -> None:
        self.bar.advance(self.task, units)

    def finish(self, prediction) -> None:
        status = f"{prediction.windows_run} run, {prediction.windows_skipped} skipped (no ROI)"
        self.bar.update(self.task, status=status)


class CliReporter(Reporter):
    """Progress bars on stderr, results on stdout, an `error:` line for each skipped case."""

    @contextmanager
    def simulating(self, n_cases):
        with progress_bar() as bar:
            task = bar.add_task("simulate", total=n_cases, status="")
            yield lambda case_id: bar.update(task, advance=1, status=case_id)

    def simulated(self, out_dir, folders):
        print(f"wrote {len(folders)} cases to {out_dir}")

    def cohort_reported(self, page):
        print(f"cohort report: {page}")

    def preparing_training(self):
        # Held until the run is set up: a warning must not come before an `error:` line.
        setup_logging(hold=True)

    @contextmanager
    def training(self, trainer, stop):
        show = trainer.rank == 0
        # Under torchrun only rank 0 writes files, the log included.
        setup_logging(trainer.run.train_log if show else None)
        with progress_bar() as bar:
            task = bar.add_task(
                f"train {trainer.config.model.name}",
                total=stop,
                completed=trainer.step,
                status="",
                visible=show,
            )

            def on_step(step, stage, terms, speed):
                status = f"{stage} loss {terms['total']:.3f} {speed:.2f} it/s"
                bar.update(task, completed=step, status=status)

            yield on_step

    def trained(self, trainer, metrics):
        if trainer.rank != 0:
            return
        logging.getLogger("dcesynth").info(
            "done: step %d, run in %s", trainer.step, trainer.run.path
        )
        if metrics:
            print(
                f"step {trainer.step}: val enh. error last phase "
                f"{metrics['val_enh_error_last']:.4f} (copy 1st post "
                f"{metrics['val_enh_error_last_copy']:.4f})"
            )

    @contextmanager
    def fitting_regression(self):
        with progress_bar() as bar:
            task = bar.add_task("fit regression", total=None, status="")
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def fitted_regression(self, run_dir, model):
        stages = "voxel and lesion stages" if model.lesion is not None else "voxel stage"
        print(
            f"regression: change at {model.n_knots} times after 1dyn "
            f"({model.knots_s[0]:g}-{model.knots_s[-1]:g} s), {model.n_terms} terms ({stages}); "
            f"run in {run_dir}"
        )

    def case_skipped(self, exc):
        print_error(exc)

    @contextmanager
    def predicting(self):
        with progress_bar() as bar:
            yield BarCaseProgress(bar)

    def predicted(self, out_dir, count):
        finish_cases(count.written, count.skipped, f"predictions in {out_dir}")

    def evaluated(self, out_dir, metrics, count):
        if metrics is None:
            finish_cases(count.written, count.skipped, "no case scored")
            return
        print_metrics(metrics)
        print(f"report: {out_dir / 'index.html'}")
        finish_cases(count.written, count.skipped, f"cases scored in {out_dir / 'metrics.json'}")


REPORTER = CliReporter()


@app.command()
@exits_on_input_error
def simulate(
    out: Annotated[Path, typer.Argument(help="Output folder for the cohort.")],
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed: fixes anatomy, kinetics and noise.")] = 0,
    shape: Annotated[tuple[int, int, int], typer.Option(help="Volume size X Y Z in voxels.")] = (
        128,
        128,
        64,
    ),
    times: Annotated[
        str | None, typer.Option(help="Acquisition times in s, pre first (default: paper's).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
    report: Annotated[bool, typer.Option(help="Also write OUT/report/index.html.")] = False,
    phantom: Annotated[
        str,
        typer.Option(
            help="Named phantom: default (the paper's scanner and protocol) or randomised "
            "(scanner, protocol, injection and anatomy drawn per case from wide ranges)."
        ),
    ] = "default",
) -> None:
    """Simulate a breast DCE-MRI cohort with ground-truth kinetics."""
    from dataclasses import replace

    from dcesynth import pipeline
    from dcesynth.phantom import phantom_config

    base = phantom_config(phantom)
    fixed_times = times_option(times)
    config = replace(
        base, shape=tuple(shape), times_s=tuple(fixed_times) if fixed_times else base.times_s
    )
    pipeline.simulate(out, cases, seed=seed, config=config, workers=workers, reporter=REPORTER)
    if report:
        pipeline.report_cohort(out, out / "report", REPORTER)


@app.command()
@exits_on_input_error
def train(
    data: Annotated[Path, typer.Argument(help="Folder of cases (e.g. from `simulate`).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    model: Annotated[str, typer.Option(help="iterunet, baseline or regression.")] = "iterunet",
    preset: Annotated[str, typer.Option(help="demo, cpu, gpu or paper.")] = "demo",
    no_warmup: Annotated[bool, typer.Option("--no-warmup", help="Ablation: skip stage 1.")] = False,
    no_temporal: Annotated[
        bool, typer.Option("--no-temporal", help="Ablation: no time embedding, no ConvLSTM.")
    ] = False,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    perceptual_weights: Annotated[
        Path | None,
        typer.Option(
            help="MedicalNet ResNet-10 weights (.pth/.safetensors) for the perceptual loss."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the preset's seed.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast.")] = None,
    normalisation: Annotated[
        str | None,
        typer.Option(
            help="Intensity normalisation of the network and the regression model: ti "
            "(TI-norm; paper, gpu) or pre (referenced to the pre-contrast phase; demo, cpu)."
        ),
    ] = None,
    scheduled_sampling: Annotated[
        float | None,
        typer.Option(
            help="Share of stage 2 over which the rollout's inputs go from the real phases "
            "to the model's own (0: free-running from its first step, the presets')."
        ),
    ] = None,
    case_features: Annotated[
        bool | None,
        typer.Option(
            "--case-features/--no-case-features",
            help="Condition the network on the breast's enhancement statistics (default: "
            "the preset's).",
        ),
    ] = None,
    prior: Annotated[
        str | None,
        typer.Option(
            help="What iterU-Net's steps start from: none (the current phase, the paper's) "
            "or regression (plus the change a regression model fitted on the training "
            "cases predicts; default: the preset's).",
        ),
    ] = None,
) -> None:
    """Train iterU-Net (two stages), the per-phase baseline or the regression model."""
    from dcesynth import pipeline
    from dcesynth.config import preset as make_preset

    config = make_preset(
        preset,
        model=model,
        temporal=not no_temporal,
        warmup=not no_warmup,
        seed=seed,
        amp=amp,
        normalisation=normalisation,
        scheduled_sampling=scheduled_sampling,
        case_features=case_features,
        prior=prior,
    )
    pipeline.train(
        data,
        out,
        config,
        max_steps=max_steps,
        resume=resume,
        perceptual_weights=perceptual_weights,
        reporter=REPORTER,
    )


@app.command()
@exits_on_input_error
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `train`.")],
    cases: Annotated[list[Path], typer.Argument(help="Case folders, or folders of cases.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    inputs: Annotated[str, typer.Option(help="Observed phases, pre first.")] = "pre,1dyn",
    times: Annotated[
        str | None, typer.Option(help="Whole protocol times in s (default: the case's meta).")
    ] = None,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap.")] = 0.5,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast.")] = None,
    mirror: Annotated[
        bool,
        typer.Option(help="Average the predictions of each window mirrored over all axes (8x)."),
    ] = False,
) -> None:
    """Synthesize the delayed phases of whole cases, plus a kinetic colour map."""
    from dcesynth import pipeline

    pipeline.predict(
        run,
        cases,
        out,
        inputs=inputs,
        overlap=overlap,
        amp=amp,
        mirror=mirror,
        times_s=times_option(times),
        reporter=REPORTER,
    )


@app.command()
@exits_on_input_error
def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder of real cases.")],
    pred: Annotated[list[str], typer.Option("--pred", help="NAME=DIR of predictions.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder.")],
) -> None:
    """Score predictions against the real phases: metrics.json and index.html."""
    from dcesynth import pipeline

    predictions = {}
    for item in pred:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--pred: expected NAME=DIR, got {item!r}")
        if name in predictions:
            raise InputError(f"--pred: model name {name!r} given twice")
        predictions[name] = Path(folder)
    pipeline.evaluate(data, predictions, out, reporter=REPORTER)


def print_metrics(metrics: dict) -> None:
    """The headline figures as a rich table, then the verdict of each paired comparison."""
    from rich.table import Table

    from dcesynth.comparison import REFERENCE_MODEL

    table = Table(title=f"{metrics['cases']} cases, {metrics['lesions']} lesions")
    columns = ("model", "enh. error last", "× copy [95 % CI]", "SCC", "DTW", "type agr.")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for name, values in metrics["models"].items():
        to_copy = metrics["paired"].get(f"{name} - {REFERENCE_MODEL}", {}).get("enh_error_last", {})
        ratio = ""
        if to_copy.get("ratio") is not None:
            low, high = to_copy["ratio_ci95"]
            ratio = f"{to_copy['ratio']:.2f} [{low:.2f}, {high:.2f}]"
        table.add_row(
            name,
            f"{values['enh_error_last']:.4f}",
            ratio,
            f"{values['scc']:.3f}",
            f"{values['dtw']:.3f}",
            f"{values['curve_type_agreement']:.2f}",
        )
    console = Console()
    console.print(table)
    for sentence in metrics["verdicts"].values():
        console.print(sentence, markup=False, highlight=False, soft_wrap=True)


@app.command("import")
@exits_on_input_error
def import_(
    kind: Annotated[str, typer.Argument(help="reference, mama-mia or duke.")],
    src: Annotated[Path, typer.Argument(help="Source folder of the cohort.")],
    out: Annotated[Path, typer.Option("--out", help="Data folder to write cases to.")],
    times: Annotated[str | None, typer.Option(help="Acquisition times in s, pre first.")] = None,
    cases: Annotated[str | None, typer.Option(help="Only these case ids, comma-separated.")] = None,
    roi_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of {id}.nii.gz whole-breast masks; the ROI is derived in them."),
    ] = None,
    mapping: Annotated[
        Path | None, typer.Option(help="Duke file-path mapping spreadsheet.")
    ] = None,
    annotations: Annotated[Path | None, typer.Option(help="Duke Annotation_Boxes.xlsx.")] = None,
    resample: Annotated[
        bool, typer.Option("--resample", help="Resample mismatched grids to the pre phase.")
    ] = False,
) -> None:
    """Import a public cohort (reference layout, MAMA-MIA, Duke DICOM) into case folders."""
    from rich.table import Table

    from dcesynth.data.importers import NothingImportedError, import_cohort
    from dcesynth.guards import check_out_apart_from_inputs
    from dcesynth.io import check_output_dir

    check_out_apart_from_inputs(out, [src, roi_dir, mapping, annotations])
    check_output_dir(out, "--out")
    with progress_bar() as bar:
        task = bar.add_task(f"import {kind}", total=None, status="")

        def on_case(case_id: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, status=case_id)

        try:
            summary = import_cohort(
                kind,
                src,
                out,
                times_s=times_option(times),
                case_ids=[c.strip() for c in cases.split(",") if c.strip()] if cases else None,
                roi_dir=roi_dir,
                mapping=mapping,
                annotations=annotations,
                resample=resample,
                progress=on_case,
            )
        except NothingImportedError as exc:
            if not exc.summary.skipped:
                raise
            summary = exc.summary
    for _, reason in summary.skipped:
        print_error(reason)
    if summary.written:
        print_import_summary(summary, Table)
    finish_cases(len(summary.written), len(summary.skipped), f"cases imported to {out}")


def print_import_summary(summary, table_class) -> None:
    """The cases written and skipped, as a table on stdout."""
    table = table_class(title="import summary")
    table.add_column("case")
    table.add_column("result")
    for case_id in summary.written:
        table.add_row(case_id, "[green]written")
    for case_id, reason in summary.skipped:
        table.add_row(case_id, f"[yellow]skipped:[/] {reason}")
    Console().print(table)


# Cohort sizes of `demo` and `experiment`: phantom cases are cheap to simulate, and a test
# cohort needs about 100 lesions before intervals can tell models apart. The experiment's
# 1,500 training cases are what the regression prior needed to reach 0.6x copy-forward
# on the default phantom (300: 0.62x); on the randomised one it reaches 0.59x.
DEMO_TRAIN_CASES, DEMO_TEST_LESIONS = 200, 100
EXPERIMENT_TRAIN_CASES, EXPERIMENT_TEST_LESIONS = 1500, 125
DEMO_VARIANTS = ("iterunet-prior", "baseline", "regression")


def compare(what: str, out: Path, preset: str, variants, cases: int, lesions: int, seed: int):
    """Run `demo` or `experiment` (``pipeline.run_comparison``); say where its report is."""
    from dcesynth import pipeline

    page = pipeline.run_comparison(
        out, preset, variants, cases, lesions, seed=seed, reporter=REPORTER
    )
    print(f"{what} done: open {page}")


@app.command()
@exits_on_input_error
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for data, runs, predictions, report.")],
    seed: Annotated[int, typer.Option(help="Seed of cohorts and training.")] = 0,
) -> None:
    """Simulate (training: randomised phantom at the paper's protocol; test: default) ->
    train iterU-Net on the regression prior, the baseline and the regression model ->
    predict -> evaluate."""
    compare("demo", out, "demo", DEMO_VARIANTS, DEMO_TRAIN_CASES, DEMO_TEST_LESIONS, seed)


@app.command()
@exits_on_input_error
def experiment(
    out: Annotated[Path, typer.Argument(help="Folder for data, runs, predictions, report.")],
    preset: Annotated[str, typer.Option(help="Training preset of every model.")] = "cpu",
    cases: Annotated[int, typer.Option(help="Training cases.")] = EXPERIMENT_TRAIN_CASES,
    test_lesions: Annotated[
        int, typer.Option(help="Lesions of the test cohort (its cases follow).")
    ] = EXPERIMENT_TEST_LESIONS,
    seed: Annotated[int, typer.Option(help="Seed of cohorts and training.")] = 0,
) -> None:
    """The paper's comparison (iterU-Net, baseline, both ablations) with iterU-Net on the
    regression prior and the regression model, trained on the randomised phantom at the
    paper's protocol and tested on the default one."""
    compare("experiment", out, preset, None, cases, test_lesions, seed)


def setup_logging(log_file: Path | None = None, hold: bool = False) -> None:
    """Log to stderr via rich, and to ``log_file`` (a run's ``RunDir.train_log``) when given.

    With ``hold``, records are kept back until the next call, which passes them on to
    its handlers (the log file included); an error in between drops them.
    """
    from logging.handlers import MemoryHandler

    from rich.logging import RichHandler

    logger = logging.getLogger("dcesynth")
    logger.setLevel(logging.INFO)
    held = [r for h in logger.handlers if isinstance(h, MemoryHandler) for r in h.buffer]
    logger.handlers.clear()
    if hold:
        logger.addHandler(MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))
        return
    logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    for record in held:
        logger.handle(record)


def main() -> None:
    """Entry point: usage errors become one `error:` line with exit code 2, too."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        code = 2
    except UsageError as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
