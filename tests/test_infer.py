"""Whole-case prediction: shapes, affines, determinism, skipped windows, inputs, CLI."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dcesynth.accel import windows_per_call
from dcesynth.case import Case, load_case, save_case
from dcesynth.cli import app
from dcesynth.config import ModelConfig, RunConfig, TrainConfig
from dcesynth.infer import (
    WindowPredictor,
    count_region_windows,
    count_windows,
    load_run,
    mirror_flips,
    predict_case,
    predict_volume,
    roi_region,
    write_prediction,
)
from dcesynth.io import InputError, atomic_write_json
from dcesynth.model import build_model
from dcesynth.regression import RegressionConfig, RegressionModel, fit_regression
from dcesynth.rundir import RunDir
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


def make_run(
    tmp_path,
    name="iterunet",
    n_targets=4,
    seed=0,
    relative_enhancement=False,
    normalisation="ti",
    case_features=False,
    prior_model: RegressionModel | None = None,
    zero_output=False,
):
    """A run folder of an untrained model; with ``prior_model``, an iterU-Net that steps
    from it; with ``zero_output``, whose U-Net outputs zero."""
    run_dir = tmp_path / f"run_{name}_{relative_enhancement}_{normalisation}_{case_features}"
    run_dir = run_dir.with_name(run_dir.name + ("_prior" if prior_model else ""))
    (run_dir / "checkpoints").mkdir(parents=True)
    model_config = ModelConfig(
        name=name,
        features=FEATURES,
        temporal=name == "iterunet",
        relative_enhancement=relative_enhancement,
        normalisation=normalisation,
        case_features=case_features,
        prior="none" if prior_model is None else "regression",
    )
    config = RunConfig(preset="test", model=model_config, train=TrainConfig(patch=PATCH, amp=False))
    atomic_write_json(run_dir / "config.json", config.to_json())
    torch.manual_seed(seed)
    model = build_model(
        name,
        FEATURES,
        name == "iterunet",
        n_targets,
        model_config.pre_channels,
        model_config.n_case_features,
        prior=prior_model is not None,
    )
    for module in model.modules():  # a visibly non-trivial output layer, or a zero one
        if hasattr(module, "final_conv"):
            torch.nn.init.normal_(module.final_conv.weight, std=0.0 if zero_output else 0.5)
            if zero_output:
                torch.nn.init.zeros_(module.final_conv.bias)
    save_weights(run_dir / "checkpoints" / "last.safetensors", model)
    if prior_model is not None:
        prior_model.save(RunDir(run_dir).prior_file)
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


@pytest.mark.parametrize("name", ["iterunet", "baseline"])
def test_inputs_beside_ti_norm_tell_what_it_cannot(tmp_path, name):
    # Scaling and offsetting every phase alike leaves TI-normalised phases unchanged, so a
    # model on them alone predicts the same normalised output; the relative enhancement
    # (S1 - S0) / S0 changes with the offset, and a model given it predicts differently,
    # as does a model whose inputs are referenced to the pre-contrast mean, and one
    # conditioned on the breast's statistics (its 1dyn mean over spread changes too).
    case = make_case()
    shifted = Case(
        "case_b", case.phases * 0.5 + 40.0, case.times_s, case.seg, case.roi, case.affine
    )
    variants = {
        "plain": {},
        "relative": {"relative_enhancement": True},
        "pre": {"normalisation": "pre"},
        "case_features": {"case_features": True},
    }
    outputs = {}
    for variant, options in variants.items():
        run = load_run(make_run(tmp_path, name, **options), torch.device("cpu"))
        outputs[variant] = [
            (predict_case(run, c).phases[:, c.roi > 0] - c.phases[1][c.roi > 0].mean())
            / c.phases[1][c.roi > 0].std()
            for c in (case, shifted)
        ]
    plain = outputs.pop("plain")
    np.testing.assert_allclose(plain[0], plain[1], atol=2e-3)
    for variant, (original, moved) in outputs.items():
        assert np.abs(original - moved).max() > 1e-2, variant


def test_predict_twice_gives_identical_files(tmp_path, case_dir):
    run_dir = make_run(tmp_path)
    runner = CliRunner()
    for out in ("p1", "p2"):
        result = runner.invoke(
            app, ["predict", str(run_dir), str(case_dir), "--out", str(tmp_path / out)]
        )
        assert result.exit_code == 0, result.output
    assert digest(tmp_path / "p1" / "case_a") == digest(tmp_path / "p2" / "case_a")


def test_only_the_roi_box_is_predicted(tmp_path, case_dir):
    case = load_case(case_dir)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    calls = []
    run.model.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    prediction = predict_case(run, case, overlap=0.5)
    # ROI x, y 4:14 (10 voxels) grows to one 16-voxel window centred on it; z is one window.
    assert prediction.region == ((1, 17), (1, 17), (0, 32))
    assert (prediction.windows_run, prediction.windows_skipped) == (1, 0)
    assert count_windows(case.shape, PATCH, 0.5) == 16  # a whole-volume grid's windows
    assert count_region_windows(case.roi, PATCH, 0.5) == 1
    assert len(calls) == 4  # four U-Net passes (rollout steps) in the one window run
    outside = np.ones(case.shape, dtype=bool)
    outside[1:17, 1:17] = False
    for phase in prediction.phases:  # outside the box: the last observed phase, exactly
        np.testing.assert_array_equal(phase[outside], case.phases[1][outside])
    roi = case.roi > 0
    assert np.abs(prediction.phases[:, roi] - case.phases[1][roi]).mean() > 1.0


def test_windows_of_the_roi_box_without_roi_are_not_run(tmp_path):
    shape = (64, 16, 32)
    case = make_case(shape, roi_box=(slice(0, 64), slice(0, 16), slice(0, 32)))
    case.roi[8:56] = 0  # two ROI slabs, x 0:8 and 56:64, 48 voxels apart
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    prediction = predict_case(run, case, overlap=0.5)
    # Windows start at x = 0, 8, ..., 48; only the first and the last hold ROI voxels.
    assert prediction.region == ((0, 64), (0, 16), (0, 32))
    assert (prediction.windows_run, prediction.windows_skipped) == (2, 5)
    np.testing.assert_array_equal(prediction.phases[:, 24:40], case.phases[1:2, 24:40].repeat(4, 0))


def _normalised_volume(case: Case) -> dict:
    """``predict_volume``'s inputs for ``case`` (pre, 1dyn), z-scored crudely."""
    observed = (case.phases[:2] - 100.0) / 10.0
    context = np.zeros((0, *case.shape), dtype=np.float32)
    return {"observed": observed, "context": context, "times_s": TIMES[1:], "patch": PATCH}


def test_windows_without_a_needed_voxel_are_not_run_and_needed_voxels_keep_their_value(
    tmp_path,
):
    shape = (64, 16, 32)
    case = make_case(shape, roi_box=(slice(0, 64), slice(0, 16), slice(0, 32)))
    lesion = case.seg > 0  # x 6:10: the windows starting at x = 0 and x = 8
    model = load_run(make_run(tmp_path), torch.device("cpu")).model
    inputs = _normalised_volume(case)
    whole = predict_volume(model, roi=case.roi, **inputs)
    only_lesion = predict_volume(model, roi=case.roi, needed=lesion, **inputs)
    assert whole.region == only_lesion.region == ((0, 64), (0, 16), (0, 32))
    assert (whole.windows_run, whole.windows_skipped) == (7, 0)
    assert (only_lesion.windows_run, only_lesion.windows_skipped) == (2, 5)
    np.testing.assert_allclose(
        only_lesion.phases[:, lesion].numpy(), whole.phases[:, lesion].numpy(), rtol=1e-5
    )
    far = only_lesion.phases[:, 40:].numpy()  # no window over x >= 24 ran: 1dyn stands in
    np.testing.assert_allclose(
        far, np.broadcast_to(inputs["observed"][1, 40:], far.shape), atol=1e-6
    )


def test_windows_per_call_batches_small_cpu_windows_with_the_same_result(tmp_path):
    cpu = torch.device("cpu")
    assert windows_per_call(cpu, (32, 32, 16)) == 4
    assert windows_per_call(cpu, (96, 96, 48)) == 1
    assert windows_per_call(torch.device("cuda"), (96, 96, 48)) == 8
    shape = (64, 16, 32)
    case = make_case(shape, roi_box=(slice(0, 64), slice(0, 16), slice(0, 32)))
    model = load_run(make_run(tmp_path), cpu).model
    inputs = _normalised_volume(case)
    one = predict_volume(model, roi=case.roi, window_batch=1, **inputs)
    batched = predict_volume(model, roi=case.roi, window_batch=4, **inputs)
    assert one.windows_run == batched.windows_run == 7
    # One window alone runs PyTorch's native convolution, a batch oneDNN's: rounding differs.
    scale = float(one.phases.abs().max())
    np.testing.assert_allclose(batched.phases.numpy(), one.phases.numpy(), atol=1e-5 * scale)


def test_mirror_flips_are_every_combination_of_the_axes():
    assert mirror_flips(()) == [()]
    assert mirror_flips((2, 0)) == [(), (2,), (4,), (2, 4)]
    assert len(set(mirror_flips((0, 1, 2)))) == 8
    with pytest.raises(ValueError, match="spatial axes"):
        mirror_flips((3,))


def test_mirrored_prediction_is_the_flip_average_and_flip_equivariant(tmp_path):
    model = load_run(make_run(tmp_path), torch.device("cpu")).model
    generator = torch.Generator().manual_seed(3)
    images = torch.randn((2, 2, *PATCH), generator=generator)
    windows = torch.cat([images, torch.ones((2, 1, *PATCH))], dim=1)  # pre, 1dyn, needed
    times_s = torch.tensor(TIMES[1:])
    plain = WindowPredictor(model, 0, times_s, 4, amp=False)
    mirrored = WindowPredictor(model, 0, times_s, 4, amp=False, mirror_axes=(0, 2))
    by_hand = sum(plain(windows.flip(dims)).flip(dims) for dims in [(), (2,), (4,), (2, 4)]) / 4
    prediction = mirrored(windows)
    torch.testing.assert_close(prediction, by_hand, rtol=1e-5, atol=1e-5)
    assert (prediction - plain(windows)).abs().max() > 1e-3  # the model is not symmetric
    # Averaging over a group of flips commutes with each of its flips.
    torch.testing.assert_close(mirrored(windows.flip(2)), prediction.flip(2), rtol=1e-5, atol=1e-5)
    assert mirrored.calls == 4  # windows run, whatever the number of mirrored passes


@pytest.mark.parametrize("seed", range(20))
def test_roi_region_covers_the_roi_with_no_extra_window(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(20, 90, size=3))
    patch = tuple(int(n) for n in rng.choice([16, 32, 48], size=3))
    overlap = float(rng.choice([0.0, 0.25, 0.5, 0.75]))
    low = [int(rng.integers(0, n)) for n in shape]
    high = [int(rng.integers(lo + 1, n + 1)) for lo, n in zip(low, shape, strict=True)]
    roi = np.zeros(shape, dtype=np.uint8)
    roi[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))] = 1
    region = roi_region(roi, patch, overlap)
    for (start, stop), lo, hi, size, window in zip(region, low, high, shape, patch, strict=True):
        assert 0 <= start <= lo and hi <= stop <= size
        stride = max(1, int(window * (1 - overlap)))
        assert (start, stop) == (0, size) or (stop - start - window) % stride == 0
    extents = [hi - lo for lo, hi in zip(low, high, strict=True)]
    assert count_region_windows(roi, patch, overlap) == count_windows(extents, patch, overlap)


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


def test_iterunet_predicts_a_protocol_it_was_not_trained_on(tmp_path):
    # A run of the paper's six phases; the case: 7 phases, 60 s apart.
    full = make_case()
    abbreviated = Case("seven", full.phases[:2], [0.0, 60.0], full.seg, full.roi, full.affine)
    times_s = [60.0 * k for k in range(7)]
    run = load_run(make_run(tmp_path, n_targets=4), torch.device("cpu"))
    prediction = predict_case(run, abbreviated, times_s=times_s)
    assert prediction.names == ["2dyn", "3dyn", "4dyn", "5dyn", "6dyn"]
    assert prediction.phases.shape == (5, *full.shape)
    assert np.isfinite(prediction.phases).all()
    # Each step is conditioned on its times: later targets differ from earlier ones.
    assert not np.allclose(prediction.phases[0], prediction.phases[-1])


def fitted_prior() -> RegressionModel:
    return fit_regression([make_case], RegressionConfig(sigmas_vox=(1.0,), alpha=1.0))


def test_a_network_with_zero_output_predicts_its_regression_prior(tmp_path):
    case = make_case()
    prior_model = fitted_prior()
    run = load_run(make_run(tmp_path, prior_model=prior_model, zero_output=True))
    assert run.prior_model is not None
    prediction = predict_case(run, case)
    expected = prior_model.predict_at(case, TIMES[2:])
    np.testing.assert_allclose(prediction.phases, expected, rtol=1e-5, atol=1e-3)
    # From pre, 1dyn and 2dyn: the observed 2dyn plus the prior's change after it.
    later = predict_case(run, case, inputs="pre,1dyn,2dyn")
    np.testing.assert_allclose(
        later.phases, case.phases[2] + expected[1:] - expected[:1], rtol=1e-5, atol=1e-3
    )
    # Any protocol: the prior is interpolated at the case's own times.
    seven = Case("seven", case.phases[:2], [0.0, 85.0], case.seg, case.roi, case.affine)
    times_s = [0.0, *(85.0 + 60.0 * k for k in range(6))]
    other = predict_case(run, seven, times_s=times_s)
    np.testing.assert_allclose(
        other.phases, prior_model.predict_at(seven, times_s[2:]), rtol=1e-5, atol=1e-3
    )


def test_a_trained_prior_network_adds_its_own_output(tmp_path):
    case = make_case()
    prior_model = fitted_prior()
    run = load_run(make_run(tmp_path, prior_model=prior_model))
    prediction = predict_case(run, case)
    assert np.isfinite(prediction.phases).all()
    roi = case.roi > 0
    assert (
        np.abs(prediction.phases[:, roi] - prior_model.predict_at(case, TIMES[2:])[:, roi]).max()
        > 1
    )


def test_bad_inputs_are_rejected(tmp_path, case_dir):
    case = load_case(case_dir)
    run = load_run(make_run(tmp_path), torch.device("cpu"))
    with pytest.raises(InputError, match="--inputs"):
        predict_case(run, case, inputs="1dyn,2dyn")


def test_predict_cli_mirror_writes_the_mirrored_prediction(tmp_path, case_dir):
    run_dir = make_run(tmp_path)
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app, ["predict", str(run_dir), str(case_dir), "--out", str(out), "--mirror"]
    )
    assert result.exit_code == 0, result.output
    run, case = load_run(run_dir, torch.device("cpu")), load_case(case_dir)
    mirrored = predict_case(run, case, mirror_axes=(0, 1, 2))
    plain = predict_case(run, case)
    written = nib.load(out / "case_a" / "5dyn.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_allclose(written, mirrored.phases[-1], rtol=1e-5)
    roi = case.roi > 0
    assert np.abs(mirrored.phases[-1][roi] - plain.phases[-1][roi]).max() > 1e-3


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
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
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
