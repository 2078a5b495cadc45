"""A case on disk: save/load roundtrip, atomic writes, and load errors that name the file."""

import json
import os
import re
import stat

import nibabel as nib
import numpy as np
import pytest

import dcesynth.case
from dcesynth.case import Case, load_case, save_case
from dcesynth.io import InputError, save_nifti

SHAPE = (6, 5, 4)
TIMES_S = [0.0, 85.0, 155.0, 365.0]
NAMES = ["pre", "1dyn", "2dyn", "3dyn"]


def make_case(seed: int = 0) -> Case:
    """A 4-phase case of shape (6, 5, 4), one 2-voxel lesion, an oblique affine."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(SHAPE, dtype=np.int16)
    seg[2, 2, 1:3] = 1
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[1:5, 1:4, :] = 1
    affine = np.array(
        [[1.5, 0.1, 0.0, -40.0], [0.0, 2.0, 0.2, 12.5], [0.05, 0.0, 3.0, 7.25], [0, 0, 0, 1]]
    )
    return Case(
        case_id="case_0001",
        phases=rng.uniform(50.0, 1500.0, size=(4, *SHAPE)).astype(np.float32),
        times_s=TIMES_S,
        seg=seg,
        roi=roi,
        affine=affine,
        source="phantom",
        lesions=[{"label": 1, "curve_type": "washout", "ktrans_per_min": 0.9, "ve": 0.3}],
        extra={"snr": 31.5},
    )


@pytest.fixture
def case_dir(tmp_path):
    return save_case(make_case(), tmp_path)


def test_save_load_roundtrip_keeps_values_affine_and_meta(case_dir):
    original, loaded = make_case(), load_case(case_dir)
    np.testing.assert_array_equal(loaded.phases, original.phases)
    np.testing.assert_array_equal(loaded.seg, original.seg)
    np.testing.assert_array_equal(loaded.roi, original.roi)
    np.testing.assert_allclose(loaded.affine, original.affine, atol=1e-5)  # NIfTI sform: float32
    assert (loaded.case_id, loaded.source, loaded.times_s) == ("case_0001", "phantom", TIMES_S)
    assert loaded.lesions == original.lesions
    assert loaded.extra == {"snr": 31.5}
    assert loaded.phase_names == NAMES


def test_loaded_arrays_have_contract_dtypes(case_dir):
    loaded = load_case(case_dir)
    assert (loaded.phases.dtype, loaded.seg.dtype, loaded.roi.dtype) == (
        np.float32,
        np.int16,
        np.uint8,
    )
    assert loaded.affine.dtype == np.float64


def test_files_on_disk_have_contract_dtypes(case_dir):
    on_disk = {p.name: nib.load(p).get_data_dtype() for p in case_dir.glob("*.nii.gz")}
    assert on_disk == {
        **{f"{name}.nii.gz": np.dtype(np.float32) for name in NAMES},
        "seg.nii.gz": np.dtype(np.int16),
        "roi.nii.gz": np.dtype(np.uint8),
    }


def test_meta_json_holds_the_contract_fields(case_dir):
    meta = json.loads((case_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta == {
        "case_id": "case_0001",
        "source": "phantom",
        "phases": NAMES,
        "times_s": TIMES_S,
        "lesions": [{"label": 1, "curve_type": "washout", "ktrans_per_min": 0.9, "ve": 0.3}],
        "snr": 31.5,
    }


def test_save_case_leaves_no_temporary_files(tmp_path, case_dir):
    assert [p.name for p in tmp_path.iterdir()] == ["case_0001"]
    expected = {f"{name}.nii.gz" for name in [*NAMES, "seg", "roi"]} | {"meta.json"}
    assert {p.name for p in case_dir.iterdir()} == expected


def test_saved_case_follows_the_umask_not_private_temp_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        case_dir = save_case(make_case(), tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(case_dir.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in case_dir.iterdir()} == {0o644}


def test_save_case_failing_midway_leaves_no_case_folder(tmp_path, monkeypatch):
    calls = []

    def fail_on_third_call(path, array, affine):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save_nifti(path, array, affine)

    monkeypatch.setattr(dcesynth.case, "save_nifti", fail_on_third_call)
    with pytest.raises(OSError, match="disk full"):
        save_case(make_case(), tmp_path)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_save_case_replaces_an_existing_case_whole(tmp_path):
    save_case(make_case(seed=0), tmp_path)
    save_case(make_case(seed=1), tmp_path)
    np.testing.assert_array_equal(load_case(tmp_path / "case_0001").phases, make_case(1).phases)
    assert [p.name for p in tmp_path.iterdir()] == ["case_0001"]


def truncate(case_dir, name):
    path = case_dir / f"{name}.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_image(case_dir, name, array, affine=None):
    save_nifti(case_dir / f"{name}.nii.gz", array, make_case().affine if affine is None else affine)


def with_nan(case_dir, name):
    image = make_case().phases[2].copy()
    image[1, 1, 1] = np.nan
    write_image(case_dir, name, image)


def four_d(case_dir, name):
    write_image(case_dir, name, np.ones((*SHAPE, 2), dtype=np.float32))


def other_shape(case_dir, name):
    write_image(case_dir, name, np.ones((7, 5, 4), dtype=np.float32))


def shifted_affine(case_dir, name):
    affine = make_case().affine.copy()
    affine[0, 3] += 1.0
    write_image(case_dir, name, make_case().roi, affine)


def delete(case_dir, name):
    (case_dir / f"{name}.nii.gz").unlink()


def fractional_labels(case_dir, name):
    seg = make_case().seg.astype(np.float32)
    seg[2, 2, 1] = 0.5
    write_image(case_dir, name, seg)


def empty(case_dir, name):
    write_image(case_dir, name, np.zeros(SHAPE, dtype=np.uint8))


def edit_meta(case_dir, **changes):
    path = case_dir / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


def too_few_times(case_dir, name):
    edit_meta(case_dir, times_s=[0.0, 85.0, 155.0])


def repeated_time(case_dir, name):
    edit_meta(case_dir, times_s=[0.0, 85.0, 85.0, 365.0])


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (truncate, "1dyn.nii.gz", "cannot read NIfTI"),
        (with_nan, "2dyn.nii.gz", "NaN"),
        (four_d, "1dyn.nii.gz", "expected a 3-D image"),
        (other_shape, "3dyn.nii.gz", "shape"),
        (shifted_affine, "roi.nii.gz", "affine differs"),
        (delete, "2dyn.nii.gz", "file not found"),
        (fractional_labels, "seg.nii.gz", "integer labels"),
        (empty, "roi.nii.gz", "ROI is empty"),
        (too_few_times, "meta.json", "3 times for 4 phases"),
        (repeated_time, "meta.json", "strictly increasing"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_load_case_rejects_bad_input_naming_the_file(case_dir, damage, file, problem):
    damage(case_dir, file.split(".")[0])
    with pytest.raises(InputError, match=re.escape(str(case_dir / file))) as error:
        load_case(case_dir)
    assert problem in str(error.value)


def test_load_case_rejects_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="case folder not found"):
        load_case(tmp_path / "nowhere")
