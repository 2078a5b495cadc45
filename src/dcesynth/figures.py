"""Figures of the reports, as base64 PNG ``data:`` URIs for self-contained pages.

Drawn with matplotlib's object API (``Figure`` + Agg canvas): no global pyplot
state, no display needed. Colours follow the breast CAD convention: persistent
blue, plateau orange, washout red.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dcesynth.kinetics import TYPED_CURVES, CurveType

TYPE_COLOURS = {
    CurveType.NONE: "#8c8c8c",
    CurveType.PERSISTENT: "#1f5fbf",
    CurveType.PLATEAU: "#f0a202",
    CurveType.WASHOUT: "#d62728",
}
KINETIC_CMAP = ListedColormap([TYPE_COLOURS[t] for t in CurveType])
LINE_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v")]
DPI = 80


def png_data_uri(figure: Figure) -> str:
    """Render ``figure`` to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class CurveLine:
    """One kinetic curve of a panel.

    Attributes:
        label: legend name of its line style ("real", a model name, "lesion mean").
        values_pct: (T,) relative enhancement in percent.
        curve_type: its type, which sets the colour.
        style: index into ``LINE_STYLES``; 0 (solid, circles) is the real curve.
    """

    label: str
    values_pct: np.ndarray
    curve_type: CurveType
    style: int = 0


@dataclass
class CurvePanel:
    """One small plot: a lesion's curves over time.

    Attributes:
        title: panel title (case, lesion, type).
        times_s: (T,) seconds after injection.
        lines: the curves drawn.
        synthesized_after_s: shade the times after this one as synthesized; None: none.
    """

    title: str
    times_s: Sequence[float]
    lines: list[CurveLine]
    synthesized_after_s: float | None = None


def _style(index: int) -> dict:
    linestyle, marker = LINE_STYLES[index % len(LINE_STYLES)]
    return {"linestyle": linestyle, "marker": marker}


def _legend(target, style_labels: dict[int, str], **kwargs) -> None:
    handles = [
        Line2D([], [], color="black", label=label, **_style(style))
        for style, label in sorted(style_labels.items())
    ]
    handles += [
        Line2D([], [], color=TYPE_COLOURS[t], linewidth=6, label=t.label) for t in TYPED_CURVES
    ]
    target.legend(handles=handles, frameon=False, **kwargs)


def curve_grid(panels: Sequence[CurvePanel], columns: int = 4) -> str:
    """Small multiples of kinetic curves, one panel per lesion, one shared legend (PNG URI)."""
    columns = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    style_labels: dict[int, str] = {}
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel.synthesized_after_s is not None:
            ax.axvspan(panel.synthesized_after_s, max(panel.times_s), color="#ececec", zorder=0)
        for line in panel.lines:
            style_labels.setdefault(line.style, line.label)
            width = 2.4 if line.style == 0 else 1.4
            ax.plot(
                panel.times_s,
                line.values_pct,
                color=TYPE_COLOURS[line.curve_type],
                markersize=4,
                linewidth=width,
                **_style(line.style),
            )
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("time after injection (s)", fontsize=8)
        ax.set_ylabel("enhancement (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    _legend(figure, style_labels, loc="outside upper center", ncol=8)
    return png_data_uri(figure)


def curve_overview(curves: Sequence[tuple[Sequence[float], CurveLine]]) -> str:
    """All curves in one plot, coloured by type (a cohort at a glance; PNG URI).

    Args:
        curves: ``(times_s, line)`` pairs, times (T,) in seconds after injection.
    """
    figure = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = figure.subplots()
    for times_s, line in curves:
        ax.plot(
            times_s,
            line.values_pct,
            color=TYPE_COLOURS[line.curve_type],
            marker="o",
            markersize=3,
            linewidth=1.2,
            alpha=0.8,
        )
    ax.set_xlabel("time after injection (s)")
    ax.set_ylabel("relative enhancement (%)")
    ax.grid(alpha=0.3)
    _legend(ax, {}, loc="upper left", fontsize=8)
    return png_data_uri(figure)


@dataclass
class CaseSlices:
    """What the image strip of one case shows, all (X, Y) at one axial slice.

    Attributes:
        title: figure title (case id, slice).
        phase_names: the synthesized phases, one row each.
        real: (P, X, Y) real phases, TI-normalised.
        synth: model name -> (P, X, Y) synthesized phases, TI-normalised.
        pre: (X, Y) pre-contrast image, TI-normalised.
        lesion: (X, Y) bool, the lesion outlined.
        kinetic: "real" and each model name -> (X, Y) kinetic-map codes.
        map_agreement: model name -> fraction of the lesion's voxels whose codes agree.
    """

    title: str
    phase_names: list[str]
    real: np.ndarray
    synth: dict[str, np.ndarray]
    pre: np.ndarray
    lesion: np.ndarray
    kinetic: dict[str, np.ndarray]
    map_agreement: dict[str, float]


def _show(ax, image: np.ndarray, **kwargs):
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)


def _grey(ax, image: np.ndarray, window, lesion: np.ndarray) -> None:
    _show(ax, image, cmap="gray", vmin=window[0], vmax=window[1])
    if lesion.any():
        ax.contour(lesion.T.astype(float), levels=[0.5], colors="#39ff14", linewidths=0.8)


def case_strip(slices: CaseSlices) -> str:
    """Real | synthesized | difference per phase and model, then kinetic maps (PNG URI).

    Rows: one per synthesized phase, then the kinetic colour map over the pre image.
    Columns: real, then per model its image and its difference (synth - real). Grey
    levels share one window (the real slices' 0.5-99.5 percentiles); the difference
    scale is +-30 % of that window.
    """
    models = list(slices.synth)
    rows, columns = len(slices.phase_names) + 1, 1 + 2 * len(models)
    figure = Figure(figsize=(1.45 * columns + 0.7, 1.45 * rows + 0.3), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    window = np.percentile(slices.real, [0.5, 99.5])
    limit = 0.3 * max(float(window[1] - window[0]), 1e-6)
    for row, phase in enumerate(slices.phase_names):
        _grey(axes[row, 0], slices.real[row], window, slices.lesion)
        axes[row, 0].set_ylabel(phase, fontsize=9)
        for index, model in enumerate(models):
            synth = slices.synth[model][row]
            _grey(axes[row, 1 + 2 * index], synth, window, np.zeros_like(slices.lesion))
            difference = _show(
                axes[row, 2 + 2 * index],
                synth - slices.real[row],
                cmap="RdBu_r",
                vmin=-limit,
                vmax=limit,
            )
    axes[0, 0].set_title("real", fontsize=9)
    for index, model in enumerate(models):
        axes[0, 1 + 2 * index].set_title(model, fontsize=9)
        axes[0, 2 + 2 * index].set_title(f"{model} − real", fontsize=9)
    kinetic_row = axes[rows - 1]
    kinetic_row[0].set_ylabel("kinetic map", fontsize=9)
    map_axes = [kinetic_row[0], *kinetic_row[1::2]]
    for ax, name in zip(map_axes, ["real", *models], strict=True):
        _grey(ax, slices.pre, window, slices.lesion)
        codes = slices.kinetic[name]
        _show(
            ax,
            np.ma.masked_where(codes == 0, codes),
            cmap=KINETIC_CMAP,
            vmin=-0.5,
            vmax=3.5,
            alpha=0.75,
        )
    for ax, model in zip(kinetic_row[2::2], models, strict=True):
        ax.axis("off")
        agreement = 100 * slices.map_agreement[model]
        ax.text(
            0.5,
            0.5,
            f"lesion voxels\nof the same type:\n{agreement:.0f} %",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
    figure.suptitle(slices.title, fontsize=10)
    bar = figure.colorbar(difference, ax=axes[:-1, -1], shrink=0.7)
    bar.set_label("synth − real (TI-norm units)", fontsize=8)
    return png_data_uri(figure)
