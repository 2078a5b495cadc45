"""Inputs are never destroyed, a bad input gets one clear line, a bad case is skipped.

One test per defect found by trying damaged inputs as a new user would, plus the
checks made before work starts (output paths, disk space, memory).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dcesynth import guards
from dcesynth.case import save_case
from dcesynth.cli import app
from dcesynth.config import preset
from dcesynth.data.importers import NothingImportedError, import_cohort
from dcesynth.io import atomic_write_json
from dcesynth.regression import RegressionModel
from dcesynth.rundir import RunDir
from test_importers import _write_mamamia, _write_reference
from test_infer import make_case, make_run
from test_regression import fitted, law_case
from test_train import cohort  # noqa: F401 (a fixture)


def read_tensors(path) -> dict:
    """A weights file's tensors as copies, so that the file itself can then be overwritten."""
    return {key: value.clone() for key, value in load_file(path).items()}


def cli(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def error_line(result, code: int = 2) -> str:
    """The one stderr line of a failed command, checked to be an `error:` line."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (folders as "dir")."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def data(tmp_path):
    """Two cases, case_a and case_b, in tmp_path/data."""
    for case_id in ("case_a", "case_b"):
        save_case(dataclasses.replace(make_case(), case_id=case_id), tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def predictions(tmp_path, run_dir, data) -> Path:
    result = cli("predict", run_dir, data, "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.stderr
    return tmp_path / "pred"


def no_prediction(monkeypatch):
    """Make any prediction fail the test: the command must stop before work starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("predict_case ran")

    monkeypatch.setattr("dcesynth.infer.predict_case", refuse)


# --- 1. Input data are never modified or deleted --------------------------------------


@pytest.mark.parametrize(
    "out", ["data", "data/case_a", "data/case_a/sub", "."], ids=["is", "case", "inside", "contains"]
)
def test_predict_out_overlapping_the_input_is_refused_and_the_input_kept(
    tmp_path, data, run_dir, out, monkeypatch
):
    before = tree_digest(data)
    monkeypatch.chdir(tmp_path)
    line = error_line(cli("predict", run_dir, "data", "--out", out))
    assert line.startswith(f"error: --out {out}: ")
    assert "is inside the input" in line or "contains the input" in line
    assert tree_digest(data) == before


def test_predictions_may_go_into_a_subfolder_of_the_run(tmp_path, data, run_dir):
    result = cli("predict", run_dir, data / "case_a", "--out", run_dir / "predictions")
    assert result.exit_code == 0, result.stderr
    assert (run_dir / "predictions" / "case_a" / "5dyn.nii.gz").is_file()


def test_predict_into_another_data_folder_is_refused_and_its_cases_kept(tmp_path, data, run_dir):
    other = save_case(dataclasses.replace(make_case(), case_id="case_a"), tmp_path / "other")
    before = tree_digest(other.parent)
    line = error_line(cli("predict", run_dir, data / "case_a", "--out", other.parent))
    assert line.endswith("holds the case case_a; predictions would replace it")
    assert tree_digest(other.parent) == before


def test_train_evaluate_import_refuse_out_equal_to_their_input(tmp_path, data, run_dir):
    pred = predictions(tmp_path, run_dir, data)
    _write_reference(tmp_path / "src", "patient_01")
    before = {folder: tree_digest(folder) for folder in (data, pred, tmp_path / "src")}
    for args in (
        ("train", data, "--out", data, "--max-steps", 1),
        ("evaluate", data, "--pred", f"tiny={pred}", "--out", data),
        ("evaluate", data, "--pred", f"tiny={pred}", "--out", pred / "report"),
        ("import", "reference", tmp_path / "src", "--out", tmp_path / "src"),
    ):
        assert "is inside the input" in error_line(cli(*args))
    assert {folder: tree_digest(folder) for folder in before} == before


# --- 2. Outputs are checked before they are written -----------------------------------


def test_nan_weights_are_refused_naming_the_file_without_fallback(tmp_path, data, run_dir):
    last = run_dir / "checkpoints" / "last.safetensors"
    best = run_dir / "checkpoints" / "best.safetensors"
    tensors = read_tensors(last)
    save_file({key: value * np.nan for key, value in tensors.items()}, best)
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / "out"))
    assert line.startswith(f"error: {best}: weights hold NaN or infinite values")
    assert not (tmp_path / "out").exists()


def test_non_finite_prediction_is_refused_naming_the_run_and_not_written(tmp_path, data, run_dir):
    weights = run_dir / "checkpoints" / "last.safetensors"
    tensors = read_tensors(weights)
    for key in tensors:
        if key.endswith("final_conv.weight"):  # finite weights whose output overflows
            tensors[key] = tensors[key] * 1e37
    save_file(tensors, weights)
    line = error_line(cli("predict", run_dir, data / "case_a", "--out", tmp_path / "out"))
    assert line.startswith(f"error: {run_dir}: the prediction of case_a holds NaN")
    assert not (tmp_path / "out").exists()


def test_non_finite_regression_prediction_is_refused_naming_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    fitted([law_case(0), law_case(1)]).save(RunDir(run).regression_file)
    atomic_write_json(run / "config.json", preset("demo", model="regression").to_json())
    case_dir = save_case(law_case(2, "case_r"), tmp_path / "data")
    monkeypatch.setattr(
        RegressionModel,
        "predict_at",
        lambda self, case, times_s: np.full((len(times_s), *case.shape), np.nan),
    )
    line = error_line(cli("predict", run, case_dir, "--out", tmp_path / "out"))
    assert line == f"error: {run}: the prediction of case_r holds NaN or infinite voxels"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [0, -1])
def test_train_max_steps_below_1_is_refused_before_any_work(tmp_path, data, steps):
    line = error_line(cli("train", data, "--out", tmp_path / "run", "--max-steps", steps))
    assert line == f"error: --max-steps: must be at least 1, got {steps}"
    assert not (tmp_path / "run").exists()


# --- 3. Exit codes and messages --------------------------------------------------------


@pytest.mark.parametrize("below", ["afile", "afile/p"])
def test_predict_out_under_a_regular_file_is_refused_before_any_work(
    tmp_path, data, run_dir, below, monkeypatch
):
    (tmp_path / "afile").write_text("notes")
    no_prediction(monkeypatch)
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / below))
    assert f"{tmp_path / 'afile'} is a file" in line
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "notes"


def test_evaluate_out_under_a_regular_file_is_refused(tmp_path, data, run_dir):
    pred = predictions(tmp_path, run_dir, data)
    (tmp_path / "afile").write_text("notes")
    line = error_line(
        cli("evaluate", data, "--pred", f"tiny={pred}", "--out", tmp_path / "afile" / "rep")
    )
    assert f"{tmp_path / 'afile'} is a file" in line


def test_predict_into_a_read_only_folder_is_refused_before_any_work(
    tmp_path, data, run_dir, monkeypatch
):
    # Root writes anywhere despite chmod, so the folder's permissions are faked.
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != tmp_path and access(path, mode))
    no_prediction(monkeypatch)
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / "out"))
    assert line.endswith(f"output folder is not writable ({tmp_path} is read-only)")


def test_a_full_disk_while_writing_is_one_error_line_and_leaves_nothing(
    tmp_path, data, run_dir, monkeypatch
):
    def full(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("dcesynth.infer.save_nifti", full)
    result = cli("predict", run_dir, data, "--out", tmp_path / "out")
    assert error_line(result).endswith("2dyn.nii.gz: No space left on device")
    assert list((tmp_path / "out").iterdir()) == []


def test_run_config_naming_an_unknown_model_is_one_error_line(tmp_path, data, run_dir):
    path = run_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["name"] = "transformer"
    path.write_text(json.dumps(config))
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / "out"))
    assert line.startswith(f"error: {path}: cannot build the model") and "transformer" in line


def test_weights_metadata_n_targets_not_a_number_is_one_error_line(tmp_path, data, run_dir):
    weights = run_dir / "checkpoints" / "last.safetensors"
    save_file(read_tensors(weights), weights, metadata={"n_targets": "abc"})
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / "out"))
    assert line == f"error: {weights}: metadata n_targets must be a positive integer, got 'abc'"


def test_debug_shows_the_traceback(tmp_path, data):
    result = cli("--debug", "predict", tmp_path / "nope", data, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "config.json" in str(result.exception)


def test_predict_prints_nothing_on_stderr_without_a_terminal(tmp_path, data, run_dir):
    result = cli("predict", run_dir, data, "--out", tmp_path / "out")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert (
        result.stdout.splitlines()[-1]
        == f"2 written, 0 skipped (predictions in {tmp_path / 'out'})"
    )


def test_import_error_line_comes_before_any_summary(tmp_path):
    _write_reference(tmp_path / "src", "four", n_phases=4)
    result = cli("import", "reference", tmp_path / "src", "--out", tmp_path / "out")
    assert error_line(result) == f"error: {tmp_path / 'src' / 'four'}: times missing and no --times"
    assert "import summary" not in result.stdout
    assert not (tmp_path / "out").exists()


# --- 4. Multi-case commands skip a bad case and finish the others ----------------------


def test_predict_skips_a_bad_case_finishes_the_others_and_exits_3(tmp_path, data, run_dir):
    (data / "case_a" / "2dyn.nii.gz").write_bytes(b"not an image")
    result = cli("predict", run_dir, data, "--out", tmp_path / "out")
    line = error_line(result, code=3)
    assert line.startswith(f"error: {data / 'case_a' / '2dyn.nii.gz'}: cannot read NIfTI")
    assert "1 written, 1 skipped" in result.stdout
    assert not (tmp_path / "out" / "case_a").exists()
    assert (tmp_path / "out" / "case_b" / "5dyn.nii.gz").is_file()


def test_evaluate_scores_the_cases_it_kept_and_says_how_many_it_skipped(tmp_path, data, run_dir):
    pred = predictions(tmp_path, run_dir, data)
    (pred / "case_b" / "3dyn.nii.gz").unlink()
    result = cli("evaluate", data, "--pred", f"tiny={pred}", "--out", tmp_path / "report")
    line = error_line(result, code=3)
    assert line == f"error: {pred / 'case_b' / '3dyn.nii.gz'}: predicted phase not found"
    assert "1 written, 1 skipped" in result.stdout
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["cases"] == 1 and list(metrics["per_case"]) == ["case_a"]
    assert list(metrics["skipped"]) == ["case_b"]


def test_import_skips_a_bad_case_and_exits_3(tmp_path):
    _write_reference(tmp_path / "src", "good")
    _write_reference(tmp_path / "src", "four", n_phases=4)
    result = cli("import", "reference", tmp_path / "src", "--out", tmp_path / "out")
    assert "times missing" in error_line(result, code=3)
    assert "1 written, 1 skipped" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]


# --- 5. Options are validated before any work -----------------------------------------


def test_evaluate_refuses_the_same_pred_name_twice(tmp_path, data, run_dir):
    pred = predictions(tmp_path, run_dir, data)
    result = cli(
        "evaluate", data, "--pred", f"a={pred}", "--pred", f"a={pred}", "--out", tmp_path / "r"
    )
    assert error_line(result) == "error: --pred: model name 'a' given twice"
    assert not (tmp_path / "r").exists()


def test_train_refuses_a_case_folder_without_meta_json(tmp_path, data):
    shutil.copytree(data / "case_a", data / "case_c")
    (data / "case_c" / "meta.json").unlink()
    line = error_line(cli("train", data, "--out", tmp_path / "run", "--max-steps", 1))
    assert line == f"error: {data / 'case_c' / 'meta.json'}: file not found"
    assert not (tmp_path / "run").exists()


def test_mamamia_truncated_image_is_named_not_reported_as_missing_times(tmp_path):
    src = tmp_path / "src"
    _write_mamamia(src, "NACT_01", 3, info=None)
    image = src / "images" / "NACT_01" / "nact_01_0001.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(NothingImportedError) as error:
        import_cohort("mama-mia", src, tmp_path / "out")
    assert error.value.summary.skipped[0][1].startswith(f"{image}: cannot read NIfTI")


# --- 7. Disk and memory -----------------------------------------------------------------


def test_predict_refuses_to_start_when_the_disk_lacks_room(tmp_path, data, run_dir, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    no_prediction(monkeypatch)
    line = error_line(cli("predict", run_dir, data, "--out", tmp_path / "out"))
    needed = 2 * guards.prediction_disk_bytes(make_case().shape, 4) / guards.MIB
    assert line == (
        f"error: --out {tmp_path / 'out'}: needs about {needed:.1f} MiB, the disk has 0.1 MiB free"
    )
    assert not (tmp_path / "out").exists()


def test_memory_estimate_of_a_too_large_volume_is_printed_before_work(
    tmp_path, data, run_dir, monkeypatch
):
    big = dataclasses.replace(make_case(shape=(80, 72, 64)), case_id="case_big")
    big_dir = save_case(big, data)
    needed = guards.prediction_memory_bytes(big.shape, 6, 4)
    monkeypatch.setattr(guards, "available_memory_bytes", lambda: needed - 1)
    events = []
    monkeypatch.setattr("dcesynth.cli.print_error", lambda exc: events.append(str(exc)))
    from dcesynth import infer

    original = infer.predict_case
    monkeypatch.setattr(
        infer,
        "predict_case",
        lambda run, case, **kwargs: events.append(case.case_id) or original(run, case, **kwargs),
    )
    result = cli("predict", run_dir, data, "--out", tmp_path / "out")
    assert result.exit_code == 3
    assert events == [
        f"{big_dir}: predicting it needs about {needed / guards.MIB:.0f} MiB of memory, "
        f"{(needed - 1) / guards.MIB:.0f} MiB available",
        "case_a",
        "case_b",
    ]


# --- Nothing under any input folder changes ----------------------------------------------


def test_no_command_changes_anything_under_its_input_folders(tmp_path, data, run_dir):
    _write_reference(tmp_path / "src", "patient_01")
    pred = predictions(tmp_path, run_dir, data)
    inputs = (data, pred, tmp_path / "src")
    run_files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    before = {folder: tree_digest(folder) for folder in inputs}
    commands = [
        ("predict", run_dir, data, "--out", tmp_path / "pred2"),
        ("predict", run_dir, data, "--out", data),
        ("evaluate", data, "--pred", f"tiny={pred}", "--out", tmp_path / "report"),
        ("evaluate", data, "--pred", f"tiny={pred}", "--out", pred),
        ("import", "reference", tmp_path / "src", "--out", tmp_path / "imported"),
        ("import", "reference", tmp_path / "src", "--out", tmp_path / "src" / "patient_01"),
        ("train", data, "--out", data / "run", "--max-steps", 1),
    ]
    codes = [cli(*command).exit_code for command in commands]
    assert codes == [0, 2, 0, 2, 0, 2, 2]
    assert {folder: tree_digest(folder) for folder in inputs} == before
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == run_files
    assert nib.load(tmp_path / "imported" / "patient_01" / "pre.nii.gz").shape == (24, 20, 8)


def test_train_warning_goes_to_the_log_and_never_before_an_error(cohort, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    first = cli("train", cohort, "--out", run, "--max-steps", 1)
    assert first.exit_code == 0, first.stderr
    assert "perceptual loss off" in (run / "train.log").read_text(encoding="utf-8")
    weights = run / "checkpoints" / "last.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # The perceptual-loss warning is logged while the model is built, before this error.
    line = error_line(cli("train", cohort, "--out", run, "--resume", "--max-steps", 2))
    assert line.startswith(f"error: {weights}: cannot read weights")


def test_a_real_process_given_a_damaged_header_prints_one_line(tmp_path, data, run_dir):
    from test_bad_inputs import bad_datatype

    bad_datatype(data / "case_a", "1dyn")
    command = [sys.executable, "-m", "dcesynth", "predict", run_dir, data / "case_a"]
    result = subprocess.run(
        [*map(str, command), "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {data / 'case_a' / '1dyn.nii.gz'}: cannot read NIfTI "
        "(HeaderDataError: data code 272 not recognized)"
    ]
