"""iterU-Net (Chung et al., MICCAI 2025) and the per-phase U-Net baseline.

Both run the one U-Net body, `dcesynth.model.blocks.UNet3D`: `IterUNet` iterates it over
phases with time conditioning and a ConvLSTM; `BaselineUNet` holds one plain `UNet3D` per
target phase. Spatial sizes must be divisible by 16 on every axis (4 max-pool levels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from dcesynth.model.blocks import (
    DEFAULT_ACT,
    DEFAULT_NORM,
    PAPER_FEATURES,
    LSTMState,
    TimeEmbedding,
    UNet3D,
)

MODEL_NAMES = ("iterunet", "baseline")

Times = torch.Tensor | float


class IterUNet(nn.Module):
    """iterU-Net: predicts the next phase from the pre-contrast image and the current phase.

    `next = current + conv1x1(decoder)` (output-level residual). With `temporal`, each step
    is conditioned on physical time: the current and the target acquisition times in
    seconds, each sinusoidally encoded (periods 10 s to 2400 s, so 0-600 s is resolved
    finely and without ambiguity) and concatenated, through a Linear-GELU-Linear MLP
    (`TimeEmbedding`), computed once per step as `(B, D)` and projected per block to
    `(B, C)`; seeing both times, the MLP can also use the gap. And a ConvLSTM on
    the level-0 features carries `(hidden, cell)` from step to step, starting at zeros.
    `temporal=False` (the paper's ablation) has neither, and no parameters for them.

    Args:
        in_channels: network input channels: the pre-contrast image's channels + 1.
        features: six channel counts (see `UNet3D`).
        temporal: time embedding and ConvLSTM on or off.
        time_dim: size of the step embedding (a multiple of 4).
        act: activation, MONAI form.
        norm: normalisation, MONAI form.
    """

    def __init__(
        self,
        in_channels: int = 2,
        features: Sequence[int] = PAPER_FEATURES,
        temporal: bool = True,
        time_dim: int = 128,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
    ):
        super().__init__()
        self.temporal = temporal
        self.time_embedding = TimeEmbedding(time_dim) if temporal else None
        self.unet = UNet3D(
            in_channels,
            out_channels=1,
            features=features,
            time_dim=time_dim if temporal else None,
            recurrent=temporal,
            act=act,
            norm=norm,
        )

    def step(
        self,
        pre: torch.Tensor,
        current: torch.Tensor,
        current_time_s: Times,
        target_time_s: Times,
        state: LSTMState | None = None,
    ) -> tuple[torch.Tensor, LSTMState | None]:
        """Predict the phase at `target_time_s` from the phase at `current_time_s`.

        Args:
            pre: `(B, in_channels - 1, X, Y, Z)` pre-contrast image.
            current: `(B, 1, X, Y, Z)` current phase.
            current_time_s: `(B,)` tensor or float, seconds after injection of `current`.
            target_time_s: `(B,)` tensor or float, seconds after injection of the target.
            state: ConvLSTM `(hidden, cell)` from the previous step; None for zeros.

        Returns:
            `(B, 1, X, Y, Z)` predicted phase and the new state (None if not temporal).

        Raises:
            ValueError: shapes disagree, a spatial axis is not divisible by 16, or a time
                tensor is not `(B,)`.
        """
        _check_phase("current", current, pre)
        embedding = self._embed(pre, current_time_s, target_time_s)
        delta, state = self.unet(torch.cat([pre, current], dim=1), embedding, state)
        return current + delta, state

    def _embed(
        self, pre: torch.Tensor, current_time_s: Times, target_time_s: Times
    ) -> torch.Tensor | None:
        """`(B, time_dim)` step embedding, or None without time conditioning."""
        if self.time_embedding is None:
            return None
        batch_size, device = pre.shape[0], pre.device
        return self.time_embedding(
            _batch_times("current_time_s", current_time_s, batch_size, device),
            _batch_times("target_time_s", target_time_s, batch_size, device),
        )

    def _teacher_forced(
        self,
        pre: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        input_times_s: Sequence[Times],
        target_times_s: Sequence[Times],
        state: LSTMState | None,
    ) -> list[torch.Tensor]:
        """Every step of a teacher-forced rollout in one batch of `len(inputs) * B`.

        With teacher forcing every step's input is known in advance, and only the ConvLSTM
        depends on the step before: the level-0 block runs once on all steps, the ConvLSTM
        step by step on its slices, and the rest of the U-Net once on all steps again. The
        same function as calling `step` in a loop, with larger (faster) batches.
        """
        for index, phase in enumerate(inputs):
            _check_phase(f"rollout input {index}", phase, pre)
        x = torch.cat([torch.cat([pre, phase], dim=1) for phase in inputs])
        embeddings = [
            self._embed(pre, current, target)
            for current, target in zip(input_times_s, target_times_s, strict=True)
        ]
        embedding = None if embeddings[0] is None else torch.cat(embeddings)
        self.unet.check_input(x, embedding)
        hidden = []
        for level_0 in self.unet.level_0(x).chunk(len(inputs)):
            level_0, state = self.unet.recur(level_0, state)
            hidden.append(level_0)
        deltas = self.unet.rest(torch.cat(hidden), embedding).chunk(len(inputs))
        return [phase + delta for phase, delta in zip(inputs, deltas, strict=True)]

    def rollout(
        self,
        pre: torch.Tensor,
        observed: Sequence[torch.Tensor],
        observed_times_s: Sequence[Times],
        target_times_s: Sequence[Times],
        teacher: Sequence[torch.Tensor] | None = None,
        batch_steps: bool = True,
    ) -> list[torch.Tensor]:
        """Predict every target phase in order, starting from the last observed phase.

        Any start phase works: with several observed phases, the earlier ones only warm up
        the ConvLSTM state (their level-0 features advance it; the rest of the U-Net is not
        run, as its output would be discarded), so only the last observed time conditions
        the first prediction. Then each prediction is fed back as the next input
        (free-running), or with `teacher` the real phase is (teacher forcing).

        Args:
            pre: `(B, in_channels - 1, X, Y, Z)` pre-contrast image.
            observed: one or more observed post-contrast phases, each `(B, 1, X, Y, Z)`.
            observed_times_s: their times, seconds (`(B,)` tensors or floats); only the
                last is used, as the ConvLSTM warm-up is time-free.
            target_times_s: times of the phases to predict, in order, seconds.
            teacher: real target phases, one per target; `teacher[k]` is the input of the
                step to target `k + 1` (so the last one is never fed).
            batch_steps: with `teacher`, run all steps as one batch (faster: on an H200
                0.078 s against 0.111 s a warm-up step of the paper's model, on a 2-core CPU
                3-5 %); False runs them one by one.

        Returns:
            One `(B, 1, X, Y, Z)` prediction per target time.
        """
        _check_rollout_args(observed, observed_times_s, target_times_s, teacher)
        state = None
        if self.unet.conv_lstm is not None:
            for index, phase in enumerate(observed[:-1]):
                _check_phase(f"observed[{index}]", phase, pre)
                _, state = self.unet.first_level(torch.cat([pre, phase], dim=1), state)
        current, current_time_s = observed[-1], observed_times_s[-1]
        if teacher is not None and batch_steps and len(target_times_s) > 1:
            inputs = [current, *teacher[:-1]]
            input_times_s = [current_time_s, *target_times_s[:-1]]
            return self._teacher_forced(pre, inputs, input_times_s, target_times_s, state)
        predictions = []
        for index, target_time_s in enumerate(target_times_s):
            prediction, state = self.step(pre, current, current_time_s, target_time_s, state)
            predictions.append(prediction)
            current = prediction if teacher is None else teacher[index]
            current_time_s = target_time_s
        return predictions

    def forward(
        self,
        pre: torch.Tensor,
        observed: Sequence[torch.Tensor],
        observed_times_s: Sequence[Times],
        target_times_s: Sequence[Times],
        teacher: Sequence[torch.Tensor] | None = None,
        batch_steps: bool = True,
    ) -> list[torch.Tensor]:
        """Same as `rollout`."""
        return self.rollout(pre, observed, observed_times_s, target_times_s, teacher, batch_steps)


class BaselineUNet(nn.Module):
    """The paper's baseline: one plain 3-D U-Net per target phase, no iteration, no time.

    Target `k` is predicted directly from the pre-contrast image and the first observed
    phase, as that phase plus the U-Net output (the same output-level residual as
    iterU-Net). `rollout` has iterU-Net's signature so training and prediction treat both
    models alike; times and `teacher` are ignored.

    Args:
        n_targets: number of target phases, one U-Net each.
        in_channels: network input channels: the pre-contrast image's channels + 1.
        features: six channel counts (see `UNet3D`).
        act: activation, MONAI form.
        norm: normalisation, MONAI form.
    """

    def __init__(
        self,
        n_targets: int,
        in_channels: int = 2,
        features: Sequence[int] = PAPER_FEATURES,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
    ):
        super().__init__()
        if n_targets < 1:
            raise ValueError(f"n_targets: expected at least 1, got {n_targets}")
        self.n_targets = n_targets
        self.unets = nn.ModuleList(
            UNet3D(in_channels, 1, features, act=act, norm=norm) for _ in range(n_targets)
        )

    def rollout(
        self,
        pre: torch.Tensor,
        observed: Sequence[torch.Tensor],
        observed_times_s: Sequence[Times],
        target_times_s: Sequence[Times],
        teacher: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Predict each of the `n_targets` phases from `pre` and `observed[0]`.

        Args: as `IterUNet.rollout`; `target_times_s` must have `n_targets` entries.

        Returns:
            One `(B, 1, X, Y, Z)` prediction per target, in target order.
        """
        _check_rollout_args(observed, observed_times_s, target_times_s, teacher)
        if len(target_times_s) != self.n_targets:
            raise ValueError(
                f"target_times_s: the baseline predicts exactly {self.n_targets} phases, "
                f"got {len(target_times_s)} target times"
            )
        first = observed[0]
        _check_phase("observed[0]", first, pre)
        x = torch.cat([pre, first], dim=1)
        return [first + unet(x)[0] for unet in self.unets]

    def forward(
        self,
        pre: torch.Tensor,
        observed: Sequence[torch.Tensor],
        observed_times_s: Sequence[Times],
        target_times_s: Sequence[Times],
        teacher: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Same as `rollout`."""
        return self.rollout(pre, observed, observed_times_s, target_times_s, teacher)


def build_model(
    name: str, features: Sequence[int], temporal: bool, n_targets: int
) -> IterUNet | BaselineUNet:
    """Build a model by name.

    Args:
        name: `"iterunet"` or `"baseline"`.
        features: six channel counts (see `UNet3D`).
        temporal: iterU-Net time embedding and ConvLSTM on/off; the baseline has neither.
        n_targets: number of target phases; sets the baseline's U-Net count (iterU-Net
            predicts any number).

    Returns:
        The model, with default activation and normalisation.
    """
    if name == "iterunet":
        return IterUNet(features=features, temporal=temporal)
    if name == "baseline":
        return BaselineUNet(n_targets, features=features)
    raise ValueError(f"model name: expected one of {', '.join(MODEL_NAMES)}, got {name!r}")


def _check_phase(name: str, phase: torch.Tensor, pre: torch.Tensor) -> None:
    expected = (pre.shape[0], 1, *pre.shape[2:])
    if pre.ndim != 5 or tuple(phase.shape) != expected:
        raise ValueError(
            f"{name}: expected shape (B, 1, X, Y, Z) matching pre {tuple(pre.shape)}, "
            f"got {tuple(phase.shape)}"
        )


def _check_rollout_args(
    observed: Sequence[torch.Tensor],
    observed_times_s: Sequence[Times],
    target_times_s: Sequence[Times],
    teacher: Sequence[torch.Tensor] | None,
) -> None:
    if len(observed) == 0:
        raise ValueError("observed: expected at least one observed post-contrast phase")
    if len(observed_times_s) != len(observed):
        raise ValueError(
            f"observed_times_s: expected {len(observed)} times (one per observed phase), "
            f"got {len(observed_times_s)}"
        )
    if teacher is not None and len(teacher) != len(target_times_s):
        raise ValueError(
            f"teacher: expected {len(target_times_s)} phases (one per target time), "
            f"got {len(teacher)}"
        )


def _batch_times(name: str, times_s: Times, batch_size: int, device: torch.device) -> torch.Tensor:
    times = torch.as_tensor(times_s, dtype=torch.float32, device=device)
    if times.ndim == 0:
        return times.expand(batch_size)
    if tuple(times.shape) != (batch_size,):
        raise ValueError(
            f"{name}: expected a float or a tensor of shape ({batch_size},) in seconds, "
            f"got shape {tuple(times.shape)}"
        )
    return times
