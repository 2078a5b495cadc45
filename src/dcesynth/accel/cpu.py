"""CPU speed paths: the whole U-Net in channels-last (NDHWC) layout, and the kernels that
keep it so.

oneDNN's 3-D convolutions want channels-last on CPU: with few channels their backward pass
is many times faster than in the default layout. Several operations would silently turn a
channels-last tensor back into the default layout, or take slow strided paths on it; the
modules here are the models' own blocks with those operations replaced, computing the same
maths. `keep_channels_last` swaps them in, in place (weights and parameter names stay).
"""

from __future__ import annotations

import ctypes
import math
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcesynth.model.blocks import ConvLSTMCell3D, SkipUpCat, TimeShift, UNet3D
from dcesynth.train.losses import CombinedLoss

CHANNELS_LAST = torch.channels_last_3d


class _DenseGradChannelCat(torch.autograd.Function):
    """`torch.cat` along channels whose backward hands each input a channels-last gradient."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.channels = [tensor.shape[1] for tensor in tensors]
        return torch.cat(tensors, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(
            part.contiguous(memory_format=torch.channels_last_3d)
            for part in grad.split(ctx.channels, dim=1)
        )


def cat_channels(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate `(B, C_i, X, Y, Z)` tensors along channels.

    The gradient of a channel slice of a channels-last tensor is strided, and on CPU the
    element-wise backward kernels it then meets (activation, accumulation) take a slow
    path: channels-last inputs get their gradients back as dense channels-last tensors
    instead, for the price of one copy.
    """
    if _is_channels_last(tensors[0]):
        return _DenseGradChannelCat.apply(*tensors)
    return torch.cat(tensors, dim=1)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _dense_chunks(gates: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Split `(B, count * C, X, Y, Z)` into `count` gates of C channels.

    A channel slice of a channels-last tensor is strided, and bf16 sigmoid/tanh on strided
    input take a slow path on CPU; copying each gate to a dense channels-last tensor
    first is cheaper. Contiguous (NCDHW) gates are sliced as they are.
    """
    chunks = gates.chunk(count, dim=1)
    if gates.is_contiguous():
        return chunks
    return tuple(chunk.contiguous(memory_format=torch.channels_last_3d) for chunk in chunks)


def _sample_rows(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """`(B, C, X, Y, Z)` channels-last -> `(B, X*Y*Z / repeat, repeat * C)`, a view: each row
    holds `repeat` consecutive voxels, channel fastest, so column `j` is channel `j % C`.
    Raises if `x` is not dense channels-last (a view cannot be made)."""
    batch, channels = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1).view(batch, -1, repeat * channels)


def _row_repeat(x: torch.Tensor) -> int:
    """Voxels per row for `_sample_rows` of `x` `(B, C, X, Y, Z)`: rows of a multiple of 32
    values where the voxel count allows (CPU kernels are slow on short rows)."""
    return math.gcd(32 // math.gcd(x.shape[1], 32), x[0, 0].numel())


class _RowInstanceNorm(torch.autograd.Function):
    """Affine instance norm of a channels-last `(B, C, X, Y, Z)` tensor.

    Each sample, a `(voxels, C)` matrix in memory, is seen as rows of several voxels
    (`_sample_rows`), so that a row is a multiple of 32 values: ATen's batch-norm kernels on
    such a matrix are vectorised, where on rows of C = 28 they are several times slower.
    Batch norm of the rows gives per-column statistics, pooled here per channel (exactly:
    equal column sizes). Normalising is eval-mode batch norm with per-column coefficients,
    which computes in fp32 and rounds once, as the fused kernels do; the input gradient is
    that plus a multiple of the upstream gradient (two roundings: within one bf16 step).
    Where rows are
    single voxels (C a multiple of 32), the fused kernels run as they are.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        batch, channels = x.shape[:2]
        repeat = _row_repeat(x)
        out = torch.empty_like(x)
        x_rows, out_rows = _sample_rows(x, repeat), _sample_rows(out, repeat)
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        if repeat == 1:
            mean, invstd = x.new_empty((2, batch, channels), dtype=stats_dtype)
            for i in range(batch):
                torch.ops.aten.native_batch_norm.out(
                    x_rows[i], weight, bias, None, None, True, 0.0, eps,
                    out=out_rows[i], save_mean=mean[i], save_invstd=invstd[i],
                )  # fmt: skip
        else:
            ones = x.new_ones(repeat * channels, dtype=stats_dtype)
            # Column statistics (eps 0; the normalised output is discarded), fp32 for bf16.
            stats = [
                torch.native_batch_norm(rows, ones, None, None, None, True, 0.0, 0.0)[1:]
                for rows in x_rows
            ]
            column_mean = torch.stack([m for m, _ in stats]).view(batch, repeat, channels)
            column_invstd = torch.stack([s for _, s in stats]).view(batch, repeat, channels)
            mean = column_mean.mean(1)
            # ATen gives a constant column (variance 0, eps 0) invstd 0, not inf.
            column_variance = torch.where(column_invstd > 0, column_invstd.pow(-2), 0.0)
            variance = column_variance.mean(1)
            variance += (column_mean - mean[:, None]).pow(2).mean(1)
            invstd = torch.rsqrt(variance + eps)
            scale = weight * invstd
            _affine_rows(x_rows, scale, bias - mean * scale, out_rows)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.repeat, ctx.eps = repeat, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        repeat = ctx.repeat
        batch, channels = x.shape[:2]
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_x = torch.empty_like(x)
        grad_rows, x_rows, grad_x_rows = (_sample_rows(t, repeat) for t in (grad, x, grad_x))
        # Per sample: sums of grad * normalised x (the weight's gradient) and of grad (bias).
        grad_weight, grad_bias = mean.new_empty((2, batch, channels))
        if repeat == 1:
            for i in range(batch):
                torch.ops.aten.native_batch_norm_backward.out(
                    grad_rows[i], x_rows[i], weight, None, None, mean[i], invstd[i], True,
                    ctx.eps, [True, True, True],
                    out0=grad_x_rows[i], out1=grad_weight[i], out2=grad_bias[i],
                )  # fmt: skip
            return grad_x, grad_weight.sum(0), grad_bias.sum(0), None
        mean_rows, invstd_rows = mean.repeat(1, repeat), invstd.repeat(1, repeat)
        sums = [
            torch.ops.aten.native_batch_norm_backward(
                grad_rows[i], x_rows[i], None, None, None, mean_rows[i], invstd_rows[i], True,
                0.0, [False, True, True],
            )[1:]
            for i in range(batch)
        ]  # fmt: skip
        grad_weight = torch.stack([d for d, _ in sums]).view(batch, repeat, channels).sum(1)
        grad_bias = torch.stack([s for _, s in sums]).view(batch, repeat, channels).sum(1)
        # d loss / d x = a * grad + c * x + d per channel: batch-norm backward, expanded.
        a = weight * invstd
        c = -a * invstd * grad_weight / x[0, 0].numel()
        d = -a * grad_bias / x[0, 0].numel() - c * mean
        _affine_rows(x_rows, c, d, grad_x_rows)
        a_rows = a.repeat(1, repeat).to(grad.dtype)
        for i in range(batch):
            grad_x_rows[i].addcmul_(grad_rows[i], a_rows[i])
        return grad_x, grad_weight.sum(0), grad_bias.sum(0), None


def _affine_rows(
    rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor
) -> None:
    """`out = rows * scale + shift` in fp32, rounded once (eval-mode batch norm, unit variance).

    Args:
        rows: `(B, N, repeat * C)` samples as rows (`_sample_rows`).
        scale, shift: `(B, C)` fp32 coefficients per sample and channel.
        out: written, the shape of `rows`.
    """
    repeat = rows.shape[2] // scale.shape[1]
    scale, shift = scale.repeat(1, repeat), shift.repeat(1, repeat)
    unit = scale.new_ones(scale.shape[1])
    zero, none = unit.new_zeros(unit.shape), unit.new_empty(0)
    for i in range(rows.shape[0]):
        torch.ops.aten.native_batch_norm.out(
            rows[i], scale[i], shift[i], zero, unit, False, 0.0, 0.0,
            out=out[i], save_mean=none, save_invstd=none,
        )  # fmt: skip


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm without running statistics that keeps a channels-last input channels-last.

    The same maths and parameter names as `nn.InstanceNorm3d` (statistics per sample and
    channel, biased variance, optional per-channel affine). `F.instance_norm` folds the batch
    into the channels, which turns a channels-last input into a contiguous copy, and the
    convolutions after it then run in the layout oneDNN is slow in on CPU; `F.group_norm`
    keeps the layout but its channels-last bf16 backward is much slower. A channels-last
    input is normalised by `_RowInstanceNorm`, on ATen's batch-norm kernels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `(B, C, X, Y, Z)`; a channels-last input gives a channels-last output."""
        if not _is_channels_last(x):
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        ones = x.new_ones(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        weight = ones if self.weight is None else self.weight
        bias = torch.zeros_like(ones) if self.bias is None else self.bias
        return _RowInstanceNorm.apply(x, weight, bias, self.eps)


class ChannelsLastUNet3D(UNet3D):
    """`UNet3D` that turns its input channels-last; every block after it keeps the layout."""

    def level_0(self, x: torch.Tensor) -> torch.Tensor:
        return super().level_0(x.contiguous(memory_format=CHANNELS_LAST))


class ChannelsLastConvLSTMCell3D(ConvLSTMCell3D):
    """`ConvLSTMCell3D` whose concatenation and gates stay dense channels-last."""

    @staticmethod
    def concat(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return cat_channels(x, hidden)

    @staticmethod
    def split_gates(gates: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        return _dense_chunks(gates, count)


class ChannelsLastSkipUpCat(SkipUpCat):
    """`SkipUpCat` whose skip concatenation hands back dense channels-last gradients."""

    @staticmethod
    def concat(skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        return cat_channels(skip, upsampled)


class ChannelsLastTimeShift(TimeShift):
    """`TimeShift` for channels-last features.

    Adding a `(B, C, 1, 1, 1)` tensor to a channels-last one takes a slow path on CPU;
    added to rows of voxels, the shift is a row vector, a fast broadcast.
    """

    def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if not _is_channels_last(features):
            return super().forward(features, embedding)
        shift = nn.Linear.forward(self, embedding)
        batch, channels, *spatial = features.shape
        repeat = _row_repeat(features)
        rows = _sample_rows(features, repeat) + shift.repeat(1, repeat)[:, None, :]
        return rows.view(batch, *spatial, channels).permute(0, 4, 1, 2, 3)


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    UNet3D: ChannelsLastUNet3D,
    ConvLSTMCell3D: ChannelsLastConvLSTMCell3D,
    SkipUpCat: ChannelsLastSkipUpCat,
    TimeShift: ChannelsLastTimeShift,
}


def keep_channels_last(module: nn.Module) -> None:
    """Run `module`'s U-Nets (and a `CombinedLoss`'s filters) channels-last, in place.

    Each block of a class in `SWAPS`, and each instance norm without running statistics,
    becomes its channels-last variant: a subclass with the same attributes and parameters,
    so this may be applied before or after weights are loaded.
    """
    for child in module.modules():
        if type(child) in SWAPS:
            child.__class__ = SWAPS[type(child)]
        elif type(child) is nn.InstanceNorm3d and not child.track_running_stats:
            child.__class__ = ChannelsLastInstanceNorm3d
        elif isinstance(child, CombinedLoss):
            # oneDNN's depthwise convolutions (SSIM's Gaussian) are faster channels-last.
            child.filter_memory_format = CHANNELS_LAST


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_host_memory() -> bool:
    """Let this process reuse the memory its tensors free, rather than give it back (glibc).

    By default glibc serves large blocks with fresh mappings and trims the heap as they are
    freed, so every training step faults in and zero-fills new pages for its activations
    (a few per cent of a step). With mmap and trimming off, freed blocks stay in the heap
    for the next step, as with the jemalloc or tcmalloc preloads PyTorch's CPU tuning guide
    recommends; the heap stays at its peak size. Process-wide.

    Returns:
        True if applied (Linux with glibc), False otherwise.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def bf16_is_fast() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX), where bf16 training is faster.

    Without them oneDNN's bf16 kernels for few-channel 3-D convolutions are slower than
    fp32 (see docs/performance.md for both measurements).
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())
