"""The `dcesynth` command line: one command per stage; each parses, calls the library, prints.

Bad input ends with exit code 2 and one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import functools
import sys
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


def exits_on_input_error(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError into one `error:` line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as exc:
            message = " ".join(str(exc).split())
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper


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
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
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
    from dcesynth.train.trainer import Trainer

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
    setup_logging()
    trainer = Trainer(data, out, config, resume=resume, perceptual_weights=perceptual_weights)
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
    from dcesynth.case import find_cases

    out: list[Path] = []
    for path in paths:
        out.extend([path] if (path / "meta.json").is_file() else find_cases(path))
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
    from dcesynth.infer import load_run, predict_case, progress_units, write_prediction

    loaded = load_run(run)
    folders = expand_cases(cases)
    protocol = parse_times(times)
    with progress_bar() as bar:
        for folder in folders:
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
            write_prediction(case, prediction, out)
            bar.update(
                task,
                status=f"{prediction.windows_run} run, "
                f"{prediction.windows_skipped} skipped (no ROI)",
            )
    print(f"wrote {len(folders)} predictions to {out}")


@app.command()
@exits_on_input_error
def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder of real cases.")],
    pred: Annotated[list[str], typer.Option("--pred", help="NAME=DIR of predictions.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder.")],
) -> None:
    """Score predictions against the real phases: metrics.json and index.html."""
    from dcesynth.report import evaluate as run_evaluation

    predictions = {}
    for item in pred:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--pred: expected NAME=DIR, got {item!r}")
        predictions[name] = Path(folder)
    metrics = run_evaluation(data, predictions, out)
    print_metrics(metrics)
    print(f"report: {out / 'index.html'}")


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
            print_import_summary(exc.summary, Table)
            raise
    print_import_summary(summary, Table)
    print(f"imported {len(summary.written)} cases to {out}")


def print_import_summary(summary, table_class) -> None:
    table = table_class(title="import summary")
    table.add_column("case")
    table.add_column("result")
    for case_id in summary.written:
        table.add_row(case_id, "[green]written")
    for case_id, reason in summary.skipped:
        table.add_row(case_id, f"[yellow]skipped:[/] {reason}")
    console.print(table)


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
    from dcesynth.train.checkpoint import REGRESSION_FILE

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
        saved = (run_dir / "checkpoints" / "last_state.pt", run_dir / REGRESSION_FILE)
        options = {"no_warmup": False, "no_temporal": False, **VARIANTS[name]}
        train(
            train_dir,
            out=run_dir,
            preset=preset,
            max_steps=None,
            resume=any(path.is_file() for path in saved),
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


def setup_logging(run_dir: Path | None = None) -> None:
    """Log to stderr via rich, and to RUN/train.log when a run folder is given."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("dcesynth")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    if run_dir is not None:
        handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


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
