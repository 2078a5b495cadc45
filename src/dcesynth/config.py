"""Typed configuration: one frozen dataclass per concern, presets as data.

A run writes its resolved :class:`RunConfig` into its run folder beside the weights
(``dcesynth.rundir``), so a run folder explains itself and ``predict`` rebuilds the
model from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dcesynth.data.tinorm import CASE_FEATURES, NORMALISATIONS
from dcesynth.io import InputError
from dcesynth.regression import RegressionConfig

MODEL_CHOICES = ("iterunet", "baseline", "regression")

PRIORS = ("none", "regression")

PAPER_FEATURES = (28, 32, 64, 128, 256, 28)


@dataclass(frozen=True)
class ModelConfig:
    """Network choice.

    Attributes:
        name: "iterunet" (one network applied iteratively), "baseline" (one plain
            U-Net per target phase, the paper's comparison) or "regression" (the
            classical model of ``dcesynth.regression``; no network).
        features: channels per U-Net level (MONAI BasicUNet convention, 6 values).
        temporal: time embedding + ConvLSTM; False is the paper's ablation.
        relative_enhancement: a network input beside pre and the current phase: the
            relative enhancement of 1dyn over pre, ``(S1 - S0) / S0`` of the signal
            (``dcesynth.data.tinorm.context_channels``), which TI-norm cannot express.
            False is the paper's input.
        normalisation: how a case's intensities are mapped for the network
            (``dcesynth.data.tinorm.fit_input_norm``): "ti", TI-norm (the paper's), or
            "pre", referenced to the pre-contrast phase's mean in the breast ROI.
        case_features: condition the network on the breast's enhancement statistics
            (``dcesynth.data.tinorm.case_features``), embedded beside the time in every
            U-Net block; False is the paper's model.
        prior: what iterU-Net's steps start from. "none": the current phase (the
            paper's residual, ``next = current + U-Net``). "regression": the current
            phase plus the change that a regression model (``dcesynth.regression``,
            fitted on the run's training cases) predicts from the current to the target
            time; the U-Net sees that change as an input and learns what to add to it.
    """

    name: str = "iterunet"
    features: tuple[int, ...] = PAPER_FEATURES
    temporal: bool = True
    relative_enhancement: bool = False
    normalisation: str = "ti"
    case_features: bool = False
    prior: str = "none"

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"model.normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}"
            )
        if self.prior not in PRIORS:
            raise ValueError(f"model.prior must be one of {PRIORS}, got {self.prior!r}")
        if self.prior != "none" and self.name != "iterunet":
            raise ValueError(f"model.prior {self.prior!r} is for iterunet, not {self.name!r}")

    @property
    def pre_channels(self) -> int:
        """Channels of the network's `pre` input: the pre-contrast image and any context."""
        return 1 + int(self.relative_enhancement)

    @property
    def n_case_features(self) -> int:
        """Breast statistics per case the network takes (``CASE_FEATURES``), or 0."""
        return len(CASE_FEATURES) if self.case_features else 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule and sampling.

    Attributes:
        patch: crop size (X, Y, Z), each divisible by 16.
        cases_per_step: cases per optimiser step; each gives 2 patches (one centred
            in a lesion, one anywhere in the breast ROI), so the batch is twice this;
            without ``roi_patch``, the lesion patch alone.
        roi_patch: each case also gives the patch anywhere in the ROI (the paper's).
        warmup_steps: stage 1, teacher forcing (real phase k in, k+1 out).
        optim_steps: stage 2, free-running rollout from the warm-up weights.
        scheduled_sampling: fraction of stage 2 over which each rollout step's input
            goes from the real phase to the model's own prediction, per sample with a
            probability falling linearly from 1 to 0 (scheduled sampling, Bengio et al.
            2015); 0 = fully free-running from the first stage-2 step, as the paper.
        lr, weight_decay: AdamW.
        enhancement_mask: weight prediction and target by sqrt(|last - first post|)
            in stage 2, as the reference code does.
        loss_weights: (l1, ssim, perceptual, gdl[, lesion[, parenchyma]]) as
            ``LossWeights`` takes them; a term left out weighs 0.
        val_fraction: share of cases held out for validation (at least one).
        max_val_cases: at most this many validation cases. Validation predicts each one
            whole at every validation, so its time grows with the cohort: 100 phantom
            cases hold about 125 lesions, what ``evaluate`` needs to tell models apart.
        val_every: steps between validations (and checkpoints).
        amp: bf16 autocast; None lets the device decide (``dcesynth.accel.use_bf16``:
            on CUDA, and on CPUs with bf16 matrix units, where it is the faster precision).
        lesion_offset: the lesion patch's centre is a lesion voxel moved by up to this
            fraction of the half patch per axis (0 = centred, the paper). Prediction
            tiles windows wherever they fall, so a lesion sits anywhere in a window.
        workers: data-loading worker processes (0 = in the main process).
        seed: fixes the split, sampling, augmentation and initialisation.
    """

    patch: tuple[int, int, int] = (96, 96, 48)
    cases_per_step: int = 1
    roi_patch: bool = True
    warmup_steps: int = 3200
    optim_steps: int = 3200
    scheduled_sampling: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 1e-3
    enhancement_mask: bool = True
    loss_weights: tuple[float, ...] = (0.1, 1.0, 1.0, 0.1)
    val_fraction: float = 0.2
    max_val_cases: int = 100
    val_every: int = 160
    amp: bool | None = None
    lesion_offset: float = 0.0
    workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scheduled_sampling <= 1.0:
            raise ValueError(
                f"train.scheduled_sampling must be in [0, 1], got {self.scheduled_sampling}"
            )
        if self.max_val_cases < 1:
            raise ValueError(f"train.max_val_cases must be at least 1, got {self.max_val_cases}")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.optim_steps


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, written to its run folder.

    ``regression`` configures the classical model (``model.name == "regression"``),
    which ignores ``train`` but for its seed. ``n_targets`` is what training learnt
    from the data: the phases after 1dyn in the training protocol, which the baseline
    predicts (iterU-Net and the regression model predict any number); None until a
    run sets it, and in runs whose weights' metadata holds it instead
    (``RunDir.n_targets``).
    """

    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    version: str = ""
    n_targets: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        model = ModelConfig(**{k: _tuple(v) for k, v in data["model"].items()})
        train = TrainConfig(**{k: _tuple(v) for k, v in data["train"].items()})
        regression = RegressionConfig(
            **{k: _tuple(v) for k, v in data.get("regression", {}).items()}
        )
        n_targets = data.get("n_targets")
        if n_targets is not None and (not isinstance(n_targets, int) or n_targets < 1):
            raise ValueError(f"n_targets must be a positive integer, got {n_targets!r}")
        return cls(
            preset=data["preset"],
            model=model,
            train=train,
            regression=regression,
            version=data.get("version", ""),
            n_targets=n_targets,
        )


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


SMALL_FEATURES = (8, 8, 16, 32, 64, 8)

# Product presets go beyond the paper where measurements on the phantom said so
# (README, "Results"): the lesion loss term, heavier L1, lesion patches placed anywhere in
# the patch, small patches (many more steps in the same time: a phantom lesion is at most
# ~10 voxels across), no stage-2 enhancement weighting (the lesion term does its job), and
# for `cpu` a free-running stage nearly twice the warm-up's length, sized to train in
# 45 minutes on a 2-core AVX2 CPU (README, "Results": twice these steps scored no better).
# `demo` is 50 + 50 steps so that `make demo` runs in about 8 minutes there: the demo trains
# iterU-Net on the regression prior, which starts it from a model that beats copy-forward.
# Both normalise to the pre-contrast phase: trained on the randomised phantom, the
# regression met the paper-protocol thresholds with it and missed them with TI-norm
# (docs/method.md, "Normalisation").
PRODUCT_LOSS = (1.0, 0.5, 1.0, 0.1, 2.0)

# The paper: 40 epochs of 160 cases, batch 1 case (2 patches). The split between
# stages is not given; we spend half on each.
PRESETS: dict[str, RunConfig] = {
    "demo": RunConfig(
        preset="demo",
        model=ModelConfig(features=SMALL_FEATURES, normalisation="pre"),
        regression=RegressionConfig(normalisation="pre"),
        train=TrainConfig(
            patch=(32, 32, 16),
            cases_per_step=2,
            warmup_steps=50,
            optim_steps=50,
            lr=2e-3,
            weight_decay=1e-3,
            enhancement_mask=False,
            loss_weights=PRODUCT_LOSS,
            lesion_offset=0.75,
            val_every=50,
        ),
    ),
    "cpu": RunConfig(
        preset="cpu",
        model=ModelConfig(features=SMALL_FEATURES, normalisation="pre"),
        regression=RegressionConfig(normalisation="pre"),
        train=TrainConfig(
            patch=(32, 32, 16),
            cases_per_step=2,
            warmup_steps=600,
            optim_steps=1100,
            lr=2e-3,
            weight_decay=1e-3,
            enhancement_mask=False,
            loss_weights=PRODUCT_LOSS,
            lesion_offset=0.75,
            val_every=425,
        ),
    ),
    "paper": RunConfig(
        preset="paper",
        model=ModelConfig(features=PAPER_FEATURES),
        train=TrainConfig(patch=(96, 96, 48), warmup_steps=3200, optim_steps=3200, val_every=160),
    ),
    # The paper's model, patch, batch (one case, two patches) and losses on one GPU, sized so
    # that training fits scripts/gpu-check.sh with installation, tests, benchmarks, prediction
    # and evaluation (step rates: docs/performance.md). The stages split evenly, as the paper
    # gives no split; 3/8 of the paper's 6400 steps, hence twice its lr. Workers keep patch
    # sampling off the GPU's critical path.
    "gpu": RunConfig(
        preset="gpu",
        model=ModelConfig(features=PAPER_FEATURES),
        train=TrainConfig(
            patch=(96, 96, 48),
            cases_per_step=1,
            warmup_steps=1200,
            optim_steps=1200,
            lr=2e-4,
            val_every=200,
            workers=4,
        ),
    ),
}


def preset(
    name: str,
    model: str = "iterunet",
    temporal: bool = True,
    warmup: bool = True,
    seed: int | None = None,
    amp: bool | None = None,
    normalisation: str | None = None,
    scheduled_sampling: float | None = None,
    case_features: bool | None = None,
    prior: str | None = None,
) -> RunConfig:
    """The named preset with the command line's model choice, ablations and overrides applied.

    Args:
        name: a key of ``PRESETS``.
        model: one of ``MODEL_CHOICES``.
        temporal: False is the ablation without time embedding and ConvLSTM.
        warmup: False is the ablation without the warm-up stage.
        seed: replaces the preset's seed (training and regression) when given.
        amp: replaces the preset's bf16 autocast setting when given.
        normalisation: replaces the preset's intensity normalisation, the network's and
            the regression model's (prior), when given (a value of ``NORMALISATIONS``).
        scheduled_sampling: replaces the preset's ``TrainConfig.scheduled_sampling``.
        case_features: replaces the preset's ``ModelConfig.case_features`` when given.
        prior: replaces the preset's ``ModelConfig.prior`` (a value of ``PRIORS``) when
            given; only iterU-Net takes one, so the other models drop the preset's. With
            a prior the free-running stage is as long as the warm-up, when the preset's
            is longer.
    """
    if name not in PRESETS:
        raise InputError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if model not in MODEL_CHOICES:
        raise InputError(f"--model: unknown model {model!r}; choose {', '.join(MODEL_CHOICES)}")
    if normalisation is not None and normalisation not in NORMALISATIONS:
        raise InputError(
            f"--normalisation: unknown normalisation {normalisation!r}; "
            f"choose {', '.join(NORMALISATIONS)}"
        )
    if scheduled_sampling is not None and not 0.0 <= scheduled_sampling <= 1.0:
        raise InputError(
            f"--scheduled-sampling: a share of stage 2 from 0 to 1, got {scheduled_sampling}"
        )
    if prior is not None and prior not in PRIORS:
        raise InputError(f"--prior: unknown prior {prior!r}; choose {', '.join(PRIORS)}")
    if prior not in (None, "none") and model != "iterunet":
        raise InputError(f"--prior: only iterunet starts from a prior, not {model}")
    base = PRESETS[name]
    train = base.train
    prior = (prior or base.model.prior) if model == "iterunet" else "none"
    if not warmup or model == "baseline":
        # Without warm-up the optimisation stage gets the whole budget; the baseline has
        # no feedback loop, so its single stage is the whole budget too.
        train = dataclasses.replace(train, warmup_steps=0, optim_steps=train.total_steps)
    elif prior != "none":
        # The network starts from the prior's prediction, and free-running steps beyond the
        # warm-up's number did not change it: `cpu` with the prior on 1,500 cases held
        # 0.58x copy-forward on validation from the warm-up's end to step 1,700.
        train = dataclasses.replace(train, optim_steps=min(train.optim_steps, train.warmup_steps))
    overrides = {
        key: value
        for key, value in (
            ("seed", seed),
            ("amp", amp),
            ("scheduled_sampling", scheduled_sampling),
        )
        if value is not None
    }
    train = dataclasses.replace(train, **overrides)
    model_config = dataclasses.replace(
        base.model,
        name=model,
        temporal=temporal and model == "iterunet",
        normalisation=normalisation or base.model.normalisation,
        case_features=base.model.case_features if case_features is None else case_features,
        prior=prior,
    )
    from dcesynth import __version__

    regression = dataclasses.replace(
        base.regression,
        seed=train.seed,
        normalisation=normalisation or base.regression.normalisation,
    )
    return RunConfig(
        preset=name, model=model_config, train=train, regression=regression, version=__version__
    )
