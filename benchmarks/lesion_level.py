"""How much of a lesion's late enhancement its pre and 1dyn images determine.

Ridge regressions on lesion-level numbers computed from pre and 1dyn alone predict each
later phase's lesion mean (as a change from 1dyn, in TI units); they are scored as
`evaluate` scores a model: the last phase's lesion enhancement error as a ratio to
copy-forward's (95 % case-bootstrap interval), curve-type agreement and SCC of the
lesion curves. Each predictor adds one group of numbers to the one before:

- ``ti_means``: the lesion's mean pre, 1dyn and enhancement in TI units, what a voxel
  of a TI-normalised network input shows at the lesion;
- ``relative_enhancement``: mean, 10th/50th/90th percentile and spread of the lesion's
  relative enhancement (S1 - S0) / S0, which TI-norm hides;
- ``shape``: log volume, the share of voxels on its boundary, rim minus core relative
  enhancement;
- ``context``: the ROI's mean enhancement (TI units) and median relative enhancement, and
  the relative enhancement of a 2-voxel shell around the lesion.

The last predictor (all groups) is an estimate of what a model that sees pre and 1dyn
can reach on the test cohort; ``ti_means`` alone, of what is left without the rest.

A trained model's predictions of TEST (``--pred NAME=DIR``, as `evaluate` takes them) are
scored beside them, paired with the all-group ridge, and its residual at the last phase
(real minus predicted lesion mean) is regressed on the lesion numbers: a cross-validated
R^2 above 0 says what the model misses that the numbers hold. Beside the lesions, each
model's change of the parenchyma (the ROI's non-lesion voxels) from 1dyn to the last
phase, a per-case mean in TI units, is compared with the real one across cases
(correlation, mean difference and root mean squared error).

Usage:
    python benchmarks/lesion_level.py TRAIN TEST [--pred NAME=DIR ...] [--out FILE.json]
        TRAIN, TEST: folders of cases of one protocol (e.g. `dcesynth simulate`'s)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dcesynth import metrics
from dcesynth.case import Case, find_cases, load_case, load_images
from dcesynth.data.tinorm import fit_case_norm, relative_enhancement
from dcesynth.io import InputError, atomic_write_json
from dcesynth.kinetics import curve_type_codes, lesion_labels, lesion_mean_curve
from dcesynth.scoring import FIRST_PREDICTED
from dcesynth.stats import bootstrap_ci, paired_comparison, resample_counts

FEATURE_GROUPS = {
    "ti_means": ("pre", "post", "enhancement"),
    "relative_enhancement": ("re_mean", "re_p10", "re_p50", "re_p90", "re_std"),
    "shape": ("log_volume", "boundary_share", "rim_minus_core_re"),
    "context": ("roi_enhancement", "roi_re_median", "shell_re"),
}
FEATURES = tuple(name for group in FEATURE_GROUPS.values() for name in group)
ALPHAS = np.logspace(-2, 3, 11)
"""Ridge penalties on the standardised features, chosen per target by leave-one-out."""
RESIDUAL_FOLDS = 10


class Lesions:
    """Every lesion of a cohort: features (L, F), targets (L, K), signal curves (L, T), and
    the curves of each model's predictions ``{name: (L, T)}``."""

    def __init__(self, data_dir: Path, predictions: dict[str, Path] | None = None):
        predictions = predictions or {}
        rows = []
        real_parenchyma: list[float] = []
        parenchyma: dict[str, list[float]] = {name: [] for name in predictions}
        for folder in find_cases(data_dir):
            case = load_case(folder)
            predicted = {name: predicted_series(case, pred) for name, pred in predictions.items()}
            real, *models = parenchyma_changes(case, [case.phases, *predicted.values()])
            real_parenchyma.append(real)
            for name, change in zip(predicted, models, strict=True):
                parenchyma[name].append(change)
            for row in case_lesions(case):
                row["predicted"] = {
                    name: lesion_mean_curve(series, case.seg, row["label"]).tolist()
                    for name, series in predicted.items()
                }
                rows.append(row)
        if not rows:
            raise InputError(f"{data_dir}: no lesion in any case")
        times = {tuple(row["times_s"]) for row in rows}
        if len(times) > 1 or len(next(iter(times))) < 3:
            raise InputError(f"{data_dir}: cases must share one protocol with a phase after 1dyn")
        self.times_s = np.array(rows[0]["times_s"])
        self.cases = np.unique([row["case"] for row in rows], return_inverse=True)[1]
        self.features = np.array([row["features"] for row in rows])
        self.curves = np.array([row["curve"] for row in rows])
        self.scale = np.array([row["scale"] for row in rows])
        self.predicted = {
            name: np.array([row["predicted"][name] for row in rows]) for name in predictions
        }
        # Targets: later phases' lesion means minus 1dyn's, TI units.
        self.targets = (self.curves[:, 2:] - self.curves[:, [1]]) / self.scale[:, None]
        # Per case, the parenchyma's change from 1dyn to the last phase, TI units.
        self.real_parenchyma = np.array(real_parenchyma)
        self.parenchyma = {name: np.array(values) for name, values in parenchyma.items()}


def parenchyma_changes(case: Case, series: list[np.ndarray]) -> list[float]:
    """Per series (T, X, Y, Z) of ``case``, the mean change from 1dyn to the last phase
    over the ROI's non-lesion voxels, in the case's TI units; NaN where the ROI holds
    only lesion."""
    parenchyma = (case.roi > 0) & (case.seg == 0)
    if not parenchyma.any():
        return [float("nan")] * len(series)
    scale = fit_case_norm(case.phases, case.roi, where=case.case_id).std
    return [float((one[-1] - one[1])[parenchyma].mean() / scale) for one in series]


def parenchyma_scores(real: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    """Correlation across cases (None where either side is constant), mean difference
    (predicted minus real) and root mean squared difference of per-case parenchyma
    changes ``(C,)``, NaNs left out."""
    ok = np.isfinite(real) & np.isfinite(predicted)
    real, predicted = real[ok], predicted[ok]
    constant = len(real) < 2 or np.ptp(real) == 0 or np.ptp(predicted) == 0
    return {
        "parenchyma_r": None if constant else float(np.corrcoef(real, predicted)[0, 1]),
        "parenchyma_bias": float(np.mean(predicted - real)),
        "parenchyma_rmse": float(np.sqrt(np.mean((predicted - real) ** 2))),
    }


def case_lesions(case: Case) -> list[dict]:
    """One row per lesion of ``case``: its features (``FEATURES``), signal curve, TI scale."""
    norm = fit_case_norm(case.phases, case.roi, where=case.case_id)
    pre, post = norm.forward(case.phases[0]), norm.forward(case.phases[1])
    relative = relative_enhancement(case.phases[0], case.phases[1])
    roi = case.roi > 0
    context = [float((post - pre)[roi].mean()), float(np.median(relative[roi]))]
    rows = []
    for label in lesion_labels(case.seg):
        lesion = case.seg == label
        core = ndimage.binary_erosion(lesion)
        rim = lesion & ~core
        shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & roi
        values = relative[lesion]
        core_mean = relative[core].mean() if core.any() else values.mean()
        features = [
            pre[lesion].mean(),
            post[lesion].mean(),
            (post - pre)[lesion].mean(),
            values.mean(),
            *np.percentile(values, [10, 50, 90]),
            values.std(),
            np.log(lesion.sum()),
            rim.sum() / lesion.sum(),
            relative[rim].mean() - core_mean,
            *context,
            relative[shell].mean() if shell.any() else context[1],
        ]
        rows.append(
            {
                "case": case.case_id,
                "label": label,
                "times_s": [float(t) for t in case.times_s],
                "features": [float(v) for v in features],
                "curve": lesion_mean_curve(case.phases, case.seg, label).tolist(),
                "scale": norm.std,
            }
        )
    return rows


def predicted_series(case: Case, pred_dir: Path) -> np.ndarray:
    """(T, X, Y, Z) signal: pre and 1dyn of ``case``, then ``pred_dir/CASE/{k}dyn.nii.gz``."""
    names = case.phase_names[FIRST_PREDICTED:]
    images, _ = load_images(Path(pred_dir) / case.case_id, names, case.shape, case.affine)
    return np.concatenate([case.phases[:FIRST_PREDICTED], np.stack(images)])


def predict_changes(train: Lesions, test: Lesions, columns: list[int]) -> np.ndarray:
    """(L_test, K) predicted change from 1dyn of each later phase, TI units."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, alpha_per_target=True))
    return model.fit(train.features[:, columns], train.targets).predict(test.features[:, columns])


def score(test: Lesions, changes: np.ndarray, counts: np.ndarray) -> dict:
    """A predictor's row: last-phase error ratio to copy-forward, agreement, SCC, intervals."""
    curves = test.curves.copy()
    curves[:, 2:] = test.curves[:, [1]] + changes * test.scale[:, None]
    error = (changes[:, -1] - test.targets[:, -1]) ** 2
    copy_error = test.targets[:, -1] ** 2
    paired = paired_comparison(error, copy_error, test.cases, counts, ratio=True)
    agree = curve_type_codes(curves, test.times_s) == curve_type_codes(test.curves, test.times_s)
    scc = np.array(
        [metrics.spearman(real, ours) for real, ours in zip(test.curves, curves, strict=True)]
    )
    return {
        "enh_error_last": float(error.mean()),
        "ratio_to_copy": paired["ratio"],
        "ratio_to_copy_ci95": paired["ratio_ci95"],
        "agreement": float(agree.mean()),
        "agreement_ci95": bootstrap_ci(agree.astype(float), test.cases),
        "scc": float(scc.mean()),
        "scc_ci95": bootstrap_ci(scc, test.cases),
    }


def residual_r2(features: np.ndarray, residual: np.ndarray, seed: int = 0) -> float | None:
    """Cross-validated R^2 of a ridge from lesion features (L, F) to residuals (L,); None
    when the residuals do not vary (nothing to explain)."""
    if np.ptp(residual) == 0:
        return None
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    folds = KFold(min(RESIDUAL_FOLDS, len(residual)), shuffle=True, random_state=seed)
    fitted = cross_val_predict(model, features, residual, cv=folds)
    return float(1.0 - np.mean((residual - fitted) ** 2) / np.var(residual))


def compare(train: Lesions, test: Lesions, seed: int = 0) -> dict[str, dict]:
    """``copy-1dyn``, one ridge predictor per cumulative feature group and each model of
    ``test.predicted``, scored on ``test``; models also against the last ridge."""
    if not np.array_equal(train.times_s, test.times_s):
        raise InputError(
            f"training protocol {train.times_s.tolist()} s differs from the test's "
            f"{test.times_s.tolist()} s"
        )
    counts = resample_counts(int(test.cases.max()) + 1, seed=seed)
    rows = {"copy-1dyn": score(test, np.zeros_like(test.targets), counts)}
    names: list[str] = []
    for group, features in FEATURE_GROUPS.items():
        names += features
        columns = [FEATURES.index(name) for name in names]
        label = group if len(names) == len(features) else f"+ {group}"
        changes = predict_changes(train, test, columns)
        rows[label] = score(test, changes, counts)
    ridge_error = (changes[:, -1] - test.targets[:, -1]) ** 2
    for name, curves in test.predicted.items():
        changes = (curves[:, FIRST_PREDICTED:] - test.curves[:, [1]]) / test.scale[:, None]
        error = (changes[:, -1] - test.targets[:, -1]) ** 2
        against = paired_comparison(error, ridge_error, test.cases, counts, ratio=True)
        rows[name] = {
            **score(test, changes, counts),
            "ratio_to_ridge": against["ratio"],
            "ratio_to_ridge_ci95": against["ratio_ci95"],
            "residual_r2": residual_r2(test.features, test.targets[:, -1] - changes[:, -1], seed),
            **parenchyma_scores(test.real_parenchyma, test.parenchyma[name]),
        }
    return rows


def table(rows: dict[str, dict], test: Lesions) -> str:
    """The rows as plain text, one line per predictor."""
    n_cases = int(test.cases.max()) + 1
    lines = [
        f"{len(test.cases)} test lesions in {n_cases} cases",
        f"{'predictor':<24} {'x copy at last phase':<22} {'type agr.':<18} SCC",
    ]
    for name, row in rows.items():
        ratio = f"{row['ratio_to_copy']:.2f} [{row['ratio_to_copy_ci95'][0]:.2f}, "
        ratio += f"{row['ratio_to_copy_ci95'][1]:.2f}]"
        agreement = f"{row['agreement']:.2f} [{row['agreement_ci95'][0]:.2f}, "
        agreement += f"{row['agreement_ci95'][1]:.2f}]"
        lines.append(f"{name:<24} {ratio:<22} {agreement:<18} {row['scc']:.3f}")
    for name, row in rows.items():
        if "ratio_to_ridge" in row:
            low, high = row["ratio_to_ridge_ci95"]
            r2 = "-" if row["residual_r2"] is None else f"{row['residual_r2']:.2f}"
            r = "-" if row["parenchyma_r"] is None else f"{row['parenchyma_r']:.2f}"
            lines.append(
                f"{name}: error {row['ratio_to_ridge']:.2f}x the last ridge's [{low:.2f}, "
                f"{high:.2f}]; residual R^2 on the lesion numbers {r2}; parenchyma's change "
                f"r {r}, bias {row['parenchyma_bias']:+.2f}, RMSE {row['parenchyma_rmse']:.2f} "
                "TI units"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument(
        "--pred", action="append", default=[], metavar="NAME=DIR", help="a model's predictions"
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    predictions = {}
    reserved = {"copy-1dyn", *FEATURE_GROUPS, *(f"+ {group}" for group in FEATURE_GROUPS)}
    for item in args.pred:
        name, _, folder = item.partition("=")
        if not name or not folder or name in reserved:
            parser.error(f"--pred: expected NAME=DIR with a name of a model, got {item!r}")
        predictions[name] = Path(folder)
    try:
        train, test = Lesions(args.train), Lesions(args.test, predictions)
        rows = compare(train, test)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.out:
        atomic_write_json(args.out, rows)
    print(table(rows, test))


if __name__ == "__main__":
    main()
