"""Validation during training: free-running rollout over each validation case's ROI.

The kinetic figure that matters is the lesion enhancement error: the squared
error of the lesion-mean intensity (TI-normalised units) between real and
synthesized phases. It is reported next to the error of copying the first
post-contrast phase forward, the trivial answer a model must beat.

Each validation case is predicted as ``predict`` predicts it, by sliding windows over
its breast ROI (``dcesynth.infer.predict_volume``), not on one lesion-centred patch:
on 60 validation cases, the checkpoint with the lowest error on such patches scored
1.05x copy-forward's error on 125 test lesions, where the one chosen by whole-volume
validation scored 0.74x (docs/method.md, "Training"). Only the lesion voxels are scored, so
only the windows that cover one run: every window over a lesion voxel still runs, so its
blended prediction is the one ``predict`` makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dcesynth.data.sampling import PreparedCase
from dcesynth.infer import predict_volume
from dcesynth.metrics import spearman


def lesion_means(phases: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """``(T, X, Y, Z)`` phases and an ``(X, Y, Z)`` bool mask -> ``(T,)`` lesion-mean
    intensities (float64); the mean over the whole volume without a lesion voxel."""
    if not lesion.any():
        return phases.reshape(phases.shape[0], -1).mean(axis=1, dtype=np.float64)
    return phases[:, lesion].mean(axis=1, dtype=np.float64)


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: Sequence[PreparedCase],
    patch: Sequence[int],
    amp: bool,
    overlap: float = 0.5,
) -> dict[str, float]:
    """Kinetic validation metrics of ``model`` (on its device) on whole prepared cases.

    Each case rolls out from pre and 1dyn over its own protocol; a phase's error averages
    the cases that have that phase, and "last" is each case's own last phase.

    Returns:
        ``val_enh_error_{k}dyn`` per predicted phase, ``val_enh_error_last``,
        ``val_enh_error_last_copy`` (first post-contrast phase copied forward) and
        ``val_scc`` (Spearman of lesion curves, mean over cases).
    """
    was_training = model.training
    model.eval()
    real_curves, synth_curves = [], []
    for case in cases:
        roi = np.zeros(case.lesion_mask.shape, dtype=bool)
        roi[tuple(case.roi_voxels.T)] = True
        predicted = predict_volume(
            model,
            case.phases[:2],
            case.context,
            roi,
            case.times_s[1:],
            patch,
            overlap,
            amp,
            needed=case.lesion_mask if case.lesion_mask.any() else None,
            case_features=case.case_features if len(case.case_features) else None,
            prior=case.prior[1:] if len(case.prior) else None,
        )
        synth = np.concatenate(
            [case.phases[:2], np.repeat(case.phases[1:2], len(predicted.phases), 0)]
        )
        box = tuple(slice(start, stop) for start, stop in predicted.region)
        synth[(slice(2, None), *box)] = predicted.phases.numpy()
        real_curves.append(lesion_means(case.phases, case.lesion_mask))
        synth_curves.append(lesion_means(synth, case.lesion_mask))
    model.train(was_training)
    errors = [(real - synth) ** 2 for real, synth in zip(real_curves, synth_curves, strict=True)]
    metrics = {
        f"val_enh_error_{k}dyn": float(np.mean([e[k] for e in errors if len(e) > k]))
        for k in range(2, max(len(e) for e in errors))
    }
    metrics["val_enh_error_last"] = float(np.mean([e[-1] for e in errors]))
    metrics["val_enh_error_last_copy"] = float(np.mean([(r[-1] - r[1]) ** 2 for r in real_curves]))
    metrics["val_scc"] = float(
        np.mean([spearman(r, s) for r, s in zip(real_curves, synth_curves, strict=True)])
    )
    return metrics
