"""Tests of import_cohort on small fake trees of the reference, MAMA-MIA and Duke layouts."""

import json
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import openpyxl
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dcesynth.case import PAPER_TIMES_S, load_case
from dcesynth.cli import app
from dcesynth.data.breast_mask import automatic_breast_mask, fibroglandular_roi
from dcesynth.data.dicom_series import dicom_time_s
from dcesynth.data.import_common import read_table
from dcesynth.data.importers import ImportSummary, NothingImportedError, import_cohort
from dcesynth.io import InputError
from dcesynth.rundir import RunDir

SHAPE = (24, 20, 8)
VOXEL_MM = 2.0
RAS_AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
LPS_AFFINE = np.diag([-VOXEL_MM, -VOXEL_MM, VOXEL_MM, 1.0])
LESION = (slice(5, 8), slice(10, 13), slice(3, 6))


def _anatomy() -> tuple[np.ndarray, np.ndarray]:
    """Body and breast masks (X, Y, Z) in RAS voxel order: +Y anterior, breasts at y >= 8."""
    x, y, _ = np.meshgrid(*map(np.arange, SHAPE), indexing="ij")
    body = y < 8
    breasts = np.zeros(SHAPE, bool)
    for centre in (5, 18):
        breasts |= ((x - centre) ** 2 + ((y - 8) / 1.5) ** 2 <= 16) & (y >= 8)
    return body, breasts


def _fibroglandular(breasts: np.ndarray) -> np.ndarray:
    """(X, Y, Z) fibroglandular core of ``breasts``, clear of their one-voxel boundary."""
    x, y, _ = np.meshgrid(*map(np.arange, SHAPE), indexing="ij")
    core = np.zeros(SHAPE, bool)
    for centre in (5, 18):
        core |= (x - centre) ** 2 + ((y - 10.5) / 1.2) ** 2 <= 4
    return core & breasts & (y >= 9)


def _breast_images(n_phases: int, body, breasts, rng) -> np.ndarray:
    """(T, X, Y, Z) signal: air 5, body and fat 100, fibroglandular tissue 70 and enhancing."""
    fgt = _fibroglandular(breasts)
    pre = 5.0 + 95.0 * (body | breasts) - 30.0 * fgt + rng.normal(0.0, 1.0, SHAPE)
    return np.stack([pre + 3.0 * k * fgt for k in range(n_phases)])


def _phases(n_phases: int, seed: int = 0) -> np.ndarray:
    """(T, X, Y, Z) RAS-ordered phantom phases: ``_breast_images`` and an enhancing lesion."""
    body, breasts = _anatomy()
    phases = _breast_images(n_phases, body, breasts, np.random.default_rng(seed))
    for k in range(n_phases):
        phases[k][LESION] += 60.0 * min(k, 1) + 5.0 * k
    return np.round(phases).astype(np.float32)


def _lesion_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.int16)
    mask[LESION] = 1
    return mask


def _to_lps(array: np.ndarray) -> np.ndarray:
    """A RAS-ordered (X, Y, Z) array in the voxel order of LPS_AFFINE."""
    return np.ascontiguousarray(array[::-1, ::-1, :])


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _write_reference(src: Path, case_id: str, n_phases: int = 6, seed: int = 0) -> np.ndarray:
    phases = _phases(n_phases, seed)
    names = ["pre"] + [f"{k}dyn" for k in range(1, n_phases)]
    for name, image in zip(names, phases, strict=True):
        _save(src / case_id / f"{name}.nii.gz", image, RAS_AFFINE)
    _save(src / case_id / "seg.nii.gz", _lesion_mask(), RAS_AFFINE)
    _, breasts = _anatomy()
    _save(src / case_id / "roi.nii.gz", breasts.astype(np.uint8), RAS_AFFINE)
    return phases


def _write_mamamia(src: Path, patient: str, n_phases: int, info: dict | None) -> np.ndarray:
    """One MAMA-MIA patient: folder upper case, files lower case, LPS voxel order."""
    stem = patient.lower()
    phases = _phases(n_phases)
    for k, image in enumerate(phases):
        _save(src / "images" / patient / f"{stem}_{k:04d}.nii.gz", _to_lps(image), LPS_AFFINE)
    seg = _to_lps(_lesion_mask() * 255).astype(np.uint8)
    _save(src / "segmentations" / "expert" / f"{stem}.nii.gz", seg, LPS_AFFINE)
    if info is not None:
        (src / "patient_info_files").mkdir(parents=True, exist_ok=True)
        (src / "patient_info_files" / f"{stem}.json").write_text(json.dumps(info))
    return phases


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = math.radians(degrees_z), math.radians(degrees_x)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return about_z @ about_x


OBLIQUE = _rotation(20.0, 10.0)
DICOM_SPACING = (1.8, 2.2, 3.0)
DICOM_ORIGIN = (-10.0, 20.0, 5.0)


def _lps_geometry_as_ras() -> np.ndarray:
    """The RAS+ affine expected for the DICOM series written by ``_write_series``."""
    lps = np.eye(4)
    lps[:3, :3] = OBLIQUE @ np.diag(DICOM_SPACING)
    lps[:3, 3] = DICOM_ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_series(
    folder: Path, volume: np.ndarray, description: str, time: str, reverse_instances=False
) -> None:
    """A DICOM series, one int16 file per slice, ``volume`` (X, Y, Z) in LPS voxel order."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(DICOM_SPACING)
    image.SetDirection(tuple(OBLIQUE.ravel()))
    image.SetOrigin(DICOM_ORIGIN)
    d = OBLIQUE.ravel()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n_slices = volume.shape[2]
    for z in range(n_slices):
        section = image[:, :, z]
        instance = n_slices - z if reverse_instances else z + 1
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": f"1.2.826.0.1.3680043.2.1125.{zlib.crc32(str(folder).encode())}",
            "0008|103e": description,
            "0008|0032": time,
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(instance),
            "0028|0030": f"{DICOM_SPACING[1]}\\{DICOM_SPACING[0]}",
        }
        for tag, value in tags.items():
            section.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{instance:02d}.dcm"))
        writer.Execute(section)


DUKE_SERIES = [
    ("3.000000-ax dyn pre-111", "ax dyn pre", "235930"),
    ("4.000000-ax dyn 1st pass-222", "ax dyn 1st pass", "000125"),
    ("5.000000-ax dyn 2nd pass-333", "ax dyn 2nd pass", "000305"),
]
DUKE_STUDY = "01-01-1990-MRI BREAST-000"


def _write_duke(src: Path, patient: str = "Breast_MRI_001", series=DUKE_SERIES, **kwargs):
    phases = _phases(len(series))
    for (folder, description, time), image in zip(series, phases, strict=True):
        _write_series(
            src / patient / DUKE_STUDY / folder, _to_lps(image), description, time, **kwargs
        )
    _write_series(
        src / patient / DUKE_STUDY / "2.000000-ax t1-000", _to_lps(phases[0]), "ax t1", "235500"
    )
    return phases


def _write_boxes(path: Path, rows: list[tuple]) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(
        ["Patient ID", "Start Row", "End Row", "Start Column", "End Column"]
        + ["Start Slice", "End Slice"]
    )
    for row in rows:
        sheet.append(list(row))
    book.save(path)
    return path


# --- reference layout ------------------------------------------------------------------


def test_reference_case_with_six_phases_gets_paper_times_and_loads(tmp_path):
    phases = _write_reference(tmp_path / "src", "case_a")
    summary = import_cohort("reference", tmp_path / "src", tmp_path / "out")
    assert summary == ImportSummary(written=["case_a"], skipped=[])
    case = load_case(tmp_path / "out" / "case_a")
    assert case.times_s == list(PAPER_TIMES_S)
    assert case.source == "reference"
    np.testing.assert_array_equal(case.phases, phases)
    np.testing.assert_array_equal(case.seg, _lesion_mask())
    np.testing.assert_allclose(case.affine, RAS_AFFINE)
    assert case.lesions == [{"label": 1}]


def test_reference_case_with_four_phases_needs_times(tmp_path):
    _write_reference(tmp_path / "src", "six")
    _write_reference(tmp_path / "src", "four", n_phases=4)
    summary = import_cohort("reference", tmp_path / "src", tmp_path / "out")
    assert summary.written == ["six"]
    assert summary.skipped[0][0] == "four"
    assert "times missing and no --times" in summary.skipped[0][1]


def test_reference_times_option_is_used_and_its_count_must_match(tmp_path):
    _write_reference(tmp_path / "src", "six")
    _write_reference(tmp_path / "src", "four", n_phases=4)
    times = [0.0, 60.0, 120.0, 180.0]
    summary = import_cohort("reference", tmp_path / "src", tmp_path / "out", times_s=times)
    assert summary.written == ["four"]
    assert summary.skipped == [
        ("six", f"{tmp_path / 'src' / 'six'}: --times gives 4 times for 6 phases")
    ]
    assert load_case(tmp_path / "out" / "four").times_s == times


def test_reference_case_without_pre_is_skipped(tmp_path):
    _write_reference(tmp_path / "src", "good")
    _write_reference(tmp_path / "src", "nopre")
    (tmp_path / "src" / "nopre" / "pre.nii.gz").unlink()
    summary = import_cohort("reference", tmp_path / "src", tmp_path / "out")
    assert summary.written == ["good"]
    assert summary.skipped == [
        ("nopre", f"{tmp_path / 'src' / 'nopre'}: pre.nii.gz missing (pre-contrast image)")
    ]
    assert not (tmp_path / "out" / "nopre").exists()


def test_phase_on_another_grid_is_skipped_without_resample(tmp_path):
    phases = _write_reference(tmp_path / "src", "shifted")
    shifted = RAS_AFFINE.copy()
    shifted[0, 3] += VOXEL_MM
    _save(tmp_path / "src" / "shifted" / "2dyn.nii.gz", phases[2], shifted)
    with pytest.raises(NothingImportedError) as error:
        import_cohort("reference", tmp_path / "src", tmp_path / "out")
    ((case_id, reason),) = error.value.summary.skipped
    assert case_id == "shifted" and "2dyn.nii.gz" in reason and "--resample" in reason
    assert not (tmp_path / "out" / "shifted").exists()


def test_phase_on_another_grid_is_resampled_onto_pre_with_resample(tmp_path):
    phases = _write_reference(tmp_path / "src", "shifted")
    shifted = RAS_AFFINE.copy()
    shifted[0, 3] += VOXEL_MM
    _save(tmp_path / "src" / "shifted" / "2dyn.nii.gz", phases[2], shifted)
    import_cohort("reference", tmp_path / "src", tmp_path / "out", resample=True)
    case = load_case(tmp_path / "out" / "shifted")
    # 2dyn voxel i lies where pre voxel i + 1 lies: on the pre grid it moves up by one.
    np.testing.assert_allclose(case.phase("2dyn")[1:], phases[2][:-1], atol=1e-4)
    np.testing.assert_array_equal(case.phase("2dyn")[0], 0.0)
    np.testing.assert_array_equal(case.phase("3dyn"), phases[3])


# --- cohort-level behaviour ------------------------------------------------------------


def test_missing_source_folder_raises(tmp_path):
    with pytest.raises(InputError, match="source folder not found"):
        import_cohort("reference", tmp_path / "nowhere", tmp_path / "out")


def test_nothing_imported_raises_input_error_with_the_reasons(tmp_path):
    _write_reference(tmp_path / "src", "four", n_phases=4)
    with pytest.raises(InputError, match="no case could be imported") as error:
        import_cohort("reference", tmp_path / "src", tmp_path / "out")
    assert error.value.summary.skipped[0][0] == "four"
    assert not (tmp_path / "out").exists()


def test_option_of_another_kind_is_refused(tmp_path):
    _write_reference(tmp_path / "src", "a")
    with pytest.raises(InputError, match="--annotations: does not apply to reference"):
        import_cohort("reference", tmp_path / "src", tmp_path / "out", annotations=tmp_path)


def test_bad_times_option_is_refused(tmp_path):
    _write_reference(tmp_path / "src", "a")
    with pytest.raises(InputError, match="--times: times must be strictly increasing"):
        import_cohort("reference", tmp_path / "src", tmp_path / "out", times_s=[0, 90, 60])


def test_case_ids_select_cases_ignoring_case_and_report_unknown_ones(tmp_path):
    for case_id in ("a", "B", "c"):
        _write_reference(tmp_path / "src", case_id)
    calls = []
    summary = import_cohort(
        "reference",
        tmp_path / "src",
        tmp_path / "out",
        case_ids=["b", "A", "zz"],
        progress=lambda *args: calls.append(args),
    )
    assert summary.written == ["B", "a"]
    assert summary.skipped == [("zz", f"--cases zz: not found in {tmp_path / 'src'}")]
    assert calls == [("B", 1, 2), ("a", 2, 2)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["B", "a"]


# --- MAMA-MIA --------------------------------------------------------------------------


def test_mamamia_case_insensitive_names_nested_json_times_and_binary_seg(tmp_path):
    src = tmp_path / "src"
    info = {"imaging_data": {"scanner": "x", "acquisition_times": [0, 90.5, 180, 270]}}
    phases = _write_mamamia(src, "DUKE_001", 4, info)
    summary = import_cohort("mama-mia", src, tmp_path / "out")
    assert summary.written == ["DUKE_001"]
    case = load_case(tmp_path / "out" / "DUKE_001")
    assert case.source == "mama-mia"
    assert case.times_s == [0.0, 90.5, 180.0, 270.0]
    assert case.extra["times_origin"] == "pre_acquisition_start"
    np.testing.assert_allclose(case.affine, LPS_AFFINE)
    np.testing.assert_array_equal(case.phase("3dyn"), _to_lps(phases[3]))
    np.testing.assert_array_equal(case.seg, _to_lps(_lesion_mask()))


def test_mamamia_times_from_spreadsheet_with_post_contrast_offsets_only(tmp_path):
    src = tmp_path / "src"
    _write_mamamia(src, "ISPY2_100", 4, info=None)
    book = openpyxl.Workbook()
    book.active.title = "notes"
    sheet = book.create_sheet("dataset_info")
    sheet.append(["patient_id", "age", "acquisition_times"])
    sheet.append(["ISPY2_100", 50, "[100, 200, 300]"])
    book.save(src / "clinical_and_imaging_info.xlsx")
    import_cohort("mama-mia", src, tmp_path / "out")
    assert load_case(tmp_path / "out" / "ISPY2_100").times_s == [0.0, 100.0, 200.0, 300.0]


def test_mamamia_tree_of_mixed_protocols_imports_and_trains_iterunet(tmp_path):
    src = tmp_path / "src"
    # Protocols as the collection's dataset_info sheet writes them: seconds from the start
    # of the pre scan, as the text of a list.
    protocols = {"DUKE_010": "[0, 584, 714, 846, 977]", "ISPY1_020": "[0, 165, 288, 411]"}
    protocols["NACT_030"] = protocols["ISPY1_020"]
    book = openpyxl.Workbook()
    sheet = book.create_sheet("dataset_info")
    sheet.append(["patient_id", "dataset", "acquisition_times"])
    for patient, times in protocols.items():
        _write_mamamia(src, patient, len(json.loads(times)), info=None)
        sheet.append([patient, patient.split("_")[0], times])
    book.save(src / "clinical_and_imaging_info.xlsx")
    data, run = tmp_path / "data", tmp_path / "run"

    imported = CliRunner().invoke(app, ["import", "mama-mia", str(src), "--out", str(data)])
    assert imported.exit_code == 0, imported.output
    for patient, times in protocols.items():
        assert load_case(data / patient).times_s == [float(t) for t in json.loads(times)]
    trained = CliRunner().invoke(
        app, ["train", str(data), "--out", str(run), "--preset", "demo", "--max-steps", "2"]
    )
    assert trained.exit_code == 0, trained.output
    assert RunDir(run).config.n_targets == 3
    assert RunDir(run).best_weights.is_file()


def test_unilateral_sagittal_case_is_skipped_naming_the_mask_to_supply(tmp_path):
    src, patient = tmp_path / "src", "ISPY1_1001"
    body, breasts = _anatomy()
    x = np.arange(SHAPE[0])[:, None, None]
    one_breast = breasts & (x >= SHAPE[0] // 2)
    # Sagittal storage: voxel axes (A-P, S-I, R-L) of the RAS-ordered arrays.
    sagittal = np.array(
        [[0, 0, VOXEL_MM, 0], [VOXEL_MM, 0, 0, 0], [0, VOXEL_MM, 0, 0], [0, 0, 0, 1]]
    )
    to_sagittal = (1, 2, 0)
    images = _breast_images(3, body, one_breast, np.random.default_rng(0))
    for k, image in enumerate(images):
        path = src / "images" / patient / f"{patient.lower()}_{k:04d}.nii.gz"
        _save(path, image.transpose(to_sagittal).astype(np.float32), sagittal)
    seg = _lesion_mask().transpose(to_sagittal).astype(np.uint8)
    _save(src / "segmentations" / "expert" / f"{patient.lower()}.nii.gz", seg, sagittal)
    times = [0, 90, 180]

    with pytest.raises(NothingImportedError) as error:
        import_cohort("mama-mia", src, tmp_path / "out", times_s=times)
    assert error.value.summary.skipped == [
        (
            patient,
            f"{patient}: automatic breast mask found no cleavage between two breasts "
            "(unilateral or non-axial scan?); supply its breast mask (1 inside the breast, "
            f"on its pre phase's grid) as DIR/{patient}.nii.gz and pass --roi-dir DIR",
        )
    ]
    mask = one_breast.transpose(to_sagittal).astype(np.uint8)
    _save(tmp_path / "rois" / f"{patient}.nii.gz", mask, sagittal)
    import_cohort("mama-mia", src, tmp_path / "out", times_s=times, roi_dir=tmp_path / "rois")
    case = load_case(tmp_path / "out" / patient)
    assert case.extra["roi_automatic"] is False and case.extra["roi_derived"] is True
    expected = _fibroglandular(one_breast) | (_lesion_mask() > 0)
    np.testing.assert_array_equal(case.roi, expected.transpose(to_sagittal))


def test_mamamia_without_times_is_skipped_unless_times_given(tmp_path):
    src = tmp_path / "src"
    _write_mamamia(src, "NACT_01", 3, info={"imaging_data": {"acquisition_times": None}})
    with pytest.raises(NothingImportedError) as error:
        import_cohort("mama-mia", src, tmp_path / "out")
    assert error.value.summary.skipped == [("NACT_01", "NACT_01: times missing and no --times")]
    import_cohort("mama-mia", src, tmp_path / "out", times_s=[0, 80, 160])
    case = load_case(tmp_path / "out" / "NACT_01")
    assert case.times_s == [0.0, 80.0, 160.0]
    assert case.extra["times_origin"] == "injection"


def test_mamamia_automatic_roi_is_the_fibroglandular_tissue_of_the_breasts(tmp_path):
    src = tmp_path / "src"
    _write_mamamia(src, "DUKE_002", 3, {"acquisition_times": [0, 90, 180]})
    import_cohort("mama-mia", src, tmp_path / "out")
    case = load_case(tmp_path / "out" / "DUKE_002")
    assert case.extra["roi_automatic"] is True and case.extra["roi_derived"] is True
    body, breasts = _anatomy()
    roi = _to_lps(case.roi.astype(bool))
    np.testing.assert_array_equal(roi, _fibroglandular(breasts) | (_lesion_mask() > 0))


def test_mamamia_roi_dir_masks_are_used(tmp_path):
    src = tmp_path / "src"
    _write_mamamia(src, "DUKE_003", 3, {"acquisition_times": [0, 90, 180]})
    _, breasts = _anatomy()
    left = breasts & (np.arange(SHAPE[0])[:, None, None] < SHAPE[0] // 2)
    _save(tmp_path / "rois" / "Duke_003.nii.gz", _to_lps(left.astype(np.uint8)), LPS_AFFINE)
    import_cohort("mama-mia", src, tmp_path / "out", roi_dir=tmp_path / "rois")
    case = load_case(tmp_path / "out" / "DUKE_003")
    assert case.extra["roi_automatic"] is False and case.extra["roi_derived"] is True
    expected = _fibroglandular(left) | (_lesion_mask() > 0)
    np.testing.assert_array_equal(_to_lps(case.roi.astype(bool)), expected)


# --- Duke (DICOM) ----------------------------------------------------------------------


def test_duke_dicom_keeps_oblique_geometry_order_and_midnight_times(tmp_path):
    phases = _write_duke(tmp_path / "src")
    summary = import_cohort("duke", tmp_path / "src", tmp_path / "out")
    assert summary.written == ["Breast_MRI_001"]
    case = load_case(tmp_path / "out" / "Breast_MRI_001")
    assert case.source == "duke"
    assert case.times_s == [0.0, 115.0, 215.0]
    assert case.extra["source_series"] == ["ax dyn pre", "ax dyn 1st pass", "ax dyn 2nd pass"]
    np.testing.assert_allclose(case.affine, _lps_geometry_as_ras(), atol=1e-4)
    for k in range(3):
        np.testing.assert_array_equal(case.phases[k], _to_lps(phases[k]))
    assert case.extra["roi_automatic"] is True
    assert case.extra["seg_is_box"] is False and not case.seg.any()


def test_duke_box_annotation_becomes_label_one_on_the_boxed_voxels(tmp_path):
    _write_duke(tmp_path / "src")
    boxes = _write_boxes(tmp_path / "Annotation_Boxes.xlsx", [("Breast_MRI_001", 5, 8, 3, 6, 2, 4)])
    import_cohort("duke", tmp_path / "src", tmp_path / "out", annotations=boxes)
    case = load_case(tmp_path / "out" / "Breast_MRI_001")
    expected = np.zeros(SHAPE, np.int16)
    expected[2:6, 4:8, 1:4] = 1  # columns 3-6 -> X, rows 5-8 -> Y, slices 2-4 -> Z
    np.testing.assert_array_equal(case.seg, expected)
    assert case.extra["seg_is_box"] is True


def test_duke_box_slices_count_in_instance_number_order(tmp_path):
    _write_duke(tmp_path / "src", reverse_instances=True)
    boxes = _write_boxes(tmp_path / "boxes.xlsx", [("Breast_MRI_001", 5, 8, 3, 6, 1, 2)])
    import_cohort("duke", tmp_path / "src", tmp_path / "out", annotations=boxes)
    case = load_case(tmp_path / "out" / "Breast_MRI_001")
    assert np.flatnonzero(case.seg.any(axis=(0, 1))).tolist() == [6, 7]


def test_duke_mapping_spreadsheet_names_the_phases(tmp_path):
    # Descriptions the heuristic cannot read: only the mapping tells pre from posts.
    series = [
        ("s1", "t1 fl3d A", "101500"),
        ("s2", "t1 fl3d B", "101640"),
        ("s3", "t1 fl3d C", "101800"),
    ]
    phases = _write_duke(tmp_path / "src", series=series)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["original_path_and_filename", "classic_path", "descriptive_path"])
    for (folder, _, _), sequence in zip(series, ("pre", "post_1", "post_2"), strict=True):
        for number in (1, 2):
            original = (
                f"DICOM_Images/Breast_MRI_001/{sequence}/Breast_MRI_001_{sequence}_0{number}.dcm"
            )
            classic = f"Duke-Breast-Cancer-MRI/Breast_MRI_001/{DUKE_STUDY}/{folder}/1-0{number}.dcm"
            sheet.append([original, classic, None])
    book.save(tmp_path / "mapping.xlsx")
    with pytest.raises(NothingImportedError):
        import_cohort("duke", tmp_path / "src", tmp_path / "heuristic")
    import_cohort("duke", tmp_path / "src", tmp_path / "out", mapping=tmp_path / "mapping.xlsx")
    case = load_case(tmp_path / "out" / "Breast_MRI_001")
    assert case.times_s == [0.0, 100.0, 180.0]
    np.testing.assert_array_equal(case.phases[2], _to_lps(phases[2]))


def test_duke_unreadable_dicom_is_skipped_with_its_path(tmp_path):
    _write_duke(tmp_path / "src", patient="Breast_MRI_001")
    _write_duke(tmp_path / "src", patient="Breast_MRI_002")
    garbage = tmp_path / "src" / "Breast_MRI_002" / DUKE_STUDY / DUKE_SERIES[0][0] / "1-99.dcm"
    garbage.write_bytes(np.random.default_rng(0).bytes(600))
    summary = import_cohort("duke", tmp_path / "src", tmp_path / "out")
    assert summary.written == ["Breast_MRI_001"]
    ((case_id, reason),) = summary.skipped
    assert case_id == "Breast_MRI_002" and reason.startswith(f"{garbage}: unreadable DICOM")


def test_duke_patient_without_pre_series_is_skipped(tmp_path):
    _write_duke(tmp_path / "src", series=DUKE_SERIES[1:])
    with pytest.raises(NothingImportedError) as error:
        import_cohort("duke", tmp_path / "src", tmp_path / "out")
    assert "no pre-contrast dynamic series" in error.value.summary.skipped[0][1]


# --- helpers ---------------------------------------------------------------------------


def test_read_table_finds_the_header_row_of_a_csv_and_normalises_keys(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("Lesion boxes\nPatient ID,Start_Row\nBreast_MRI_007,12\n,\n")
    rows = list(read_table(path, required=("patient_id", "start row")))
    assert rows == [{"patient id": "Breast_MRI_007", "start row": "12"}]


def test_read_table_without_the_required_columns_raises(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="no sheet with the columns patient_id"):
        list(read_table(path, required=("patient_id",)))


def test_dicom_time_parses_hhmmss_fraction():
    assert dicom_time_s("235930.25") == pytest.approx(86370.25)
    assert dicom_time_s("000125") == 85.0
    assert dicom_time_s("") is None


def test_automatic_breast_mask_does_not_depend_on_voxel_order():
    image = _phases(2).mean(axis=0)
    in_ras = automatic_breast_mask(image, RAS_AFFINE)
    in_lps = automatic_breast_mask(_to_lps(image), LPS_AFFINE)
    np.testing.assert_array_equal(_to_lps(in_ras), in_lps)
    body, breasts = _anatomy()
    assert not (in_ras.astype(bool) & body).any()
    assert (in_ras.astype(bool) & breasts).sum() / breasts.sum() > 0.9


def test_automatic_breast_mask_reads_no_level_from_a_slice_where_the_breasts_do_not_meet():
    body, breasts = _anatomy()
    body[:, :, 0] = False  # slice 0 holds the two breasts alone, apart
    mask = automatic_breast_mask(5.0 + 95.0 * (body | breasts), RAS_AFFINE).astype(bool)
    assert not (mask & body).any()
    assert (mask & breasts).sum() / breasts.sum() > 0.9


def test_automatic_breast_mask_refuses_an_image_without_two_breasts():
    body, _ = _anatomy()
    with pytest.raises(InputError, match="no cleavage between two breasts"):
        automatic_breast_mask(5.0 + 95.0 * body, RAS_AFFINE)


def _slab(fat, fgt, band_x=slice(20, 30), enhancement=20.0, noise=2.0, fresh_noise=False):
    """A (40, 40, 10) breast slab, open at both z ends, a fibroglandular band along y.

    Args:
        fat, fgt: pre-contrast levels of fat and of the band at x ``band_x``.
        enhancement: the band's 1dyn - pre.
        noise: standard deviation of the Gaussian noise.
        fresh_noise: 1dyn gets noise of its own, not pre's.

    Returns:
        The pre and 1dyn images, the breast mask and the band.
    """
    rng = np.random.default_rng(3)
    shape = (40, 40, 10)
    breast = np.zeros(shape, bool)
    breast[2:38, 2:38, :] = True
    band = np.zeros(shape, bool)
    band[band_x, 2:38, :] = True
    level = np.where(band, fgt, fat)
    pre = level + rng.normal(0.0, noise, shape)
    post = (level + rng.normal(0.0, noise, shape) if fresh_noise else pre) + enhancement * band
    return pre, post, breast, band


@pytest.mark.parametrize(("fat", "fgt"), [(100.0, 60.0), (15.0, 60.0)], ids=["plain", "fat-sat"])
def test_fibroglandular_roi_keeps_the_enhancing_class_without_the_skin(fat, fgt):
    spacing = (0.5, 0.5, 3.0)
    pre, post, breast, band = _slab(fat, fgt)
    roi = fibroglandular_roi(pre, post, breast, np.diag([*spacing, 1.0])).astype(bool)
    # 2 mm of skin: 4 voxels in-plane, one 3 mm slice (none at the open z ends).
    inside = np.zeros_like(breast)
    inside[6:34, 6:34, :] = True
    np.testing.assert_array_equal(roi, band & inside)


def test_fibroglandular_roi_is_not_misled_by_noise_on_a_fat_suppressed_scan():
    # A thin band, 15 above fat, enhancing by 4, noise 4 drawn anew per phase: the fat
    # voxels whose noise lifted them above the threshold show a lowered 1dyn - pre,
    # enough to make the bright class look like the one that does not enhance.
    pre, post, breast, band = _slab(
        15.0, 30.0, band_x=slice(20, 24), enhancement=4.0, noise=4.0, fresh_noise=True
    )
    roi = fibroglandular_roi(pre, post, breast, np.eye(4)).astype(bool)
    kept = band.copy()
    kept[:, :4] = kept[:, 36:] = False
    assert 2 * (roi & kept).sum() / (roi.sum() + kept.sum()) > 0.8


def test_fibroglandular_roi_refuses_a_breast_of_one_intensity():
    pre, post, breast, _ = _slab(100.0, 100.0)
    flat = np.full_like(pre, 100.0)
    with pytest.raises(InputError, match="case 7: the breast mask holds no fat and fib"):
        fibroglandular_roi(flat, post, breast, np.eye(4), where="case 7")
