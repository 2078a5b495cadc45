"""Training data: TI-normalised cases in memory, foreground-aware crops, augmentation.

Per case and step two patches are cut (the paper's foreground-aware random
cropping): one centred on a random lesion voxel, one centred on a random voxel of
the breast ROI; or the lesion patch alone (``roi_patch=False``). Augmentation (the
paper's: Gaussian noise p 0.5 std 0.02, Gaussian smooth / sharpen p 0.2, axis flips
and in-plane 90 degree rotations p 0.5) acts on all phases of a patch at once, so the
phases stay aligned.

A cohort may mix protocols (phase counts and times). The patches of one step come from
cases with the same number of phases, so that they stack into one batch and roll out
together; which phase count a step draws is random, in proportion to its cases. Padding
every batch to the longest protocol and masking the missing steps would roll every
batch out over the longest protocol instead (docs/performance.md measures both).

Every random choice of step ``s`` comes from a generator seeded with
``(seed, s, rank)``: a batch depends only on its step, which makes resumed runs
and runs with data-loading workers identical to uninterrupted, serial ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai import transforms
from monai.data import set_track_meta

from dcesynth.case import Case
from dcesynth.data.tinorm import case_features, context_channels, fit_input_norm
from dcesynth.io import InputError
from dcesynth.regression import RegressionModel

set_track_meta(False)


@dataclass
class PreparedCase:
    """A case ready for sampling.

    Attributes:
        case_id: the case's name.
        phases: (T, X, Y, Z) float32 TI-normalised phases, padded to at least the patch.
        context: (C, X, Y, Z) float32 network inputs besides the phases
            (``context_channels``; C may be 0), padded like ``phases``.
        times_s: (T,) float32 acquisition times.
        lesion_voxels: (N, 3) voxel indices inside lesions (may be empty).
        roi_voxels: (M, 3) voxel indices inside the breast ROI.
        lesion_mask: (X, Y, Z) bool lesion mask (padded like ``phases``).
        case_features: (K,) float32 breast statistics (``case_features``); none by default.
        prior: (T, X, Y, Z) float32 prior prediction of every phase, normalised and padded
            like ``phases`` (pre and 1dyn as they are), for a model that steps from one
            (``dcesynth.model.IterUNet``); (0, X, Y, Z) without.
        parenchyma_mask: (X, Y, Z) bool, the ROI's voxels outside lesions (derived).
    """

    case_id: str
    phases: np.ndarray
    context: np.ndarray
    times_s: np.ndarray
    lesion_voxels: np.ndarray
    roi_voxels: np.ndarray
    lesion_mask: np.ndarray
    case_features: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    prior: np.ndarray | None = None
    parenchyma_mask: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prior is None:
            self.prior = np.zeros((0, *self.phases.shape[1:]), dtype=np.float32)
        roi = np.zeros(self.lesion_mask.shape, dtype=bool)
        roi[tuple(self.roi_voxels.T)] = True
        self.parenchyma_mask = roi & ~self.lesion_mask


def prepare_case(
    case: Case,
    patch: Sequence[int],
    relative_enhancement: bool = False,
    normalisation: str = "ti",
    with_case_features: bool = False,
    prior_model: RegressionModel | None = None,
) -> PreparedCase:
    """Normalise ``case`` (``fit_input_norm``) and pad it so that every axis holds at
    least one patch.

    ``relative_enhancement`` adds that context channel (``context_channels``);
    ``with_case_features`` computes the breast statistics (``case_features``);
    ``prior_model`` predicts the prior of every phase after 1dyn at the case's times.
    """
    norm = fit_input_norm(case.phases, case.roi, normalisation, where=case.case_id)
    phases = norm.forward(case.phases)
    pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, case.shape, strict=True)]
    fill = float(phases.min())
    phases = np.pad(phases, pad, mode="constant", constant_values=fill)
    prior = None
    if prior_model is not None:
        prior = norm.forward(prior_model.predict_series(case, case.times_s[2:]))
        prior = np.pad(prior, pad, mode="constant", constant_values=fill).astype(np.float32)
    context = np.pad(context_channels(case.phases, relative_enhancement), pad)
    lesion = np.pad(case.seg > 0, pad[1:])
    roi = np.pad(case.roi > 0, pad[1:])
    return PreparedCase(
        case_id=case.case_id,
        phases=np.ascontiguousarray(phases, dtype=np.float32),
        context=np.ascontiguousarray(context, dtype=np.float32),
        times_s=np.asarray(case.times_s, dtype=np.float32),
        case_features=(
            case_features(case.phases, case.roi, norm)
            if with_case_features
            else np.zeros(0, dtype=np.float32)
        ),
        lesion_voxels=np.argwhere(lesion),
        roi_voxels=np.argwhere(roi),
        lesion_mask=lesion,
        prior=prior,
    )


def protocol_groups(cases: list[PreparedCase]) -> dict[int, list[int]]:
    """Indices of ``cases`` by their number of phases T, fewest phases first."""
    groups: dict[int, list[int]] = {}
    for index, case in enumerate(cases):
        groups.setdefault(case.phases.shape[0], []).append(index)
    return dict(sorted(groups.items()))


def crop_start(centre: np.ndarray, patch: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Corner of a ``patch`` centred at ``centre``, shifted to lie inside ``shape``."""
    start = np.asarray(centre) - np.asarray(patch) // 2
    return np.clip(start, 0, np.asarray(shape) - np.asarray(patch))


def crop(volume: np.ndarray, start: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """(..., X, Y, Z) -> (..., *patch) from corner ``start``."""
    x, y, z = (int(s) for s in start)
    return volume[..., x : x + patch[0], y : y + patch[1], z : z + patch[2]]


@dataclass
class Augmentation:
    """The paper's augmentations, for (T, *patch) patches (phases as channels).

    Attributes:
        intensity: noise, smoothing and sharpening, applied to the phases only.
        spatial: axis flips and the in-plane 90 degree rotation, applied to the phases,
            the context channels and the masks stacked, so that they stay aligned.
    """

    intensity: transforms.Compose
    spatial: transforms.Compose

    def __call__(
        self, phases: np.ndarray, context: np.ndarray, masks: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Augmented ``(phases (T, *patch), context (C, *patch), masks (M, *patch) bool)``,
        fixed by ``seed``."""
        self.intensity.set_random_state(seed=seed)
        self.spatial.set_random_state(seed=seed + 1)
        stacked = np.concatenate([np.asarray(self.intensity(phases)), context, masks])
        stacked = np.asarray(self.spatial(stacked))
        n_images = phases.shape[0] + context.shape[0]
        return (
            stacked[: phases.shape[0]],
            stacked[phases.shape[0] : n_images],
            stacked[n_images:] > 0.5,
        )


def augmentation(patch: Sequence[int]) -> Augmentation:
    """The paper's augmentations for patches of shape ``patch``.

    The in-plane 90 degree rotation swaps X and Y, so it is left out when the patch is
    not square in-plane (every patch of a batch must keep one shape).
    """
    intensity = [
        transforms.RandGaussianNoise(prob=0.5, std=0.02),
        transforms.RandGaussianSmooth(prob=0.2),
        transforms.RandGaussianSharpen(prob=0.2),
    ]
    spatial = [transforms.RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)]
    if patch[0] == patch[1]:
        spatial.append(transforms.RandRotate90(prob=0.5, spatial_axes=(0, 1)))
    return Augmentation(transforms.Compose(intensity), transforms.Compose(spatial))


class PatchBatches(torch.utils.data.Dataset):
    """Batch number ``step`` of training: ``2 * cases_per_step`` augmented patches, or
    ``cases_per_step`` without ``roi_patch`` (the lesion patches alone).

    Items are dicts with ``phases`` (B, T, *patch) float32, ``context`` (B, C, *patch)
    float32, ``prior`` (B, T or 0, *patch) float32 (``PreparedCase.prior``, augmented
    with the context), ``times_s`` (B, T), ``case_features`` (B, K), and ``lesion`` and
    ``parenchyma`` (B, 1, *patch) bool, each patch's lesion mask and its ROI outside
    lesions. T is the phase count of the step's cases (see the module docstring for mixed
    protocols).
    """

    def __init__(
        self,
        cases: list[PreparedCase],
        patch: Sequence[int],
        cases_per_step: int,
        total_steps: int,
        seed: int,
        rank: int = 0,
        augment: bool = True,
        lesion_offset: float = 0.0,
        roi_patch: bool = True,
    ):
        if not cases:
            raise InputError("no training cases")
        if any(len(c.roi_voxels) == 0 for c in cases):
            raise InputError("a training case has an empty breast ROI")
        self.cases, self.patch = cases, tuple(patch)
        self.groups = list(protocol_groups(cases).values())
        self.group_shares = np.asarray([len(g) for g in self.groups]) / len(cases)
        self.cases_per_step, self.total_steps = cases_per_step, total_steps
        self.seed, self.rank = seed, rank
        self.transform = augmentation(self.patch) if augment else None
        self.max_offset = np.asarray([int(lesion_offset * (p // 2)) for p in self.patch])
        self.roi_patch = roi_patch

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        patches, contexts, priors, times, masks, statistics = [], [], [], [], [], []
        group = self.groups[0]
        if len(self.groups) > 1:
            group = self.groups[rng.choice(len(self.groups), p=self.group_shares)]
        for index in rng.choice(group, size=self.cases_per_step):
            case = self.cases[index]
            lesion_pool = case.lesion_voxels if len(case.lesion_voxels) else case.roi_voxels
            for pool in (lesion_pool, case.roi_voxels) if self.roi_patch else (lesion_pool,):
                centre = pool[rng.integers(len(pool))]
                if pool is lesion_pool and self.max_offset.any():
                    centre = centre + rng.integers(-self.max_offset, self.max_offset + 1)
                start = crop_start(centre, self.patch, case.phases.shape[1:])
                sample = crop(case.phases, start, self.patch)
                fixed = np.concatenate(
                    [crop(case.context, start, self.patch), crop(case.prior, start, self.patch)]
                )
                mask = np.stack(
                    [crop(m, start, self.patch) for m in (case.lesion_mask, case.parenchyma_mask)]
                )
                if self.transform is not None:
                    sample, fixed, mask = self.transform(
                        sample, fixed, mask, int(rng.integers(2**31 - 1))
                    )
                context, prior = np.split(fixed, [len(case.context)])
                patches.append(torch.as_tensor(np.ascontiguousarray(sample), dtype=torch.float32))
                contexts.append(torch.as_tensor(np.ascontiguousarray(context), dtype=torch.float32))
                priors.append(torch.as_tensor(np.ascontiguousarray(prior), dtype=torch.float32))
                masks.append(torch.as_tensor(np.ascontiguousarray(mask)))
                times.append(torch.as_tensor(case.times_s))
                statistics.append(torch.as_tensor(case.case_features))
        return {
            "phases": torch.stack(patches),
            "context": torch.stack(contexts),
            "prior": torch.stack(priors),
            "times_s": torch.stack(times),
            "case_features": torch.stack(statistics),
            "lesion": torch.stack(masks)[:, :1],
            "parenchyma": torch.stack(masks)[:, 1:],
        }
