"""Every command that reads data, given one bad input: one `error:` line naming it, exit 2.

One row per kind of damage; nothing is written where the command would have written.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dcesynth.case import save_case
from dcesynth.config import preset
from dcesynth.io import save_nifti
from dcesynth.train.trainer import build_trainer
from test_case import (
    delete,
    edit_meta,
    empty,
    four_d,
    fractional_labels,
    make_case,
    other_shape,
    repeated_time,
    shifted_affine,
    too_few_times,
    truncate,
    with_nan,
    write_image,
)
from test_importers import _write_mamamia, _write_reference
from test_infer import make_run
from test_reliability import cli, error_line, read_tensors
from test_train import tiny


def assert_one_error(result, *fragments: str) -> None:
    line = error_line(result)
    for fragment in fragments:
        assert fragment in line


def with_out(options: list[str], tmp_path) -> list[str]:
    """``options`` with ``{tmp}`` filled in, and ``--out tmp/out`` unless they give one."""
    options = [option.format(tmp=tmp_path) for option in options]
    return options if "--out" in options else [*options, "--out", str(tmp_path / "out")]


def not_nifti(case_dir, name):
    (case_dir / f"{name}.nii.gz").write_text("this is not an image")


def bad_datatype(case_dir, name):
    """An unknown NIfTI datatype code, which nibabel also logs on stderr by itself."""
    path = case_dir / f"{name}.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[70:72] = (272).to_bytes(2, "little")
    path.write_bytes(gzip.compress(bytes(raw)))


def with_inf(case_dir, name):
    image = make_case().phases[1].copy()
    image[2, 2, 2] = np.inf
    write_image(case_dir, name, image)


def two_d(case_dir, name):
    write_image(case_dir, name, np.ones(make_case().shape[:2], dtype=np.float32))


def bad_phase_names(case_dir, name):
    edit_meta(case_dir, phases=["pre", "early", "mid", "late"])


def not_json(case_dir, name):
    (case_dir / "meta.json").write_text("{ not json")


CASE_DAMAGE = [
    (delete, "2dyn.nii.gz", "file not found"),
    (truncate, "1dyn.nii.gz", "cannot read NIfTI"),
    (not_nifti, "pre.nii.gz", "cannot read NIfTI"),
    (bad_datatype, "1dyn.nii.gz", "cannot read NIfTI"),
    (with_nan, "2dyn.nii.gz", "NaN"),
    (with_inf, "1dyn.nii.gz", "infinite"),
    (two_d, "3dyn.nii.gz", "expected a 3-D image"),
    (four_d, "1dyn.nii.gz", "expected a 3-D image"),
    (other_shape, "3dyn.nii.gz", "shape"),
    (shifted_affine, "roi.nii.gz", "affine differs"),
    (empty, "roi.nii.gz", "ROI is empty"),
    (fractional_labels, "seg.nii.gz", "integer labels"),
    (repeated_time, "meta.json", "strictly increasing"),
    (too_few_times, "meta.json", "3 times for 4 phases"),
    (bad_phase_names, "meta.json", "phases must be named"),
    (not_json, "meta.json", "invalid JSON"),
    (delete, "meta.json", "file not found"),
]
CASE_IDS = [f"{damage.__name__}-{file.split('.')[0]}" for damage, file, _ in CASE_DAMAGE]


def damage_case(case_dir, damage, file):
    if file == "meta.json" and damage is delete:
        (case_dir / file).unlink()
    else:
        damage(case_dir, file.split(".")[0])


@pytest.fixture
def data(tmp_path):
    """Two 4-phase cases: case_0001 (to be damaged) and case_0002."""
    save_case(make_case(0), tmp_path / "data")
    save_case(dataclasses.replace(make_case(1), case_id="case_0002"), tmp_path / "data")
    return tmp_path / "data"


def write_predictions(case_dir, pred_dir):
    """The real 2dyn and 3dyn written as a model's prediction of the case."""
    case = make_case()
    (pred_dir / case_dir.name).mkdir(parents=True)
    for k, name in ((2, "2dyn"), (3, "3dyn")):
        save_nifti(pred_dir / case_dir.name / f"{name}.nii.gz", case.phases[k], case.affine)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


# --- predict ---------------------------------------------------------------------------


@pytest.mark.parametrize(("damage", "file", "problem"), CASE_DAMAGE, ids=CASE_IDS)
def test_predict_bad_case(tmp_path, data, run_dir, damage, file, problem):
    case_dir = data / "case_0001"
    damage_case(case_dir, damage, file)
    assert_one_error(
        cli("predict", run_dir, case_dir, "--out", tmp_path / "out"), str(case_dir / file), problem
    )
    assert not (tmp_path / "out").exists()


def copy_run(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def foreign_weights(run):
    from dcesynth.model import build_model
    from dcesynth.train.checkpoint import save_weights

    save_weights(
        run / "checkpoints" / "last.safetensors", build_model("baseline", (4,) * 6, False, 2)
    )
    return "weights do not fit the model"


def truncated_weights(run):
    path = run / "checkpoints" / "last.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return "cannot read weights"


def pickled_weights(run):
    path = run / "checkpoints" / "last.safetensors"
    torch.save(read_tensors(path), path)
    return "cannot read weights"


def nan_weights(run):
    path = run / "checkpoints" / "last.safetensors"
    save_file({key: value * np.nan for key, value in read_tensors(path).items()}, path)
    return "NaN or infinite"


def no_weights(run):
    (run / "checkpoints" / "last.safetensors").unlink()
    return "no best.safetensors or last.safetensors"


def bad_config(run):
    (run / "config.json").write_text('{"model": 3}')
    return "invalid run config"


def unknown_normalisation(run):
    path = run / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["normalisation"] = "zscore"
    path.write_text(json.dumps(config), encoding="utf-8")
    return "model.normalisation must be one of ('ti', 'pre'), got 'zscore'"


def scheduled_sampling_out_of_range(run):
    path = run / "config.json"
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            '"scheduled_sampling": 0.0', '"scheduled_sampling": -1.0'
        )
    )
    return "train.scheduled_sampling must be in [0, 1], got -1.0"


def unknown_model(run):
    path = run / "config.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"iterunet"', '"vit"'))
    return "cannot build the model"


@pytest.mark.parametrize(
    "damage",
    [
        foreign_weights,
        truncated_weights,
        pickled_weights,
        nan_weights,
        no_weights,
        bad_config,
        unknown_normalisation,
        scheduled_sampling_out_of_range,
        unknown_model,
    ],
)
def test_predict_bad_run(tmp_path, data, run_dir, damage):
    run = copy_run(run_dir, tmp_path)
    problem = damage(run)
    assert_one_error(cli("predict", run, data, "--out", tmp_path / "out"), str(run), problem)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--inputs", "1dyn,2dyn"], "--inputs: expected pre,1dyn"),
        (["--times", "0,85,85"], "--times: times must be strictly increasing"),
        (["--overlap", "1"], "--overlap: must be at least 0 and below 1, got 1"),
        (["--out", "{tmp}/afile/p"], "is a file"),
        (["--out", "{tmp}/afile"], "is a file"),
    ],
    ids=["inputs", "times", "overlap", "out-under-a-file", "out-is-a-file"],
)
def test_predict_bad_option(tmp_path, data, run_dir, options, problem):
    (tmp_path / "afile").write_text("x")
    assert_one_error(cli("predict", run_dir, data, *with_out(options, tmp_path)), problem)
    assert not (tmp_path / "out").exists()


# --- evaluate --------------------------------------------------------------------------


def evaluate_one(tmp_path, data):
    """Evaluate case_0001 alone (its own cohort) against its real phases as predictions."""
    (data / "case_0002").rename(tmp_path / "case_0002")
    write_predictions(data / "case_0001", tmp_path / "pred")
    return ("evaluate", data, "--pred", f"real={tmp_path / 'pred'}", "--out", tmp_path / "rep")


@pytest.mark.parametrize(("damage", "file", "problem"), CASE_DAMAGE, ids=CASE_IDS)
def test_evaluate_bad_case(tmp_path, data, damage, file, problem):
    command = evaluate_one(tmp_path, data)
    damage_case(data / "case_0001", damage, file)
    assert_one_error(cli(*command), str(data / "case_0001" / file), problem)
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (delete, "3dyn.nii.gz", "predicted phase not found"),
        (truncate, "2dyn.nii.gz", "cannot read NIfTI"),
        (not_nifti, "3dyn.nii.gz", "cannot read NIfTI"),
        (with_nan, "2dyn.nii.gz", "NaN"),
        (four_d, "3dyn.nii.gz", "expected a 3-D image"),
        (other_shape, "3dyn.nii.gz", "shape"),
        (shifted_affine, "2dyn.nii.gz", "affine differs"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_evaluate_bad_prediction(tmp_path, data, damage, file, problem):
    command = evaluate_one(tmp_path, data)
    folder = tmp_path / "pred" / "case_0001"
    damage(folder, file.split(".")[0])
    assert_one_error(cli(*command), str(folder / file), problem)
    assert not (tmp_path / "rep").exists()


def test_evaluate_empty_seg_where_a_lesion_is_needed(tmp_path, data):
    command = evaluate_one(tmp_path, data)
    empty(data / "case_0001", "seg")
    assert_one_error(cli(*command), "no lesion in any seg.nii.gz")
    assert not (tmp_path / "rep").exists()


# --- train -----------------------------------------------------------------------------


@pytest.mark.parametrize(("damage", "file", "problem"), CASE_DAMAGE, ids=CASE_IDS)
def test_train_bad_case(tmp_path, data, damage, file, problem):
    damage_case(data / "case_0001", damage, file)
    result = cli("train", data, "--out", tmp_path / "run", "--max-steps", 1)
    assert_one_error(result, str(data / "case_0001" / file), problem)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def trained(tmp_path, data):
    """A one-step run on ``data`` (tiny model), to resume."""
    run = tmp_path / "run"
    build_trainer(data, run, tiny(preset("demo"))).fit(max_steps=1)
    return run


class RunsCode:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def pickled_state(state):
    torch.save({"step": RunsCode()}, state)


def truncated_state(state):
    state.write_bytes(state.read_bytes()[:50])


def foreign_state(state):
    torch.save({"something": torch.zeros(3)}, state)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (pickled_state, "cannot read checkpoint"),
        (truncated_state, "cannot read checkpoint"),
        (foreign_state, "not a training state"),
    ],
    ids=["pickled", "truncated", "foreign"],
)
def test_train_resume_bad_checkpoint(tmp_path, data, trained, damage, problem, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = trained / "checkpoints" / "last_state.pt"
    damage(state)
    result = cli("train", data, "--out", trained, "--resume", "--max-steps", 2)
    assert_one_error(result, str(state), problem)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--perceptual-weights", "{tmp}/none.pth"], "none.pth"),
        (["--out", "{tmp}/afile/run"], "is a file"),
        (["--preset", "huge"], "--preset: unknown preset"),
        (["--normalisation", "zscore"], "--normalisation: unknown normalisation 'zscore'"),
        (["--scheduled-sampling", "2"], "--scheduled-sampling: a share of stage 2 from 0 to 1"),
    ],
    ids=[
        "perceptual-weights-missing",
        "out-under-a-file",
        "preset",
        "normalisation",
        "scheduled-sampling",
    ],
)
def test_train_bad_option(tmp_path, data, options, problem):
    (tmp_path / "afile").write_text("x")
    assert_one_error(cli("train", data, "--max-steps", 1, *with_out(options, tmp_path)), problem)
    assert not (tmp_path / "out").exists()


# --- import ----------------------------------------------------------------------------


def reference_source(tmp_path):
    _write_reference(tmp_path / "src", "patient_01")
    return tmp_path / "src" / "patient_01"


def empty_roi(case_dir, name):
    from test_importers import RAS_AFFINE, SHAPE

    save_nifti(case_dir / f"{name}.nii.gz", np.zeros(SHAPE, np.uint8), RAS_AFFINE)


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (truncate, "1dyn.nii.gz", "cannot read NIfTI"),
        (not_nifti, "seg.nii.gz", "cannot read NIfTI"),
        (with_nan, "2dyn.nii.gz", "NaN"),
        (with_inf, "3dyn.nii.gz", "infinite"),
        (two_d, "4dyn.nii.gz", "expected a 3-D image"),
        (four_d, "5dyn.nii.gz", "expected a 3-D image"),
        (other_shape, "3dyn.nii.gz", "differs from the pre phase"),
        (fractional_labels, "seg.nii.gz", "integer labels"),
        (empty_roi, "roi.nii.gz", "ROI is empty"),
        (delete, "roi.nii.gz", "roi.nii.gz missing"),
        (delete, "pre.nii.gz", "pre.nii.gz missing"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_import_bad_case(tmp_path, damage, file, problem):
    case_dir = reference_source(tmp_path)
    damage(case_dir, file.split(".")[0])
    result = cli("import", "reference", tmp_path / "src", "--out", tmp_path / "out")
    named = case_dir if problem.endswith("missing") else case_dir / file
    assert_one_error(result, str(named), problem)
    assert not (tmp_path / "out").exists()


def mamamia_json_not_json(src):
    (src / "patient_info_files" / "p_01.json").write_text("{")
    return src / "patient_info_files" / "p_01.json", "invalid JSON"


def mamamia_times_not_numbers(src):
    (src / "patient_info_files" / "p_01.json").write_text('{"acquisition_times": ["soon"]}')
    return src / "patient_info_files" / "p_01.json", "expected comma-separated seconds"


def mamamia_truncated_phase(src):
    truncate(src / "images" / "P_01", "p_01_0002")
    return src / "images" / "P_01" / "p_01_0002.nii.gz", "cannot read NIfTI"


def mamamia_seg_missing(src):
    (src / "segmentations" / "expert" / "p_01.nii.gz").unlink()
    return "P_01", "expert segmentation segmentations/expert/p_01.nii.gz missing"


@pytest.mark.parametrize(
    "damage",
    [
        mamamia_json_not_json,
        mamamia_times_not_numbers,
        mamamia_truncated_phase,
        mamamia_seg_missing,
    ],
)
def test_import_mamamia_bad_case(tmp_path, damage):
    src = tmp_path / "src"
    _write_mamamia(src, "P_01", 3, {"acquisition_times": [0, 90, 180]})
    named, problem = damage(src)
    result = cli("import", "mama-mia", src, "--out", tmp_path / "out")
    assert_one_error(result, str(named), problem)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--times", "0,85,85"], "--times: times must be strictly increasing"),
        (["--times", "0,85,155"], "3 times for 6 phases"),
        (["--roi-dir", "{tmp}/src"], "--roi-dir: does not apply to reference"),
        (["--out", "{tmp}/afile/data"], "is a file"),
    ],
    ids=["times", "times-count", "option-of-another-kind", "out-under-a-file"],
)
def test_import_bad_option(tmp_path, options, problem):
    reference_source(tmp_path)
    (tmp_path / "afile").write_text("x")
    options = with_out(options, tmp_path)
    assert_one_error(cli("import", "reference", tmp_path / "src", *options), problem)
    assert not (tmp_path / "out").exists()


def test_import_of_a_folder_without_cases(tmp_path):
    (tmp_path / "src").mkdir()
    result = cli("import", "reference", tmp_path / "src", "--out", tmp_path / "out")
    assert_one_error(result, str(tmp_path / "src"), "no case could be imported")
