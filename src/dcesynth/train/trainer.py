"""Two-stage, resumable training of iterU-Net (and of the per-phase baseline).

Stage 1, warm-up: teacher forcing, the real phase k goes in and phase k+1 is the
target, for every step of the protocol. Stage 2, optimisation: starting from the
warm-up weights (with a fresh optimiser), the model's own output is fed back
(free-running rollout) and gradients flow through the whole rollout. The loss of
every step is summed. ``--no-warmup`` gives stage 2 the whole budget (the paper's
ablation); the baseline has no feedback, so it trains in one stage.

Batches depend only on (seed, step, rank) (see dcesynth.data.sampling), so a run
resumed from its last checkpoint continues exactly; with several processes
(``torchrun``) each rank draws its own patches and DistributedDataParallel
averages the gradients. The Trainer joins the process group that torchrun
describes in the environment (NCCL on CUDA, gloo on CPU) and leaves it in
``close`` (or at the end of a ``with build_trainer(...)`` block); only rank 0 writes
files.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dcesynth.accel import accelerate, make_adamw, tune_process, use_bf16
from dcesynth.case import find_cases, load_case
from dcesynth.config import ModelConfig, RunConfig, TrainConfig
from dcesynth.data.sampling import (
    PatchBatches,
    PreparedCase,
    prepare_case,
    protocol_groups,
)
from dcesynth.io import InputError
from dcesynth.model import build_model
from dcesynth.regression import RegressionModel, fit_regression
from dcesynth.rundir import RunDir
from dcesynth.train.checkpoint import (
    load_state,
    load_weights,
    save_state,
    save_weights,
    weights_metadata,
)
from dcesynth.train.losses import CombinedLoss, LossWeights, enhancement_weight
from dcesynth.train.perceptual import load_perceptual_network
from dcesynth.train.validation import validate

log = logging.getLogger("dcesynth")


@contextmanager
def interrupts_between_steps():
    """Hold Ctrl-C until the running step is complete, so the checkpoint saved is whole.

    Yields a function telling whether an interrupt arrived. Outside the main thread
    (where signals cannot be caught) interrupts act at once, as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: requested.append(signum))
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class Stage:
    """A span of steps trained one way."""

    name: str
    start: int
    stop: int
    teacher_forcing: bool
    enhancement_mask: bool


def stages(config: RunConfig) -> list[Stage]:
    """Warm-up then optimisation (either may be empty)."""
    train = config.train
    out = []
    if train.warmup_steps:
        out.append(Stage("warm-up", 0, train.warmup_steps, True, False))
    if train.optim_steps:
        out.append(
            Stage(
                "optimisation", train.warmup_steps, train.total_steps, False, train.enhancement_mask
            )
        )
    return out


def teacher_probability(train: TrainConfig, stage: Stage, step: int) -> float:
    """Probability that a rollout step of global step ``step`` is fed the real phase.

    1 in teacher forcing; in the free-running stage it falls linearly from 1 to 0 over the
    stage's first ``train.scheduled_sampling`` fraction, and is 0 after it (or throughout
    when that fraction is 0).
    """
    if stage.teacher_forcing:
        return 1.0
    span = train.scheduled_sampling * (stage.stop - stage.start)
    return max(0.0, 1.0 - (step - stage.start) / span) if span > 0 else 0.0


def select_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(world: int, device: torch.device) -> bool:
    """Join the process group described by torchrun's environment (``env://``).

    Args:
        world: number of processes (``WORLD_SIZE``); nothing happens for 1.
        device: this rank's device; CUDA ranks use NCCL, CPU ranks gloo.

    Returns:
        True when this call created the group (its owner destroys it).
    """
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return True


def split_cases(case_dirs: list[Path], val_fraction: float, seed: int, max_val: int):
    """Deterministic train/validation split: ``val_fraction`` of the cases, at most
    ``max_val``, validate; at least one of each when there are 2+ cases."""
    order = np.random.default_rng(seed).permutation(len(case_dirs))
    n_val = round(val_fraction * len(case_dirs))
    n_val = min(len(case_dirs) - 1, max(1, min(n_val, max_val)))
    val = sorted(case_dirs[i] for i in order[:n_val])
    return [case_dirs[i] for i in sorted(order[n_val:])], val


def make_optimizer(model: torch.nn.Module, config: RunConfig, stage: Stage):
    """AdamW with cosine decay over the stage."""
    optimizer = make_adamw(model.parameters(), config.train.lr, config.train.weight_decay)
    length = max(1, stage.stop - stage.start)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i, length) / length))
    )
    return optimizer, scheduler


class Trainer:
    """Holds a run: data, model, loss, optimiser; `fit` trains it to the end or `max_steps`.

    Built by :func:`build_trainer`, which loads the data, makes the model and restores a
    resumed run.

    Args:
        run: the run folder.
        config: the run's config.
        device: where the model trains.
        model: the model, on ``device``.
        loss: the training loss, on ``device``.
        batches: the training batches by step.
        val_cases: the validation cases, predicted whole at each validation.
        rank: this process's rank (only rank 0 writes files).
        net: what a step calls: ``model`` or its DistributedDataParallel wrapper.
        owns_process_group: whether ``close`` leaves the process group.
    """

    def __init__(
        self,
        run: RunDir,
        config: RunConfig,
        device: torch.device,
        model: torch.nn.Module,
        loss: CombinedLoss,
        batches: PatchBatches,
        val_cases: list[PreparedCase],
        rank: int = 0,
        net: torch.nn.Module | None = None,
        owns_process_group: bool = False,
    ):
        self.run, self.config, self.device = run, config, device
        self.model, self.net = model, model if net is None else net
        self.loss, self.batches, self.val_cases = loss, batches, val_cases
        self.rank, self.owns_process_group = rank, owns_process_group
        self.amp = use_bf16(device, config.train.amp)
        self.stages = stages(config)
        self.step, self.best = 0, math.inf
        self.optimizer = self.scheduler = self.optimizer_stage = None

    def close(self) -> None:
        """Leave the process group if this Trainer joined it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if s.start <= step < s.stop)

    def restore(self) -> None:
        """Continue from the run's last checkpoint: weights, step, best, optimiser, schedule."""
        state = load_state(self.run.state)
        weights = self.run.last_weights
        load_weights(weights, self.model)
        self.step, self.best = int(state["step"]), float(state["best"])
        if weights_metadata(weights).get("step") != str(self.step):
            # The two files are written one after the other; a crash between them
            # leaves a pair from different steps, which would not resume exactly.
            raise InputError(
                f"{weights}: weights are not from step {self.step} of {self.run.state.name}"
            )
        if self.step < self.config.train.total_steps and state["stage"] is not None:
            self._enter(next(s for s in self.stages if s.name == state["stage"]))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        log.info("resumed %s at step %d", self.run.path, self.step)

    def save(self) -> None:
        """Write the last weights and training state (rank 0)."""
        if self.rank != 0:
            return
        save_weights(self.run.last_weights, self.model, step=self.step)
        save_state(
            self.run.state,
            {
                "step": self.step,
                "best": self.best,
                "stage": self.optimizer_stage,
                "optimizer": self.optimizer.state_dict() if self.optimizer else {},
                "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            },
        )

    def train_step(self, batch: dict[str, torch.Tensor], stage: Stage) -> dict[str, float]:
        """One optimiser step on a batch of patches: phases `(B, T, X, Y, Z)`, pre first."""
        phases = batch["phases"].to(self.device, non_blocking=True)
        context = batch["context"].to(self.device, non_blocking=True)
        times_s = batch["times_s"].to(self.device)
        statistics = batch["case_features"].to(self.device)
        prior = batch["prior"].to(self.device, non_blocking=True)[:, 1:]
        targets = phases[:, 2:]
        teacher, teacher_mask = self.teacher_inputs(targets, stage)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.net(
                torch.cat([phases[:, :1], context], dim=1),
                phases[:, 1:2],
                times_s[:, 1:],
                teacher=teacher,
                teacher_mask=teacher_mask,
                case_features=statistics if statistics.shape[1] else None,
                prior=prior if prior.shape[1] else None,
            )
        weight = (
            enhancement_weight(phases[:, 1:2], phases[:, -1:]) if stage.enhancement_mask else None
        )
        lesion = batch["lesion"].to(self.device, non_blocking=True)
        parenchyma = batch["parenchyma"].to(self.device, non_blocking=True)
        total, terms = self.loss(preds, targets, weight, lesion, parenchyma)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if torch.stack([g.isfinite().all() for g in grads]).all():
            self.optimizer.step()
        else:
            # One bad batch (e.g. a bf16 overflow) must not poison the weights; AMP's
            # gradient scaler skips such steps the same way. Under DDP the gradients are
            # already averaged, so every rank takes the same decision.
            log.warning("step %d: non-finite gradients, update skipped", self.step)
        self.scheduler.step()
        return terms

    def teacher_inputs(self, targets: torch.Tensor, stage: Stage):
        """``(teacher, teacher_mask)`` for the model: the real phases and which of them go
        in, drawn per sample with ``teacher_probability`` from a generator seeded by the
        seed and step (so ``--resume`` draws the same)."""
        if stage.teacher_forcing:
            return targets, None
        probability = teacher_probability(self.config.train, stage, self.step)
        if probability == 0.0:
            return None, None
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.step)
        draws = torch.rand(targets.shape[:2], generator=generator)
        return targets, (draws < probability).to(targets.device)

    def fit(self, max_steps: int | None = None, on_step=None) -> dict[str, float]:
        """Train until the schedule ends or ``max_steps`` steps in total are done.

        Args:
            max_steps: stop after this global step (the schedule itself is unchanged,
                so a later ``--resume`` continues it).
            on_step: called after each step with (step, stage name, loss terms, steps/s).

        Returns:
            The last validation metrics.
        """
        total = self.config.train.total_steps
        stop = min(total, max_steps) if max_steps is not None else total
        loader = torch.utils.data.DataLoader(
            self.batches,
            batch_size=None,
            sampler=range(self.step, stop),
            num_workers=self.config.train.workers,
            persistent_workers=False,
        )
        metrics: dict[str, float] = {}
        started, done = time.perf_counter(), 0
        with interrupts_between_steps() as interrupted:
            for batch in loader:
                stage = self.stage_at(self.step)
                if stage.name != self.optimizer_stage:
                    if stage.start > 0:
                        self.save_warmup_weights()
                    self._enter(stage)
                    log.info("stage %s: steps %d-%d", stage.name, stage.start, stage.stop)
                terms = self.train_step(batch, stage)
                self.step += 1
                done += 1
                if on_step:
                    on_step(self.step, stage.name, terms, done / (time.perf_counter() - started))
                if self.step % self.config.train.val_every == 0 or self.step in (stage.stop, stop):
                    metrics = self.validate_and_save(stage, terms)
                if interrupted():
                    self.save()
                    log.warning("interrupted at step %d; continue with --resume", self.step)
                    raise KeyboardInterrupt
        return metrics

    def _enter(self, stage: Stage) -> None:
        """Start ``stage`` with a fresh optimiser (stage 2 starts from the warm-up weights)."""
        self.optimizer, self.scheduler = make_optimizer(self.model, self.config, stage)
        self.optimizer_stage = stage.name

    def save_warmup_weights(self) -> None:
        """Keep the weights the warm-up stage ended with (rank 0)."""
        if self.rank == 0:
            save_weights(self.run.warmup_weights, self.model)

    def validate_and_save(self, stage: Stage, terms: dict[str, float]) -> dict[str, float]:
        metrics = validate(self.model, self.val_cases, self.config.train.patch, self.amp)
        record = {"step": self.step, "stage": stage.name, **terms, **metrics}
        if self.rank == 0:
            self.run.append_log(record)
            if metrics["val_enh_error_last"] < self.best:
                self.best = metrics["val_enh_error_last"]
                save_weights(self.run.best_weights, self.model)
        self.save()
        log.info(
            "step %d %s loss %.4f val enh. error last %.4f (copy 1st post %.4f)",
            self.step,
            stage.name,
            terms.get("total", float("nan")),
            metrics["val_enh_error_last"],
            metrics["val_enh_error_last_copy"],
        )
        return metrics


def resolve_config(run: RunDir, config: RunConfig, resume: bool) -> RunConfig:
    """The config to train with: the run's own when resuming, else ``config`` for a new run.

    Raises:
        InputError: a new run in a folder that holds one, or a resumed one without a config.
    """
    if not resume:
        run.check_unused()
        return config
    saved = run.config
    if saved.model != config.model or saved.train != config.train:
        log.info("resuming with the run's own config from %s", run.config_file)
    return saved


def training_split(data_dir: Path, train: TrainConfig) -> tuple[list[Path], list[Path]]:
    """The training and validation case folders of ``data_dir``, split by ``train``'s seed.

    Raises:
        InputError: fewer than 2 cases.
    """
    case_dirs = find_cases(data_dir)
    if len(case_dirs) < 2:
        raise InputError(f"{data_dir}: need at least 2 cases (train + validation)")
    return split_cases(case_dirs, train.val_fraction, train.seed, train.max_val_cases)


def training_prior(
    run: RunDir, config: RunConfig, train_dirs: list[Path], resume: bool
) -> RegressionModel | None:
    """The regression model a run with ``model.prior == "regression"`` steps from.

    A new run fits it on its training cases alone (the validation cases stay unseen)
    with ``config.regression``; a resumed run reads the one it saved. None without a prior.

    Raises:
        InputError: a resumed run's prior file is missing or unreadable.
    """
    if config.model.prior != "regression":
        return None
    if resume:
        return RegressionModel.load(run.prior_file)
    log.info("fitting the regression prior on %d training cases", len(train_dirs))
    loaders = [functools.partial(load_case, case_dir) for case_dir in train_dirs]
    return fit_regression(loaders, config.regression)


def load_training_cases(
    data_dir: Path,
    train: TrainConfig,
    model: ModelConfig,
    split: tuple[list[Path], list[Path]] | None = None,
    prior_model: RegressionModel | None = None,
) -> tuple[list[PreparedCase], list[PreparedCase]]:
    """The training and validation cases of ``data_dir``, split by ``train``'s seed.

    The cases may mix protocols (phase counts and times); ``model`` sets their
    normalisation and context channels, ``prior_model`` their prior.

    Args:
        split: the case folders (``training_split``), when already made.

    Raises:
        InputError: fewer than 2 cases, a bad case, or a case of fewer than 3 phases.
    """
    train_dirs, val_dirs = split or training_split(data_dir, train)

    def load(case_dir: Path) -> PreparedCase:
        return prepare_case(
            load_case(case_dir),
            train.patch,
            model.relative_enhancement,
            model.normalisation,
            model.case_features,
            prior_model,
        )

    # Reading, filtering and the prior's prediction spend most of their time in zlib, scipy
    # and numpy, which release the GIL: threads share the cores the run was given.
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        train_cases, val_cases = (list(pool.map(load, dirs)) for dirs in (train_dirs, val_dirs))
    for case in train_cases + val_cases:
        if case.phases.shape[0] < 3:
            raise InputError(
                f"{data_dir / case.case_id}: training needs at least 3 phases (pre, 2 post), "
                f"got {case.phases.shape[0]}"
            )
    return train_cases, val_cases


def check_model_fits_cohort(model: str, phase_counts: list[int], data_dir: Path) -> None:
    """Refuse a cohort of mixed protocol lengths for the baseline, which has one U-Net per
    target phase of a single protocol (iterU-Net rolls out over any protocol).

    Raises:
        InputError: ``model`` is the baseline and ``phase_counts`` has several values.
    """
    if model == "baseline" and len(phase_counts) > 1:
        raise InputError(
            f"{data_dir}: the baseline predicts the phases of one protocol, but the cases "
            f"have {', '.join(map(str, phase_counts))} phases; train iterU-Net on a mixed "
            "cohort, or the baseline on cases of one protocol"
        )


def prepare_process(world: int) -> tuple[torch.device, bool]:
    """This process's device, tuned (``dcesynth.accel.tune_process``), in the process group.

    Returns:
        The device, and whether this call created the process group (``init_distributed``).
    """
    device = select_device()
    tune_process(device)
    return device, init_distributed(world, device)


def distributed(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several processes."""
    if world <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def build_loss(train: TrainConfig, perceptual_weights: Path | None) -> CombinedLoss:
    """The training loss; the perceptual term reads MedicalNet weights from a local file.

    Raises:
        InputError: ``perceptual_weights`` missing or not MedicalNet ResNet-10 weights.
    """
    try:
        perceptual = load_perceptual_network(perceptual_weights)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return CombinedLoss(LossWeights(*train.loss_weights), perceptual)


def build_trainer(
    data_dir: Path,
    run_dir: Path,
    config: RunConfig,
    resume: bool = False,
    perceptual_weights: Path | None = None,
) -> Trainer:
    """Set up a training run: device, process group, data, model, loss; resume or start it.

    A new run gets its config, with ``n_targets`` from the data, written to its folder
    (rank 0) once everything is set up, so a bad input leaves nothing behind.

    Args:
        data_dir: folder of training cases (iterU-Net: protocols may differ).
        run_dir: the run folder (``RunDir``).
        config: the run's config; when resuming, the run's own config is used instead.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        perceptual_weights: MedicalNet ResNet-10 weights; None turns the perceptual term off.

    Raises:
        InputError: see ``resolve_config``, ``load_training_cases`` and ``build_loss``;
            a resumed run whose checkpoint cannot be read or does not fit.
    """
    run = RunDir(run_dir)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device, owns_process_group = prepare_process(world)
    config = resolve_config(run, config, resume)
    train = config.train
    split = training_split(data_dir, train)
    prior_model = training_prior(run, config, split[0], resume)
    train_cases, val_cases = load_training_cases(data_dir, train, config.model, split, prior_model)
    phase_counts = list(protocol_groups(train_cases + val_cases))
    check_model_fits_cohort(config.model.name, phase_counts, data_dir)
    n_phases = phase_counts[-1]
    if not resume:
        config = dataclasses.replace(config, n_targets=n_phases - 2)
    batches = PatchBatches(
        train_cases,
        train.patch,
        train.cases_per_step,
        train.total_steps,
        train.seed,
        rank,
        lesion_offset=train.lesion_offset,
        roi_patch=train.roi_patch,
    )
    # The model's initial weights depend on the seed alone: it is built right after seeding.
    torch.manual_seed(train.seed)
    model = build_model(
        config.model.name,
        config.model.features,
        config.model.temporal,
        n_phases - 2,
        config.model.pre_channels,
        config.model.n_case_features,
        prior=prior_model is not None,
    ).to(device)
    accelerate(model, device)
    net = distributed(model, device, world)
    loss = accelerate(build_loss(train, perceptual_weights).to(device), device)
    trainer = Trainer(
        run,
        config,
        device,
        model,
        loss,
        batches,
        val_cases,
        rank=rank,
        net=net,
        owns_process_group=owns_process_group,
    )
    if resume:
        trainer.restore()
    elif rank == 0:
        run.create(config)
        if prior_model is not None:
            prior_model.save(run.prior_file)
    return trainer
