"""evaluate() and the HTML reports on two tiny synthetic cases and hand-made predictions."""

import json
from html import escape

import numpy as np
import pytest
from typer.testing import CliRunner

from dcesynth.case import PAPER_TIMES_S, Case, phase_names, save_case
from dcesynth.cli import app
from dcesynth.data.tinorm import fit_case_norm
from dcesynth.io import InputError, save_nifti
from dcesynth.metrics import PSNR_CAP_DB
from dcesynth.pages import LESION_METRICS
from dcesynth.report import REFERENCE_MODEL, evaluate, write_cohort_report

SHAPE = (32, 32, 16)
LESION = (slice(12, 18), slice(12, 18), slice(6, 10))
SHIFT = 8.0
"""Signal added to every predicted phase of the "shifted" model."""
ENHANCEMENT = {  # relative enhancement per phase, pre first
    "washout": [0.0, 1.2, 1.05, 0.95, 0.9, 0.8],
    "persistent": [0.0, 0.5, 0.7, 0.9, 1.0, 1.1],
}
PREDICTED = phase_names(6)[2:]
PHASE_METRICS = ("psnr", "ssim", "enh_error")
MODEL_KEYS = {"per_phase", *LESION_METRICS, "confusion_matrix", "std"}
"""A model's metrics.json keys other than the intervals."""


def _case(case_id: str, curve_type: str, seed: int) -> Case:
    """A breast box with slowly enhancing tissue and one cubic lesion of ``curve_type``."""
    rng = np.random.default_rng(seed)
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[4:28, 4:28, 2:14] = 1
    seg = np.zeros(SHAPE, dtype=np.int16)
    seg[LESION] = 1
    base = np.where(roi > 0, 100.0 + 5.0 * rng.normal(size=SHAPE), 20.0)
    phases = []
    for k, time_s in enumerate(PAPER_TIMES_S):
        image = base * (1.0 + 0.2 * time_s / 365.0)
        image[LESION] = base[LESION] * (1.0 + ENHANCEMENT[curve_type][k])
        phases.append(image)
    lesion = {"label": 1, "curve_type": curve_type, "ktrans_per_min": 0.5, "ve": 0.3}
    return Case(
        case_id=case_id,
        phases=np.stack(phases).astype(np.float32),
        times_s=list(PAPER_TIMES_S),
        seg=seg,
        roi=roi,
        affine=np.eye(4),
        source="phantom",
        lesions=[lesion],
    )


def _write_predictions(case: Case, folder, shift: float = 0.0, names=PREDICTED) -> None:
    (folder / case.case_id).mkdir(parents=True)
    for name in names:
        save_nifti(folder / case.case_id / f"{name}.nii.gz", case.phase(name) + shift, case.affine)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two cases on disk, a perfect and a shifted model's predictions, one evaluation."""
    root = tmp_path_factory.mktemp("study")
    cases = [_case("case_a", "washout", 0), _case("case_b", "persistent", 1)]
    for case in cases:
        save_case(case, root / "data")
        _write_predictions(case, root / "perfect")
        _write_predictions(case, root / "shifted", shift=SHIFT)
    predictions = {"perfect": root / "perfect", "shifted": root / "shifted"}
    result = evaluate(root / "data", predictions, root / "report")
    return root, cases, result


def test_metrics_json_follows_the_contract(study):
    root, _, result = study
    written = json.loads((root / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert written == result
    assert written["cases"] == 2
    assert list(written["models"]) == ["perfect", "shifted", REFERENCE_MODEL]
    for entry in written["models"].values():
        assert list(entry["per_phase"]) == PREDICTED
        for values in entry["per_phase"].values():
            assert set(values) == {*PHASE_METRICS, *(f"{key}_ci95" for key in PHASE_METRICS)}
        for key in ("scc", "dtw", "curve_type_agreement"):
            assert isinstance(entry[key], float)
        assert set(entry) == MODEL_KEYS | {f"{key}_ci95" for key in LESION_METRICS}
        assert set(entry["std"]) == {"per_phase", *LESION_METRICS}


def test_every_scalar_metric_has_a_bootstrap_interval_around_its_mean(study):
    result = study[2]
    assert result["bootstrap"] == {"resamples": 2000, "seed": 0, "unit": "case", "level": 0.95}
    for entry in result["models"].values():
        scalars = [(entry, key) for key in LESION_METRICS]
        scalars += [
            (values, key) for values in entry["per_phase"].values() for key in PHASE_METRICS
        ]
        for metrics, key in scalars:
            low, high = metrics[f"{key}_ci95"]
            assert low <= metrics[key] + 1e-12 and metrics[key] <= high + 1e-12


def test_paired_block_compares_every_model_with_copy_on_every_metric(study):
    result = study[2]
    assert list(result["paired"]) == [
        f"perfect - {REFERENCE_MODEL}",
        f"shifted - {REFERENCE_MODEL}",
    ]
    expected = [f"{key}_{phase}" for phase in PREDICTED for key in PHASE_METRICS]
    for comparisons in result["paired"].values():
        assert list(comparisons) == expected + list(LESION_METRICS)
        for metric, values in comparisons.items():
            is_error = metric.startswith("enh_error") or metric == "dtw"
            keys = {"diff", "ci95", "ratio", "ratio_ci95"} if is_error else {"diff", "ci95"}
            assert set(values) == keys
    perfect = result["paired"][f"perfect - {REFERENCE_MODEL}"]
    assert perfect["enh_error_5dyn"]["ratio"] == 0.0
    assert perfect["enh_error_5dyn"]["diff"] == pytest.approx(
        -result["models"][REFERENCE_MODEL]["per_phase"]["5dyn"]["enh_error"]
    )
    assert result["verdicts"][f"perfect - {REFERENCE_MODEL}"].startswith(
        "perfect beat copy-forward on the lesion enhancement error at the last phase"
    )


def test_iterunet_is_paired_with_baseline_and_regression_when_present(study, tmp_path):
    root = study[0]
    predictions = {
        "iterunet": root / "shifted",
        "baseline": root / "perfect",
        "regression": root / "shifted",
    }
    result = evaluate(root / "data", predictions, tmp_path / "report", resamples=200)
    assert list(result["paired"])[-2:] == ["iterunet - baseline", "iterunet - regression"]
    same = result["paired"]["iterunet - regression"]["enh_error_last"]
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "ratio": 1.0, "ratio_ci95": [1.0, 1.0]}
    assert result["verdicts"]["iterunet - regression"].startswith(
        "iterunet did not beat regression"
    )
    assert result["paired"]["iterunet - baseline"]["enh_error_last"]["ratio"] is None
    assert result["verdicts"]["iterunet - baseline"].startswith("iterunet was worse than baseline")


def test_metrics_json_is_strict_json_without_nan_or_infinity(study):
    root, _, _ = study

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads(
        (root / "report" / "metrics.json").read_text(encoding="utf-8"), parse_constant=reject
    )


def test_perfect_predictions_score_perfectly(study):
    perfect = study[2]["models"]["perfect"]
    for values in perfect["per_phase"].values():
        assert values["psnr"] == PSNR_CAP_DB
        assert values["ssim"] == pytest.approx(1.0)
        assert values["enh_error"] == 0.0
    assert perfect["scc"] == pytest.approx(1.0)
    assert perfect["dtw"] == 0.0
    assert perfect["curve_type_agreement"] == 1.0
    assert perfect["kinetic_map_agreement"] == 1.0
    assert perfect["confusion_matrix"]["counts"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_shifted_predictions_have_the_squared_normalised_shift_as_enhancement_error(study):
    _, cases, result = study
    expected = np.mean([(SHIFT / fit_case_norm(c.phases, c.roi).std) ** 2 for c in cases])
    for values in result["models"]["shifted"]["per_phase"].values():
        assert values["enh_error"] == pytest.approx(expected, rel=1e-4)
        assert values["psnr"] < PSNR_CAP_DB
    assert result["models"]["shifted"]["enh_error_last"] == pytest.approx(expected, rel=1e-4)


def test_copy_1dyn_reference_flattens_every_curve_to_plateau(study):
    reference = study[2]["models"][REFERENCE_MODEL]
    assert study[2]["reference_models"] == [REFERENCE_MODEL]
    assert reference["curve_type_agreement"] == 0.0
    assert reference["confusion_matrix"]["counts"] == [[0, 1, 0], [0, 0, 0], [0, 1, 0]]


def test_per_case_lists_every_lesion_with_real_and_synthesized_type(study):
    per_case = study[2]["per_case"]
    assert set(per_case) == {"case_a", "case_b"}
    lesion = per_case["case_a"]["models"]["shifted"]["lesions"][0]
    assert lesion["real_type"] == "washout"
    assert set(lesion["enh_error"]) == set(PREDICTED)


def test_report_page_has_both_tables_and_embedded_figures(study):
    page = (study[0] / "report" / "index.html").read_text(encoding="utf-8")
    assert "Table 1. Image quality per synthesized phase" in page
    assert "Table 2. Kinetic curves" in page
    assert page.count("data:image/png;base64,") == 3  # curves + one strip per case
    assert "paper: iterU-Net" in page
    assert 'src="http' not in page


def test_report_page_opens_with_the_verdicts_and_shows_intervals_and_paired_table(study):
    result = study[2]
    page = (study[0] / "report" / "index.html").read_text(encoding="utf-8")
    verdict = escape(result["verdicts"][f"shifted - {REFERENCE_MODEL}"])
    assert page.index(verdict) < page.index("Table 1.")
    shifted = result["models"]["shifted"]
    low, high = shifted["enh_error_last_ci95"]
    assert f"{shifted['enh_error_last']:.3f} ± " in page and f"[{low:.3f}, {high:.3f}]" in page
    assert "Paired comparisons" in page and f"shifted - {REFERENCE_MODEL}" in page


def test_predictions_from_a_later_phase_are_scored_from_that_phase(study, tmp_path):
    root, cases, _ = study
    for case in cases:
        _write_predictions(case, tmp_path / "late", shift=SHIFT, names=PREDICTED[1:])
    result = evaluate(root / "data", {"late": tmp_path / "late"}, tmp_path / "report")
    assert list(result["models"]["late"]["per_phase"]) == PREDICTED[1:]
    assert list(result["models"][REFERENCE_MODEL]["per_phase"]) == PREDICTED
    paired = result["paired"][f"late - {REFERENCE_MODEL}"]
    assert "enh_error_2dyn" not in paired and "psnr_2dyn" not in paired
    assert "enh_error_3dyn" in paired


def test_cli_evaluate_prints_the_verdicts_after_the_table(study, tmp_path):
    root = study[0]
    args = ["evaluate", str(root / "data"), "--pred", f"shifted={root / 'shifted'}"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    sentence = "shifted beat copy-forward on the lesion enhancement error at the last phase"
    assert result.output.index("2 cases") < result.output.index(sentence)


def test_missing_prediction_case_names_the_folder_and_writes_nothing(study, tmp_path):
    root, cases, _ = study
    partial = tmp_path / "partial"
    _write_predictions(cases[0], partial)
    with pytest.raises(InputError, match=str(partial / "case_b")):
        evaluate(root / "data", {"partial": partial}, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_missing_predicted_phase_is_named(study, tmp_path):
    root, cases, _ = study
    for case in cases:
        _write_predictions(case, tmp_path / "gap")
    (tmp_path / "gap" / "case_b" / "3dyn.nii.gz").unlink()
    with pytest.raises(InputError, match="case_b/3dyn.nii.gz"):
        evaluate(root / "data", {"gap": tmp_path / "gap"}, tmp_path / "report")


def test_prediction_of_the_wrong_shape_is_named(study, tmp_path):
    root, cases, _ = study
    for case in cases:
        _write_predictions(case, tmp_path / "bad")
    save_nifti(tmp_path / "bad" / "case_a" / "4dyn.nii.gz", np.zeros((8, 8, 8)), np.eye(4))
    with pytest.raises(InputError, match="case_a/4dyn.nii.gz: shape"):
        evaluate(root / "data", {"bad": tmp_path / "bad"}, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_reference_name_is_reserved(study, tmp_path):
    with pytest.raises(InputError, match=REFERENCE_MODEL):
        evaluate(study[0] / "data", {REFERENCE_MODEL: study[0] / "perfect"}, tmp_path / "r")


def test_cohort_report_lists_each_case_and_true_type(study, tmp_path):
    page = write_cohort_report(study[0] / "data", tmp_path / "cohort").read_text(encoding="utf-8")
    for case_id in ("case_a", "case_b"):
        assert case_id in page
    assert '<span class="type washout">washout</span>' in page
    assert "data:image/png;base64," in page
