"""Training loss of iterU-Net: 0.1·L1 + 1·(1 − SSIM) + 1·perceptual + 0.1·GDL per rollout step.

Each term compares one predicted phase with its real phase, both ``(B, 1, X, Y, Z)`` and
TI-normalised (z-scored with the first post-contrast phase inside the breast ROI, so values lie
roughly in -2..10). The per-step losses are summed over the rollout, as in the paper.

Beyond the paper, an optional lesion term is the squared error of each patch's lesion-mean
intensity: the enhancement error that the evaluation reports, so that the few lesion voxels
of a patch are not outweighed by the many voxels of tissue that barely enhances. A
parenchyma term is the same error over the patch's breast ROI outside lesions: with the
lesion term alone, the networks learnt the lesions' late change and applied their washout
to the parenchyma too.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcesynth.metrics import SSIM_K1, SSIM_K2
from dcesynth.train.perceptual import perceptual_loss

# SSIM's data range is the target's range, but never below one TI-normalised unit (the
# within-ROI std of the first post-contrast phase): flat or masked-out patches would otherwise
# make the stability constants vanish and SSIM 0/0.
MIN_SSIM_DATA_RANGE = 1.0


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (the paper's values are the defaults).

    Attributes:
        l1: weight of the mean absolute error.
        ssim: weight of ``1 - SSIM``.
        perceptual: weight of the MedicalNet feature distance (unused without a network).
        gdl: weight of the gradient difference loss.
        lesion: weight of the lesion-mean squared error (``region_mean_error``); 0 in the paper.
        parenchyma: weight of the same error over the ROI's non-lesion voxels; 0 in the paper.
    """

    l1: float = 0.1
    ssim: float = 1.0
    perceptual: float = 1.0
    gdl: float = 0.1
    lesion: float = 0.0
    parenchyma: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l1", "ssim", "perceptual", "gdl", "lesion", "parenchyma"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossWeights.{name}: must be >= 0, got {getattr(self, name)}")


def gaussian_window(window: int, sigma: float, device=None) -> Tensor:
    """Normalised 1-D Gaussian of ``window`` taps, float32 (MONAI's SSIM kernel, per axis)."""
    offsets = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_filter_valid(
    x: Tensor, window: int, sigma: float, memory_format: torch.memory_format | None = None
) -> Tensor:
    """Separable Gaussian filter without padding, per channel.

    Args:
        x: ``(B, C, X, Y, Z)``.
        memory_format: the layout to filter in (``dcesynth.accel`` chooses); None keeps x's.

    Returns:
        ``(B, C, X - window + 1, Y - window + 1, Z - window + 1)``.
    """
    channels = x.shape[1]
    kernel = gaussian_window(window, sigma, x.device).to(x.dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = window
        x = F.conv3d(x, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return x


def ssim_loss(
    pred: Tensor,
    target: Tensor,
    window: int = 7,
    sigma: float = 1.5,
    memory_format: torch.memory_format | None = None,
) -> Tensor:
    """``1 - SSIM`` with a Gaussian window, averaged over the batch.

    The same SSIM as MONAI's ``compute_ssim_and_cs`` (Gaussian window, k1 0.01, k2 0.03,
    valid region only; a test checks they agree), but the 3-D Gaussian is applied as three
    1-D passes over all five local moments at once: 21 taps instead of 343, which makes
    SSIM's backward pass on CPU several times cheaper.

    The data range of each sample is its target's max − min, detached, floored at
    ``MIN_SSIM_DATA_RANGE``. A per-sample range keeps SSIM's constants in proportion to the
    contrast actually present, including after the enhancement weighting rescales intensities;
    a fixed constant would not. The window is 7 voxels so that 16-slice patches keep 10 valid
    positions along Z (MONAI's default 11 leaves 6).

    Args:
        pred: predicted volume ``(B, 1, X, Y, Z)``.
        target: target volume ``(B, 1, X, Y, Z)``.
        window: Gaussian window size in voxels, along every axis.
        sigma: Gaussian standard deviation in voxels.
        memory_format: the layout of the Gaussian filtering (see ``gaussian_filter_valid``).

    Returns:
        Scalar tensor in [0, 2], 0 when ``pred`` equals ``target``.
    """
    if min(target.shape[2:]) < window:
        raise ValueError(
            f"ssim_loss: window {window} is larger than the patch {tuple(target.shape[2:])}"
        )
    data_range = target.detach().amax(dim=(1, 2, 3, 4)) - target.detach().amin(dim=(1, 2, 3, 4))
    data_range = data_range.clamp_min(MIN_SSIM_DATA_RANGE).view(-1, 1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    moments = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    mu_p, mu_t, mu_pp, mu_tt, mu_pt = gaussian_filter_valid(
        moments, window, sigma, memory_format
    ).unbind(1)
    var_p, var_t, cov = mu_pp - mu_p**2, mu_tt - mu_t**2, mu_pt - mu_p * mu_t
    c1, c2 = c1.squeeze(1), c2.squeeze(1)
    luminance = (2 * mu_p * mu_t + c1) / (mu_p**2 + mu_t**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_p + var_t + c2)
    return 1.0 - (luminance * contrast_structure).mean()


def gradient_difference_loss(pred: Tensor, target: Tensor, alpha: float = 1.0) -> Tensor:
    """Gradient difference loss (Mathieu et al. 2016) over the three spatial axes.

    For each axis, ``| |Δpred| − |Δtarget| |^alpha`` of forward differences, averaged over
    voxels; the three axes are summed, as Mathieu et al. sum their directions.

    Args:
        pred: predicted volume ``(B, C, X, Y, Z)``.
        target: target volume ``(B, C, X, Y, Z)``.
        alpha: exponent of the difference.

    Returns:
        Scalar tensor, 0 when ``pred`` and ``target`` differ by a constant.
    """
    total = pred.new_zeros(())
    for axis in (2, 3, 4):
        pred_gradient = torch.diff(pred, dim=axis).abs()
        target_gradient = torch.diff(target, dim=axis).abs()
        total = total + (pred_gradient - target_gradient).abs().pow(alpha).mean()
    return total


def region_mean_error(pred: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """Squared error of a region's mean intensity, averaged over the patches that hold it.

    Args:
        pred, target: ``(B, 1, X, Y, Z)`` phases.
        region: ``(B, 1, X, Y, Z)`` bool mask of each patch's region (lesions, parenchyma).

    Returns:
        A scalar; 0 when no patch holds a voxel of the region.
    """
    weight = region.to(pred.dtype)
    voxels = weight.sum(dim=(1, 2, 3, 4))
    difference = ((pred - target) * weight).sum(dim=(1, 2, 3, 4)) / voxels.clamp(min=1)
    holds = (voxels > 0).to(pred.dtype)
    return (difference.square() * holds).sum() / holds.sum().clamp(min=1)


def enhancement_weight(first_post: Tensor, last_post: Tensor) -> Tensor:
    """Voxel weight ``sqrt(|last_post − first_post|)`` that emphasises enhancing tissue.

    The reference code multiplies prediction and target by this weight during the
    optimisation stage, so voxels whose signal changes over the series dominate every term.

    Args:
        first_post: first post-contrast phase ``(B, 1, X, Y, Z)``, TI-normalised.
        last_post: last post-contrast phase ``(B, 1, X, Y, Z)``, TI-normalised.

    Returns:
        Weight ``(B, 1, X, Y, Z)``, >= 0.
    """
    if first_post.shape != last_post.shape:
        raise ValueError(
            f"enhancement_weight: first_post {tuple(first_post.shape)} and last_post "
            f"{tuple(last_post.shape)} differ in shape"
        )
    return (last_post - first_post).abs().sqrt()


class CombinedLoss(nn.Module):
    """Weighted sum of L1, ``1 - SSIM``, MedicalNet perceptual and GDL terms over rollout steps.

    Inputs are cast to float32 and the pixel terms run with autocast disabled, so the loss is
    stable under ``torch.autocast(..., dtype=torch.bfloat16)``; the perceptual network itself
    follows the caller's autocast (see ``perceptual_loss``).

    Args:
        weights: weight of each term.
        perceptual_net: frozen MedicalNet from ``load_perceptual_network``, or None to leave the
            perceptual term out (its weight is then ignored).
        ssim_window: SSIM Gaussian window size in voxels; must not exceed the patch size.
        gdl_alpha: exponent of the gradient difference loss.
    """

    def __init__(
        self,
        weights: LossWeights,
        perceptual_net: nn.Module | None,
        ssim_window: int = 7,
        gdl_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = weights
        self.perceptual_net = perceptual_net
        self.ssim_window = ssim_window
        self.gdl_alpha = gdl_alpha
        self.filter_memory_format: torch.memory_format | None = None

    @property
    def uses_perceptual(self) -> bool:
        """Whether the perceptual term is computed (a network is given and its weight is > 0)."""
        return self.perceptual_net is not None and self.weights.perceptual > 0

    def forward(
        self,
        preds: Tensor,
        targets: Tensor,
        weight: Tensor | None = None,
        lesion: Tensor | None = None,
        parenchyma: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of a rollout.

        Args:
            preds: ``(B, K, X, Y, Z)`` predicted phases, one per rollout step.
            targets: ``(B, K, X, Y, Z)`` real phases, matching ``preds`` step for step.
            weight: optional voxel weight ``(B, 1, X, Y, Z)`` (e.g. ``enhancement_weight``),
                multiplied into prediction and target before every term but the lesion term.
            lesion: ``(B, 1, X, Y, Z)`` bool lesion masks; needed when the lesion weight is > 0.
            parenchyma: ``(B, 1, X, Y, Z)`` bool masks of the ROI outside lesions; needed
                when the parenchyma weight is > 0.

        Returns:
            ``(total, terms)``: the weighted sum over steps as a float32 scalar tensor, and the
            unweighted terms summed over steps (``"l1"``; ``"ssim"`` as ``1 - SSIM``,
            ``"gdl"``, ``"perceptual"``, ``"lesion"`` and ``"parenchyma"`` only where their
            weight is above 0
            and, for the perceptual term, a network is given) plus ``"total"``, as floats.
        """
        if preds.ndim != 5 or preds.shape != targets.shape or preds.shape[1] == 0:
            raise ValueError(
                "CombinedLoss: expected predictions and targets of one shape (B, K, X, Y, Z), "
                f"got {tuple(preds.shape)} and {tuple(targets.shape)}"
            )
        if self.weights.lesion > 0 and lesion is None:
            raise ValueError("CombinedLoss: the lesion term needs the patches' lesion masks")
        if self.weights.parenchyma > 0 and parenchyma is None:
            raise ValueError("CombinedLoss: the parenchyma term needs the patches' ROI masks")
        if weight is not None and weight.shape != preds[:, :1].shape:
            raise ValueError(
                f"CombinedLoss: weight shape {tuple(weight.shape)} differs from one phase's "
                f"{tuple(preds[:, :1].shape)}"
            )
        sums = {name: torch.zeros((), device=preds.device) for name in self._term_names()}
        for pred, target in zip(preds.split(1, 1), targets.split(1, 1), strict=True):
            pred, target = pred.float(), target.float()
            if self.weights.lesion > 0:
                sums["lesion"] = sums["lesion"] + region_mean_error(pred, target, lesion)
            if self.weights.parenchyma > 0:
                sums["parenchyma"] = sums["parenchyma"] + region_mean_error(
                    pred, target, parenchyma
                )
            if weight is not None:
                pred, target = pred * weight.float(), target * weight.float()
            with torch.autocast(device_type=pred.device.type, enabled=False):
                sums["l1"] = sums["l1"] + F.l1_loss(pred, target)
                if "ssim" in sums:
                    sums["ssim"] = sums["ssim"] + ssim_loss(
                        pred, target, self.ssim_window, memory_format=self.filter_memory_format
                    )
                if "gdl" in sums:
                    sums["gdl"] = sums["gdl"] + gradient_difference_loss(
                        pred, target, self.gdl_alpha
                    )
            if self.uses_perceptual:
                sums["perceptual"] = sums["perceptual"] + perceptual_loss(
                    self.perceptual_net, pred, target
                )
        total = sum(getattr(self.weights, name) * value for name, value in sums.items())
        terms = {name: float(value.detach()) for name, value in sums.items()}
        terms["total"] = float(total.detach())
        return total, terms

    def _term_names(self) -> tuple[str, ...]:
        weighted = (
            ("ssim", self.weights.ssim > 0),
            ("gdl", self.weights.gdl > 0),
            ("perceptual", self.uses_perceptual),
            ("lesion", self.weights.lesion > 0),
            ("parenchyma", self.weights.parenchyma > 0),
        )
        return ("l1", *(name for name, used in weighted if used))
