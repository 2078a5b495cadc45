"""Evaluate synthesized phases against the real ones; write metrics.json and HTML reports.

What is compared (Chung et al. 2025, Tables 1 and 2; conventions in ``metrics``):

- Per synthesized phase, in TI-normalised units (TI-norm fitted on the REAL case):
  PSNR and SSIM inside the breast ROI (one value per case), enhancement error per
  lesion (squared error of the lesion mean).
- Per lesion, on the synthesized series (observed phases + predicted phases): the
  lesion-mean curve against the real one by Spearman rank correlation (signal units;
  TI-norm does not change ranks) and DTW (TI-normalised curves, the units of the
  enhancement error); the curve type of both; the fraction of the lesion's voxels
  whose kinetic-map codes agree.
- Aggregates: image metrics are means (and population SDs) over cases, lesion
  metrics over all lesions of the cohort. PSNR is capped at ``metrics.PSNR_CAP_DB``.
- ``copy-1dyn`` is a reference, not a model: the first post-contrast phase copied
  forward to every later phase ("no change after 1dyn"). A useful model beats it.
- Uncertainty (``comparison``): a 95 % percentile-bootstrap interval of every mean,
  resampling cases (seeded); paired differences and error ratios of every model
  against the reference and of iterU-Net against the baseline and the regression
  model (those present), on the same resampled cases; a verdict sentence per pair,
  read off the intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dcesynth import comparison, figures, metrics
from dcesynth.case import Case, find_cases, load_case, load_images, read_meta
from dcesynth.comparison import REFERENCE_MODEL
from dcesynth.data.tinorm import TINorm, fit_case_norm
from dcesynth.io import InputError, atomic_write_bytes, atomic_write_json, check_output_dir
from dcesynth.kinetics import (
    DEFAULT_RULE,
    CurveRule,
    CurveType,
    classify_curve,
    kinetic_map,
    lesion_labels,
    lesion_mean_curve,
    relative_enhancement,
)
from dcesynth.pages import LESION_METRICS, cohort_page, evaluation_page
from dcesynth.stats import LEVEL, RESAMPLES, resample_counts

FIRST_PREDICTED = 2
"""Index of the earliest phase a model may predict (2dyn): pre and 1dyn are always inputs."""
MAX_IMAGE_CASES = 4
MAX_CURVE_PANELS = 48


class NothingEvaluatedError(InputError):
    """Every case was skipped (each one already reported to ``on_skip``)."""


def _prediction_folder(pred_dir: Path, case_dir: Path, meta: dict) -> Path:
    return Path(pred_dir) / str(meta.get("case_id", case_dir.name))


def _first_predicted(predictions: dict[str, Path], metas: dict[Path, dict]) -> dict[str, int]:
    """Each model's first predicted phase; check its prediction folder exists.

    A model predicts the same phases for every case: from its earliest ``kdyn.nii.gz``
    (k >= 2) in any case to the last phase, without gaps (``_check_predictions``).

    Args:
        predictions: model name -> prediction folder.
        metas: case folder -> its meta.json content.

    Returns:
        Model name -> index of its first predicted phase.
    """
    if not predictions:
        raise InputError("predictions: give at least one model as NAME=DIR")
    firsts = {}
    for model, pred_dir in predictions.items():
        if model == REFERENCE_MODEL:
            raise InputError(f"{model}: name reserved for the reference row, choose another")
        if not Path(pred_dir).is_dir():
            raise InputError(f"{pred_dir}: prediction folder of model {model!r} not found")
        found = []
        for case_dir, meta in metas.items():
            folder = _prediction_folder(pred_dir, case_dir, meta)
            names = meta["phases"][FIRST_PREDICTED:]
            found += [
                k
                for k, name in enumerate(names, FIRST_PREDICTED)
                if (folder / f"{name}.nii.gz").is_file()
            ]
        firsts[model] = min(found, default=FIRST_PREDICTED)
    return firsts


def _check_predictions(
    predictions: dict[str, Path], firsts: dict[str, int], case_dir: Path, meta: dict
) -> None:
    """Check that every prediction file of one case exists, before any heavy work."""
    for model, pred_dir in predictions.items():
        folder = _prediction_folder(pred_dir, case_dir, meta)
        if not folder.is_dir():
            raise InputError(f"{folder}: no predictions of model {model!r} for this case")
        for name in meta["phases"][firsts[model] :]:
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
    case_dir: Path, predictions: dict[str, Path], firsts: dict[str, int]
) -> tuple[Case, TINorm, dict[str, np.ndarray]]:
    """A real case, its TI-norm and each model's synthesized series (T, X, Y, Z)."""
    case = load_case(case_dir)
    if len(case.times_s) <= FIRST_PREDICTED:
        raise InputError(f"{case_dir}: needs a phase after 1dyn to compare")
    norm = fit_case_norm(case.phases, case.roi, where=str(case_dir))
    series = {
        model: _synthesized_series(case, pred_dir, firsts[model])
        for model, pred_dir in predictions.items()
    }
    return case, norm, series


def _lesion_curves(phases: np.ndarray, case: Case, rule: CurveRule) -> dict:
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
        real: ``{"curves": _lesion_curves(...), "map": (X, Y, Z) codes}`` of the real series.
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
            curve_type_agreement=float(real_type == synth_type),
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
        "curves": _lesion_curves(phases, case, rule),
        "map": kinetic_map(phases, case.times_s, case.roi, rule),
    }


def _square_around(mask: np.ndarray, min_size: int = 40) -> tuple[slice, slice]:
    """A square window on an (X, Y) image centred on ``mask``, 3 times its extent or more.

    The window is shifted, not cut, at the image borders (cut only if the image is
    smaller than the window).
    """
    corners = np.argwhere(mask)
    low, high = corners.min(axis=0), corners.max(axis=0) + 1
    size = max(min_size, 3 * int((high - low).max()))
    window = []
    for axis, length in enumerate(mask.shape):
        start = (low[axis] + high[axis]) // 2 - size // 2
        start = int(np.clip(start, 0, max(length - size, 0)))
        window.append(slice(start, start + size))
    return window[0], window[1]


def _case_slices(case: Case, norm: TINorm, analysed: dict, record: dict) -> figures.CaseSlices:
    """Image strip content: the largest lesion's fullest axial slice, around the lesion."""
    label = max(record["lesions"], key=lambda lesion: lesion["voxels"])["label"]
    z = int(np.argmax((case.seg == label).sum(axis=(0, 1))))
    crop = (*_square_around(case.seg[:, :, z] == label), z)
    delayed = range(FIRST_PREDICTED, len(case.times_s))
    models = [name for name in analysed if name != "real"]
    lesion_index = [lesion["label"] for lesion in record["lesions"]].index(label)
    return figures.CaseSlices(
        title=f"{case.case_id}, lesion {label}, slice z = {z}",
        phase_names=[case.phase_names[k] for k in delayed],
        real=np.stack([norm.forward(case.phases[k][crop]) for k in delayed]),
        synth={
            model: np.stack([norm.forward(analysed[model]["phases"][k][crop]) for k in delayed])
            for model in models
        },
        pre=norm.forward(case.phases[0][crop]),
        lesion=case.seg[crop] == label,
        kinetic={name: series["map"][crop] for name, series in analysed.items()},
        map_agreement={
            model: record["models"][model]["lesions"][lesion_index]["kinetic_map_agreement"]
            for model in models
        },
    )


def _curve_panel(case: Case, label: int, analysed: dict, first: int) -> figures.CurvePanel:
    """One lesion's real and synthesized curves as relative enhancement (%)."""
    lines = []
    for style, (name, series) in enumerate(analysed.items()):
        curve, curve_type = series["curves"][label]
        lines.append(figures.CurveLine(name, 100 * relative_enhancement(curve), curve_type, style))
    return figures.CurvePanel(
        title=f"{case.case_id} · lesion {label}\nreal: {lines[0].curve_type.label}",
        times_s=case.times_s,
        lines=lines,
        synthesized_after_s=case.times_s[first - 1],
    )


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def _aggregate(per_case: dict, model: str) -> dict:
    """One model's cohort entry: image metrics over cases, lesion metrics over lesions."""
    records = [case["models"][model] for case in per_case.values()]
    lesions = [lesion for record in records for lesion in record["lesions"]]
    phases = {name for record in records for name in record["per_phase"]}
    mean: dict = {"per_phase": {}}
    std: dict = {"per_phase": {}}
    for phase in sorted(phases, key=lambda name: int(name.removesuffix("dyn"))):
        mean["per_phase"][phase], std["per_phase"][phase] = {}, {}
        for key in ("psnr", "ssim"):
            values = [r["per_phase"][phase][key] for r in records if phase in r["per_phase"]]
            mean["per_phase"][phase][key], std["per_phase"][phase][key] = _mean_std(values)
        errors = [lesion["enh_error"].get(phase) for lesion in lesions]
        mean["per_phase"][phase]["enh_error"], std["per_phase"][phase]["enh_error"] = _mean_std(
            errors
        )
    for key in LESION_METRICS:
        mean[key], std[key] = _mean_std([lesion[key] for lesion in lesions])
    counts = metrics.confusion_matrix(
        [CurveType[lesion["real_type"].upper()] for lesion in lesions],
        [CurveType[lesion["synth_type"].upper()] for lesion in lesions],
    )
    mean["confusion_matrix"] = {
        "rows": "real",
        "columns": "synthesized",
        "labels": [curve_type.label for curve_type in metrics.TYPED_CURVES],
        "counts": counts.tolist(),
    }
    mean["std"] = std
    return mean


def evaluate(
    data_dir: Path,
    predictions: dict[str, Path],
    out_dir: Path,
    rule: CurveRule = DEFAULT_RULE,
    seed: int = 0,
    resamples: int = RESAMPLES,
    on_skip: Callable[[Path, InputError], None] | None = None,
) -> dict:
    """Compare each model's predicted phases with the real ones; write metrics.json, index.html.

    Args:
        data_dir: folder of case folders (``find_cases``): the real series.
        predictions: model name -> folder holding ``CASE_ID/{k}dyn.nii.gz`` for every
            case: the predicted phases (signal units, the case's shape and affine)
            from the model's first predicted phase (2dyn, later when more phases were
            inputs) to the last.
        out_dir: report folder; gets ``metrics.json`` and ``index.html``, other files
            in it are left alone. Nothing is written unless everything was computed.
        rule: the curve-type rule.
        seed: seed of the bootstrap's resampled cases.
        resamples: number of bootstrap resamples.
        on_skip: called with a case folder and the error when a case is bad; the
            case is left out and the others are scored (the bootstrap resamples only
            those). Without it a bad case raises.

    Returns:
        The content of metrics.json: ``{"cases", "lesions", "reference_models",
        "models": {NAME: {"per_phase": {"2dyn": {"psnr", "ssim", "enh_error"}, ...},
        "scc", "dtw", "curve_type_agreement", "kinetic_map_agreement",
        "enh_error_last", "confusion_matrix", "std"}}, "bootstrap", "paired",
        "verdicts", "per_case", "skipped"}``, "std" holding the SDs in the same layout
        and every scalar ``m`` having its 95 % interval ``m_ci95`` beside it;
        ``copy-1dyn`` is among the models, as a reference. "paired" and "verdicts": see
        ``comparison``; "skipped": ``{case folder name: reason}`` of the cases left out.

    Raises:
        InputError: no models, a reserved model name, a missing prediction folder,
            or no lesion in the cohort; without ``on_skip`` also a bad case (a missing
            or damaged file, a prediction of another shape or affine, no phase after
            1dyn); the message names the file. :class:`NothingEvaluatedError` when
            ``on_skip`` was given every case.
    """
    out_dir = check_output_dir(out_dir)
    skipped: dict[str, str] = {}

    def skip(case_dir: Path, exc: InputError) -> None:
        if on_skip is None:
            raise exc
        on_skip(case_dir, exc)
        skipped[case_dir.name] = " ".join(str(exc).split())

    metas = {}
    for case_dir in find_cases(data_dir):
        try:
            metas[case_dir] = read_meta(case_dir)
        except InputError as exc:
            skip(case_dir, exc)
    firsts = _first_predicted(dict(predictions), metas) | {REFERENCE_MODEL: FIRST_PREDICTED}
    case_dirs = []
    for case_dir, meta in metas.items():
        try:
            _check_predictions(dict(predictions), firsts, case_dir, meta)
            case_dirs.append(case_dir)
        except InputError as exc:
            skip(case_dir, exc)
    per_case, summaries, panels, strips = {}, [], [], []
    for case_dir in case_dirs:
        try:
            case, norm, series = _case_and_predictions(case_dir, predictions, firsts)
        except InputError as exc:
            skip(case_dir, exc)
            continue
        series[REFERENCE_MODEL] = case.phases[[0] + [1] * (len(case.times_s) - 1)]
        analysed = {"real": _analyse(case.phases, case, rule)}
        analysed |= {model: _analyse(phases, case, rule) for model, phases in series.items()}
        lesions = [
            {"label": label, "voxels": int((case.seg == label).sum()), "curve_type": t.label}
            for label, (_, t) in analysed["real"]["curves"].items()
        ]
        models = {
            model: _evaluate_model(case, norm, analysed["real"], analysed[model], firsts[model])
            for model in series
        }
        per_case[case.case_id] = record = {"lesions": lesions, "models": models}
        summaries.append({"times_s": case.times_s, "shape": case.shape, "lesions": lesions})
        for label in analysed["real"]["curves"]:
            if len(panels) < MAX_CURVE_PANELS:
                panels.append(_curve_panel(case, label, analysed, min(firsts.values())))
        if lesions and len(strips) < MAX_IMAGE_CASES:
            strips.append(figures.case_strip(_case_slices(case, norm, analysed, record)))
    if skipped and not per_case:
        raise NothingEvaluatedError(f"{data_dir}: no case could be evaluated")
    n_lesions = sum(len(record["lesions"]) for record in per_case.values())
    if n_lesions == 0:
        raise InputError(f"{data_dir}: no lesion in any seg.nii.gz; the lesion metrics need one")
    counts = resample_counts(len(per_case), resamples, seed)
    samples = {model: comparison.metric_samples(per_case, model) for model in firsts}
    paired = comparison.paired_block(samples, counts)
    result = {
        "cases": len(per_case),
        "lesions": n_lesions,
        "reference_models": [REFERENCE_MODEL],
        "models": {
            model: comparison.with_intervals(
                _aggregate(per_case, model), comparison.intervals(samples[model], counts)
            )
            for model in firsts
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "case", "level": LEVEL},
        "paired": paired,
        "verdicts": comparison.verdicts(paired, samples),
        "per_case": per_case,
        "skipped": skipped,
    }
    page = evaluation_page(result, summaries, figures.curve_grid(panels), strips)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", result)
    atomic_write_bytes(out_dir / "index.html", page.encode("utf-8"))
    return result


def write_cohort_report(data_dir: Path, out_dir: Path, rule: CurveRule = DEFAULT_RULE) -> Path:
    """Write ``out_dir/index.html``: each lesion's curve with its true and measured type.

    The page of a cohort before any model exists (``dcesynth simulate``): true types
    and kinetic parameters come from meta.json; measured curves are the lesion means
    of the images, shown as relative enhancement over time and typed by ``rule``.

    Returns:
        The page's path; other files in ``out_dir`` are left alone.
    """
    lesions, overview, panels, n_cases = [], [], [], 0
    for case_dir in find_cases(data_dir):
        case = load_case(case_dir)
        n_cases += 1
        truths = {lesion.get("label"): lesion for lesion in case.lesions}
        for label, (curve, measured) in _lesion_curves(case.phases, case, rule).items():
            truth = truths.get(label, {})
            true_type = str(truth.get("curve_type", "unknown"))
            colour = CurveType.__members__.get(true_type.upper(), measured)
            line = figures.CurveLine("lesion mean", 100 * relative_enhancement(curve), colour)
            overview.append((case.times_s, line))
            if len(panels) < MAX_CURVE_PANELS:
                title = f"{case.case_id} · lesion {label}\ntrue: {true_type}"
                title += f", measured: {measured.label}"
                panels.append(figures.CurvePanel(title, case.times_s, [line]))
            parameters = ("ktrans_per_min", "ve", "vp", "kep_per_min")
            known = {
                key: truth[key] for key in parameters if isinstance(truth.get(key), int | float)
            }
            lesions.append(
                {
                    "case_id": case.case_id,
                    "label": label,
                    "voxels": int((case.seg == label).sum()),
                    "true_type": true_type,
                    "measured_type": measured.label,
                    **known,
                }
            )
    page = cohort_page(
        n_cases,
        lesions,
        figures.curve_overview(overview) if overview else None,
        figures.curve_grid(panels) if panels else None,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "index.html", page.encode("utf-8"))
    return out_dir / "index.html"
