"""The ROI an import derives, against the phantom's: do TI-norm units mean the same thing?

Each case of a simulated cohort goes through the importers' path for a source without a
ROI (`import_common.assemble_case`): the automatic whole-breast mask, then the paper's
ROI derived inside it (`breast_mask.fibroglandular_roi`, lesion outlines added). The
derived ROI is compared with the phantom's own `roi.nii.gz` (fibroglandular tissue and
lesions): Dice, and the mean and standard deviation of 1dyn inside it as ratios to those
inside the phantom's ROI, the two numbers TI-norm scales a case by. The whole-breast
mask's ratios stand beside them: what TI-norm would use without the derivation.

``--pool N`` averages N x N x N voxels of the images first (masks: voxels at least half
inside), so that tissue boundaries carry partial volume, which the phantom, drawn on its
own grid, does not have: simulate at N times the shape to score at the shape.

Usage:
    python benchmarks/roi.py COHORT [--pool N] [--out FILE.json]
        COHORT: a folder of `dcesynth simulate` cases
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dcesynth.case import find_cases, load_case
from dcesynth.data.breast_mask import automatic_breast_mask
from dcesynth.data.import_common import assemble_case
from dcesynth.io import InputError, atomic_write_json

MASKS = ("derived ROI", "whole breast")


def pooled(volume: np.ndarray, factor: int) -> np.ndarray:
    """(..., X, Y, Z) mean over factor^3 blocks; X, Y, Z cut to multiples of ``factor``."""
    if factor == 1:
        return volume
    shape = [size // factor for size in volume.shape[-3:]]
    cut = volume[..., : shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    blocks = cut.reshape(*volume.shape[:-3], shape[0], factor, shape[1], factor, shape[2], factor)
    return blocks.mean(axis=(-5, -3, -1))


def score_case(folder: Path, factor: int = 1) -> dict[str, dict[str, float]]:
    """Dice with the phantom's ROI and 1dyn mean and sd ratios, per mask of ``MASKS``.

    Raises:
        InputError: the case cannot be read, or its automatic breast mask fails.
    """
    case = load_case(folder)
    phases = pooled(case.phases.astype(np.float64), factor).astype(np.float32)
    roi = pooled(case.roi.astype(np.float32), factor) >= 0.5
    seg = (pooled((case.seg > 0).astype(np.float32), factor) >= 0.5).astype(np.int16)
    affine = case.affine @ np.diag([factor, factor, factor, 1.0])
    breast = automatic_breast_mask(phases.mean(axis=0), affine, where=case.case_id)
    names = ["pre", *(f"{k}dyn" for k in range(1, len(phases)))]
    imported = assemble_case(
        case.case_id,
        "benchmark",
        [(name, (phase, affine)) for name, phase in zip(names, phases, strict=True)],
        case.times_s,
        seg=("seg", (seg, affine)),
        resample=False,
        extra={},
        breast=("automatic breast mask", (breast, affine)),
    )
    post, reference = phases[1], phases[1][roi]
    scores = {}
    for name, mask in zip(MASKS, (imported.roi > 0, breast > 0), strict=True):
        inside = post[mask]
        scores[name] = {
            "dice": float(2 * (mask & roi).sum() / (mask.sum() + roi.sum())),
            "mean_ratio": float(inside.mean() / reference.mean()),
            "sd_ratio": float(inside.std() / reference.std()),
        }
    return scores


def summary(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per mask and number: median, 10th and 90th percentile over the cases."""
    return {
        mask: {
            key: [
                float(np.percentile([case[mask][key] for case in per_case], q))
                for q in (50, 10, 90)
            ]
            for key in per_case[0][mask]
        }
        for mask in MASKS
    }


def table(stats: dict[str, dict[str, list[float]]], n_cases: int, refused: int) -> str:
    lines = [
        f"{n_cases} cases scored, {refused} refused by the automatic breast mask; "
        "median [10th, 90th percentile]",
        "| mask | Dice with the phantom ROI | 1dyn mean × | 1dyn sd × |",
        "|---|---|---|---|",
    ]
    for mask, numbers in stats.items():
        cells = [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in numbers.values()]
        lines.append(f"| {mask} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--pool", type=int, default=1, help="average N^3 voxels first")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.pool < 1:
        parser.error(f"--pool: must be at least 1, got {args.pool}")
    per_case, refused = [], []
    try:
        for folder in find_cases(args.cohort):
            try:
                per_case.append(score_case(folder, args.pool))
            except InputError as exc:
                refused.append(str(exc))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not per_case:
        print(f"error: {args.cohort}: no case scored ({refused[:1]})", file=sys.stderr)
        sys.exit(2)
    stats = summary(per_case)
    if args.out:
        atomic_write_json(args.out, {"summary": stats, "cases": per_case, "refused": refused})
    print(table(stats, len(per_case), len(refused)))


if __name__ == "__main__":
    main()
