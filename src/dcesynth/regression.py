"""A classical model: ridge regression from features of pre and 1dyn to the later change.

Per voxel, in the units of ``config.normalisation`` (TI units: the case's first
post-contrast phase z-scored inside the breast ROI, as the paper's networks see it; or
referenced to the pre-contrast mean, ``data.tinorm.fit_input_norm``), the features are
the pre and 1dyn intensities, their difference, the relative enhancement
``(S1 - S0) / S0`` of the signal, both enhancement maps smoothed at a few spatial
scales (a voxel's neighbourhood: lesion size, rim against core), the case's mean
enhancement inside the ROI (background parenchymal enhancement), the log of 1dyn's
time after the pre scan and the blood's relative enhancement at 1dyn
(``arterial_enhancement``), against which an early uptake is read. Their products up
to ``degree`` feed a ridge regression with one output per knot, a time after 1dyn: the
change from 1dyn there.

Time is continuous: the model predicts the change at a few knots, and a prediction
interpolates the knots' changes linearly to any time (no change at 1dyn). It is fitted
at each training case's own phases, through that interpolation, so a phase between two
knots is fitted where it was acquired rather than read onto the knots. A cohort of one
protocol has its later phases as knots, so the model is then one regression per phase;
a cohort of mixed protocols and times has knots every ``knot_spacing_s``. Features that
do not vary in training (1dyn's time, in a cohort of one protocol) take no term.

Fitting samples every lesion voxel and a fixed number of other ROI voxels per case,
weighted so that each case's lesions and each case's background count alike. Only the
breast ROI is predicted; outside it the output is the first post-contrast phase.

A second, lesion-level stage reads each lesion of the case's ``seg`` as a whole, as a
reader's kinetic ROI does: its mean pre and 1dyn, the spread of its relative
enhancement (on the map smoothed at ``lesion_sigma_vox``), its volume, and its rim
against its core. One more ridge regression maps these to the lesion's mean change,
and the voxelwise prediction inside the lesion is shifted to that mean. Nothing a
voxel's neighbourhood shows carries a lesion's size and shape so well: fitted on 1,500
phantom cases, the stage takes the 5dyn lesion enhancement error from 0.60x to 0.57x
and 0.53x copy-forward's on two test cohorts, and curve-type agreement from 0.66 to
0.70 and from 0.62 to 0.68 (docs/method.md). A case with no lesion labelled gets the
voxelwise prediction alone.

The fitted model is a few arrays (term exponents, scaler, coefficients), stored as
safetensors with the feature names, knots and configuration in its metadata: no
pickle. It is the floor every network must beat, and a model that fits a cohort of
hundreds of cases in minutes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save
from scipy import ndimage
from sklearn.preprocessing import PolynomialFeatures

from dcesynth.case import Case
from dcesynth.data.tinorm import NORMALISATIONS, TINorm, fit_input_norm, relative_enhancement
from dcesynth.io import InputError, atomic_write_bytes


@dataclass(frozen=True)
class RegressionConfig:
    """Features and fit of the regression model.

    Attributes:
        sigmas_vox: Gaussian smoothing scales of the enhancement maps, voxels.
        degree: highest total power of the feature products.
        alpha: ridge penalty on the standardised terms.
        background_voxels_per_case: non-lesion ROI voxels sampled per training case.
        lesion_stage: fit the lesion-level stage (module docstring) when the training
            cases hold lesions.
        lesion_degree: its terms' highest power.
        lesion_alpha: its ridge penalty per training lesion: the stage's penalty is this
            times the number of lesions, so a cohort of 100 lesions and one of 2,000 are
            held to the same strength. The stage has about 120 terms per knot; on cohorts
            of mixed protocols their fit reaches past what the lesions pin down, and
            shrinking it harder than the voxel stage keeps predictions on shifted cohorts
            close to the average change (docs/method.md).
        lesion_sigma_vox: Gaussian smoothing of the relative enhancement map that the
            lesion stage's statistics are read on, voxels (0: none). Below the SNR that
            training saw, noise widens a lesion's raw percentiles and moves its means
            less; smoothing keeps them where training had them.
        normalisation: the intensity map of features and targets, one of
            ``NORMALISATIONS``: ``"ti"`` (TI-norm) or ``"pre"`` (referenced to the
            pre-contrast mean, whose scale noise and contrast uptake do not move).
        knot_spacing_s: spacing of the knots of a cohort whose times after 1dyn take more
            than ``max_protocol_knots`` values.
        max_protocol_knots: up to this many distinct times after 1dyn in the cohort, they
            are the knots.
        knot_coverage: fraction of the training cases that must reach a knot (at least
            one case); later knots are dropped, and predictions hold the last knot's
            change after it.
        seed: fixes the voxel sample.
    """

    sigmas_vox: tuple[float, ...] = (1.0, 2.0, 4.0)
    degree: int = 2
    alpha: float = 10.0
    background_voxels_per_case: int = 2000
    lesion_stage: bool = True
    lesion_degree: int = 2
    lesion_alpha: float = 0.05
    lesion_sigma_vox: float = 1.0
    normalisation: str = "ti"
    knot_spacing_s: float = 60.0
    max_protocol_knots: int = 12
    knot_coverage: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"regression.normalisation must be one of {NORMALISATIONS}, "
                f"got {self.normalisation!r}"
            )

    def case_norm(self, case: Case) -> TINorm:
        """The map of ``case``'s intensities to the model's units."""
        return fit_input_norm(case.phases, case.roi, self.normalisation, where=case.case_id)


def feature_names(config: RegressionConfig) -> list[str]:
    """Names of ``voxel_features``' channels, in order."""
    smoothed = [
        f"{name}_sigma{sigma:g}"
        for sigma in config.sigmas_vox
        for name in ("enhancement", "relative_enhancement")
    ]
    return [
        "pre",
        "post",
        "enhancement",
        "relative_enhancement",
        *smoothed,
        "roi_enhancement",
        "log_first_post_min",
        "arterial_enhancement",
    ]


def log_first_post_min(case: Case) -> float:
    """The natural log of 1dyn's time after the pre scan, in minutes.

    The change after 1dyn depends most steeply on 1dyn's time when 1dyn is early and the
    uptake still rising; a quadratic in log time follows that where one in time cannot.
    """
    return float(np.log((case.times_s[1] - case.times_s[0]) / 60.0))


ARTERIAL_PERCENTILE = 99.5
"""Percentile of the body's smoothed relative enhancement read as the blood's: on the
phantom the heart alone is about 3 % of the volume, more than any lesion."""


def arterial_enhancement(pre: np.ndarray, post: np.ndarray, sigma_vox: float = 2.0) -> float:
    """The relative enhancement of the most enhancing tissue at 1dyn: the blood's, when the
    field of view holds the heart or large vessels.

    It tells how much contrast agent had reached the blood by 1dyn, which a lesion's early
    uptake is read against: the same uptake comes from fast kinetics under a weak or late
    bolus and from slow kinetics under a strong, early one. Read as the
    ``ARTERIAL_PERCENTILE`` percentile of the relative enhancement over the body, the
    voxels whose pre-contrast signal is above 10 % of the image's 99th percentile (air and
    lung left out), smoothed within the body (Gaussian, ``sigma_vox``) so that noise does
    not make it.

    Args:
        pre, post: (X, Y, Z) signal of the pre-contrast phase and of 1dyn.
    """
    pre = np.asarray(pre, dtype=np.float32)
    body = pre > 0.1 * np.percentile(pre, 99)
    relative = np.where(body, relative_enhancement(pre, post), 0.0)
    # Normalised convolution: air's meaningless ratios do not bleed into the body's edge.
    weight = ndimage.gaussian_filter(body.astype(np.float32), sigma_vox)
    smoothed = ndimage.gaussian_filter(relative, sigma_vox) / np.maximum(weight, 1e-6)
    return float(np.percentile(smoothed[body], ARTERIAL_PERCENTILE))


def voxel_features(case: Case, norm: TINorm, config: RegressionConfig) -> np.ndarray:
    """(X, Y, Z, F) float32 features of a case's pre and 1dyn (``feature_names``)."""
    pre, post = norm.forward(case.phases[0]), norm.forward(case.phases[1])
    enhancement = post - pre
    relative = relative_enhancement(case.phases[0], case.phases[1])
    channels = [pre, post, enhancement, relative]
    for sigma in config.sigmas_vox:
        channels += [
            ndimage.gaussian_filter(enhancement, sigma),
            ndimage.gaussian_filter(relative, sigma),
        ]
    roi = case.roi > 0
    channels.append(np.full_like(pre, float(enhancement[roi].mean())))
    channels.append(np.full_like(pre, log_first_post_min(case)))
    channels.append(np.full_like(pre, arterial_enhancement(case.phases[0], case.phases[1])))
    return np.stack(channels, axis=-1)


LESION_FEATURES = (
    "pre",
    "post",
    "enhancement",
    "relative_enhancement",
    "relative_enhancement_p10",
    "relative_enhancement_p50",
    "relative_enhancement_p90",
    "log_volume_mm3",
    "core_relative_enhancement",
    "rim_relative_enhancement",
    "rim_fraction",
    "roi_enhancement",
    "log_first_post_min",
    "arterial_enhancement",
)
"""Per lesion: mean pre, 1dyn and enhancement (normalised units), the relative enhancement's mean
and percentiles, log volume, the relative enhancement of the core and of the rim (the
voxels one erosion removes) and the rim's share of the voxels, the case's mean
enhancement inside the ROI, the log of 1dyn's time after the pre scan and the blood's
relative enhancement at 1dyn. The relative enhancement is read on the map smoothed at
``RegressionConfig.lesion_sigma_vox``."""


def lesion_features(
    case: Case, norm: TINorm, config: RegressionConfig
) -> tuple[list[int], np.ndarray]:
    """The labels of ``case.seg``'s lesions and their (L, F) features (``LESION_FEATURES``)."""
    roi = case.roi > 0
    pre, post = norm.forward(case.phases[0]), norm.forward(case.phases[1])
    roi_enhancement = float((post - pre)[roi].mean())
    relative_map = relative_enhancement(case.phases[0], case.phases[1])
    if config.lesion_sigma_vox > 0:
        relative_map = ndimage.gaussian_filter(relative_map, config.lesion_sigma_vox)
    arterial = arterial_enhancement(case.phases[0], case.phases[1])
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(case.affine, dtype=float)[:3, :3])))
    labels, rows = [], []
    for label, box in enumerate(ndimage.find_objects(case.seg.astype(np.int32)), start=1):
        if box is None:
            continue
        # One voxel of margin, so that the erosion sees the lesion's outside.
        box = tuple(
            slice(max(b.start - 1, 0), min(b.stop + 1, n))
            for b, n in zip(box, case.shape, strict=True)
        )
        mask = case.seg[box] == label
        relative = relative_map[box][mask]
        core = ndimage.binary_erosion(mask)[mask]
        labels.append(label)
        rows.append(
            [
                pre[box][mask].mean(),
                post[box][mask].mean(),
                (post[box] - pre[box])[mask].mean(),
                relative.mean(),
                *np.percentile(relative, (10, 50, 90)),
                np.log(mask.sum() * voxel_mm3),
                relative[core].mean() if core.any() else relative.mean(),
                # Erosion always removes a lesion's boundary: the rim is never empty.
                relative[~core].mean(),
                1.0 - core.mean(),
                roi_enhancement,
                log_first_post_min(case),
                arterial,
            ]
        )
    return labels, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(LESION_FEATURES))


def polynomial_terms(features: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """(N, F) features -> (N, P) products, term p = prod_f features[:, f] ** powers[p, f]."""
    terms = np.ones((features.shape[0], powers.shape[0]), dtype=np.float64)
    for term, exponents in enumerate(powers):
        for feature in np.flatnonzero(exponents):
            terms[:, term] *= features[:, feature].astype(np.float64) ** int(exponents[feature])
    return terms


STAGE_ARRAYS = ("powers", "term_mean", "term_scale", "coef", "intercept")
"""The arrays of a ``PolynomialRidge``, as the model file names them."""
LESION_PREFIX = "lesion_"
"""Prefix of the lesion stage's arrays in the model file."""


@dataclass
class PolynomialRidge:
    """Ridge regression on the standardised products of features up to a degree.

    Attributes:
        powers: (P, F) exponents of the polynomial terms.
        term_mean, term_scale: (P,) standardisation of the terms.
        coef: (K, P) coefficients, one row per target; intercept: (K,).
    """

    powers: np.ndarray
    term_mean: np.ndarray
    term_scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    @classmethod
    def fit(
        cls,
        blocks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]],
        degree: int,
        alpha: float,
    ) -> PolynomialRidge:
        """Fit K outputs that are seen only through linear combinations of them.

        Each block is (features (N, F), observed (N, T), weights (N,) or None, design
        (T, K)): the block's samples' observed value t is ``design[t] @ outputs``. One
        ridge regression (penalty ``alpha`` on the standardised terms, none on the
        intercepts) is fitted to every observation at once, so a case whose phases fall
        between knots is fitted at its phases, not at values interpolated onto the knots.
        A NaN observation leaves that value out. Terms of features that are constant over
        the samples are left out: they carry nothing.
        """
        features = np.concatenate([block[0] for block in blocks])
        varying = np.ptp(features, axis=0) > 0
        powers = PolynomialFeatures(degree, include_bias=False).fit(features[:1]).powers_
        powers = powers[~(powers[:, ~varying] > 0).any(axis=1)].astype(np.int64)
        terms = polynomial_terms(features, powers)
        term_mean = terms.mean(axis=0)
        term_scale = terms.std(axis=0)
        term_scale = np.where(term_scale > 0, term_scale, 1.0)
        n_terms, n_outputs = len(powers) + 1, blocks[0][3].shape[1]
        normal = np.zeros((n_terms * n_outputs,) * 2)
        moment = np.zeros((n_terms, n_outputs))
        start = 0
        for block_features, observed, weights, design in blocks:
            rows = slice(start, start + len(block_features))
            start = rows.stop
            # The intercept is the last column: no penalty falls on it.
            design_matrix = np.column_stack(
                [(terms[rows] - term_mean) / term_scale, np.ones(len(block_features))]
            )
            weights = np.ones(len(design_matrix)) if weights is None else np.asarray(weights)
            seen = np.isfinite(observed)
            for pattern in np.unique(seen, axis=0):
                samples = (seen == pattern).all(axis=1)
                z, y, mix = (
                    design_matrix[samples],
                    observed[np.ix_(samples, pattern)],
                    design[pattern],
                )
                weighted = z * weights[samples, None]
                normal += np.kron(mix.T @ mix, weighted.T @ z)
                moment += weighted.T @ y @ mix
        penalty = np.tile(np.r_[np.full(n_terms - 1, alpha), 0.0], n_outputs)
        solution = np.linalg.lstsq(
            normal + np.diag(penalty), moment.flatten(order="F"), rcond=None
        )[0].reshape((n_terms, n_outputs), order="F")
        return cls(powers, term_mean, term_scale, solution[:-1].T, solution[-1])

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, K) predictions."""
        terms = (polynomial_terms(features, self.powers) - self.term_mean) / self.term_scale
        return terms @ self.coef.T + self.intercept

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        # safetensors writes an array's memory as it lies: a transposed view (scikit-learn's
        # coefficients may be one) would be read back scrambled.
        return {
            prefix + name: np.ascontiguousarray(
                getattr(self, name), dtype=np.int64 if name == "powers" else np.float64
            )
            for name in STAGE_ARRAYS
        }

    def check(self, path: Path, n_features: int, n_targets: int) -> None:
        """InputError naming ``path`` unless the arrays fit together and are finite."""
        if (
            self.powers.shape[1:] != (n_features,)
            or self.coef.shape != (n_targets, len(self.powers))
            or self.intercept.shape != (n_targets,)
        ):
            raise InputError(f"{path}: regression model arrays do not fit together")
        if not all(np.isfinite(a).all() for a in (self.term_mean, self.term_scale, self.coef)):
            raise InputError(f"{path}: regression model holds non-finite values")


def interpolation_matrix(nodes_s: Sequence[float], times_s: Sequence[float]) -> np.ndarray:
    """(len(times_s), len(nodes_s)) weights of linear interpolation between the nodes,
    held at the first and last node outside them: ``values_at_times = M @ values_at_nodes``."""
    return np.stack([np.interp(times_s, nodes_s, unit) for unit in np.eye(len(nodes_s))], axis=1)


@dataclass
class RegressionModel:
    """A fitted regression model.

    Attributes:
        config: how it was fitted.
        knots_s: the times after 1dyn (s, increasing, positive) at which it predicts the
            change from 1dyn; other times interpolate them.
        voxel: the voxelwise stage, ``voxel_features`` -> the change at each knot.
        lesion: the lesion-level stage, ``lesion_features`` -> the lesion's mean change
            at each knot; None when it was not fitted.
    """

    config: RegressionConfig
    knots_s: list[float]
    voxel: PolynomialRidge
    lesion: PolynomialRidge | None = None

    @property
    def n_knots(self) -> int:
        return len(self.knots_s)

    @property
    def n_terms(self) -> int:
        """Polynomial terms of both stages."""
        return sum(len(stage.powers) for stage in (self.voxel, self.lesion) if stage is not None)

    def predict_change(self, case: Case, norm: TINorm, roi: np.ndarray) -> np.ndarray:
        """(N, knots) predicted change from 1dyn, in ``norm``'s units, of the N voxels of
        ``roi``.

        Each lesion's voxels in the ROI are shifted to the lesion stage's mean change.
        """
        change = self.voxel.predict(voxel_features(case, norm, self.config)[roi])
        if self.lesion is None:
            return change
        labels, features = lesion_features(case, norm, self.config)
        if not labels:
            return change
        lesion_of_voxel = case.seg[roi]
        for label, wanted in zip(labels, self.lesion.predict(features), strict=True):
            voxels = lesion_of_voxel == label
            if voxels.any():
                change[voxels] += wanted - change[voxels].mean(axis=0)
        return change

    def predict_case(self, case: Case) -> np.ndarray:
        """(T - 2, X, Y, Z) float32: ``predict_at`` the case's own later phase times."""
        return self.predict_at(case, case.times_s[2:])

    def predict_at(self, case: Case, times_s: Sequence[float]) -> np.ndarray:
        """(len(times_s), X, Y, Z) float32 phases of ``case`` at any times, signal units.

        The predicted change from 1dyn is interpolated linearly in time between the knots
        (no change at 1dyn's time) and held constant before 1dyn and after the last knot.
        Outside the breast ROI every phase is the case's 1dyn.
        """
        norm = self.config.case_norm(case)
        roi = case.roi > 0
        post = norm.forward(case.phases[1][roi])
        fitted = self.predict_change(case, norm, roi)
        change = np.concatenate([np.zeros((len(post), 1)), fitted], axis=1)
        after_post_s = np.asarray(times_s, dtype=float) - float(case.times_s[1])
        weights = interpolation_matrix([0.0, *self.knots_s], after_post_s)
        out = np.repeat(case.phases[1][None].astype(np.float32), len(after_post_s), axis=0)
        for index, row in enumerate(weights):
            out[index][roi] = norm.inverse(post + change @ row)
        return out

    def predict_series(self, case: Case, times_s: Sequence[float]) -> np.ndarray:
        """(2 + len(times_s), X, Y, Z) float32: the case's pre and 1dyn, then
        ``predict_at(case, times_s)``; the prior an iterU-Net run steps from."""
        later = self.predict_at(case, times_s)
        return np.concatenate([case.phases[:2].astype(np.float32), later])

    def save(self, path: Path) -> None:
        """Write the model as safetensors (arrays + JSON metadata), atomically."""
        tensors = self.voxel.tensors("")
        if self.lesion is not None:
            tensors.update(self.lesion.tensors(LESION_PREFIX))
        metadata = {
            "model_class": "RegressionModel",
            "config": json.dumps(asdict(self.config)),
            "knots_s": json.dumps(self.knots_s),
            "features": json.dumps(feature_names(self.config)),
            "lesion_features": json.dumps(list(LESION_FEATURES) if self.lesion is not None else []),
        }
        atomic_write_bytes(Path(path), save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> RegressionModel:
        """Read a model written by ``save``; InputError naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: regression model file not found")
        try:
            with safe_open(path, framework="numpy") as handle:
                metadata = dict(handle.metadata() or {})
                arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            raw = json.loads(metadata["config"])
            config = RegressionConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            )
            model = cls(
                config=config,
                knots_s=[float(t) for t in json.loads(metadata["knots_s"])],
                voxel=PolynomialRidge(*(arrays[name] for name in STAGE_ARRAYS)),
                lesion=PolynomialRidge(*(arrays[LESION_PREFIX + name] for name in STAGE_ARRAYS))
                if LESION_PREFIX + "coef" in arrays
                else None,
            )
            stored_names = {
                key: json.loads(metadata.get(key, "[]")) for key in ("features", "lesion_features")
            }
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: not a regression model ({exc})") from exc
        if not model.knots_s or any(np.diff([0.0, *model.knots_s]) <= 0):
            raise InputError(f"{path}: regression model knots must be positive and increasing")
        lesion_names = list(LESION_FEATURES) if model.lesion is not None else []
        for key, names in (("features", feature_names(config)), ("lesion_features", lesion_names)):
            if stored_names[key] != names:
                raise InputError(
                    f"{path}: regression model was fitted on other {key.replace('_', ' ')} "
                    f"than dcesynth computes; fit it again"
                )
        model.voxel.check(path, len(feature_names(config)), model.n_knots)
        if model.lesion is not None:
            model.lesion.check(path, len(LESION_FEATURES), model.n_knots)
        return model


def _lesion_sample(
    case: Case, norm: TINorm, config: RegressionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One case's lesions: features (L, F) and mean change from 1dyn at each later phase
    (L, T - 2)."""
    labels, features = lesion_features(case, norm, config)
    change = norm.forward(case.phases[2:]) - norm.forward(case.phases[1])
    targets = [change[:, case.seg == label].mean(axis=1) for label in labels]
    return features, np.asarray(targets, dtype=np.float64).reshape(len(labels), len(change))


def _training_sample(
    case: Case, norm: TINorm, config: RegressionConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's sampled voxels: features (N, F), change from 1dyn at each later phase
    (N, T - 2), weights (N,)."""
    features = voxel_features(case, norm, config)
    lesion = case.seg > 0
    background = np.argwhere((case.roi > 0) & ~lesion)
    if len(background) > config.background_voxels_per_case:
        background = background[
            rng.choice(len(background), config.background_voxels_per_case, replace=False)
        ]
    parts = [part for part in (np.argwhere(lesion), background) if len(part)]
    index = tuple(np.concatenate(parts).T)
    weights = np.concatenate([np.full(len(part), 1.0 / len(part)) for part in parts])
    post = norm.forward(case.phases[1][index])
    targets = np.stack(
        [norm.forward(case.phases[k][index]) - post for k in range(2, len(case.times_s))], axis=-1
    )
    return features[index], targets, weights


def after_post_s(times_s: Sequence[float]) -> np.ndarray:
    """(T - 2,) times of a protocol's later phases after its 1dyn, seconds."""
    return np.asarray(times_s[2:], dtype=float) - float(times_s[1])


def choose_knots(protocols: Sequence[Sequence[float]], config: RegressionConfig) -> list[float]:
    """The knots of a cohort of these protocols (times, pre first): its distinct times
    after 1dyn when there are at most ``config.max_protocol_knots``, else every
    ``config.knot_spacing_s``; only knots that ``config.knot_coverage`` of the protocols
    (at least one) reach."""
    later = [after_post_s(times) for times in protocols]
    distinct = np.unique(np.round(np.concatenate(later), 6))
    if len(distinct) <= config.max_protocol_knots:
        candidates = distinct
    else:
        spacing = config.knot_spacing_s
        candidates = spacing * np.arange(1, int(distinct[-1] // spacing) + 2)
    last = np.array([times[-1] for times in later])
    needed = max(1, int(np.ceil(config.knot_coverage * len(later))))
    return [float(knot) for knot in candidates if (last >= knot - 1e-6).sum() >= needed]


def knot_design(times_s: Sequence[float], knots_s: Sequence[float]) -> np.ndarray:
    """(T - 2, knots) weights that make the change from 1dyn at a protocol's later phases
    from the changes at the knots: linear interpolation (no change at 1dyn). A phase after
    the last knot has a row of zeros: predictions hold the last knot's change there, which
    training does not fit to."""
    later = after_post_s(times_s)
    design = interpolation_matrix([0.0, *knots_s], later)[:, 1:]
    design[later > float(knots_s[-1]) + 1e-6] = 0.0
    return design


def fit_regression(
    cases: Sequence[Callable[[], Case]],
    config: RegressionConfig = RegressionConfig(),
    on_case: Callable[[int], None] | None = None,
) -> RegressionModel:
    """Fit the model on a cohort, of one protocol or of mixed ones.

    Args:
        cases: loaders of the training cases (called one at a time, so the cohort is
            never in memory at once).
        config: features and fit.
        on_case: progress callback, called with the number of cases done.

    Raises:
        InputError: no case, or a case with no phase after 1dyn.
    """
    if not cases:
        raise InputError("regression: no training case")
    rng = np.random.default_rng(config.seed)
    voxel_samples, lesion_samples, protocols = [], [], []
    for done, load in enumerate(cases, 1):
        case = load()
        if len(case.times_s) < 3:
            raise InputError(f"{case.case_id}: the regression needs a phase after 1dyn")
        protocols.append([float(t) for t in case.times_s])
        norm = config.case_norm(case)
        voxel_samples.append(_training_sample(case, norm, config, rng))
        if config.lesion_stage:
            lesion_samples.append(_lesion_sample(case, norm, config))
        if on_case:
            on_case(done)
    knots_s = choose_knots(protocols, config)
    designs = [knot_design(times, knots_s) for times in protocols]
    voxel = PolynomialRidge.fit(
        [(*sample, design) for sample, design in zip(voxel_samples, designs, strict=True)],
        config.degree,
        config.alpha,
    )
    lesion = None
    n_lesions = sum(len(rows) for rows, _ in lesion_samples)
    if n_lesions:
        lesion = PolynomialRidge.fit(
            [
                (features, targets, None, design)
                for (features, targets), design in zip(lesion_samples, designs, strict=True)
            ],
            config.lesion_degree,
            config.lesion_alpha * n_lesions,
        )
    return RegressionModel(config=config, knots_s=knots_s, voxel=voxel, lesion=lesion)
