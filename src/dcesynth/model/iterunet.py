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
    CaseEmbedding,
    TimeEmbedding,
    UNet3D,
)

MODEL_NAMES = ("iterunet", "baseline")


class PhaseModel(nn.Module):
    """The one interface of the models: pre-contrast and observed phases in, later phases out.

    `forward` checks the arguments and the model's own rule for which protocols it serves
    (`check_protocol`), then runs `rollout`. A model built with `n_case_features` K > 0
    also takes each case's breast statistics (`dcesynth.data.tinorm.case_features`),
    embedded (`CaseEmbedding`) and added to every step's embedding. An iterU-Net built
    with `prior` takes a prior prediction of the phases and steps from it (`IterUNet`).
    """

    uses_prior = False

    def forward(
        self,
        pre: torch.Tensor,
        observed: torch.Tensor,
        times_s: torch.Tensor,
        teacher: torch.Tensor | None = None,
        teacher_mask: torch.Tensor | None = None,
        case_features: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the phases at the target times.

        Args:
            pre: `(B, in_channels - 1, X, Y, Z)` pre-contrast image.
            observed: `(B, T_obs, X, Y, Z)` observed post-contrast phases, `T_obs >= 1`.
            times_s: `(B, T_obs + K)` times of the observed then the K target phases,
                seconds after injection.
            teacher: `(B, K, X, Y, Z)` real target phases for teacher forcing, or None.
            teacher_mask: `(B, K)` bool, which of `teacher`'s phases are fed (scheduled
                sampling: the model's own prediction goes in where False); None feeds all.
            case_features: `(B, n_case_features)` breast statistics; exactly when the
                model is built with them.
            prior: `(B, 1 + K, X, Y, Z)` a prior prediction of the phases at the last
                observed time then at each target time, in the inputs' units; exactly
                when the model is built with one (`uses_prior`).

        Returns:
            `(B, K, X, Y, Z)` predictions, one per target time.

        Raises:
            ValueError: shapes disagree, the model does not serve the protocol, or a
                spatial axis is not divisible by 16.
        """
        n_targets = check_protocol_args(pre, observed, times_s, teacher, teacher_mask)
        try:
            self.check_protocol(observed.shape[1], n_targets)
        except ValueError as exc:
            raise ValueError(f"times_s: {exc}") from None
        case = self.embed_case(case_features, pre.shape[0])
        expected = (pre.shape[0], n_targets + 1, *pre.shape[2:])
        if (prior is not None) != self.uses_prior or (
            prior is not None and tuple(prior.shape) != expected
        ):
            wanted = f"a prior of shape {expected}" if self.uses_prior else "no prior"
            got = None if prior is None else tuple(prior.shape)
            raise ValueError(f"prior: this model takes {wanted}; got {got}")
        return self.rollout(pre, observed, times_s, teacher, teacher_mask, case, prior)

    @property
    def n_case_features(self) -> int:
        """K, the breast statistics the model takes; 0 without."""
        return 0 if self.case_embedding is None else self.case_embedding.n_features

    def embed_case(self, case_features: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """`(B, time_dim)` embedding of `(B, K)` `case_features`; None without them.

        Raises:
            ValueError: features given to a model without them, missing, or misshapen.
        """
        expected = (batch, self.n_case_features)
        if case_features is None and not self.n_case_features:
            return None
        if case_features is None or tuple(case_features.shape) != expected or not expected[1]:
            got = None if case_features is None else tuple(case_features.shape)
            raise ValueError(
                f"case_features: this model takes {self.n_case_features} breast statistics "
                f"per case, shape {expected}; got {got}"
            )
        return self.case_embedding(case_features)

    def check_protocol(self, n_observed: int, n_targets: int) -> None:
        """Raise ValueError unless the model predicts `n_targets` phases after `n_observed`."""
        raise NotImplementedError

    def rollout(self, pre, observed, times_s, teacher, teacher_mask=None, case=None, prior=None):
        """`forward` after its checks; the same arguments and result, with the breast
        statistics as their `(B, time_dim)` embedding `case` (None without)."""
        raise NotImplementedError


class IterUNet(PhaseModel):
    """iterU-Net: predicts the next phase from the pre-contrast image and the current phase.

    `next = current + conv1x1(decoder)` (output-level residual). With `temporal`, each step
    is conditioned on physical time: the current and the target acquisition times in
    seconds, each sinusoidally encoded (periods 10 s to 2400 s, so 0-600 s is resolved
    finely and without ambiguity) and concatenated, through a Linear-GELU-Linear MLP
    (`TimeEmbedding`), computed once per step as `(B, D)` and projected per block to
    `(B, C)`; seeing both times, the MLP can also use the gap. And a ConvLSTM on
    the level-0 features carries `(hidden, cell)` from step to step, starting at zeros.
    `temporal=False` (the paper's ablation) has neither, and no parameters for them.

    With `prior` (beyond the paper) each step starts from the prior's change instead of
    no change: `next = current + (prior[target] - prior[current]) + U-Net`, the U-Net
    seeing that change as one more input channel. From a regression model's prediction
    (`dcesynth.regression`), the U-Net learns what the regression misses rather than the
    whole enhancement; its output convolution starts at zero, so an untrained model's
    rollout ends on the prior.

    Args:
        in_channels: network input channels: the pre-contrast image's channels + 1.
        features: six channel counts (see `UNet3D`).
        temporal: time embedding and ConvLSTM on or off.
        time_dim: size of the step embedding (a multiple of 4).
        act: activation, MONAI form.
        norm: normalisation, MONAI form.
        n_case_features: K breast statistics per case (`PhaseModel`); 0 for none, the
            paper's model.
        prior: step from a prior prediction (see above); False is the paper's model.
    """

    def __init__(
        self,
        in_channels: int = 2,
        features: Sequence[int] = PAPER_FEATURES,
        temporal: bool = True,
        time_dim: int = 128,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
        n_case_features: int = 0,
        prior: bool = False,
    ):
        super().__init__()
        self.temporal = temporal
        self.uses_prior = prior
        self.time_embedding = TimeEmbedding(time_dim) if temporal else None
        self.case_embedding = CaseEmbedding(n_case_features, time_dim) if n_case_features else None
        self.unet = UNet3D(
            in_channels + int(prior),
            out_channels=1,
            features=features,
            time_dim=time_dim if temporal or n_case_features else None,
            recurrent=temporal,
            act=act,
            norm=norm,
        )
        if prior:
            # Training starts from the prior itself, the U-Net adding nothing yet.
            nn.init.zeros_(self.unet.final_conv.weight)
            nn.init.zeros_(self.unet.final_conv.bias)

    def rollout(self, pre, observed, times_s, teacher, teacher_mask=None, case=None, prior=None):
        """Predict every target phase in order, starting from the last observed phase.

        With several observed phases, the earlier ones only warm up the ConvLSTM state, so
        only the last observed time conditions the first prediction. Then each prediction
        is fed back as the next input (free-running), or with `teacher` the real phase is
        (teacher forcing: every step's input is known in advance, so all steps run as one
        batch through the U-Net, the ConvLSTM stepping through them in order);
        `teacher[:, k]` is the input of the step to target `k + 1`, so the last one is
        never fed. With `teacher_mask` the steps run in order, each sample's input being
        its real phase where the mask is True and its own prediction elsewhere (scheduled
        sampling). Arguments and result as `PhaseModel.forward`.
        """
        n_observed = observed.shape[1]
        n_targets = times_s.shape[1] - n_observed
        # The prior's change over each step: added to the step's output and fed as an input.
        changes = None if prior is None else prior[:, 1:] - prior[:, :-1]
        state = None
        for index in range(n_observed - 1):
            # Earlier observed phases only warm up the state; a prior's change is zero there.
            phase = observed[:, index : index + 1]
            change = None if prior is None else torch.zeros_like(phase)
            state = self.unet.advance(self._unet_input(pre, phase, change), state)
        current = observed[:, -1:]
        input_times_s = times_s[:, n_observed - 1 : -1]
        target_times_s = times_s[:, n_observed:]
        if teacher is not None and teacher_mask is None:
            inputs = torch.cat([current, teacher[:, :-1]], dim=1)
            x = torch.cat(
                [
                    self._unet_input(pre, inputs[:, k : k + 1], _step(changes, k))
                    for k in range(n_targets)
                ]
            )
            embedding = self._embed(
                input_times_s.T.flatten(),
                target_times_s.T.flatten(),
                None if case is None else case.repeat(n_targets, 1),
            )
            deltas, _ = self.unet(x, embedding, state, steps=n_targets)
            outputs = inputs + torch.cat(deltas.chunk(n_targets), dim=1)
            return outputs if changes is None else outputs + changes
        predictions = []
        for step in range(n_targets):
            if teacher is not None and step > 0:
                fed = teacher_mask[:, step - 1].view(-1, *[1] * (current.ndim - 1))
                current = torch.where(fed, teacher[:, step - 1 : step], current)
            embedding = self._embed(input_times_s[:, step], target_times_s[:, step], case)
            change = _step(changes, step)
            delta, state = self.unet(self._unet_input(pre, current, change), embedding, state)
            current = current + delta if change is None else current + change + delta
            predictions.append(current)
        return torch.cat(predictions, dim=1)

    @staticmethod
    def _unet_input(
        pre: torch.Tensor, phase: torch.Tensor, change: torch.Tensor | None
    ) -> torch.Tensor:
        """The U-Net's input: pre, the step's input phase and, with a prior, its change."""
        return torch.cat([pre, phase] if change is None else [pre, phase, change], dim=1)

    def check_protocol(self, n_observed: int, n_targets: int) -> None:
        """iterU-Net serves any protocol: one or more observed phases, any targets."""
        if n_observed < 1 or n_targets < 1:
            raise ValueError(
                f"iterU-Net needs an observed and a target phase, got {n_observed} and {n_targets}"
            )

    def _embed(
        self,
        current_time_s: torch.Tensor,
        target_time_s: torch.Tensor,
        case: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """`(N, time_dim)` step embeddings of `(N,)` times plus the `(N, time_dim)` case
        embedding, either alone where the other is off; None with neither."""
        if self.time_embedding is None:
            return case
        embedding = self.time_embedding(current_time_s, target_time_s)
        return embedding if case is None else embedding + case


class BaselineUNet(PhaseModel):
    """The paper's baseline: one plain 3-D U-Net per target phase, no iteration, no time.

    Target `k` is predicted directly from the pre-contrast image and the first observed
    phase, as that phase plus the U-Net output (the same output-level residual as
    iterU-Net). It takes iterU-Net's arguments, so training and prediction treat both
    models alike; times, `teacher` and `teacher_mask` are ignored.

    Args:
        n_targets: number of target phases, one U-Net each.
        in_channels: network input channels: the pre-contrast image's channels + 1.
        features: six channel counts (see `UNet3D`).
        act: activation, MONAI form.
        norm: normalisation, MONAI form.
        n_case_features: K breast statistics per case (`PhaseModel`), one embedding that
            every U-Net's blocks project; 0 for none, the paper's baseline.
        time_dim: size of that embedding.
    """

    def __init__(
        self,
        n_targets: int,
        in_channels: int = 2,
        features: Sequence[int] = PAPER_FEATURES,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
        n_case_features: int = 0,
        time_dim: int = 128,
    ):
        super().__init__()
        if n_targets < 1:
            raise ValueError(f"n_targets: expected at least 1, got {n_targets}")
        self.n_targets = n_targets
        self.case_embedding = CaseEmbedding(n_case_features, time_dim) if n_case_features else None
        embedding_dim = time_dim if n_case_features else None
        self.unets = nn.ModuleList(
            UNet3D(in_channels, 1, features, embedding_dim, act=act, norm=norm)
            for _ in range(n_targets)
        )

    def rollout(self, pre, observed, times_s, teacher, teacher_mask=None, case=None, prior=None):
        """Predict the phases after the observed ones, each from `pre` and the first one:
        the last K of the `n_targets` phases after `observed[:, 0]`. Times, `teacher` and
        `teacher_mask` are not used. Arguments and result as `PhaseModel.forward`."""
        n_targets = times_s.shape[1] - observed.shape[1]
        first = observed[:, :1]
        x = torch.cat([pre, first], dim=1)
        unets = self.unets[self.n_targets - n_targets :]
        return torch.cat([first + unet(x, case)[0] for unet in unets], dim=1)

    def check_protocol(self, n_observed: int, n_targets: int) -> None:
        """The baseline predicts its `n_targets` phases after the first observed one: the
        observed phases after it and the targets must be exactly those."""
        if n_observed - 1 + n_targets != self.n_targets:
            raise ValueError(
                f"this baseline predicts {self.n_targets} phases after 1dyn; the protocol asks "
                f"for {n_observed - 1 + n_targets}"
            )


def _step(changes: torch.Tensor | None, step: int) -> torch.Tensor | None:
    """`(B, 1, X, Y, Z)` the prior's change over rollout step `step`; None without a prior."""
    return None if changes is None else changes[:, step : step + 1]


def build_model(
    name: str,
    features: Sequence[int],
    temporal: bool,
    n_targets: int,
    pre_channels: int = 1,
    n_case_features: int = 0,
    prior: bool = False,
) -> IterUNet | BaselineUNet:
    """Build a model by name.

    Args:
        name: `"iterunet"` or `"baseline"`.
        features: six channel counts (see `UNet3D`).
        temporal: iterU-Net time embedding and ConvLSTM on/off; the baseline has neither.
        n_targets: number of target phases; sets the baseline's U-Net count (iterU-Net
            predicts any number).
        pre_channels: channels of the `pre` argument: the pre-contrast image and any
            fixed inputs beside it.
        n_case_features: breast statistics per case the model is conditioned on
            (`PhaseModel`); 0 for none.
        prior: iterU-Net steps from a prior prediction (`IterUNet`); the baseline has none.

    Returns:
        The model, with default activation and normalisation.
    """
    if name == "iterunet":
        return IterUNet(
            pre_channels + 1,
            features=features,
            temporal=temporal,
            n_case_features=n_case_features,
            prior=prior,
        )
    if prior:
        raise ValueError(f"prior: only iterunet steps from a prior, not {name!r}")
    if name == "baseline":
        return BaselineUNet(
            n_targets, pre_channels + 1, features=features, n_case_features=n_case_features
        )
    raise ValueError(f"model name: expected one of {', '.join(MODEL_NAMES)}, got {name!r}")


def check_protocol_args(
    pre: torch.Tensor,
    observed: torch.Tensor,
    times_s: torch.Tensor,
    teacher: torch.Tensor | None,
    teacher_mask: torch.Tensor | None = None,
) -> int:
    """The number K of target phases; ValueError unless the model arguments agree in shape."""
    if pre.ndim != 5:
        raise ValueError(f"pre: expected shape (B, C, X, Y, Z), got {tuple(pre.shape)}")
    batch, spatial = pre.shape[0], tuple(pre.shape[2:])
    if observed.ndim != 5 or observed.shape[0] != batch or tuple(observed.shape[2:]) != spatial:
        raise ValueError(
            f"observed: expected shape ({batch}, T_obs, *{spatial}) matching pre, got "
            f"{tuple(observed.shape)}"
        )
    if observed.shape[1] == 0:
        raise ValueError("observed: expected at least one observed post-contrast phase")
    n_observed = observed.shape[1]
    if times_s.ndim != 2 or times_s.shape[0] != batch or times_s.shape[1] <= n_observed:
        raise ValueError(
            f"times_s: expected shape ({batch}, {n_observed} + K) in seconds, K >= 1 targets, "
            f"got {tuple(times_s.shape)}"
        )
    n_targets = times_s.shape[1] - n_observed
    if teacher is not None and tuple(teacher.shape) != (batch, n_targets, *spatial):
        raise ValueError(
            f"teacher: expected shape {(batch, n_targets, *spatial)} (one phase per target "
            f"time), got {tuple(teacher.shape)}"
        )
    if teacher_mask is not None and (
        teacher is None
        or teacher_mask.dtype != torch.bool
        or tuple(teacher_mask.shape) != (batch, n_targets)
    ):
        raise ValueError(
            f"teacher_mask: expected a bool tensor of shape {(batch, n_targets)} beside "
            f"teacher, got {teacher_mask.dtype} {tuple(teacher_mask.shape)}"
            + ("" if teacher is not None else " without teacher")
        )
    return n_targets
