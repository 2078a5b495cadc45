"""A naive iterU-Net: our maths, computed the way the reference implementation computes it.

The peer that ``benchmarks/train_step.py`` times our ``IterUNet`` against. It computes the
same function as ``IterUNet(temporal=True)`` from the same weights (``copy_weights``), but
the way the public reference code (github.com/goglxych97/iterU-Net) does:

- the step embedding is broadcast to the full feature map BEFORE the GELU and the block's
  Linear projection, so that projection runs once per voxel (``project_per_voxel``);
- the ConvLSTM starts from explicit zero tensors, concatenated to the input and convolved,
  with the reference's gate order (input, forget, candidate, output);
- MONAI's ``TwoConv``/``Down``/``UpCat`` with their defaults (odd-size padding check on,
  in-place LeakyReLU as the reference sets it), float32, default (contiguous) memory layout;
- the loss uses MONAI's dense 3-D Gaussian SSIM (``compute_ssim_and_cs``, a 7x7x7 kernel)
  and the reference's slice-based gradient difference loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import compute_ssim_and_cs
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import Tensor, nn

from dcesynth.metrics import SSIM_K1, SSIM_K2
from dcesynth.model import IterUNet, SinusoidalTimeEncoding
from dcesynth.train.losses import MIN_SSIM_DATA_RANGE

REFERENCE_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
REFERENCE_NORM = ("instance", {"affine": True})

# Our ConvLSTM gates are (input, forget, output, candidate); the reference's are
# (input, forget, candidate, output): this maps a reference gate index to ours.
REFERENCE_GATE_ORDER = (0, 1, 3, 2)


def project_per_voxel(embedding: Tensor, spatial: Sequence[int], projection: nn.Linear) -> Tensor:
    """The reference's time conditioning: broadcast, then GELU and project every voxel.

    Args:
        embedding: `(B, D)` step embedding.
        spatial: `(X, Y, Z)` of the feature map it is added to.
        projection: `Linear(D, C)`.

    Returns:
        `(B, C, X, Y, Z)`, the same value at every voxel.
    """
    expanded = embedding[:, :, None, None, None].expand(-1, -1, *spatial)
    projected = projection(F.gelu(expanded.permute(0, 2, 3, 4, 1)))
    return projected.permute(0, 4, 1, 2, 3)


class NaiveConvLSTMCell(nn.Module):
    """The reference ConvLSTM cell: zero state made explicitly, gates (i, f, g, o)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv3d(2 * channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """`x`: `(B, C, X, Y, Z)`; returns the new `(hidden, cell)`."""
        if state is None:
            state = (torch.zeros_like(x), torch.zeros_like(x))
        hidden, cell = state
        gates = self.conv(torch.cat([x, hidden], dim=1))
        input_gate, forget_gate, candidate, output_gate = torch.chunk(gates, 4, dim=1)
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
        return torch.sigmoid(output_gate) * torch.tanh(cell), cell


class NaiveIterUNet(nn.Module):
    """The function of `IterUNet(features, temporal=True, time_dim)`, computed naively.

    Args:
        features: six channel counts (see `dcesynth.model.UNet3D`).
        time_dim: size of the step embedding.
    """

    def __init__(self, features: Sequence[int], time_dim: int = 128):
        super().__init__()
        f = tuple(features)
        self.encoding = SinusoidalTimeEncoding(time_dim // 2)
        self.mlp = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_0 = TwoConv(3, 2, f[0], REFERENCE_ACT, REFERENCE_NORM, True)
        self.conv_lstm = NaiveConvLSTMCell(f[0])
        self.downs = nn.ModuleList(
            Down(3, f[k], f[k + 1], REFERENCE_ACT, REFERENCE_NORM, True) for k in range(4)
        )
        options = {"act": REFERENCE_ACT, "norm": REFERENCE_NORM, "bias": True}
        self.ups = nn.ModuleList(
            [
                UpCat(3, f[4], f[3], f[3], **options),
                UpCat(3, f[3], f[2], f[2], **options),
                UpCat(3, f[2], f[1], f[1], **options),
                UpCat(3, f[1], f[0], f[5], halves=False, **options),
            ]
        )
        self.final_conv = Conv["conv", 3](f[5], 1, kernel_size=1)
        block_channels = (*f[:5], f[3], f[2], f[1], f[5])
        self.time_projections = nn.ModuleList(nn.Linear(time_dim, c) for c in block_channels)

    def forward(
        self,
        pre: Tensor,
        observed: Tensor,
        times_s: Tensor,
        teacher: Tensor | None = None,
    ) -> Tensor:
        """Same as `IterUNet(pre, observed, times_s, teacher)` for one observed phase.

        Args:
            pre: `(B, 1, X, Y, Z)` pre-contrast image.
            observed: `(B, 1, X, Y, Z)` first post-contrast phase.
            times_s: `(B, 1 + K)` its time and the K target times, seconds.
            teacher: `(B, K, X, Y, Z)` real target phases for teacher forcing; None for
                free-running.

        Returns:
            `(B, K, X, Y, Z)` predictions.
        """
        first, first_time_s = observed, times_s[:, 0]
        target_times_s = times_s[:, 1:].unbind(1)
        state, current, current_time_s = None, first, first_time_s
        predictions = []
        for index, target_time_s in enumerate(target_times_s):
            encoding = torch.cat([self.encoding(target_time_s), self.encoding(current_time_s)], 1)
            embedding = self.mlp(encoding)
            state = self.conv_lstm(self.conv_0(torch.cat([pre, current], dim=1)), state)
            skips = [self._add_time(state[0], 0, embedding)]
            for block, down in enumerate(self.downs, start=1):
                skips.append(self._add_time(down(skips[-1]), block, embedding))
            features = skips.pop()
            for block, (up, skip) in enumerate(
                zip(self.ups, reversed(skips), strict=True), start=5
            ):
                features = self._add_time(up(features, skip), block, embedding)
            prediction = self.final_conv(features) + current
            predictions.append(prediction)
            current = prediction if teacher is None else teacher[:, index : index + 1]
            current_time_s = target_time_s
        return torch.cat(predictions, dim=1)

    def _add_time(self, features: Tensor, block: int, embedding: Tensor) -> Tensor:
        return features + project_per_voxel(
            embedding, features.shape[2:], self.time_projections[block]
        )


def copy_weights(source: IterUNet, naive: NaiveIterUNet) -> NaiveIterUNet:
    """Load `source`'s weights into `naive`, so both compute the same function.

    Args:
        source: a temporal `IterUNet`.
        naive: a `NaiveIterUNet` with the same features and time_dim.

    Returns:
        `naive`, with the weights loaded (strict).
    """
    state = {}
    for name, value in source.state_dict().items():
        name = name.removeprefix("unet.").replace("time_embedding.mlp", "mlp")
        if name.startswith("conv_lstm.gates."):
            name = name.replace("gates", "conv")
            value = torch.cat([value.chunk(4)[k] for k in REFERENCE_GATE_ORDER])
        state[name] = value
    naive.load_state_dict(state)
    return naive


def reference_gdl(pred: Tensor, target: Tensor) -> Tensor:
    """The reference gradient difference loss: L1 between absolute forward differences."""

    def gradients(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            (x[:, :, 1:] - x[:, :, :-1]).abs(),
            (x[:, :, :, 1:] - x[:, :, :, :-1]).abs(),
            (x[:, :, :, :, 1:] - x[:, :, :, :, :-1]).abs(),
        )

    return sum(F.l1_loss(p, t) for p, t in zip(gradients(pred), gradients(target), strict=True))


def naive_loss(
    preds: Tensor,
    targets: Tensor,
    weight: Tensor | None = None,
    loss_weights: tuple[float, float, float] = (0.1, 1.0, 0.1),
) -> Tensor:
    """`CombinedLoss` without the perceptual term, with MONAI's dense 3-D SSIM.

    Args:
        preds: `(B, K, X, Y, Z)` predicted phases.
        targets: `(B, K, X, Y, Z)` real phases.
        weight: optional voxel weight `(B, 1, X, Y, Z)` multiplied into both.
        loss_weights: weights of L1, `1 - SSIM` and GDL.

    Returns:
        Scalar float32 loss summed over the steps.
    """
    l1_weight, ssim_weight, gdl_weight = loss_weights
    total = torch.zeros((), device=preds.device)
    for pred, target in zip(preds.split(1, 1), targets.split(1, 1), strict=True):
        pred, target = pred.float(), target.float()
        if weight is not None:
            pred, target = pred * weight, target * weight
        flat = target.detach().flatten(1)
        data_range = (flat.amax(1) - flat.amin(1)).clamp_min(MIN_SSIM_DATA_RANGE)
        ssim_map, _ = compute_ssim_and_cs(
            pred,
            target,
            spatial_dims=3,
            kernel_size=(7, 7, 7),
            kernel_sigma=(1.5, 1.5, 1.5),
            data_range=data_range.view(-1, 1, 1, 1, 1),
            k1=SSIM_K1,
            k2=SSIM_K2,
        )
        total = total + l1_weight * F.l1_loss(pred, target)
        total = total + ssim_weight * (1 - ssim_map.mean())
        total = total + gdl_weight * reference_gdl(pred, target)
    return total
