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
``close`` (or at the end of a ``with Trainer(...)`` block); only rank 0 writes
files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dcesynth.accel import accelerate, make_adamw, tune_process, use_bf16
from dcesynth.case import find_cases, load_case
from dcesynth.config import RunConfig
from dcesynth.data.sampling import PatchBatches, prepare_case, validation_patches
from dcesynth.io import InputError, atomic_write_json, check_writable_dir
from dcesynth.model import build_model
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


def split_cases(case_dirs: list[Path], val_fraction: float, seed: int):
    """Deterministic train/validation split; at least one of each when there are 2+ cases."""
    order = np.random.default_rng(seed).permutation(len(case_dirs))
    n_val = min(len(case_dirs) - 1, max(1, round(val_fraction * len(case_dirs))))
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
    """Holds a run: data, model, loss, optimiser; `fit` trains it to the end or `max_steps`."""

    def __init__(
        self,
        data_dir: Path,
        run_dir: Path,
        config: RunConfig,
        resume: bool = False,
        perceptual_weights: Path | None = None,
    ):
        self.run_dir, self.config = Path(run_dir), config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = select_device()
        tune_process(self.device)
        self.owns_process_group = init_distributed(self.world, self.device)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume:
            saved = RunConfig.load(self.run_dir)
            if saved.model != config.model or saved.train != config.train:
                log.info("resuming with the run's own config from %s", self.run_dir / "config.json")
            self.config = config = saved
        elif (self.ckpt_dir / "last_state.pt").exists():
            raise InputError(f"{self.run_dir}: holds a run already; use --resume or a new --out")
        train = config.train
        self.amp = use_bf16(self.device, train.amp)
        case_dirs = find_cases(data_dir)
        if len(case_dirs) < 2:
            raise InputError(f"{data_dir}: need at least 2 cases (train + validation)")
        train_dirs, val_dirs = split_cases(case_dirs, train.val_fraction, train.seed)
        self.train_cases = [prepare_case(load_case(d), train.patch) for d in train_dirs]
        self.val_cases = [prepare_case(load_case(d), train.patch) for d in val_dirs]
        counts = {c.phases.shape[0] for c in self.train_cases + self.val_cases}
        if len(counts) != 1:
            raise InputError(
                f"{data_dir}: cases must share one protocol length; got phase counts "
                f"{sorted(counts)}"
            )
        n_phases = counts.pop()
        if n_phases < 3:
            raise InputError(f"{data_dir}: training needs at least 3 phases (pre, 2 post)")
        self.batches = PatchBatches(
            self.train_cases,
            train.patch,
            train.cases_per_step,
            train.total_steps,
            train.seed,
            self.rank,
            lesion_offset=train.lesion_offset,
        )
        self.val_batch = validation_patches(self.val_cases, train.patch)
        torch.manual_seed(train.seed)
        self.model = build_model(
            config.model.name, config.model.features, config.model.temporal, n_phases - 2
        ).to(self.device)
        accelerate(self.model, self.device)
        self.net = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        try:
            perceptual = load_perceptual_network(perceptual_weights)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        self.loss = accelerate(
            CombinedLoss(LossWeights(*train.loss_weights), perceptual).to(self.device), self.device
        )
        self.stages = stages(config)
        self.step, self.best = 0, math.inf
        self.optimizer = self.scheduler = self.optimizer_stage = None
        if resume:
            self._restore()
        elif self.rank == 0:
            check_writable_dir(self.ckpt_dir)
            atomic_write_json(self.run_dir / "config.json", config.to_json())

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

    def _restore(self) -> None:
        state = load_state(self.ckpt_dir / "last_state.pt")
        weights = self.ckpt_dir / "last.safetensors"
        load_weights(weights, self.model)
        self.step, self.best = int(state["step"]), float(state["best"])
        if weights_metadata(weights).get("step") != str(self.step):
            # The two files are written one after the other; a crash between them
            # leaves a pair from different steps, which would not resume exactly.
            raise InputError(f"{weights}: weights are not from step {self.step} of last_state.pt")
        if self.step < self.config.train.total_steps and state["stage"] is not None:
            stage = next(s for s in self.stages if s.name == state["stage"])
            self._enter(stage, announce=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def save(self) -> None:
        if self.rank != 0:
            return
        save_weights(self.ckpt_dir / "last.safetensors", self.model, step=self.step)
        save_state(
            self.ckpt_dir / "last_state.pt",
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
        times_s = batch["times_s"].to(self.device)
        targets = phases[:, 2:]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.net(
                phases[:, :1],
                phases[:, 1:2],
                times_s[:, 1:],
                teacher=targets if stage.teacher_forcing else None,
            )
        weight = (
            enhancement_weight(phases[:, 1:2], phases[:, -1:]) if stage.enhancement_mask else None
        )
        lesion = batch["lesion"].to(self.device, non_blocking=True)
        total, terms = self.loss(preds, targets, weight, lesion)
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
                    self._enter(stage)
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

    def _enter(self, stage: Stage, announce: bool = True) -> None:
        """Start ``stage`` with a fresh optimiser (stage 2 starts from the warm-up weights)."""
        self.optimizer, self.scheduler = make_optimizer(self.model, self.config, stage)
        self.optimizer_stage = stage.name
        if announce:
            if stage.start > 0 and self.rank == 0:
                save_weights(self.ckpt_dir / "warmup.safetensors", self.model)
            log.info("stage %s: steps %d-%d", stage.name, stage.start, stage.stop)

    def validate_and_save(self, stage: Stage, terms: dict[str, float]) -> dict[str, float]:
        metrics = validate(self.model, self.val_batch, self.device, self.amp)
        record = {"step": self.step, "stage": stage.name, **terms, **metrics}
        if self.rank == 0:
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if metrics["val_enh_error_last"] < self.best:
                self.best = metrics["val_enh_error_last"]
                save_weights(self.ckpt_dir / "best.safetensors", self.model)
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
