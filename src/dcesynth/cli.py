"""The `dcesynth` command line: one command per stage; each parses, calls the library, prints.

Bad input ends with exit code 2 and one ``error: ...`` line on stderr (``--debug``
shows the traceback instead). A multi-case command (predict, evaluate, import) skips
a bad case with one ``error:`` line, finishes the others, prints ``N written, M
skipped`` and exits 3 when it skipped any (2 when it wrote none).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
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


class CaseTally:
    """Cases a multi-case command wrote or skipped; each skip prints its `error:` line."""

    def __init__(self) -> None:
        self.written = 0
        self.skipped = 0

    def skip(self, exc: Exception | str) -> None:
        print_error(exc)
        self.skipped += 1

    def finish(self, what: str) -> None:
        """The summary line on stdout; exit 3 when a case was skipped, 2 when none written."""
        print(f"{self.written} written, {self.skipped} skipped ({what})")
        if self.skipped:
            raise typer.Exit(code=3 if self.written else 2)


def parse_times(text: str | None) -> list[float] | None:
    """'0,85,155' -> [0.0, 85.0, 155.0]; validated as acquisition times."""
    if text is None:
        return None
    from dcesynth.case import validate_times

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InputError(f"--times: expected comma-separated seconds, got {text!r}") from exc
    return validate_times(values, where="--times")


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
) -> None:
    """Simulate a breast DCE-MRI cohort with ground-truth kinetics."""
    from dcesynth.io import check_writable_dir
    from dcesynth.phantom import PhantomConfig, simulate_cohort

    if cases < 1:
        raise InputError(f"--cases: need at least 1 case, got {cases}")
    if seed < 0:
        raise InputError(f"--seed: must be 0 or more, got {seed}")
    config = PhantomConfig(
        shape=tuple(shape), times_s=tuple(parse_times(times) or PhantomConfig.times_s)
    )
    config.validate()
    check_writable_dir(out)
    with progress_bar() as bar:
        task = bar.add_task("simulate", total=cases, status="")
        folders = simulate_cohort(
            out,
            cases,
            seed=seed,
            config=config,
            workers=workers,
            progress=lambda case_id: bar.update(task, advance=1, status=case_id),
        )
    print(f"wrote {len(folders)} cases to {out}")
    if report:
        from dcesynth.report import write_cohort_report

        page = write_cohort_report(out, out / "report")
        print(f"cohort report: {page}")


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
) -> None:
    """Train iterU-Net (two stages), the per-phase baseline or the regression model."""
    import dataclasses
    import logging

    from dcesynth.config import preset as make_preset
    from dcesynth.guards import check_out_apart_from_inputs
    from dcesynth.io import check_output_dir
    from dcesynth.train.trainer import build_trainer

    if max_steps is not None and max_steps < 1:
        raise InputError(f"--max-steps: must be at least 1, got {max_steps}")
    check_out_apart_from_inputs(out, [data, perceptual_weights])
    check_output_dir(out, "--out")
    config = make_preset(preset, model=model, temporal=not no_temporal, warmup=not no_warmup)
    overrides = {k: v for k, v in (("seed", seed), ("amp", amp)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **overrides))
    if seed is not None:
        config = dataclasses.replace(
            config, regression=dataclasses.replace(config.regression, seed=seed)
        )
    if config.model.name == "regression":
        train_regression_run(data, out, config, resume)
        return
    # Held until the run is set up: a warning must not come before an `error:` line.
    setup_logging(hold=True)
    trainer = build_trainer(data, out, config, resume, perceptual_weights)
    with trainer:
        show = trainer.rank == 0
        # Under torchrun only rank 0 writes files, the log included.
        setup_logging(out if show else None)
        total = min(trainer.config.train.total_steps, max_steps or trainer.config.train.total_steps)
        with progress_bar() as bar:
            task = bar.add_task(
                f"train {trainer.config.model.name}",
                total=total,
                completed=trainer.step,
                status="",
                visible=show,
            )

            def on_step(step, stage, terms, speed):
                bar.update(
                    task,
                    completed=step,
                    status=f"{stage} loss {terms['total']:.3f} {speed:.2f} it/s",
                )

            metrics = trainer.fit(max_steps=max_steps, on_step=on_step)
    if show:
        logging.getLogger("dcesynth").info("done: step %d, run in %s", trainer.step, out)
        if metrics:
            print(
                f"step {trainer.step}: val enh. error last phase "
                f"{metrics['val_enh_error_last']:.4f} (copy 1st post "
                f"{metrics['val_enh_error_last_copy']:.4f})"
            )


def train_regression_run(data: Path, out: Path, config, resume: bool) -> None:
    """`train --model regression`: fit the classical model, one progress step per case."""
    from dcesynth.train.regression_run import train_regression

    with progress_bar() as bar:
        task = bar.add_task("fit regression", total=None, status="")
        model = train_regression(
            data,
            out,
            config,
            resume=resume,
            on_case=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(f"regression: {model.n_targets} target phases, {model.coef.shape[1]} terms; run in {out}")


def expand_cases(paths: list[Path]) -> list[Path]:
    """Case folders from the arguments: a case folder itself, or a folder of cases."""
    from dcesynth.case import find_cases, is_case_folder

    out: list[Path] = []
    for path in paths:
        out.extend([path] if is_case_folder(path) else find_cases(path))
    return out


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
) -> None:
    """Synthesize the delayed phases of whole cases, plus a kinetic colour map."""
    from dcesynth.case import load_case
    from dcesynth.guards import (
        check_disk_space,
        check_holds_no_cases,
        check_memory,
        check_out_apart_from_inputs,
        prediction_needs,
    )
    from dcesynth.infer import (
        input_names,
        load_run,
        predict_case,
        progress_units,
        write_prediction,
    )
    from dcesynth.io import check_output_dir

    if not 0 <= overlap < 1:
        raise InputError(f"--overlap: must be at least 0 and below 1, got {overlap:g}")
    folders = expand_cases(cases)
    check_out_apart_from_inputs(out, [*cases, *folders])
    check_output_dir(out, "--out")
    check_holds_no_cases(out)
    n_inputs = len(input_names(inputs))
    protocol = parse_times(times)
    loaded = load_run(run)
    tally = CaseTally()
    planned, disk_bytes = [], 0
    for folder in folders:
        try:
            case_disk, case_memory = prediction_needs(folder, n_inputs, protocol)
            check_memory(str(folder), case_memory)
        except InputError as exc:
            tally.skip(exc)
            continue
        planned.append(folder)
        disk_bytes += case_disk
    check_disk_space(out, disk_bytes)
    with progress_bar() as bar:
        for folder in planned:
            try:
                case = load_case(folder)
                total = progress_units(loaded, case, overlap)
                task = bar.add_task(f"predict {case.case_id}", total=total, status="")
                prediction = predict_case(
                    loaded,
                    case,
                    inputs=inputs,
                    times_s=protocol,
                    overlap=overlap,
                    amp=amp,
                    on_windows=lambda n, task=task: bar.advance(task, n),
                )
            except InputError as exc:
                tally.skip(exc)
                continue
            write_prediction(case, prediction, out)
            tally.written += 1
            bar.update(
                task,
                status=f"{prediction.windows_run} run, "
                f"{prediction.windows_skipped} skipped (no ROI)",
            )
    tally.finish(f"predictions in {out}")


@app.command()
@exits_on_input_error
def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder of real cases.")],
    pred: Annotated[list[str], typer.Option("--pred", help="NAME=DIR of predictions.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder.")],
) -> None:
    """Score predictions against the real phases: metrics.json and index.html."""
    from dcesynth.guards import check_out_apart_from_inputs
    from dcesynth.io import check_output_dir
    from dcesynth.report import NothingEvaluatedError
    from dcesynth.report import evaluate as run_evaluation

    predictions = {}
    for item in pred:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--pred: expected NAME=DIR, got {item!r}")
        if name in predictions:
            raise InputError(f"--pred: model name {name!r} given twice")
        predictions[name] = Path(folder)
    check_out_apart_from_inputs(out, [data, *predictions.values()])
    check_output_dir(out, "--out")
    tally = CaseTally()
    try:
        metrics = run_evaluation(data, predictions, out, on_skip=lambda _, exc: tally.skip(exc))
    except NothingEvaluatedError:
        tally.finish("no case scored")
    tally.written = metrics["cases"]
    print_metrics(metrics)
    print(f"report: {out / 'index.html'}")
    tally.finish(f"cases scored in {out / 'metrics.json'}")


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
        Path | None, typer.Option(help="Folder of {id}.nii.gz breast masks.")
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
                times_s=parse_times(times),
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
    tally = CaseTally()
    for _, reason in summary.skipped:
        tally.skip(reason)
    tally.written = len(summary.written)
    if summary.written:
        print_import_summary(summary, Table)
    tally.finish(f"cases imported to {out}")


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
# cohort needs about 100 lesions before intervals can tell models apart.
DEMO_TRAIN_CASES, DEMO_TEST_LESIONS = 200, 32
EXPERIMENT_TRAIN_CASES, EXPERIMENT_TEST_LESIONS = 300, 125

# Each variant is a model of the paper's comparison, as `train` options.
VARIANTS = {
    "iterunet": {"model": "iterunet"},
    "baseline": {"model": "baseline"},
    "no-warmup": {"model": "iterunet", "no_warmup": True},
    "no-temporal": {"model": "iterunet", "no_temporal": True},
    "regression": {"model": "regression"},
}


def cases_for_lesions(min_lesions: int, seed: int) -> int:
    """The fewest phantom cases of cohort ``seed`` that hold at least ``min_lesions`` lesions."""
    from dcesynth.phantom import plan_cohort

    n_cases = max(1, min_lesions // 2)
    while sum(len(plan.lesion_types) for plan in plan_cohort(n_cases, seed)) < min_lesions:
        n_cases += 1
    return n_cases


def run_comparison(
    out: Path,
    preset: str,
    variants: list[str],
    train_cases: int,
    test_lesions: int,
    shape: tuple[int, int, int],
    seed: int,
) -> Path:
    """Simulate train/test cohorts, train each variant, predict the test cases, evaluate.

    The test cohort has the fewest cases that hold ``test_lesions`` lesions.

    Writes OUT/data/{train,test}, OUT/cohort/index.html (the training cohort's lesion
    curves by type), OUT/runs/VARIANT, OUT/predictions/VARIANT and OUT/report.

    Every stage is skipped when its output is already there, so an interrupted run
    continues where it stopped (training resumes from its last checkpoint).
    """
    from dcesynth.rundir import RunDir

    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    for folder, count, cohort_seed in (
        (train_dir, train_cases, seed),
        (test_dir, cases_for_lesions(test_lesions, seed + 1), seed + 1),
    ):
        if not (folder / f"phantom_{count - 1:04d}" / "meta.json").is_file():
            simulate(
                folder,
                cases=count,
                seed=cohort_seed,
                shape=shape,
                times=None,
                workers=None,
                report=False,
            )
    if not (out / "cohort" / "index.html").is_file():
        from dcesynth.report import write_cohort_report

        print(f"cohort report: {write_cohort_report(train_dir, out / 'cohort')}")
    predictions = {}
    for name in variants:
        run_dir = out / "runs" / name
        options = {"no_warmup": False, "no_temporal": False, **VARIANTS[name]}
        train(
            train_dir,
            out=run_dir,
            preset=preset,
            max_steps=None,
            resume=RunDir(run_dir).started,
            perceptual_weights=None,
            seed=seed,
            amp=None,
            **options,
        )
        predict(
            run_dir,
            [test_dir],
            out=out / "predictions" / name,
            inputs="pre,1dyn",
            times=None,
            overlap=0.5,
            amp=None,
        )
        predictions[name] = str(out / "predictions" / name)
    evaluate(test_dir, pred=[f"{k}={v}" for k, v in predictions.items()], out=out / "report")
    return out / "report" / "index.html"


@app.command()
@exits_on_input_error
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for data, runs, predictions, report.")],
    seed: Annotated[int, typer.Option(help="Seed of cohorts and training.")] = 0,
) -> None:
    """Simulate -> train iterU-Net, the baseline and the regression -> predict -> evaluate."""
    page = run_comparison(
        out,
        "demo",
        ["iterunet", "baseline", "regression"],
        train_cases=DEMO_TRAIN_CASES,
        test_lesions=DEMO_TEST_LESIONS,
        shape=(64, 64, 32),
        seed=seed,
    )
    print(f"demo done: open {page}")


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
    """The paper's comparison: iterU-Net, baseline, both ablations and the regression model."""
    page = run_comparison(
        out,
        preset,
        list(VARIANTS),
        train_cases=cases,
        test_lesions=test_lesions,
        shape=(64, 64, 32),
        seed=seed,
    )
    print(f"experiment done: open {page}")


def setup_logging(run_dir: Path | None = None, hold: bool = False) -> None:
    """Log to stderr via rich, and to the run's log file (``RunDir.train_log``) when given.

    With ``hold``, records are kept back until the next call, which passes them on to
    its handlers (the log file included); an error in between drops them.
    """
    import logging
    from logging.handlers import MemoryHandler

    from rich.logging import RichHandler

    from dcesynth.rundir import RunDir

    logger = logging.getLogger("dcesynth")
    logger.setLevel(logging.INFO)
    held = [r for h in logger.handlers if isinstance(h, MemoryHandler) for r in h.buffer]
    logger.handlers.clear()
    if hold:
        logger.addHandler(MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))
        return
    logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    if run_dir is not None:
        handler = logging.FileHandler(RunDir(run_dir).train_log, encoding="utf-8")
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
