"""A classical model: ridge regression from voxel features of pre and 1dyn to each later phase.

Per voxel, in TI units (the case's first post-contrast phase z-scored inside the
breast ROI, as the networks see it), the features are the pre and 1dyn intensities,
their difference, the relative enhancement ``(S1 - S0) / S0`` of the signal, both
enhancement maps smoothed at a few spatial scales (a voxel's neighbourhood: lesion
size, rim against core), and the case's mean enhancement inside the ROI (background
parenchymal enhancement). Their products up to ``degree`` feed one ridge regression
per target phase, fitted to ``phase_k - 1dyn``.

Fitting samples every lesion voxel and a fixed number of other ROI voxels per case,
weighted so that each case's lesions and each case's background count alike. Only the
breast ROI is predicted; outside it the output is the first post-contrast phase.

A second, lesion-level stage reads each lesion of the case's ``seg`` as a whole, as a
reader's kinetic ROI does: its mean pre and 1dyn, the spread of its relative
enhancement, its volume, and its rim against its core. One more ridge regression maps
these to the lesion's mean change per phase, and the voxelwise prediction inside the
lesion is shifted to that mean. Nothing a voxel's neighbourhood shows carries a lesion's
size and shape so well: fitted on 1,500 phantom cases, the stage takes the 5dyn lesion
enhancement error from 0.60x to 0.57x and 0.53x copy-forward's on two test cohorts, and
curve-type agreement from 0.66 to 0.70 and from 0.62 to 0.68 (docs/method.md). A case
with no lesion labelled gets the voxelwise prediction alone.

The fitted model is a few arrays (term exponents, scaler, coefficients), stored as
safetensors with the feature names, target times and configuration in its metadata:
no pickle. It is the floor every network must beat, and a model that fits a cohort of
hundreds of cases in well under a minute.
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
from sklearn.linear_model import Ridge
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from dcesynth.case import Case
from dcesynth.data.tinorm import TINorm, fit_case_norm, relative_enhancement
from dcesynth.io import InputError, atomic_write_bytes


class MixedProtocols(InputError):
    """The training cases of a regression model do not share one protocol: case
    ``case_id``, number ``index`` of the cohort (from 0), has ``times_s`` where the cases
    before it have ``cohort_times_s``."""

    def __init__(self, case_id: str, index: int, times_s: list[float], cohort_times_s: list[float]):
        self.case_id, self.index = case_id, index
        self.times_s, self.cohort_times_s = times_s, cohort_times_s
        super().__init__(
            f"{case_id}: protocol {times_s} s differs from the cohort's {cohort_times_s} s; "
            "the regression model predicts one protocol"
        )


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
        lesion_degree, lesion_alpha: its terms' highest power and its ridge penalty.
        seed: fixes the voxel sample.
    """

    sigmas_vox: tuple[float, ...] = (1.0, 2.0, 4.0)
    degree: int = 2
    alpha: float = 10.0
    background_voxels_per_case: int = 2000
    lesion_stage: bool = True
    lesion_degree: int = 2
    lesion_alpha: float = 10.0
    seed: int = 0


def feature_names(config: RegressionConfig) -> list[str]:
    """Names of ``voxel_features``' channels, in order."""
    smoothed = [
        f"{name}_sigma{sigma:g}"
        for sigma in config.sigmas_vox
        for name in ("enhancement", "relative_enhancement")
    ]
    return ["pre", "post", "enhancement", "relative_enhancement", *smoothed, "roi_enhancement"]


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
)
"""Per lesion: mean pre, 1dyn and enhancement (TI units), the relative enhancement's mean
and percentiles, log volume, the relative enhancement of the core and of the rim (the
voxels one erosion removes) and the rim's share of the voxels, and the case's mean
enhancement inside the ROI."""


def lesion_features(case: Case, norm: TINorm) -> tuple[list[int], np.ndarray]:
    """The labels of ``case.seg``'s lesions and their (L, F) features (``LESION_FEATURES``)."""
    roi = case.roi > 0
    pre, post = norm.forward(case.phases[0]), norm.forward(case.phases[1])
    roi_enhancement = float((post - pre)[roi].mean())
    relative_map = relative_enhancement(case.phases[0], case.phases[1])
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
        cls, features: np.ndarray, targets: np.ndarray, weights, degree: int, alpha: float
    ) -> PolynomialRidge:
        """Fit on (N, F) features and (N, K) targets, with (N,) sample weights or None."""
        poly = PolynomialFeatures(degree, include_bias=False).fit(features[:1])
        terms = polynomial_terms(features, poly.powers_)
        scaler = StandardScaler().fit(terms)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        ridge = Ridge(alpha=alpha).fit((terms - scaler.mean_) / scale, targets, weights)
        return cls(
            powers=poly.powers_.astype(np.int64),
            term_mean=scaler.mean_,
            term_scale=scale,
            coef=np.atleast_2d(ridge.coef_),
            intercept=np.atleast_1d(ridge.intercept_),
        )

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


@dataclass
class RegressionModel:
    """A fitted regression model.

    Attributes:
        config: how it was fitted.
        times_s: the protocol it was fitted on (pre first); it predicts phases 2.. of it.
        voxel: the voxelwise stage, ``voxel_features`` -> ``phase_k - 1dyn`` (K targets).
        lesion: the lesion-level stage, ``lesion_features`` -> the lesion's mean
            ``phase_k - 1dyn``; None when it was not fitted.
    """

    config: RegressionConfig
    times_s: list[float]
    voxel: PolynomialRidge
    lesion: PolynomialRidge | None = None

    @property
    def n_targets(self) -> int:
        return int(self.voxel.coef.shape[0])

    @property
    def n_terms(self) -> int:
        """Polynomial terms of both stages."""
        return sum(len(stage.powers) for stage in (self.voxel, self.lesion) if stage is not None)

    def predict_change(self, case: Case, norm: TINorm, roi: np.ndarray) -> np.ndarray:
        """(N, K) predicted ``phase_k - 1dyn`` in TI units of the N voxels of ``roi``.

        Each lesion's voxels in the ROI are shifted to the lesion stage's mean change.
        """
        change = self.voxel.predict(voxel_features(case, norm, self.config)[roi])
        if self.lesion is None:
            return change
        labels, features = lesion_features(case, norm)
        if not labels:
            return change
        lesion_of_voxel = case.seg[roi]
        for label, wanted in zip(labels, self.lesion.predict(features), strict=True):
            voxels = lesion_of_voxel == label
            if voxels.any():
                change[voxels] += wanted - change[voxels].mean(axis=0)
        return change

    def predict_case(self, case: Case) -> np.ndarray:
        """(K, X, Y, Z) float32 predicted phases 2.. of ``case`` in signal units.

        Raises:
            InputError: the case's protocol is not the one the model was fitted on.
        """
        observed = [float(t) for t in case.times_s]
        if observed[: len(self.times_s)] != self.times_s[: len(observed)]:
            raise InputError(
                f"{case.case_id}: this regression model predicts the protocol {self.times_s} s; "
                f"the case has {list(case.times_s)}"
            )
        return self.predict_at(case, self.times_s[2:])

    def predict_at(self, case: Case, times_s: Sequence[float]) -> np.ndarray:
        """(len(times_s), X, Y, Z) float32 phases of ``case`` at any times, signal units.

        The predicted change from 1dyn is interpolated linearly in time between the
        fitted protocol's phases (no change at its 1dyn time) and held constant before
        and after them; at the fitted times it is ``predict_case``'s. Outside the breast
        ROI every phase is the case's 1dyn.
        """
        norm = fit_case_norm(case.phases, case.roi, where=case.case_id)
        roi = case.roi > 0
        post = norm.forward(case.phases[1][roi])
        fitted = self.predict_change(case, norm, roi)
        change = np.concatenate([np.zeros((len(post), 1)), fitted], axis=1)
        out = np.repeat(case.phases[1][None].astype(np.float32), len(times_s), axis=0)
        fitted_times_s = self.times_s[1:]
        for index, time_s in enumerate(times_s):
            # The linear interpolation's weight of each fitted phase at time_s.
            weights = [np.interp(time_s, fitted_times_s, unit) for unit in np.eye(change.shape[1])]
            out[index][roi] = norm.inverse(post + change @ np.asarray(weights))
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
            "times_s": json.dumps(self.times_s),
            "features": json.dumps(feature_names(self.config)),
            "lesion_features": json.dumps(list(LESION_FEATURES) if self.lesion is not None else []),
            "n_targets": str(self.n_targets),
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
                times_s=[float(t) for t in json.loads(metadata["times_s"])],
                voxel=PolynomialRidge(*(arrays[name] for name in STAGE_ARRAYS)),
                lesion=PolynomialRidge(*(arrays[LESION_PREFIX + name] for name in STAGE_ARRAYS))
                if LESION_PREFIX + "coef" in arrays
                else None,
            )
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: not a regression model ({exc})") from exc
        model.voxel.check(path, len(feature_names(config)), model.n_targets)
        if model.lesion is not None:
            model.lesion.check(path, len(LESION_FEATURES), model.n_targets)
        return model


def _lesion_sample(case: Case, norm: TINorm) -> tuple[np.ndarray, np.ndarray]:
    """One case's lesions: features (L, F) and mean ``phase_k - 1dyn`` targets (L, K)."""
    labels, features = lesion_features(case, norm)
    change = norm.forward(case.phases[2:]) - norm.forward(case.phases[1])
    targets = [change[:, case.seg == label].mean(axis=1) for label in labels]
    return features, np.asarray(targets, dtype=np.float64).reshape(len(labels), len(change))


def _training_sample(
    case: Case, norm: TINorm, config: RegressionConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's sampled voxels: features (N, F), targets (N, K), weights (N,)."""
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


def fit_regression(
    cases: Sequence[Callable[[], Case]],
    config: RegressionConfig = RegressionConfig(),
    on_case: Callable[[int], None] | None = None,
) -> RegressionModel:
    """Fit the model on a cohort that shares one protocol.

    Args:
        cases: loaders of the training cases (called one at a time, so the cohort is
            never in memory at once).
        config: features and fit.
        on_case: progress callback, called with the number of cases done.

    Raises:
        InputError: no case, or a protocol with no phase after 1dyn.
        MixedProtocols: cases whose protocols differ.
    """
    if not cases:
        raise InputError("regression: no training case")
    rng = np.random.default_rng(config.seed)
    features, targets, weights, times_s = [], [], [], None
    lesion_rows, lesion_targets = [], []
    for done, load in enumerate(cases, 1):
        case = load()
        if times_s is None:
            times_s = [float(t) for t in case.times_s]
            if len(times_s) < 3:
                raise InputError(f"{case.case_id}: the regression needs a phase after 1dyn")
        elif [float(t) for t in case.times_s] != times_s:
            raise MixedProtocols(case.case_id, done - 1, list(case.times_s), times_s)
        norm = fit_case_norm(case.phases, case.roi, where=case.case_id)
        sample = _training_sample(case, norm, config, rng)
        for store, part in zip((features, targets, weights), sample, strict=True):
            store.append(part)
        if config.lesion_stage:
            rows, lesion_change = _lesion_sample(case, norm)
            lesion_rows.append(rows)
            lesion_targets.append(lesion_change)
        if on_case:
            on_case(done)
    voxel = PolynomialRidge.fit(
        np.concatenate(features),
        np.concatenate(targets),
        np.concatenate(weights),
        config.degree,
        config.alpha,
    )
    lesion = None
    if sum(len(rows) for rows in lesion_rows):
        lesion = PolynomialRidge.fit(
            np.concatenate(lesion_rows),
            np.concatenate(lesion_targets),
            None,
            config.lesion_degree,
            config.lesion_alpha,
        )
    return RegressionModel(config=config, times_s=times_s, voxel=voxel, lesion=lesion)
