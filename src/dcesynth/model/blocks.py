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


class CaseEmbedding(nn.Module):
    """Embedding of a case's breast statistics (`dcesynth.data.tinorm.case_features`).

    A Linear-GELU-Linear MLP to the step embedding's size; the model adds it to the step
    embedding, so every U-Net block sees it after its norm, where a patch's own mean and
    scale are gone.

    Args:
        n_features: number of statistics `K`.
        time_dim: size `D` of the step embedding.
    """

    def __init__(self, n_features: int, time_dim: int = 128):
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features: expected at least 1, got {n_features}")
        self.n_features = n_features
        self.mlp = nn.Sequential(
            nn.Linear(n_features, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, K)` statistics -> `(B, time_dim)` embedding."""
        return self.mlp(features.float())


ZERO_STATE_GATES = [0, 2, 3]
"""The gates a zero ConvLSTM state needs: input, output, candidate (not forget)."""


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
            input_gate, output_gate, candidate = self.split_gates(gates, 3)
            cell = torch.sigmoid(input_gate) * torch.tanh(candidate)
        else:
            gates = self.gates(self.concat(x, state[0]))
            input_gate, forget_gate, output_gate, candidate = self.split_gates(gates, 4)
            cell = torch.sigmoid(input_gate) * torch.tanh(candidate)
            cell = cell + torch.sigmoid(forget_gate) * state[1]
        hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
        return hidden, cell

    @staticmethod
    def concat(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The gate convolution's input: `x` and `hidden` along channels."""
        return torch.cat([x, hidden], dim=1)

    @staticmethod
    def split_gates(gates: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        """`(B, count * C, X, Y, Z)` -> `count` gates of C channels."""
        return gates.chunk(count, dim=1)


class SkipUpCat(UpCat):
    """MONAI's `UpCat` for inputs whose sizes are even at every level (no padding)."""

    def __init__(self, in_chns: int, cat_chns: int, out_chns: int, **options):
        super().__init__(3, in_chns, cat_chns, out_chns, is_pad=False, **options)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample `x` `(B, in_chns, X/2, Y/2, Z/2)`, concatenate after `skip`
        `(B, cat_chns, X, Y, Z)`, and convolve: `(B, out_chns, X, Y, Z)`."""
        return self.convs(self.concat(skip, self.upsample(x)))

    @staticmethod
    def concat(skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """The skip features, then the up-sampled ones, along channels."""
        return torch.cat([skip, upsampled], dim=1)


class TimeShift(nn.Linear):
    """A block's projection of the step embedding, added to its features per channel.

    Args:
        time_dim: size `D` of the step embedding.
        channels: channels `C` of the block's features.
    """

    def __init__(self, time_dim: int, channels: int):
        super().__init__(time_dim, channels)

    def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, C, X, Y, Z)` features plus the `(B, C)` projection of `(B, D)` `embedding`."""
        return features + super().forward(embedding)[:, :, None, None, None]


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
            nn.ModuleList(TimeShift(time_dim, c) for c in block_channels) if time_dim else None
        )

    def forward(
        self,
        x: torch.Tensor,
        embedding: torch.Tensor | None = None,
        state: LSTMState | None = None,
        steps: int = 1,
    ) -> tuple[torch.Tensor, LSTMState | None]:
        """U-Net passes of `steps` consecutive steps, stacked along the batch.

        Every block but the ConvLSTM treats the `steps * B` inputs alike; the ConvLSTM
        advances through the `steps` chunks of B in order, so one call equals `steps`
        calls of one step each, with larger (faster) batches.

        Args:
            x: `(steps * B, in_channels, X, Y, Z)` input, step-major; X, Y, Z divisible by
                16 (and, with instance norm, more than one voxel at the 1/16 scale).
            embedding: `(steps * B, time_dim)` step embeddings; required iff built with
                `time_dim`.
            state: ConvLSTM `(hidden, cell)` before the first step; None for zeros.
            steps: how many steps `x` stacks.

        Returns:
            `(steps * B, out_channels, X, Y, Z)` output and the ConvLSTM state after the
            last step (None without a ConvLSTM).
        """
        self._check_input(x, steps)
        if (embedding is None) != (self.time_projections is None):
            raise ValueError(
                "embedding: must be given exactly when the U-Net is built with time_dim"
            )
        level_0 = self.level_0(x)
        if self.conv_lstm is not None:
            hidden = []
            for chunk in level_0.chunk(steps):
                state = self.conv_lstm(chunk, state)
                hidden.append(state[0])
            level_0 = hidden[0] if steps == 1 else torch.cat(hidden)
        skips = [self._add_time(level_0, 0, embedding)]
        for block, down in enumerate(self.downs, start=1):
            skips.append(self._add_time(down(skips[-1]), block, embedding))
        features = skips.pop()
        for block, (up, skip) in enumerate(zip(self.ups, reversed(skips), strict=True), start=5):
            features = self._add_time(up(features, skip), block, embedding)
        return self.final_conv(features), state

    def advance(self, x: torch.Tensor, state: LSTMState | None = None) -> LSTMState | None:
        """The ConvLSTM state after seeing `x` `(B, in_channels, X, Y, Z)`: the level-0 block
        and the ConvLSTM only, as the rest of the pass would not change the state. None
        without a ConvLSTM."""
        if self.conv_lstm is None:
            return None
        self._check_input(x, 1)
        return self.conv_lstm(self.level_0(x), state)

    def level_0(self, x: torch.Tensor) -> torch.Tensor:
        """The level-0 block: `(N, in_channels, X, Y, Z)` -> `(N, features[0], X, Y, Z)`."""
        return self.conv_0(x)

    def _check_input(self, x: torch.Tensor, steps: int) -> None:
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
        if steps < 1 or x.shape[0] % steps:
            raise ValueError(f"steps: {steps} does not divide the batch of {x.shape[0]}")

    def _add_time(
        self, features: torch.Tensor, block: int, embedding: torch.Tensor | None
    ) -> torch.Tensor:
        if embedding is None:
            return features
        return self.time_projections[block](features, embedding)
