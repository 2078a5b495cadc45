"""Whole-volume prediction: sliding windows over a case, the rollout inside each window.

MONAI's ``sliding_window_inference`` cuts the TI-normalised case into windows of
the run's patch size (overlap 0.5, Gaussian blending). Inside each window the
model rolls out from the last observed phase through every target time, so the
ConvLSTM state carries across the rollout within the window. Only the breast
ROI is predicted (the paper evaluates only inside it): the windows tile the
ROI's bounding box rather than the whole volume, and a window that still holds
no ROI voxel is not run. Outside what the model ran, the output is the last
observed phase. Predictions are mapped back to signal units and written with
the input's affine, with a voxelwise kinetic map of the whole synthesized series.

A regression run (``dcesynth.regression``) needs no windows: it predicts the ROI's
voxels directly from pre and 1dyn, for the protocol it was fitted on. An iterU-Net run
with a regression prior (``ModelConfig.prior``) gets the prior's phases at the case's
times as windows beside the observed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from dcesynth.accel import accelerate, use_bf16, windows_per_call
from dcesynth.case import Case, phase_names, validate_times
from dcesynth.config import RunConfig
from dcesynth.data.tinorm import case_features, context_channels, fit_input_norm
from dcesynth.io import InputError, save_nifti, staged_directory
from dcesynth.kinetics import kinetic_map
from dcesynth.model import build_model
from dcesynth.regression import RegressionModel
from dcesynth.rundir import RunDir
from dcesynth.train.checkpoint import load_weights


@dataclass
class Prediction:
    """Synthesized phases of one case.

    Attributes:
        phases: (K, X, Y, Z) float32 predicted phases in signal units.
        names: their phase names (e.g. ``2dyn``...).
        times_s: the whole protocol's times, observed then predicted.
        n_inputs: number of observed phases (pre included).
        windows_run: windows the model ran; windows_skipped: windows of the ROI's box
            without ROI voxels, not run.
        region: ``(start, stop)`` voxel range per axis that the windows tiled.
    """

    phases: np.ndarray
    names: list[str]
    times_s: list[float]
    n_inputs: int
    windows_run: int
    windows_skipped: int
    region: tuple[tuple[int, int], ...]


@dataclass
class LoadedRun:
    """A trained model ready for prediction, with the run folder it came from, and the
    regression model its network steps from (``ModelConfig.prior``; None without)."""

    model: torch.nn.Module | RegressionModel
    config: RunConfig
    device: torch.device
    weights: Path
    run_dir: Path
    prior_model: RegressionModel | None = None


def load_run(run_dir: Path, device: torch.device | None = None) -> LoadedRun:
    """Rebuild the model of ``RUN`` from its config and load its weights for prediction."""
    run = RunDir(run_dir)
    config = run.config
    weights = run.weights_for_prediction()
    if config.model.name == "regression":
        return LoadedRun(
            RegressionModel.load(weights), config, torch.device("cpu"), weights, run.path
        )
    n_targets = run.n_targets
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = build_model(
            config.model.name,
            config.model.features,
            config.model.temporal,
            n_targets,
            config.model.pre_channels,
            config.model.n_case_features,
            prior=config.model.prior != "none",
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InputError(f"{run.config_file}: cannot build the model ({exc})") from exc
    load_weights(weights, model)
    prior_model = RegressionModel.load(run.prior_file) if model.uses_prior else None
    model = accelerate(model.to(device).eval(), device)
    return LoadedRun(model, config, device, weights, run.path, prior_model)


def input_names(text: str) -> list[str]:
    """``"pre,1dyn"`` -> phase names; they must be pre then consecutive post phases."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2 or names != phase_names(len(names)):
        raise InputError(f"--inputs: expected pre,1dyn[,2dyn...], got {text!r}")
    return names


def parse_inputs(text: str, case: Case) -> list[str]:
    """``"pre,1dyn"`` -> phase names (see ``input_names``), all of them in ``case``."""
    names = input_names(text)
    if len(names) > len(case.times_s):
        raise InputError(f"{case.case_id}: --inputs asks for {names[-1]}, the case ends earlier")
    return names


def target_times(case: Case, n_inputs: int, times_s: Sequence[float] | None) -> list[float]:
    """Times of the phases after the observed ones: from ``times_s`` (whole protocol) or meta."""
    protocol = validate_times(times_s, where="--times") if times_s is not None else case.times_s
    if protocol[:n_inputs] != case.times_s[:n_inputs]:
        raise InputError(f"{case.case_id}: --times disagree with the case's observed phase times")
    if len(protocol) <= n_inputs:
        raise InputError(
            f"{case.case_id}: nothing to predict after {phase_names(n_inputs)[-1]}; "
            "give the protocol with --times"
        )
    return list(protocol[n_inputs:])


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips over ``mirror_axes`` (spatial axes 0-2), as the tensor
    dims of a ``(B, C, x, y, z)`` window, the identity first: 2 ** len(mirror_axes) of them."""
    axes = sorted(set(mirror_axes))
    if any(axis not in (0, 1, 2) for axis in axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1, 2; got {tuple(mirror_axes)}")
    return [
        tuple(2 + axis for bit, axis in enumerate(axes) if subset >> bit & 1)
        for subset in range(2 ** len(axes))
    ]


class WindowPredictor:
    """The function sliding_window_inference calls on a batch of windows.

    A window is ``(W, 1 + n_observed + C + P + 1, x, y, z)``: pre, the observed phases,
    the model's C context channels (``context_channels``), P = 1 + n_targets prior phases
    for a model that steps from a prior (else P = 0), and as the last channel the mask
    of voxels whose prediction is needed (the breast ROI for ``predict``). Returns
    ``(W, n_targets, x, y, z)``, the model's predictions at ``times_s`` (observed then
    target times). Windows without a needed voxel are not run (the last observed phase
    stands in); ``calls`` counts the windows the model did run. With ``mirror_axes`` the
    model also runs on each window mirrored over every combination of those axes, and the
    predictions, mirrored back, are averaged (test-time mirroring, as nnU-Net predicts);
    training flips every axis, so each mirrored window is one the model learnt from.
    ``case_features`` (``(K,)``, the case's breast statistics) go with every window to a
    model built with them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n_context: int,
        times_s: torch.Tensor,
        n_targets: int,
        amp: bool,
        on_windows: Callable[[int], None] | None = None,
        mirror_axes: Sequence[int] = (),
        case_features: torch.Tensor | None = None,
        n_prior: int = 0,
    ):
        self.model, self.n_context, self.amp, self.on_windows = model, n_context, amp, on_windows
        self.n_prior = n_prior
        self.times_s = times_s
        self.case_features = case_features
        self.n_targets = n_targets
        self.flips = mirror_flips(mirror_axes)
        self.calls = 0
        self.skipped = 0

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        n_images = windows.shape[1] - 1 - self.n_context - self.n_prior
        images, needed = windows[:, :n_images], windows[:, -1]
        context, prior = windows[:, n_images:-1].split([self.n_context, self.n_prior], dim=1)
        out = images[:, -1:].expand(-1, self.n_targets, *images.shape[2:]).clone()
        active = needed.flatten(1).amax(dim=1) > 0.5
        if active.any():
            out[active] = self._predict(images[active], context[active], prior[active])
        self.calls += int(active.sum())
        self.skipped += int((~active).sum())
        if self.on_windows:
            self.on_windows(windows.shape[0])
        return out

    def _predict(
        self, images: torch.Tensor, context: torch.Tensor, prior: torch.Tensor
    ) -> torch.Tensor:
        """The rollout of windows ``images`` (W, 1 + n_observed, ...), averaged over flips."""
        pre = torch.cat([images[:, :1], context], dim=1)
        times_s = self.times_s.expand(images.shape[0], -1)
        # Only a model built with breast statistics or a prior takes them (a plain
        # callable need not).
        extra = {}
        if self.case_features is not None:
            extra["case_features"] = self.case_features.expand(images.shape[0], -1)
        total = None
        for dims in self.flips:
            flip = (lambda x, dims=dims: x.flip(dims)) if dims else (lambda x: x)
            if self.n_prior:
                extra["prior"] = flip(prior)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
                preds = self.model(flip(pre), flip(images[:, 1:]), times_s, **extra)
            preds = flip(preds.float())
            total = preds if total is None else total + preds
        return total / len(self.flips)


@dataclass
class VolumePrediction:
    """``predict_volume``'s result: ``phases`` (K, *region size) in normalised units, the
    predictions inside ``region``, the ``(start, stop)`` voxel range per axis that the
    windows tiled; and the windows run and skipped."""

    phases: torch.Tensor
    windows_run: int
    windows_skipped: int
    region: tuple[tuple[int, int], ...]


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    observed: np.ndarray,
    context: np.ndarray,
    roi: np.ndarray,
    times_s: Sequence[float],
    patch: Sequence[int],
    overlap: float = 0.5,
    amp: bool = False,
    window_batch: int | None = None,
    on_windows: Callable[[int], None] | None = None,
    needed: np.ndarray | None = None,
    mirror_axes: Sequence[int] = (),
    case_features: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> VolumePrediction:
    """The model's rollout over a whole normalised volume, by sliding windows over its ROI.

    Args:
        model: a ``PhaseModel``, on the device it runs on.
        observed: ``(T_obs, X, Y, Z)`` normalised pre then observed post-contrast phases.
        context: ``(C, X, Y, Z)`` the model's context channels (``context_channels``).
        roi: ``(X, Y, Z)`` breast ROI mask; windows tile its box (``roi_region``).
        times_s: the observed post-contrast then the target times, seconds.
        patch, overlap: window size and overlap.
        amp: bf16 autocast.
        window_batch: windows per model call (default: ``dcesynth.accel.windows_per_call``).
        on_windows: progress callback, called with the number of windows done.
        needed: ``(X, Y, Z)`` mask of the voxels whose prediction the caller uses (default:
            the ROI). Windows without one are not run. Every window that covers a needed
            voxel still runs, so the blended prediction there is the same as with the
            default; elsewhere inside the ROI it may be the last observed phase.
        mirror_axes: spatial axes to mirror each window over (``WindowPredictor``); each
            one doubles the model's work.
        case_features: ``(K,)`` the case's breast statistics, for a model built with them.
        prior: ``(1 + K, X, Y, Z)`` normalised prior phases at the last observed time and
            each target time, for a model that steps from a prior.

    Returns:
        The K = ``len(times_s) - T_obs + 1`` predicted phases inside the tiled region
        (outside it, a caller keeps the last observed phase).
    """
    device = next(model.parameters()).device
    n_targets = len(times_s) - observed.shape[0] + 1
    region = roi_region(roi, patch, overlap)
    box = tuple(slice(start, stop) for start, stop in region)
    all_ = slice(None)
    needed = roi if needed is None else needed
    prior = np.zeros((0, *observed.shape[1:]), np.float32) if prior is None else prior
    stack = np.concatenate(
        [
            observed[(all_, *box)],
            context[(all_, *box)],
            prior[(all_, *box)],
            np.asarray(needed)[box][None] > 0,
        ]
    ).astype(np.float32)
    predictor = WindowPredictor(
        model,
        context.shape[0],
        torch.tensor([float(t) for t in times_s], device=device),
        n_targets,
        amp,
        on_windows,
        mirror_axes,
        None if case_features is None else torch.as_tensor(case_features, device=device)[None],
        len(prior),
    )
    batch = window_batch or windows_per_call(device, patch)
    volume = torch.from_numpy(stack)[None].to(device)
    output = sliding_window_inference(
        volume, patch, batch, predictor, overlap=overlap, mode="gaussian"
    )
    return VolumePrediction(output[0].cpu(), predictor.calls, predictor.skipped, region)


def predict_case(
    run: LoadedRun,
    case: Case,
    inputs: str = "pre,1dyn",
    times_s: Sequence[float] | None = None,
    overlap: float = 0.5,
    amp: bool | None = None,
    window_batch: int | None = None,
    on_windows: Callable[[int], None] | None = None,
    mirror_axes: Sequence[int] = (),
) -> Prediction:
    """Synthesize the phases after ``inputs`` for a whole case.

    Args:
        run: the loaded model.
        case: the case; only its ``inputs`` phases, ROI and times are used.
        inputs: observed phases, ``pre,1dyn[,2dyn...]``.
        times_s: whole-protocol times (pre first) when the targets are not in meta.json.
        overlap: sliding-window overlap.
        amp: bf16 autocast (default: the run's setting).
        window_batch: windows per model call (default: ``dcesynth.accel.windows_per_call``).
        on_windows: progress callback, called with the number of windows done.
        mirror_axes: spatial axes of test-time mirroring (``WindowPredictor``); none by
            default. The regression model ignores them.

    Returns:
        The predicted phases with their names and times, and window counts.

    Raises:
        InputError: inputs or times that do not fit the case or the model, or a
            prediction with a non-finite voxel (the message names the run).
    """
    names = parse_inputs(inputs, case)
    targets = target_times(case, len(names), times_s)
    if isinstance(run.model, RegressionModel):
        return _finite(run, case, _predict_regression(run.model, case, names, targets, on_windows))
    try:
        run.model.check_protocol(len(names) - 1, len(targets))
    except ValueError as exc:
        raise InputError(f"{case.case_id}: {exc}") from None
    norm = fit_input_norm(case.phases, case.roi, run.config.model.normalisation, where=case.case_id)
    first = len(names)
    prior = None
    if run.prior_model is not None:
        later_s = list(case.times_s[2:first]) + targets
        prior = norm.forward(run.prior_model.predict_series(case, later_s)[first - 1 :])
    volume = predict_volume(
        run.model,
        norm.forward(case.phases[:first]),
        context_channels(case.phases[:2], run.config.model.relative_enhancement),
        case.roi,
        list(case.times_s[1:first]) + targets,
        run.config.train.patch,
        overlap,
        use_bf16(run.device, run.config.train.amp if amp is None else amp),
        window_batch,
        on_windows,
        mirror_axes=mirror_axes,
        case_features=(
            case_features(case.phases, case.roi, norm) if run.config.model.case_features else None
        ),
        prior=prior,
    )
    phases = np.repeat(case.phases[first - 1][None], len(targets), axis=0)
    box = tuple(slice(start, stop) for start, stop in volume.region)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite output is refused below
        phases[(slice(None), *box)] = norm.inverse(volume.phases.numpy())
    prediction = Prediction(
        phases=phases,
        names=phase_names(first + len(targets))[first:],
        times_s=list(case.times_s[:first]) + targets,
        n_inputs=first,
        windows_run=volume.windows_run,
        windows_skipped=volume.windows_skipped,
        region=volume.region,
    )
    return _finite(run, case, prediction)


def _finite(run: LoadedRun, case: Case, prediction: Prediction) -> Prediction:
    """``prediction`` when every voxel is finite; an InputError naming the run otherwise."""
    if not np.isfinite(prediction.phases).all():
        raise InputError(
            f"{run.run_dir}: the prediction of {case.case_id} holds NaN or infinite voxels"
        )
    return prediction


def _predict_regression(
    model: RegressionModel,
    case: Case,
    names: list[str],
    targets: list[float],
    on_windows: Callable[[int], None] | None,
) -> Prediction:
    """``predict_case`` for a regression run: one pass over the ROI, no windows."""
    if len(names) != 2:
        raise InputError(
            f"{case.case_id}: a regression model predicts from pre and 1dyn; "
            f"asked to predict from {','.join(names)}"
        )
    phases = model.predict_at(case, targets)
    if on_windows:
        on_windows(1)
    return Prediction(
        phases=phases,
        names=phase_names(2 + len(targets))[2:],
        times_s=list(case.times_s[:2]) + targets,
        n_inputs=2,
        windows_run=1,
        windows_skipped=0,
        region=tuple((0, size) for size in case.shape),
    )


def progress_units(run: LoadedRun, case: Case, overlap: float) -> int:
    """How many units ``predict_case`` reports through ``on_windows`` for ``case``."""
    if isinstance(run.model, RegressionModel):
        return 1
    return count_region_windows(case.roi, run.config.train.patch, overlap)


def roi_region(
    roi: np.ndarray, patch: Sequence[int], overlap: float
) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` range per axis that the sliding windows tile for an ROI.

    On each axis: the ROI's extent, grown to the span of the windows that cover it anyway
    (``patch + (n - 1) * stride``, so the extra context costs no extra window), centred on
    the ROI and kept inside the volume; the whole axis where that is shorter than the span
    (MONAI pads it). An empty ROI gives the whole volume.

    Args:
        roi: ``(X, Y, Z)`` breast ROI mask.
        patch: window size ``(x, y, z)``.
        overlap: sliding-window overlap, as MONAI's (stride ``int(patch * (1 - overlap))``).
    """
    mask = roi > 0
    if not mask.any():
        return tuple((0, size) for size in roi.shape)
    region = []
    for axis, (size, window) in enumerate(zip(roi.shape, patch, strict=True)):
        others = tuple(other for other in range(roi.ndim) if other != axis)
        occupied = np.flatnonzero(mask.any(axis=others))
        low, high = int(occupied[0]), int(occupied[-1]) + 1
        stride = _stride(window, overlap)
        extent = high - low
        span = window + int(np.ceil(max(extent - window, 0) / stride)) * stride
        if span >= size:
            region.append((0, size))
            continue
        start = min(max(low - (span - extent) // 2, 0), size - span)
        region.append((start, start + span))
    return tuple(region)


def _stride(window: int, overlap: float) -> int:
    return max(1, int(window * (1 - overlap)))


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI visits for a volume (after padding to the patch)."""
    total = 1
    for size, window in zip(shape, patch, strict=True):
        size = max(size, window)
        total *= int(np.ceil((size - window) / _stride(window, overlap))) + 1
    return total


def count_region_windows(roi: np.ndarray, patch: Sequence[int], overlap: float) -> int:
    """Number of sliding windows ``predict_case`` visits for an ROI (see ``roi_region``)."""
    shape = [stop - start for start, stop in roi_region(roi, patch, overlap)]
    return count_windows(shape, patch, overlap)


def write_prediction(case: Case, prediction: Prediction, out_dir: Path) -> Path:
    """Write ``OUT/CASE_ID/{phase}.nii.gz`` and ``kinetic_map.nii.gz`` atomically.

    The kinetic map types the observed + synthesized series inside the ROI.
    """
    series = np.concatenate([case.phases[: prediction.n_inputs], prediction.phases])
    target = Path(out_dir) / case.case_id
    with staged_directory(target) as staging:
        for name, image in zip(prediction.names, prediction.phases, strict=True):
            save_nifti(staging / f"{name}.nii.gz", image.astype(np.float32), case.affine)
        codes = kinetic_map(series, prediction.times_s, case.roi)
        save_nifti(staging / "kinetic_map.nii.gz", codes.astype(np.uint8), case.affine)
    return target
