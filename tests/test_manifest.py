"""The predictions manifest: predict writes it, evaluate reads it, and does without it."""

import json

from typer.testing import CliRunner

from dcesynth.case import save_case
from dcesynth.cli import app
from dcesynth.manifest import PredictedCase, manifest_path, read_manifest, write_manifest
from dcesynth.report import evaluate
from test_infer import make_case, make_run
from test_report import PREDICTED, _case, _write_predictions


def cli(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def entry(inputs, phases, times_s, run="/runs/r", model="iterunet") -> PredictedCase:
    return PredictedCase(run, model, tuple(inputs), tuple(phases), tuple(times_s))


def test_predict_writes_run_model_inputs_phases_and_times_of_each_case(tmp_path):
    run_dir = make_run(tmp_path)
    case_dir = save_case(make_case(), tmp_path / "data")
    result = cli(
        "predict", run_dir, case_dir, "--out", tmp_path / "pred", "--inputs", "pre,1dyn,2dyn"
    )
    assert result.exit_code == 0, result.output
    written = json.loads(manifest_path(tmp_path / "pred").read_text(encoding="utf-8"))
    assert written == {
        "cases": {
            "case_a": {
                "run": str(run_dir.resolve()),
                "model": "iterunet",
                "inputs": ["pre", "1dyn", "2dyn"],
                "phases": ["3dyn", "4dyn", "5dyn"],
                "times_s": [225.0, 295.0, 365.0],
            }
        }
    }


def test_predicting_more_cases_into_the_folder_keeps_the_earlier_ones(tmp_path):
    run_dir = make_run(tmp_path)
    for case_id in ("c1", "c2"):
        case = make_case()
        case.case_id = case_id
        case_dir = save_case(case, tmp_path / "data")
        assert cli("predict", run_dir, case_dir, "--out", tmp_path / "pred").exit_code == 0
    assert sorted(read_manifest(tmp_path / "pred")) == ["c1", "c2"]


def study(tmp_path):
    cases = [_case("case_a", "washout", 0), _case("case_b", "persistent", 1)]
    for case in cases:
        save_case(case, tmp_path / "data")
        _write_predictions(case, tmp_path / "pred")
    return cases


def test_evaluate_scores_the_phases_the_manifest_names(tmp_path):
    cases = study(tmp_path)
    # Every phase file from 2dyn is there, but the model was given 2dyn: it predicted 3dyn on.
    later = entry(["pre", "1dyn", "2dyn"], PREDICTED[1:], [225, 295, 365])
    write_manifest(tmp_path / "pred", {case.case_id: later for case in cases})
    result = evaluate(tmp_path / "data", {"m": tmp_path / "pred"}, tmp_path / "report")
    assert list(result["models"]["m"]["per_phase"]) == PREDICTED[1:]


def test_evaluate_skips_a_case_the_manifest_does_not_list(tmp_path):
    study(tmp_path)
    write_manifest(
        tmp_path / "pred", {"case_a": entry(["pre", "1dyn"], PREDICTED, [155, 225, 295, 365])}
    )
    skipped = []
    result = evaluate(
        tmp_path / "data",
        {"m": tmp_path / "pred"},
        tmp_path / "report",
        on_skip=lambda case_dir, exc: skipped.append(str(exc)),
    )
    assert list(result["per_case"]) == ["case_a"]
    assert skipped == [
        f"{manifest_path(tmp_path / 'pred')}: no predictions of model 'm' for case_b"
    ]


def test_predictions_without_a_manifest_are_read_off_their_files(tmp_path):
    study(tmp_path)
    assert read_manifest(tmp_path / "pred") is None
    result = evaluate(tmp_path / "data", {"m": tmp_path / "pred"}, tmp_path / "report")
    assert list(result["models"]["m"]["per_phase"]) == PREDICTED


def test_a_damaged_manifest_is_one_error_line(tmp_path):
    study(tmp_path)
    manifest_path(tmp_path / "pred").write_text('{"cases": {"case_a": {"run": 1}}}')
    result = cli(
        "evaluate", tmp_path / "data", "--pred", f"m={tmp_path / 'pred'}", "--out", tmp_path / "r"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"error: {manifest_path(tmp_path / 'pred')}: invalid predictions manifest"
    )
    assert not (tmp_path / "r").exists()
