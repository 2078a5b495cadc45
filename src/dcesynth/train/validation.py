"""Validation during training: free-running rollout on fixed lesion-centred patches.

The kinetic figure that matters is the lesion enhancement error: the squared
error of the lesion-mean intensity (TI-normalised units) between real and
synthesized phases. It is reported next to the error of copying the first
post-contrast phase forward, the trivial answer a model must beat.
"""

from __future__ import annotations

import numpy as np
import torch

from dcesynth.metrics import spearman


def lesion_means(phases: torch.Tensor, lesion: torch.Tensor) -> np.ndarray:
    """`(N, T, X, Y, Z)` phases and `(N, 1, X, Y, Z)` bool masks -> `(N, T)` lesion-mean
    intensities (float64)."""
    weight = lesion.to(phases.dtype)
    voxels = weight.sum(dim=(2, 3, 4)).clamp(min=1)
    return ((phases * weight).sum(dim=(2, 3, 4)) / voxels).double().cpu().numpy()


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    amp: bool,
    chunk: int = 2,
) -> dict[str, float]:
    """Kinetic validation metrics of ``model`` on ``batches`` (see validation_patches).

    Each case is scored on its own protocol; a phase's error averages the cases that have
    that phase, and "last" is each case's own last phase.

    Returns:
        ``val_enh_error_{k}dyn`` per predicted phase, ``val_enh_error_last``,
        ``val_enh_error_last_copy`` (first post-contrast phase copied forward) and
        ``val_scc`` (Spearman of lesion curves, mean over cases).
    """
    was_training = model.training
    model.eval()
    real_curves, synth_curves = [], []
    for batch in batches:
        phases, times, lesion = batch["phases"], batch["times_s"], batch["lesion"]
        for start in range(0, phases.shape[0], chunk):
            part = phases[start : start + chunk].to(device)
            part_times = times[start : start + chunk].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                preds = model(part[:, :1], part[:, 1:2], part_times[:, 1:])
            mask = lesion[start : start + chunk].to(device)
            real_curves.extend(lesion_means(part, mask))
            synth = torch.cat([part[:, :2], preds.float()], dim=1)
            synth_curves.extend(lesion_means(synth, mask))
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
