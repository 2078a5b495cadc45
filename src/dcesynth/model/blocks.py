"""Building blocks of the models: time embedding, ConvLSTM, and the one U-Net body.

The convolutional blocks (two 3x3x3 convolutions with norm and activation, max-pool
down-sampling, transposed-convolution up-sampling with skip concatenation) are MONAI's
`TwoConv`, `Down` and `UpCat`; `UNet3D` assembles them like MONAI's `BasicUNet`, with
optional time conditioning and ConvLSTM. Inputs to `UNet3D` must have every spatial axis
divisible by 16, because it halves each axis four times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

PAPER_FEATURES = (28, 32, 64, 128, 256, 28)
"""Channels of encoder levels 0-4 and of the last decoder level, as in the paper."""

SPATIAL_MULTIPLE = 16
# In place: it follows a norm whose backward needs the norm's input, not its output (as in
# the reference code); saves a full-resolution buffer and a pass over it per block.
DEFAULT_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
DEFAULT_NORM = ("instance", {"affine": True})

LSTMState = tuple[torch.Tensor, torch.Tensor]
"""ConvLSTM ``(hidden, cell)`` state, each ``(B, C, X, Y, Z)``."""

MIN_PERIOD_S = 10.0
"""Shortest sinusoid period: times a few seconds apart get distinct encodings."""

MAX_PERIOD_S = 2400.0
"""Longest sinusoid period, 4 x 600 s: its sine rises monotonically over 0..600 s, so no two
times in that range share an encoding."""


class SinusoidalTimeEncoding(nn.Module):
    """Fixed sinusoidal encoding of physical times in seconds.

    Periods are spaced geometrically from `min_period_s` to `max_period_s`, so the
    acquisition times of a DCE series (0 to ~600 s after injection) are resolved both
    finely (short periods) and without ambiguity (the longest period is 4 x 600 s). The
    usual transformer scale (periods 2*pi s to 2*pi*10^4 s) would spend most channels on
    periods far longer than the series, where the encoding is nearly constant.

    Args:
        dim: encoding size; half sines, half cosines. Must be even and >= 4.
        min_period_s: shortest period in seconds.
        max_period_s: longest period in seconds.
    """

    def __init__(
        self, dim: int, min_period_s: float = MIN_PERIOD_S, max_period_s: float = MAX_PERIOD_S
    ):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim: expected an even number >= 4, got {dim}")
        n_frequencies = dim // 2
        log_periods = torch.linspace(math.log(min_period_s), math.log(max_period_s), n_frequencies)
        # Not persistent: a fixed function of the arguments, so checkpoints need not hold it.
        self.register_buffer(
            "angular_frequencies_per_s", 2 * math.pi * torch.exp(-log_periods), persistent=False
        )

    def forward(self, times_s: torch.Tensor) -> torch.Tensor:
        """Encode times.

        Args:
            times_s: `(B,)` times in seconds after contrast injection.

        Returns:
            `(B, dim)` float32 encoding: sines then cosines.
        """
        angles = times_s.float()[:, None] * self.angular_frequencies_per_s[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimeEmbedding(nn.Module):
    """Embedding of one iteration step from the current and the target phase time.

    The step is described by two physical times: the time of the phase fed in
    (`current_time_s`) and the time of the phase to predict (`target_time_s`). Each gets
    a `time_dim // 2` sinusoidal encoding (`SinusoidalTimeEncoding`); the two are
    concatenated (target first) and passed through a Linear-GELU-Linear MLP. A final
    GELU is applied once here, so that each U-Net block's own linear projection of the
    result is not a mere continuation of the MLP's last linear layer.

    Args:
        time_dim: embedding size `D`; a multiple of 4 (two encodings of sines and cosines).
    """

    def __init__(self, time_dim: int = 128):
        super().__init__()
        if time_dim < 8 or time_dim % 4:
            raise ValueError(f"time_dim: expected a multiple of 4 that is >= 8, got {time_dim}")
        self.encoding = SinusoidalTimeEncoding(time_dim // 2)
        self.mlp = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

    def forward(self, current_time_s: torch.Tensor, target_time_s: torch.Tensor) -> torch.Tensor:
        """Embed one step.

        Args:
            current_time_s: `(B,)` acquisition time of the input phase, seconds.
            target_time_s: `(B,)` acquisition time of the phase to predict, seconds.

        Returns:
            `(B, time_dim)` embedding.
        """
        encoding = torch.cat([self.encoding(target_time_s), self.encoding(current_time_s)], dim=1)
        return F.gelu(self.mlp(encoding))


ZERO_STATE_GATES = [0, 2, 3]
"""The gates a zero ConvLSTM state needs: input, output, candidate (not forget)."""


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
    element-wise backward kernels it then meets (activation, accumulation) take a slow path
    (up to 25x): channels-last inputs on CPU get their gradients back as dense channels-last
    tensors instead, for the price of one copy.
    """
    if tensors[0].device.type == "cpu" and _is_channels_last(tensors[0]):
        return _DenseGradChannelCat.apply(*tensors)
    return torch.cat(tensors, dim=1)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _dense_chunks(gates: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Split `(B, count * C, X, Y, Z)` into `count` gates of C channels.

    A channel slice of a channels-last tensor is strided, and bf16 sigmoid/tanh on strided
    input take a slow path on CPU (~5x); copying each gate to a dense channels-last tensor
    first is cheaper. Contiguous (NCDHW) gates are sliced as they are.
    """
    chunks = gates.chunk(count, dim=1)
    if gates.is_contiguous():
        return chunks
    return tuple(chunk.contiguous(memory_format=torch.channels_last_3d) for chunk in chunks)


class ConvLSTMCell3D(nn.Module):
    """Convolutional LSTM cell (Shi et al., NeurIPS 2015) for 3-D feature maps.

    One convolution of the input and the hidden state, concatenated along channels, gives
    the four gates (`input_channels + hidden_channels -> 4 * hidden_channels`).

    Args:
        input_channels: channels of the input feature map.
        hidden_channels: channels of the hidden and cell state.
        kernel_size: gate convolution kernel size (odd; "same" padding).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd number, got {kernel_size}")
        self.input_channels = input_channels
        self.gates = Conv["conv", 3](
            input_channels + hidden_channels,
            4 * hidden_channels,
            kernel_size=kernel_size,
            padding=kernel_size // 2,
        )

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> LSTMState:
        """Advance the state by one step.

        Args:
            x: `(B, input_channels, X, Y, Z)` input features.
            state: previous `(hidden, cell)`, each `(B, hidden_channels, X, Y, Z)`;
                None means both are zero (the initial state).

        Returns:
            The new `(hidden, cell)`; `hidden` is also the cell's output.
        """
        if state is None:
            # A zero state adds nothing to the gates and leaves the forget gate unused:
            # convolve the input alone, for the input, output and candidate gates only.
            weight = self.gates.weight.unflatten(0, (4, -1))[ZERO_STATE_GATES]
            bias = self.gates.bias.unflatten(0, (4, -1))[ZERO_STATE_GATES]
            gates = F.conv3d(
                x,
                weight[:, :, : self.input_channels].flatten(0, 1),
                bias.flatten(),
                padding=self.gates.padding,
            )
            input_gate, output_gate, candidate = _dense_chunks(gates, 3)
            cell = torch.sigmoid(input_gate) * torch.tanh(candidate)
        else:
            gates = self.gates(cat_channels(x, state[0]))
            input_gate, forget_gate, output_gate, candidate = _dense_chunks(gates, 4)
            cell = torch.sigmoid(input_gate) * torch.tanh(candidate)
            cell = cell + torch.sigmoid(forget_gate) * state[1]
        hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
        return hidden, cell


class SkipUpCat(UpCat):
    """MONAI's `UpCat` for inputs whose sizes are even at every level (no padding), with the
    skip concatenation done by `cat_channels`."""

    def __init__(self, in_chns: int, cat_chns: int, out_chns: int, **options):
        super().__init__(3, in_chns, cat_chns, out_chns, is_pad=False, **options)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample `x` `(B, in_chns, X/2, Y/2, Z/2)`, concatenate after `skip`
        `(B, cat_chns, X, Y, Z)`, and convolve: `(B, out_chns, X, Y, Z)`."""
        return self.convs(cat_channels(skip, self.upsample(x)))


def _sample_rows(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """`(B, C, X, Y, Z)` channels-last -> `(B, X*Y*Z / repeat, repeat * C)`, a view: each row
    holds `repeat` consecutive voxels, channel fastest, so column `j` is channel `j % C`.
    Raises if `x` is not dense channels-last (a view cannot be made)."""
    batch, channels = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1).view(batch, -1, repeat * channels)


def _row_repeat(x: torch.Tensor) -> int:
    """Voxels per row for `_sample_rows` of `x` `(B, C, X, Y, Z)`: on CPU, rows of a multiple
    of 32 values where the voxel count allows (CPU kernels are slow on short rows)."""
    if x.device.type != "cpu":
        return 1
    return math.gcd(32 // math.gcd(x.shape[1], 32), x[0, 0].numel())


class _RowInstanceNorm(torch.autograd.Function):
    """Affine instance norm of a channels-last `(B, C, X, Y, Z)` tensor.

    Each sample, a `(voxels, C)` matrix in memory, is seen as rows of several voxels
    (`_sample_rows`), so that a row is a multiple of 32 values: ATen's batch-norm kernels on
    such a matrix are vectorised, where on rows of C = 28 they are 3-4x slower. Batch norm of
    the rows gives per-column statistics, pooled here per channel (exactly: equal column
    sizes). Normalising is eval-mode batch norm with per-column coefficients, which computes
    in fp32 and rounds once, as the fused kernels do; the input gradient is that plus a
    multiple of the upstream gradient (two roundings: within one bf16 step). Where rows are
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
            variance = column_invstd.pow(-2).mean(1)
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
    keeps the layout but its channels-last bf16 backward is ~15x slower. A channels-last
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


def keep_channels_last(module: nn.Module) -> None:
    """Swap every `nn.InstanceNorm3d` without running statistics for `ChannelsLastInstanceNorm3d`.

    Args:
        module: changed in place; it must not hold trained weights yet (new norms start at
            weight 1, bias 0, as fresh ones do).
    """
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.InstanceNorm3d and not child.track_running_stats:
                # `bias=False` (an affine norm without bias) exists from torch 2.12 only.
                no_bias = {"bias": False} if child.affine and child.bias is None else {}
                norm = ChannelsLastInstanceNorm3d(
                    child.num_features, child.eps, affine=child.affine, **no_bias
                )
                setattr(parent, name, norm)


class UNet3D(nn.Module):
    """3-D U-Net body: 4 max-pool levels, transposed-conv up-sampling, skip concatenation.

    With `time_dim`, every encoder and decoder block has its own `Linear(time_dim, C)`
    projection of the step embedding, added to the block output as `(B, C, 1, 1, 1)`.
    With `recurrent`, a `ConvLSTMCell3D` replaces the level-0 features by its hidden state
    before the first down-sampling (time is added after it, so the state is time-free).

    Args:
        in_channels: channels of the input `x`.
        out_channels: channels of the 1x1x1 output convolution.
        features: six channel counts: encoder levels 0-4, then the last decoder level.
        time_dim: size `D` of the step embedding; None for no time conditioning.
        recurrent: add the ConvLSTM on the level-0 features.
        act: activation, MONAI form (`"name"` or `("name", {kwargs})`).
        norm: normalisation, MONAI form.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        features: Sequence[int] = PAPER_FEATURES,
        time_dim: int | None = None,
        recurrent: bool = False,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
    ):
        super().__init__()
        if len(features) != 6:
            raise ValueError(f"features: expected 6 channel counts, got {tuple(features)}")
        f = tuple(features)
        self.in_channels = in_channels
        self.conv_0 = TwoConv(3, in_channels, f[0], act, norm, bias=True)
        self.conv_lstm = ConvLSTMCell3D(f[0], f[0]) if recurrent else None
        self.downs = nn.ModuleList(Down(3, f[k], f[k + 1], act, norm, bias=True) for k in range(4))
        # Sizes are divisible by 16, so UpCat's odd-size padding (a full copy) is never needed.
        up_options = {"act": act, "norm": norm, "bias": True}
        self.ups = nn.ModuleList(
            [
                SkipUpCat(f[4], f[3], f[3], **up_options),
                SkipUpCat(f[3], f[2], f[2], **up_options),
                SkipUpCat(f[2], f[1], f[1], **up_options),
                SkipUpCat(f[1], f[0], f[5], halves=False, **up_options),
            ]
        )
        self.final_conv = Conv["conv", 3](f[5], out_channels, kernel_size=1)
        block_channels = (*f[:5], f[3], f[2], f[1], f[5])
        self.time_projections = (
            nn.ModuleList(nn.Linear(time_dim, c) for c in block_channels) if time_dim else None
        )
        keep_channels_last(self)

    def first_level(
        self, x: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState | None]:
        """Level-0 block, then the ConvLSTM if any.

        Args:
            x: `(B, in_channels, X, Y, Z)` input.
            state: ConvLSTM state; None for zeros. Ignored without a ConvLSTM.

        Returns:
            `(B, features[0], X, Y, Z)` level-0 features and the new state (None without a
            ConvLSTM).
        """
        return self.recur(self.level_0(x), state)

    def level_0(self, x: torch.Tensor) -> torch.Tensor:
        """The level-0 block alone: `(B, in_channels, X, Y, Z)` -> `(B, features[0], X, Y, Z)`."""
        # Channels-last is what oneDNN's 3-D convolutions want on CPU: with few channels the
        # backward pass is up to 20x faster than in the default layout, and the whole U-Net
        # keeps it (see ChannelsLastInstanceNorm3d). On an H200 it made the free-running stage
        # 12 % faster and the batched warm-up 17 % slower, even over a step, so there the
        # default layout and its well-trodden kernels stay.
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.conv_0(x)

    def recur(
        self, level_0: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState | None]:
        """Advance the ConvLSTM on level-0 features; its hidden state replaces them.

        Without a ConvLSTM, returns `level_0` unchanged and None.
        """
        if self.conv_lstm is None:
            return level_0, None
        state = self.conv_lstm(level_0, state)
        return state[0], state

    def forward(
        self,
        x: torch.Tensor,
        embedding: torch.Tensor | None = None,
        state: LSTMState | None = None,
    ) -> tuple[torch.Tensor, LSTMState | None]:
        """One U-Net pass.

        Args:
            x: `(B, in_channels, X, Y, Z)` input; X, Y, Z divisible by 16 (and, with
                instance norm, more than one voxel at the 1/16 scale, e.g. 16x16x32).
            embedding: `(B, time_dim)` step embedding; required iff built with `time_dim`.
            state: ConvLSTM state (see `first_level`).

        Returns:
            `(B, out_channels, X, Y, Z)` output and the new ConvLSTM state.
        """
        self.check_input(x, embedding)
        level_0, state = self.first_level(x, state)
        return self.rest(level_0, embedding), state

    def check_input(self, x: torch.Tensor, embedding: torch.Tensor | None) -> None:
        """Raise ValueError unless `x` and `embedding` suit `forward`."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected shape (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(size % SPATIAL_MULTIPLE for size in spatial):
            raise ValueError(
                f"x: spatial size {spatial} must be divisible by {SPATIAL_MULTIPLE} on every "
                "axis (the U-Net halves each axis 4 times); pad or crop the volume"
            )
        if (embedding is None) != (self.time_projections is None):
            raise ValueError(
                "embedding: must be given exactly when the U-Net is built with time_dim"
            )

    def rest(self, level_0: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """Everything after `first_level`: `(B, features[0], X, Y, Z)` level-0 features
        (after the ConvLSTM) and the `(B, time_dim)` embedding -> `(B, out_channels, X, Y, Z)`."""
        skips = [self._add_time(level_0, 0, embedding)]
        for block, down in enumerate(self.downs, start=1):
            skips.append(self._add_time(down(skips[-1]), block, embedding))
        features = skips.pop()
        for block, (up, skip) in enumerate(zip(self.ups, reversed(skips), strict=True), start=5):
            features = self._add_time(up(features, skip), block, embedding)
        return self.final_conv(features)

    def _add_time(
        self, features: torch.Tensor, block: int, embedding: torch.Tensor | None
    ) -> torch.Tensor:
        if embedding is None:
            return features
        shift = self.time_projections[block](embedding)
        if features.device.type == "cpu" and _is_channels_last(features):
            # Adding a (B, C, 1, 1, 1) tensor to a channels-last one takes a slow path on CPU
            # (~9x); added to rows of voxels, the shift is a row vector, a fast broadcast.
            batch, channels, *spatial = features.shape
            repeat = _row_repeat(features)
            rows = _sample_rows(features, repeat) + shift.repeat(1, repeat)[:, None, :]
            return rows.view(batch, *spatial, channels).permute(0, 4, 1, 2, 3)
        return features + shift[:, :, None, None, None]
