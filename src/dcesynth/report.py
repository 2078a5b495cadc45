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
from dcesynth.case import Case, find_cases, load_case, read_meta
from dcesynth.comparison import REFERENCE_MODEL
from dcesynth.data.tinorm import TINorm
from dcesynth.io import InputError, atomic_write_bytes, atomic_write_json, check_output_dir
from dcesynth.kinetics import (
    DEFAULT_RULE,
    TYPED_CURVES,
    CurveRule,
    CurveType,
    relative_enhancement,
)
from dcesynth.pages import (
    KINETIC_PARAMETERS,
    LESION_METRICS,
    CaseSummary,
    CohortLesion,
    cohort_page,
    evaluation_page,
)
from dcesynth.scoring import (
    FIRST_PREDICTED,
    ModelPredictions,
    ScoredCase,
    check_predictions,
    lesion_curves,
    model_predictions,
    score_case,
)
from dcesynth.stats import LEVEL, RESAMPLES, resample_counts

MAX_IMAGE_CASES = 4
MAX_CURVE_PANELS = 48


class NothingEvaluatedError(InputError):
    """Every case was skipped (each one already reported to ``on_skip``)."""


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
        "labels": [curve_type.label for curve_type in TYPED_CURVES],
        "counts": counts.tolist(),
    }
    mean["std"] = std
    return mean


class _Skips:
    """Cases left out and why; hands each to ``on_skip``, or raises without one."""

    def __init__(self, on_skip: Callable[[Path, InputError], None] | None):
        self.on_skip = on_skip
        self.reasons: dict[str, str] = {}

    def __call__(self, case_dir: Path, exc: InputError) -> None:
        if self.on_skip is None:
            raise exc
        self.on_skip(case_dir, exc)
        self.reasons[case_dir.name] = " ".join(str(exc).split())


def _read_metas(data_dir: Path, skip: _Skips) -> dict[Path, dict]:
    """Case folder -> meta.json content, for every case of ``data_dir`` that has a good one."""
    metas = {}
    for case_dir in find_cases(data_dir):
        try:
            metas[case_dir] = read_meta(case_dir)
        except InputError as exc:
            skip(case_dir, exc)
    return metas


def _ready_cases(
    models: dict[str, ModelPredictions], metas: dict[Path, dict], skip: _Skips
) -> list[Path]:
    """The case folders every model has all prediction files of."""
    ready = []
    for case_dir, meta in metas.items():
        try:
            check_predictions(models, case_dir, meta)
            ready.append(case_dir)
        except InputError as exc:
            skip(case_dir, exc)
    return ready


class _Figures:
    """The evaluation page's figures: lesion curve panels and image strips of the first cases."""

    def __init__(self, first: int):
        self.first = first
        self.panels: list[figures.CurvePanel] = []
        self.strips: list[str] = []

    def add(self, scored: ScoredCase) -> None:
        for label in scored.analysed["real"]["curves"]:
            if len(self.panels) < MAX_CURVE_PANELS:
                self.panels.append(_curve_panel(scored.case, label, scored.analysed, self.first))
        if scored.record["lesions"] and len(self.strips) < MAX_IMAGE_CASES:
            slices = _case_slices(scored.case, scored.norm, scored.analysed, scored.record)
            self.strips.append(figures.case_strip(slices))


def _summary(scored: ScoredCase) -> CaseSummary:
    lesions = scored.record["lesions"]
    return CaseSummary(
        scored.case.times_s, scored.case.shape, [lesion["curve_type"] for lesion in lesions]
    )


def _cohort_result(
    per_case: dict, models: list[str], resamples: int, seed: int, skipped: dict[str, str]
) -> dict:
    """The content of metrics.json from the scored cases (see ``evaluate``)."""
    counts = resample_counts(len(per_case), resamples, seed)
    samples = {model: comparison.metric_samples(per_case, model) for model in models}
    paired = comparison.paired_block(samples, counts)
    return {
        "cases": len(per_case),
        "lesions": sum(len(record["lesions"]) for record in per_case.values()),
        "reference_models": [REFERENCE_MODEL],
        "models": {
            model: comparison.with_intervals(
                _aggregate(per_case, model), comparison.intervals(samples[model], counts)
            )
            for model in models
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "case", "level": LEVEL},
        "paired": paired,
        "verdicts": comparison.verdicts(paired, samples),
        "per_case": per_case,
        "skipped": skipped,
    }


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
            inputs) to the last. A folder's manifest (``dcesynth.manifest``) says
            which phases and cases it holds; without one, its files do.
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
    skip = _Skips(on_skip)
    metas = _read_metas(data_dir, skip)
    models = model_predictions(dict(predictions), metas)
    firsts = {model: predicted.first for model, predicted in models.items()}
    firsts[REFERENCE_MODEL] = FIRST_PREDICTED
    per_case, summaries, drawn = {}, [], _Figures(min(firsts.values()))
    for case_dir in _ready_cases(models, metas, skip):
        try:
            scored = score_case(case_dir, models, firsts, rule)
        except InputError as exc:
            skip(case_dir, exc)
            continue
        per_case[scored.case.case_id] = scored.record
        summaries.append(_summary(scored))
        drawn.add(scored)
    if skip.reasons and not per_case:
        raise NothingEvaluatedError(f"{data_dir}: no case could be evaluated")
    if not any(record["lesions"] for record in per_case.values()):
        raise InputError(f"{data_dir}: no lesion in any seg.nii.gz; the lesion metrics need one")
    result = _cohort_result(per_case, list(firsts), resamples, seed, skip.reasons)
    page = evaluation_page(result, summaries, figures.curve_grid(drawn.panels), drawn.strips)
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
        for label, (curve, measured) in lesion_curves(case.phases, case, rule).items():
            truth = truths.get(label, {})
            true_type = str(truth.get("curve_type", "unknown"))
            colour = CurveType.__members__.get(true_type.upper(), measured)
            line = figures.CurveLine("lesion mean", 100 * relative_enhancement(curve), colour)
            overview.append((case.times_s, line))
            if len(panels) < MAX_CURVE_PANELS:
                title = f"{case.case_id} · lesion {label}\ntrue: {true_type}"
                title += f", measured: {measured.label}"
                panels.append(figures.CurvePanel(title, case.times_s, [line]))
            known = {
                key: truth[key]
                for key in KINETIC_PARAMETERS
                if isinstance(truth.get(key), int | float)
            }
            voxels = int((case.seg == label).sum())
            lesions.append(
                CohortLesion(case.case_id, label, voxels, true_type, measured.label, known)
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
