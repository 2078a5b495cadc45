"""The comparison pipeline: simulate -> train -> predict -> evaluate -> report, as plain calls."""

import json

import pytest

from dcesynth import pipeline
from dcesynth.case import PAPER_TIMES_S
from dcesynth.cli import REPORTER
from dcesynth.manifest import read_manifest
from dcesynth.phantom import PHANTOMS, cases_for_lesions
from dcesynth.rundir import RunDir

SIZES = dict(train_cases=3, test_lesions=2, shape=(32, 32, 16), seed=0)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The regression model's comparison (no network: seconds), run once, printed."""
    out = tmp_path_factory.mktemp("comparison")
    page = pipeline.run_comparison(out, "demo", ["regression"], **SIZES, reporter=REPORTER)
    return out, page


def test_every_stage_writes_its_output(comparison):
    out, page = comparison
    assert page == out / "report" / "index.html" and page.is_file()
    assert len(list((out / "data" / "train").iterdir())) == 3
    assert len(list((out / "data" / "test").iterdir())) == cases_for_lesions(2, seed=1)
    assert (out / "cohort" / "index.html").is_file()
    assert RunDir(out / "runs" / "regression").config.model.name == "regression"
    predicted = read_manifest(out / "predictions" / "regression")
    assert sorted(predicted) == sorted(p.name for p in (out / "data" / "test").iterdir())
    metrics = json.loads((out / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["models"]) == ["regression", "copy-1dyn"]


def test_a_rerun_keeps_the_cohorts_and_the_fitted_model(comparison):
    out, _ = comparison
    kept = [out / "data" / "train" / "phantom_0000" / "pre.nii.gz", out / "cohort" / "index.html"]
    kept.append(RunDir(out / "runs" / "regression").regression_file)
    before = [path.stat().st_mtime_ns for path in kept]
    pipeline.run_comparison(out, "demo", ["regression"], **SIZES)
    assert [path.stat().st_mtime_ns for path in kept] == before


def test_the_command_line_reporter_prints_each_stage(tmp_path, capsys):
    out = tmp_path / "c"
    pipeline.run_comparison(out, "demo", ["regression"], **SIZES, reporter=REPORTER)
    lines = capsys.readouterr().out.splitlines()
    test_cases = cases_for_lesions(2, seed=1)
    assert lines[:3] == [
        f"wrote 3 cases to {out / 'data' / 'train'}",
        f"wrote {test_cases} cases to {out / 'data' / 'test'}",
        f"cohort report: {out / 'cohort' / 'index.html'}",
    ]
    assert lines[3].startswith("regression: change at 4 times after 1dyn (70-280 s),")
    assert (
        lines[4]
        == f"{test_cases} written, 0 skipped (predictions in {out / 'predictions' / 'regression'})"
    )
    assert lines[-2:] == [
        f"report: {out / 'report' / 'index.html'}",
        f"{test_cases} written, 0 skipped (cases scored in {out / 'report' / 'metrics.json'})",
    ]


def test_the_experiment_trains_iterunet_with_and_without_the_regression_prior():
    from dcesynth.config import preset

    configs = {name: preset("cpu", **options) for name, options in pipeline.VARIANTS.items()}
    assert configs["iterunet"].model.prior == "none"
    assert configs["iterunet-prior"].model.prior == "regression"
    assert configs["iterunet-prior"].model.name == "iterunet"
    assert {c.model.prior for n, c in configs.items() if n != "iterunet-prior"} == {"none"}
    # With the prior the free-running stage is as long as the warm-up (600 + 600).
    assert (configs["iterunet"].train.warmup_steps, configs["iterunet"].train.optim_steps) == (
        600,
        1100,
    )
    prior = configs["iterunet-prior"].train
    assert (prior.warmup_steps, prior.optim_steps) == (600, 600)
    assert configs["baseline"].train.optim_steps == 1700


@pytest.mark.parametrize("name", ["demo", "cpu", "gpu", "paper"])
def test_a_prior_never_lengthens_the_free_running_stage(name):
    from dcesynth.config import preset

    plain, prior = preset(name).train, preset(name, prior="regression").train
    assert prior.warmup_steps == plain.warmup_steps
    assert prior.optim_steps == min(plain.optim_steps, plain.warmup_steps)
    assert preset(name, prior="regression", warmup=False).train.optim_steps == plain.total_steps


def test_training_is_randomised_at_the_paper_protocol_and_testing_is_the_default(comparison):
    out, _ = comparison

    def drawn(cohort):
        metas = [
            json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(out.glob(f"data/{cohort}/*/meta.json"))
        ]
        return {tuple(m["times_s"]) for m in metas}, {m["acquisition"]["tr_ms"] for m in metas}

    train_times, train_tr_ms = drawn("train")
    test_times, test_tr_ms = drawn("test")
    assert train_times == test_times == {PAPER_TIMES_S}
    assert len(train_tr_ms) == 3
    low, high = (1e3 * t for t in PHANTOMS["randomised"].tr_range_s)
    assert all(low <= tr <= high for tr in train_tr_ms)
    assert test_tr_ms == {1e3 * PHANTOMS["default"].tr_range_s[0]}
