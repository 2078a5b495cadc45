"""Whole-case prediction: shapes, affines, determinism, skipped windows, inputs, CLI."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dcesynth.case import Case, load_case, save_case
from dcesynth.cli import app
from dcesynth.config import ModelConfig, RunConfig, TrainConfig
from dcesynth.infer import count_windows, load_run, predict_case, write_prediction
from dcesynth.io import InputError, atomic_write_json
from dcesynth.model import build_model
from dcesynth.train.checkpoint import save_weights

TIMES = [0.0, 85.0, 155.0, 225.0, 295.0, 365.0]
PATCH = (16, 16, 32)
FEATURES = (4, 4, 8, 8, 16, 4)


def make_case(shape=(40, 36, 32), roi_box=(slice(4, 14), slice(4, 14), slice(0, 32))) -> Case:
    """A case with a breast ROI in one corner and a washout lesion inside it."""
    rng = np.random.default_rng(0)
    phases = 100 + rng.normal(0, 2, size=(len(TIMES), *shape)).astype(np.float32)
    roi = np.zeros(shape, dtype=np.uint8)
    roi[roi_box] = 1
    seg = np.zeros(shape, dtype=np.int16)
    seg[6:10, 6:10, 10:20] = 1
    curve = np.array([1.0, 2.5, 2.3, 2.1, 2.0, 1.9])
    phases[:, seg > 0] *= curve[:, None].astype(np.float32)
    affine = np.array([[0.0, -1.1, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    return Case("case_a", phases, TIMES, seg, roi, affine, source="test")


def make_run(tmp_path, name="iterunet", n_targets=4, seed=0):
    run_dir = tmp_path / f"run_{name}"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = RunConfig(
        preset="test",
        model=ModelConfig(name=name, features=FEATURES, temporal=name == "iterunet"),
        train=TrainConfig(patch=PATCH, amp=False),
    )
    atomic_write_json(run_dir / "config.json", config.to_json())
    torch.manual_seed(seed)
    model = build_model(name, FEATURES, name == "iterunet", n_targets)
    for module in model.modules():  # a visibly non-trivial output layer
        if hasattr(module, "final_conv"):
            torch.nn.init.normal_(module.final_conv.weight, std=0.5)
    save_weights(run_dir / "checkpoints" / "last.safetensors", model)
    return run_dir


@pytest.fixture
def case_dir(tmp_path):
    return save_case(make_case(), tmp_path / "data")


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prediction_files_keep_shape_and_affine(tmp_path, case_dir):
    case = load_case(case_dir)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    folder = write_prediction(case, predict_case(run, case), tmp_path / "pred")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "2dyn.nii.gz",
        "3dyn.nii.gz",
        "4dyn.nii.gz",
        "5dyn.nii.gz",
        "kinetic_map.nii.gz",
    ]
    for name in names:
        image = nib.load(folder / name)
        assert image.shape == case.shape
        np.testing.assert_allclose(image.affine, case.affine, atol=1e-6)
    codes = np.asarray(nib.load(folder / "kinetic_map.nii.gz").dataobj)
    assert set(np.unique(codes)) <= {0, 1, 2, 3}
    assert not codes[case.roi == 0].any()


def test_predict_twice_gives_identical_files(tmp_path, case_dir):
    run_dir = make_run(tmp_path)
    runner = CliRunner()
    for out in ("p1", "p2"):
        result = runner.invoke(
            app, ["predict", str(run_dir), str(case_dir), "--out", str(tmp_path / out)]
        )
        assert result.exit_code == 0, result.output
    assert digest(tmp_path / "p1" / "case_a") == digest(tmp_path / "p2" / "case_a")


def test_windows_without_roi_are_not_run(tmp_path, case_dir):
    case = load_case(case_dir)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    calls = []
    original = run.model.step
    run.model.step = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    prediction = predict_case(run, case, overlap=0.5)
    total = count_windows(case.shape, PATCH, 0.5)
    assert prediction.windows_run + prediction.windows_skipped == total
    assert 0 < prediction.windows_run < total
    assert len(calls) == prediction.windows_run * 4  # four rollout steps per window run
    # Far from the ROI every window was skipped: the output is the last observed phase.
    np.testing.assert_allclose(
        prediction.phases[:, 35, 30, :],
        np.broadcast_to(case.phases[1, 35, 30, :], (4, 32)),
        rtol=1e-5,
    )


def test_more_inputs_predict_only_the_rest(tmp_path, case_dir):
    case = load_case(case_dir)
    for name in ("iterunet", "baseline"):
        run = load_run(make_run(tmp_path, name), torch.device("cpu"))
        prediction = predict_case(run, case, inputs="pre,1dyn,2dyn")
        assert prediction.names == ["3dyn", "4dyn", "5dyn"]
        assert prediction.phases.shape == (3, *case.shape)
        assert prediction.times_s == TIMES


def test_abbreviated_case_needs_protocol_times(tmp_path):
    full = make_case()
    short = Case("short", full.phases[:2], TIMES[:2], full.seg, full.roi, full.affine)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    with pytest.raises(InputError, match="--times"):
        predict_case(run, short)
    prediction = predict_case(run, short, times_s=TIMES)
    assert prediction.names == ["2dyn", "3dyn", "4dyn", "5dyn"]


def test_bad_inputs_are_rejected(tmp_path, case_dir):
    case = load_case(case_dir)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    with pytest.raises(InputError, match="--inputs"):
        predict_case(run, case, inputs="1dyn,2dyn")


def test_predict_cli_errors_are_one_line(tmp_path, case_dir):
    runner = CliRunner()
    result = runner.invoke(
        app, ["predict", str(tmp_path / "nope"), str(case_dir), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error:") and "config.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_writes_metrics(tmp_path, case_dir):
    run_dir = make_run(tmp_path)
    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["predict", str(run_dir), str(case_dir.parent), "--out", str(tmp_path / "pred")]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(case_dir.parent),
            "--pred",
            f"tiny={tmp_path / 'pred'}",
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["cases"] == 1
    assert set(metrics["models"]["tiny"]["per_phase"]) == {"2dyn", "3dyn", "4dyn", "5dyn"}
    assert (tmp_path / "report" / "index.html").is_file()


def test_imported_reference_case_predicts_without_conversion(tmp_path):
    from dcesynth.data.importers import import_cohort

    case = make_case()
    source = tmp_path / "reference" / "patient_01"
    source.mkdir(parents=True)
    for name, image in zip(case.phase_names, case.phases, strict=True):
        nib.save(nib.Nifti1Image(image, case.affine), source / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(case.seg, case.affine), source / "seg.nii.gz")
    nib.save(nib.Nifti1Image(case.roi, case.affine), source / "roi.nii.gz")
    summary = import_cohort("reference", tmp_path / "reference", tmp_path / "data")
    assert summary.written == ["patient_01"]
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(make_run(tmp_path)),
            str(tmp_path / "data" / "patient_01"),
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = nib.load(tmp_path / "pred" / "patient_01" / "5dyn.nii.gz")
    np.testing.assert_allclose(written.affine, case.affine, atol=1e-6)
