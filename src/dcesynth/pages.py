"""The HTML pages of the reports: one self-contained file each, readable by a radiologist.

Plain HTML and a little CSS; every text from data is escaped (``html.escape``) and
figures arrive as PNG ``data:`` URIs from ``figures``. The paper's numbers are
printed beside ours for orientation, labelled as the paper's (different data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from dcesynth.kinetics import TYPED_CURVES
from dcesynth.metrics import PSNR_CAP_DB

LESION_METRICS = ("scc", "dtw", "curve_type_agreement", "kinetic_map_agreement", "enh_error_last")
"""Table 2 columns, in order (keys of a model's metrics.json entry)."""

KINETIC_PARAMETERS = ("ktrans_per_min", "ve", "vp", "kep_per_min")
"""The phantom's ground-truth kinetic parameters of a lesion (meta.json), in column order."""


@dataclass(frozen=True)
class CaseSummary:
    """What the evaluation page says about one scored case.

    Attributes:
        times_s: (T,) acquisition times, seconds after injection.
        shape: (X, Y, Z) voxels.
        curve_types: the real curve type of each lesion (``CurveType.label``).
    """

    times_s: list[float]
    shape: tuple[int, int, int]
    curve_types: list[str]


@dataclass(frozen=True)
class CohortLesion:
    """One row of the cohort page.

    Attributes:
        case_id: the case.
        label: the lesion's label in seg.nii.gz.
        voxels: its size in voxels.
        true_type: the curve type it was made with (meta.json), or "unknown".
        measured_type: the curve-type rule on its lesion-mean curve.
        parameters: the known ``KINETIC_PARAMETERS`` (per minute or fractions).
    """

    case_id: str
    label: int
    voxels: int
    true_type: str
    measured_type: str
    parameters: dict[str, float] = field(default_factory=dict)


PAGE_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222;
       max-width: 1320px; margin: 24px auto; padding: 0 20px; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.93em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
tr.group td { border-top: 2px solid #bbb; } tr.paper td { color: #666; background: #fafafa; }
tr.reference td { color: #555; font-style: italic; }
.verdicts { background: #f3f7fc; border-left: 4px solid #1f5fbf; padding: 6px 16px; }
.type { padding: 1px 7px; border-radius: 8px; color: white; font-size: 0.88em; }
.persistent { background: #1f5fbf; } .plateau { background: #f0a202; }
.washout { background: #d62728; } .none { background: #8c8c8c; }
.row { display: flex; flex-wrap: wrap; gap: 28px; } img { max-width: 100%; }
"""


class Markup(str):
    """Text that is already HTML and must not be escaped again."""


def _cell(value) -> str:
    return value if isinstance(value, Markup) else escape(str(value))


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML page; ``title`` is escaped, ``body`` is HTML."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{PAGE_STYLE}</style></head>\n"
        f"<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def html_table(header: Sequence, rows: Sequence[Sequence], row_classes=None) -> str:
    """A table; header and cells are escaped unless they are ``Markup``."""
    row_classes = row_classes or [""] * len(rows)
    head = "".join(f"<th>{_cell(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{css}">' + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>\n"
        for row, css in zip(rows, row_classes, strict=True)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def type_badge(curve_type: str) -> Markup:
    """A coloured chip naming a curve type (persistent, plateau, washout; others grey)."""
    css = curve_type if curve_type in {t.label for t in TYPED_CURVES} else "none"
    return Markup(f'<span class="type {css}">{escape(curve_type)}</span>')


def html_image(uri: str, alt: str) -> str:
    """An embedded PNG figure."""
    return f'<img src="{uri}" alt="{escape(alt)}">'


PAPER_NOTE = (
    "Grey rows: Chung et al., MICCAI 2025 (iterU-Net), on their own 38 test patients "
    "(3 T, 6 phases); for orientation only, not comparable with this cohort."
)
PAPER_TABLE1 = {  # phase: (PSNR dB, SSIM, enhancement error); phases at 155/225/295/365 s
    "baseline (one U-Net per phase)": {
        "2dyn": (41.0328, 0.9800, 0.1176),
        "3dyn": (40.5878, 0.9795, 0.1200),
        "4dyn": (39.5314, 0.9795, 0.2397),
        "5dyn": (39.1023, 0.9792, 0.2331),
    },
    "iterU-Net": {
        "2dyn": (41.7476, 0.9808, 0.0346),
        "3dyn": (39.9487, 0.9747, 0.0738),
        "4dyn": (39.0312, 0.9718, 0.0884),
        "5dyn": (38.1176, 0.9688, 0.0921),
    },
}
PAPER_TABLE2 = {  # (SCC, DTW, enhancement error at 5dyn)
    "w/o warm-up": (0.8390, 0.8031, 0.1233),
    "w/o temporal info": (0.8390, 0.8046, 0.1146),
    "iterU-Net": (0.9203, 0.6300, 0.0921),
}


def _interval(interval: list[float] | None, digits: int) -> str:
    return "–" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _fmt(mean: float | None, std: float | None, interval: list[float] | None, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f} {_interval(interval, digits)}"


def _model_cell(result: dict, model: str) -> str:
    return f"{model} (reference)" if model in result["reference_models"] else model


def _row_class(result: dict, model: str) -> str:
    return "reference" if model in result["reference_models"] else ""


def _table1(result: dict) -> str:
    rows, classes = [], []
    for model, entry in result["models"].items():
        for index, (phase, mean) in enumerate(entry["per_phase"].items()):
            std = entry["std"]["per_phase"][phase]
            rows.append(
                [_model_cell(result, model) if index == 0 else "", phase]
                + [
                    _fmt(mean[key], std[key], mean[f"{key}_ci95"], digits)
                    for key, digits in (("psnr", 2), ("ssim", 3), ("enh_error", 3))
                ]
            )
            classes.append(("group " if index == 0 else "") + _row_class(result, model))
    for model, phases in PAPER_TABLE1.items():
        for index, (phase, (psnr, ssim, error)) in enumerate(phases.items()):
            name = f"paper: {model}" if index == 0 else ""
            rows.append([name, phase, f"{psnr:.2f}", f"{ssim:.3f}", f"{error:.3f}"])
            classes.append("paper group" if index == 0 else "paper")
    return html_table(["Model", "Phase", "PSNR (dB) ↑", "SSIM ↑", "Enh. error ↓"], rows, classes)


def _table2(result: dict) -> str:
    rows, classes = [], []
    for model, entry in result["models"].items():
        rows.append(
            [_model_cell(result, model)]
            + [
                _fmt(entry[key], entry["std"][key], entry[f"{key}_ci95"], 3)
                for key in LESION_METRICS
            ]
        )
        classes.append(_row_class(result, model))
    for index, (model, (scc, dtw, error)) in enumerate(PAPER_TABLE2.items()):
        rows.append([f"paper: {model}", f"{scc:.3f}", f"{dtw:.3f}", "–", "–", f"{error:.3f}"])
        classes.append("paper group" if index == 0 else "paper")
    header = [
        "Model",
        "SCC ↑",
        "DTW ↓",
        "Curve-type agreement ↑",
        "Kinetic-map agreement ↑",
        "Enh. error last phase ↓",
    ]
    return html_table(header, rows, classes)


def _paired_table(result: dict) -> str:
    """One row per pair and metric; bold where the difference's interval excludes 0."""
    rows, classes = [], []
    for pair, comparisons in result["paired"].items():
        for index, (metric, values) in enumerate(comparisons.items()):
            difference = f"{values['diff']:.3f} {_interval(values['ci95'], 3)}"
            low, high = values["ci95"]
            if low > 0 or high < 0:
                difference = Markup(f"<b>{escape(difference)}</b>")
            ratio = "–"
            if values.get("ratio") is not None:
                ratio = f"{values['ratio']:.2f} {_interval(values['ratio_ci95'], 2)}"
            rows.append([pair if index == 0 else "", metric, difference, ratio])
            classes.append("group" if index == 0 else "")
    header = ["Models A − B", "Metric", "Difference A − B [95 % interval]", "Ratio A / B"]
    return html_table(header, rows, classes)


def _confusion_tables(result: dict) -> str:
    blocks = []
    for model, entry in result["models"].items():
        matrix = entry["confusion_matrix"]
        rows = [
            [type_badge(label), *counts]
            for label, counts in zip(matrix["labels"], matrix["counts"], strict=True)
        ]
        table = html_table(["real ↓ / synthesized →", *matrix["labels"]], rows)
        blocks.append(f"<div><b>{escape(_model_cell(result, model))}</b>{table}</div>")
    return '<div class="row">' + "".join(blocks) + "</div>"


def _cohort_summary(summaries: list[CaseSummary]) -> str:
    types = [curve_type for case in summaries for curve_type in case.curve_types]
    counts = ", ".join(f"{types.count(t.label)} {t.label}" for t in TYPED_CURVES)
    times = {tuple(case.times_s) for case in summaries}
    times_text = ", ".join(f"{t:g}" for t in times.pop()) + " s" if len(times) == 1 else "vary"
    shapes = sorted({" × ".join(map(str, case.shape)) for case in summaries})
    return (
        f"<p><b>{len(summaries)} cases, {len(types)} lesions</b> ({counts}; the curve-type "
        f"rule on the real images). Phase times after injection: {times_text}. "
        f"Image size: {escape(', '.join(shapes))} voxels.</p>"
    )


def evaluation_page(
    result: dict, summaries: list[CaseSummary], curves: str, strips: list[str]
) -> str:
    """The evaluation page.

    Args:
        result: the metrics.json content (``report.evaluate``).
        summaries: one per scored case.
        curves: the kinetic-curve grid (PNG URI).
        strips: image strips of the first cases (PNG URIs).
    """
    models = ", ".join(escape(m) for m in result["models"] if m not in result["reference_models"])
    references = ", ".join(escape(m) for m in result["reference_models"])
    bootstrap = result["bootstrap"]
    verdicts = "".join(f"<li>{escape(sentence)}</li>" for sentence in result["verdicts"].values())
    body = [
        f'<div class="verdicts"><p><b>Verdict.</b> Each model against copy-forward (the first '
        "post-contrast phase copied to every later phase), and iterU-Net against the baseline "
        "and the regression model, read off the 95 % intervals of "
        f"{bootstrap['resamples']} bootstrap resamples of the cases (seed {bootstrap['seed']})"
        f":</p><ul>{verdicts}</ul></div>",
        _cohort_summary(summaries),
        f"<p>Models: <b>{models}</b>. Each received the pre-contrast and first post-contrast "
        f"phases and synthesized the later ones. <i>{references}</i>: a reference, not a "
        "model; it copies the first post-contrast phase forward (no change after it). "
        "A useful model beats it.</p>",
        "<h2>Table 1. Image quality per synthesized phase</h2>",
        '<p class="note">Inside the breast ROI, in TI-normalised units (z-scored by the first '
        "post-contrast phase in the ROI). PSNR peak: the real phase's range in the ROI; "
        f"identical images count as {PSNR_CAP_DB:g} dB. Enhancement error: squared "
        "difference of the lesion mean. Mean ± SD over cases (PSNR, SSIM) or lesions, then "
        "the 95 % bootstrap interval of the mean [low, high], resampling cases.</p>",
        _table1(result),
        f'<p class="note">{escape(PAPER_NOTE)}</p>',
        "<h2>Table 2. Kinetic curves</h2>",
        '<p class="note">Per lesion, its mean over all phases. SCC: Spearman rank correlation '
        "with the real curve; DTW: dynamic time warping distance (TI-normalised); curve-type "
        "agreement: same type as the real curve; kinetic-map agreement: fraction of lesion "
        "voxels of the same voxelwise type. Mean ± SD over lesions [95 % bootstrap interval of "
        "the mean].</p>",
        _table2(result),
        f'<p class="note">{escape(PAPER_NOTE)}</p>',
        "<h2>Paired comparisons</h2>",
        '<p class="note">Each model against the reference, and iterU-Net against the baseline '
        "and the regression model, on the same resampled cases and only the phases both "
        "synthesized. Difference of the means, A − B, with its 95 % interval; bold where "
        "the interval excludes 0 (a difference beyond resampling noise). Ratio A / B of the "
        "mean errors, for the error metrics (enhancement error, DTW): below 1, A's error is "
        "smaller; – where B's error is 0. Metric names as in metrics.json.</p>",
        _paired_table(result),
        "<h2>Curve type: real vs synthesized (lesions)</h2>",
        _confusion_tables(result),
        "<h2>Kinetic curves per lesion</h2>",
        '<p class="note">Relative enhancement (S − S<sub>pre</sub>) / S<sub>pre</sub>. Colour: '
        "the curve type of that curve; line style: the model. Shaded: synthesized phases.</p>",
        html_image(curves, "kinetic curves per lesion"),
        "<h2>Images at the lesion</h2>",
        '<p class="note">The largest lesion (green outline) at its fullest slice, zoomed '
        "around it. Difference: red = synthesized too bright, blue = too dark. Last row: "
        f"kinetic colour map over the pre-contrast image. First {len(strips)} cases with "
        "lesions.</p>",
        *(html_image(strip, "real and synthesized images") for strip in strips),
    ]
    return html_page("dcesynth: synthesized delayed phases vs real", "\n".join(body))


def cohort_page(
    n_cases: int, lesions: list[CohortLesion], overview: str | None, grid: str | None
) -> str:
    """The cohort page (before any model exists).

    Args:
        n_cases: number of cases.
        lesions: one row per lesion.
        overview: all curves in one figure (PNG URI), None when there is no lesion.
        grid: one panel per lesion (PNG URI), None when there is no lesion.
    """
    rows = [
        [
            lesion.case_id,
            lesion.label,
            lesion.voxels,
            type_badge(lesion.true_type),
            type_badge(lesion.measured_type),
        ]
        + [
            f"{lesion.parameters[key]:.3g}" if key in lesion.parameters else "–"
            for key in KINETIC_PARAMETERS
        ]
        for lesion in lesions
    ]
    header = [
        "Case",
        "Lesion",
        "Voxels",
        "True type",
        "Measured type",
        "K<sup>trans</sup> (/min)",
        "v<sub>e</sub>",
        "v<sub>p</sub>",
        "k<sub>ep</sub> (/min)",
    ]
    true_types = [lesion.true_type for lesion in lesions]
    counts = ", ".join(f"{true_types.count(t.label)} {t.label}" for t in TYPED_CURVES)
    body = [
        f"<p><b>{n_cases} cases, {len(lesions)} lesions</b> ({counts}). True type: the "
        "noise-free curve type the case was made with (meta.json). Measured type: the "
        "curve-type rule on the lesion mean of the images. Curves show relative enhancement "
        "(S − S<sub>pre</sub>) / S<sub>pre</sub>, coloured by the true type.</p>",
        html_image(overview, "all lesion curves") if overview else "",
        html_table([Markup(cell) for cell in header], rows),
        "<h2>Each lesion</h2>" + html_image(grid, "kinetic curve per lesion") if grid else "",
    ]
    return html_page("dcesynth cohort: lesion kinetic curves", "\n".join(body))
