"""One iterU-Net training step, ours against the naive re-implementation, in the same run.

A step is what ``Trainer.train_step`` does: a four-step rollout (pre + 1dyn -> 2dyn ... 5dyn),
the loss of every step summed (0.1 L1 + 1 - SSIM + 0.1 GDL; the perceptual term is off, as
without MedicalNet weights), backward, and an AdamW update. Both stages are timed: warm-up
(teacher forcing) and optimisation (free-running, enhancement-weighted loss).

Variants: ``naive fp32`` (``benchmarks/naive.py``: per-voxel time projection, contiguous,
MONAI's dense SSIM, default AdamW), ``ours fp32`` and ``ours bf16`` (autocast), ours as the
trainer runs it (``dcesynth.accel.accelerate`` applied to model and loss). On CUDA also
``naive bf16`` and ``ours bf16 NDHWC`` (channels-last weights and phases); there the patch
is the paper's, 96x96x48.
Before timing, both models start from the same weights and their fp32 losses must agree to
``LOSS_RTOL`` (relative). Each variant then runs in a process of its own, as each program
would: ours as the trainer runs it (``dcesynth.accel.tune_process``), the naive one
with glibc's defaults, as the reference code runs. Timing interleaves the variants
(A B C A B C ...), one process stepping at a time, so that load from other processes falls
on all of them alike; each figure is the median of ``--repeats`` steps, after one untimed
step per variant, and ``sys s`` is the median system (kernel) time of a step, mostly page
faults. The load average is printed before and after. On a shared CPU run it with
``OMP_WAIT_POLICY=PASSIVE`` (``make bench`` does): OpenMP threads that spin while they
wait for a busy core made steps up to 3x slower.

The last line, ``speedup_vs_naive``, is the naive fp32 step (warm-up + optimisation) over
our faster variant's step on CPU (the precision ``dcesynth.accel.use_bf16`` would choose
should be that one); on CUDA it compares bf16 with bf16.

``--profile`` ends with a profile of one ``ours bf16`` step per stage: the operators that
took most time (CUDA kernels on a GPU).

Usage: ``python benchmarks/train_step.py [--quick] [--repeats 5] [--patch X Y Z] [--profile]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dcesynth.accel import accelerate, make_adamw, tune_process
from dcesynth.model import PAPER_FEATURES, IterUNet
from dcesynth.train.losses import CombinedLoss, LossWeights, enhancement_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive import NaiveIterUNet, copy_weights, naive_loss  # noqa: E402

TIMES_S = (0.0, 85.0, 155.0, 225.0, 295.0, 365.0)
LOSS_RTOL = 1e-4
QUICK_FEATURES = (8, 8, 16, 32, 64, 8)
STAGES = ("warm-up", "optimisation")


@dataclass(frozen=True)
class Spec:
    """One way of running the step: which model, in which precision and layout."""

    name: str
    naive: bool
    bf16: bool
    channels_last: bool = False


class Variant:
    """A `Spec` made real: its model, optimiser and loss."""

    def __init__(self, spec: Spec, model: torch.nn.Module):
        self.spec, self.model = spec, model
        if spec.naive:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
        else:
            self.optimizer = make_adamw(model.parameters(), lr=1e-4, weight_decay=1e-3)
        if spec.naive:
            self.loss = naive_loss
        else:
            device = next(model.parameters()).device
            accelerate(model, device)
            self.loss = accelerate(CombinedLoss(LossWeights(), None), device)
        if spec.channels_last:
            model.to(memory_format=torch.channels_last_3d)


def build_models(features: tuple[int, ...], device: torch.device) -> tuple[IterUNet, NaiveIterUNet]:
    """Ours and the naive model, with the same weights (seed 0)."""
    torch.manual_seed(0)
    ours = IterUNet(features=features).to(device)
    return ours, copy_weights(ours, NaiveIterUNet(features)).to(device)


def make_batch(batch: int, patch: tuple[int, int, int], device: torch.device) -> dict:
    """Smooth synthetic phases `(B, T, X, Y, Z)` with an enhancing region, TI-normalised-like,
    and their times `(B, T - 1)` (post-contrast phases)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 1, *patch)
    anatomy = torch.nn.functional.avg_pool3d(torch.randn(shape, generator=generator), 5, 1, 2)
    uptake = torch.rand(shape, generator=generator).pow(4) * 3
    phases = [anatomy * 5 + uptake * (1 - torch.exp(torch.tensor(-t / 120))) for t in TIMES_S]
    return {
        "phases": torch.cat(phases, dim=1).to(device),
        "times_s": torch.tensor(TIMES_S[1:]).expand(batch, -1).to(device),
    }


def rollout(variant: Variant, batch: dict, teacher_forcing: bool) -> torch.Tensor:
    phases, times_s = batch["phases"], batch["times_s"]
    if variant.spec.channels_last:
        phases = phases.contiguous(memory_format=torch.channels_last_3d)
    teacher = phases[:, 2:] if teacher_forcing else None
    with torch.autocast(phases.device.type, dtype=torch.bfloat16, enabled=variant.spec.bf16):
        return variant.model(phases[:, :1], phases[:, 1:2], times_s, teacher)


def loss_of(variant: Variant, batch: dict, stage: str) -> torch.Tensor:
    optimisation = stage == "optimisation"
    preds = rollout(variant, batch, teacher_forcing=not optimisation)
    phases = batch["phases"]
    weight = enhancement_weight(phases[:, 1:2], phases[:, -1:]) if optimisation else None
    loss = variant.loss(preds, phases[:, 2:], weight)
    return loss if variant.spec.naive else loss[0]


def train_step(variant: Variant, batch: dict, stage: str) -> tuple[float, float]:
    """One optimiser step; returns its wall time and this process's system time, seconds."""
    synchronize = torch.cuda.synchronize if batch["phases"].is_cuda else (lambda: None)
    synchronize()
    start, start_sys = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    loss = loss_of(variant, batch, stage)
    variant.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    variant.optimizer.step()
    synchronize()
    end_sys = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    return time.perf_counter() - start, end_sys - start_sys


def serve(spec: Spec, features: tuple, patch: tuple, batch_size: int, device: str, conn) -> None:
    """Worker process of one variant: answers ``("step", stage)`` with `train_step`'s times,
    ``("profile", None)`` by printing `print_profile`, and None (the end) with its peak CUDA
    memory in bytes."""
    device = torch.device(device)
    if device.type == "cuda" or not spec.naive:
        tune_process(device)  # as the Trainer does
    ours, naive = build_models(features, device)
    variant = Variant(spec, naive if spec.naive else ours)
    batch = make_batch(batch_size, patch, device)
    while (request := conn.recv()) is not None:
        kind, stage = request
        if kind == "step":
            conn.send(train_step(variant, batch, stage))
        else:
            print_profile(variant, batch)
            conn.send(None)
    conn.send(torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)


class Worker:
    """A `serve` process and the end of its pipe."""

    def __init__(self, spec: Spec, *args) -> None:
        context = multiprocessing.get_context("spawn")
        self.spec, (self.conn, child) = spec, context.Pipe()
        self.process = context.Process(target=serve, args=(spec, *args, child), daemon=True)
        self.process.start()

    def ask(self, kind: str, stage: str | None = None):
        self.conn.send((kind, stage))
        return self.conn.recv()

    def close(self) -> int:
        """End the process; returns its peak CUDA memory in bytes."""
        self.conn.send(None)
        peak = self.conn.recv()
        self.process.join()
        return peak


def check_same_loss(ours: IterUNet, naive: NaiveIterUNet, batch: dict) -> None:
    """Both fp32 models, same weights: the losses of both stages agree to LOSS_RTOL."""
    for stage in STAGES:
        with torch.no_grad():
            ours_loss = loss_of(Variant(Spec("ours", False, False), ours), batch, stage).item()
            naive_loss_value = loss_of(Variant(Spec("naive", True, False), naive), batch, stage)
            naive_loss_value = naive_loss_value.item()
        difference = abs(ours_loss - naive_loss_value) / abs(naive_loss_value)
        print(
            f"same weights, {stage} loss: ours {ours_loss:.6f} naive {naive_loss_value:.6f} "
            f"(relative difference {difference:.1e}, tolerance {LOSS_RTOL:.0e})"
        )
        if difference > LOSS_RTOL:
            raise SystemExit(f"error: the two models disagree on the {stage} loss")


def print_profile(variant: Variant, batch: dict) -> None:
    """Profile one step of `variant` per stage; print the operators that took most time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batch["phases"].is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for stage in STAGES:
        with profile(activities=activities) as profiler:
            train_step(variant, batch, stage)
        print(f"profile of one {variant.spec.name} step, {stage}:")
        table = profiler.key_averages().table(
            sort_by=sort_by, row_limit=20, max_name_column_width=60
        )
        print(table)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small U-Net and patch (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant and stage")
    parser.add_argument("--batch", type=int, default=2, help="patches per step")
    parser.add_argument("--patch", type=int, nargs=3, help="default: 64 64 32 (CUDA: 96 96 48)")
    parser.add_argument("--profile", action="store_true", help="profile ours bf16 at the end")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    features = QUICK_FEATURES if args.quick else PAPER_FEATURES
    if args.patch:
        patch = tuple(args.patch)
    elif args.quick:
        patch = (32, 32, 16)
    else:
        patch = (96, 96, 48) if device.type == "cuda" else (64, 64, 32)
    batch = make_batch(args.batch, patch, device)
    ours, naive = build_models(features, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU"
    print(
        f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; features "
        f"{features}, patch {patch}, batch {args.batch}, {len(TIMES_S) - 2} rollout steps"
    )
    check_same_loss(ours, naive, batch)
    del ours, naive, batch

    specs = [Spec("naive fp32", True, False), Spec("ours fp32", False, False)]
    specs.append(Spec("ours bf16", False, True))
    if device.type == "cuda":
        specs.insert(1, Spec("naive bf16", True, True))
        specs.append(Spec("ours bf16 NDHWC", False, True, channels_last=True))
    workers = [Worker(spec, features, patch, args.batch, device.type) for spec in specs]
    times = {(spec.name, stage): [] for spec in specs for stage in STAGES}
    print(f"load average before: {load_average()}")
    for worker in workers:  # the first step builds kernels and caches: untimed
        worker.ask("step", STAGES[0])
    for stage in STAGES:
        for _ in range(args.repeats):
            for worker in workers:
                times[worker.spec.name, stage].append(worker.ask("step", stage))
    print(f"load average after: {load_average()}")

    medians = {
        key: [statistics.median(column) for column in zip(*values, strict=True)]
        for key, values in times.items()
    }
    step = {
        s.name: medians[s.name, "warm-up"][0] + medians[s.name, "optimisation"][0] for s in specs
    }
    header = (
        f"{'variant':<15} {'warm-up s':>10} {'optim. s':>10} {'step s':>8} {'sys s':>6} "
        f"{'naive fp32/':>12}"
    )
    print(f"{header}  (median of {args.repeats})")
    for name, total in step.items():
        (warm, warm_sys), (optim, optim_sys) = (
            medians[name, "warm-up"],
            medians[name, "optimisation"],
        )
        ratio = step["naive fp32"] / total
        print(
            f"{name:<15} {warm:>10.4f} {optim:>10.4f} {total:>8.4f} {warm_sys + optim_sys:>6.2f} "
            f"{ratio:>12.2f}"
        )
    if args.profile:
        next(w for w in workers if w.spec.name == "ours bf16").ask("profile")
    peaks = {worker.spec.name: worker.close() for worker in workers}
    if device.type == "cuda":
        for name, peak in peaks.items():
            print(f"peak CUDA memory, {name}: {peak / 2**30:.2f} GiB")
    if device.type == "cuda":
        peer, ours_best = "naive bf16", "ours bf16"
    else:
        peer, ours_best = "naive fp32", min(("ours fp32", "ours bf16"), key=step.get)
    print(f"speedup: {peer} / {ours_best}")
    print(f"speedup_vs_naive: {step[peer] / step[ours_best]:.2f}")


if __name__ == "__main__":
    main()
