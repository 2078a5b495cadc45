"""Score one case: each model's synthesized series against the real one.

A model's predictions folder holds ``CASE_ID/{k}dyn.nii.gz`` from its first predicted
phase to the last (``ModelPredictions``); the synthesized series of a case is its real
phases before that, the predicted ones from it on. Metric conventions: ``report``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcesynth import metrics
from dcesynth.case import Case, load_case, load_images
from dcesynth.comparison import REFERENCE_MODEL
from dcesynth.data.tinorm import TINorm, fit_case_norm
from dcesynth.io import InputError
from dcesynth.kinetics import (
    CurveRule,
    classify_curve,
    kinetic_map,
    lesion_labels,
    lesion_mean_curve,
)
from dcesynth.manifest import PredictedCase, manifest_path, read_manifest

FIRST_PREDICTED = 2
"""Index of the earliest phase a model may predict (2dyn): pre and 1dyn are always inputs."""


@dataclass(frozen=True)
class ModelPredictions:
    """One model's predictions folder and the phases it predicted.

    Attributes:
        folder: holds ``CASE_ID/{k}dyn.nii.gz``.
        first: index of its first predicted phase (2 = 2dyn), the same for every case.
        manifest: case id -> how it was predicted, from the folder's manifest; None for
            predictions without one (from other tools), whose phases are read off the files.
    """

    folder: Path
    first: int
    manifest: dict[str, PredictedCase] | None


def _case_id(case_dir: Path, meta: dict) -> str:
    return str(meta.get("case_id", case_dir.name))


def _first_found(pred_dir: Path, metas: dict[Path, dict]) -> int:
    """The earliest ``kdyn.nii.gz`` (k >= 2) of any case in a folder without a manifest."""
    found = []
    for case_dir, meta in metas.items():
        folder = Path(pred_dir) / _case_id(case_dir, meta)
        names = meta["phases"][FIRST_PREDICTED:]
        found += [
            k
            for k, name in enumerate(names, FIRST_PREDICTED)
            if (folder / f"{name}.nii.gz").is_file()
        ]
    return min(found, default=FIRST_PREDICTED)


def model_predictions(
    predictions: dict[str, Path], metas: dict[Path, dict]
) -> dict[str, ModelPredictions]:
    """Each model's predictions folder, checked to exist, with its first predicted phase.

    A model predicts the same phases for every case, from its first predicted phase to
    the last: the earliest a manifest names for any of the cases, else the earliest
    ``kdyn.nii.gz`` found (``check_predictions`` checks the rest).

    Args:
        predictions: model name -> prediction folder.
        metas: case folder -> its meta.json content.
    """
    if not predictions:
        raise InputError("predictions: give at least one model as NAME=DIR")
    models = {}
    for model, pred_dir in predictions.items():
        if model == REFERENCE_MODEL:
            raise InputError(f"{model}: name reserved for the reference row, choose another")
        if not Path(pred_dir).is_dir():
            raise InputError(f"{pred_dir}: prediction folder of model {model!r} not found")
        manifest = read_manifest(pred_dir)
        if manifest is None:
            first = _first_found(pred_dir, metas)
        else:
            listed = [_case_id(case_dir, meta) for case_dir, meta in metas.items()]
            firsts = [manifest[case].first_predicted for case in listed if case in manifest]
            first = min(firsts, default=FIRST_PREDICTED)
        models[model] = ModelPredictions(Path(pred_dir), first, manifest)
    return models


def check_predictions(models: dict[str, ModelPredictions], case_dir: Path, meta: dict) -> None:
    """Check that every prediction file of one case exists, before any heavy work."""
    case_id = _case_id(case_dir, meta)
    for model, predicted in models.items():
        if predicted.manifest is not None and case_id not in predicted.manifest:
            raise InputError(
                f"{manifest_path(predicted.folder)}: no predictions of model {model!r} "
                f"for {case_id}"
            )
        folder = predicted.folder / case_id
        if not folder.is_dir():
            raise InputError(f"{folder}: no predictions of model {model!r} for this case")
        for name in meta["phases"][predicted.first :]:
            if not (folder / f"{name}.nii.gz").is_file():
                raise InputError(f"{folder / name}.nii.gz: predicted phase not found")


def _synthesized_series(case: Case, pred_dir: Path, first: int) -> np.ndarray:
    """(T, X, Y, Z) signal: the real phases before ``first``, the predicted ones from it on."""
    folder = Path(pred_dir) / case.case_id
    names = case.phase_names[first:]
    predicted, _ = load_images(folder, names, case.shape, case.affine)
    for name, image in zip(names, predicted, strict=True):
        if not np.isfinite(image).all():
            raise InputError(f"{folder / name}.nii.gz: contains NaN or infinite values")
    return np.concatenate([case.phases[:first], np.stack(predicted).astype(np.float32)])


def _case_and_predictions(
    case_dir: Path, models: dict[str, ModelPredictions]
) -> tuple[Case, TINorm, dict[str, np.ndarray]]:
    """A real case, its TI-norm and each model's synthesized series (T, X, Y, Z)."""
    case = load_case(case_dir)
    if len(case.times_s) <= FIRST_PREDICTED:
        raise InputError(f"{case_dir}: needs a phase after 1dyn to compare")
    norm = fit_case_norm(case.phases, case.roi, where=str(case_dir))
    series = {
        model: _synthesized_series(case, predicted.folder, predicted.first)
        for model, predicted in models.items()
    }
    return case, norm, series


def lesion_curves(phases: np.ndarray, case: Case, rule: CurveRule) -> dict:
    """Label -> ((T,) lesion-mean signal curve, its CurveType), for phases (T, X, Y, Z)."""
    curves = {}
    for label in lesion_labels(case.seg):
        curve = lesion_mean_curve(phases, case.seg, label)
        curves[label] = (curve, classify_curve(curve, case.times_s, rule))
    return curves


def _evaluate_model(case: Case, norm: TINorm, real: dict, synth: dict, first: int) -> dict:
    """One model's per_case entry.

    Args:
        case: the real case.
        norm: its TI-norm.
        real: ``{"curves": lesion_curves(...), "map": (X, Y, Z) codes}`` of the real series.
        synth: the same of the synthesized series, plus ``"phases"`` (T, X, Y, Z) signal.
        first: index of the first predicted phase.
    """
    per_phase = {}
    lesions = [{"label": label, "enh_error": {}} for label in real["curves"]]
    for k in range(first, len(case.times_s)):
        name = case.phase_names[k]
        real_k, synth_k = norm.forward(case.phases[k]), norm.forward(synth["phases"][k])
        for lesion in lesions:
            lesion["enh_error"][name] = metrics.enhancement_error(
                real_k, synth_k, case.seg == lesion["label"]
            )
        errors = [lesion["enh_error"][name] for lesion in lesions]
        per_phase[name] = {
            "psnr": metrics.capped_psnr(metrics.psnr(real_k, synth_k, case.roi)),
            "ssim": metrics.ssim(real_k, synth_k, case.roi),
            "enh_error": float(np.mean(errors)) if errors else None,
        }
    for lesion in lesions:
        real_curve, real_type = real["curves"][lesion["label"]]
        synth_curve, synth_type = synth["curves"][lesion["label"]]
        lesion.update(
            real_type=real_type.label,
            synth_type=synth_type.label,
            scc=metrics.spearman(real_curve, synth_curve),
            dtw=metrics.dtw_distance(norm.forward(real_curve), norm.forward(synth_curve)),
            curve_type_agreement=metrics.curve_type_agreement([real_type], [synth_type]),
            kinetic_map_agreement=metrics.kinetic_map_agreement(
                real["map"], synth["map"], case.seg == lesion["label"]
            ),
            enh_error_last=lesion["enh_error"][case.phase_names[-1]],
        )
    return {"per_phase": per_phase, "lesions": lesions}


def _analyse(phases: np.ndarray, case: Case, rule: CurveRule) -> dict:
    """A series (T, X, Y, Z) with its lesion curves and its kinetic map."""
    return {
        "phases": phases,
        "curves": lesion_curves(phases, case, rule),
        "map": kinetic_map(phases, case.times_s, case.roi, rule),
    }


@dataclass
class ScoredCase:
    """One case's scores and what its figures are drawn from.

    Attributes:
        case: the real case.
        norm: its TI-norm (fitted on the real phases).
        analysed: "real" and each model (the reference included) -> ``_analyse`` of its
            series.
        record: the case's ``per_case`` entry of metrics.json.
    """

    case: Case
    norm: TINorm
    analysed: dict[str, dict]
    record: dict


def score_case(
    case_dir: Path, models: dict[str, ModelPredictions], firsts: dict[str, int], rule: CurveRule
) -> ScoredCase:
    """Every model's scores on one case, and the copy-forward reference's."""
    case, norm, series = _case_and_predictions(case_dir, models)
    series[REFERENCE_MODEL] = case.phases[[0] + [1] * (len(case.times_s) - 1)]
    analysed = {"real": _analyse(case.phases, case, rule)}
    analysed |= {model: _analyse(phases, case, rule) for model, phases in series.items()}
    lesions = [
        {"label": label, "voxels": int((case.seg == label).sum()), "curve_type": t.label}
        for label, (_, t) in analysed["real"]["curves"].items()
    ]
    scores = {
        model: _evaluate_model(case, norm, analysed["real"], analysed[model], firsts[model])
        for model in series
    }
    return ScoredCase(case, norm, analysed, {"lesions": lesions, "models": scores})
