"""Whole-case prediction of a 256x256x96 phantom: seconds, peak memory, windows, fp32 vs bf16.

One phantom case (a breast ROI as ``dcesynth simulate`` makes it) and one run folder holding
a freshly initialised iterU-Net with the paper's features and window (96x96x48) are written to
a temporary folder. Each precision is then measured in its own process, as ``dcesynth
predict`` would run (``dcesynth.infer.load_run`` + ``predict_case``), so that its peak RSS is
that of a prediction alone:

- the whole case at overlap 0.5 (the paper's) and 0.25 (the overlap of the issue's GPU
  figure): windows run (those of the grid over the ROI's box that hold ROI voxels), against
  the windows of that grid and of a grid over the whole volume, seconds, peak RSS (CUDA:
  peak allocated memory too);
- the lesion: a 96x96x48 crop centred on the largest lesion, predicted in one window; the
  figure is the largest difference over the predicted phases between the bf16 and the fp32
  lesion mean, in % of the lesion's real enhancement (last phase minus pre).

On CPU a window of the paper's model takes seconds (tens in fp32), so by default only the
first ``--real-windows`` windows of a whole case run the model; the other windows return the
last observed phase, which leaves the sliding-window work, the buffers and so the peak RSS as
they are. The whole-case time is then extrapolated: measured time without the model + windows
run x median seconds per window (the first window, which also builds the oneDNN kernels, is
left out of that median when more ran), and printed as such. ``--full`` runs every window (CPU:
tens of minutes). On CUDA every window always runs.

Last line: ``whole_case_s``, the faster precision at overlap 0.5.

Usage: ``python benchmarks/inference.py [--quick] [--full] [--real-windows 2]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcesynth.accel import tune_process
from dcesynth.case import Case, load_case, save_case
from dcesynth.config import PAPER_FEATURES, preset
from dcesynth.infer import count_region_windows, count_windows, load_run, predict_case
from dcesynth.model import IterUNet
from dcesynth.phantom import PhantomConfig, plan_cohort, simulate_case
from dcesynth.rundir import RunDir
from dcesynth.train.checkpoint import save_weights

FULL = {"shape": (256, 256, 96), "features": PAPER_FEATURES, "patch": (96, 96, 48)}
QUICK = {"shape": (128, 128, 48), "features": (8, 8, 16, 32, 64, 8), "patch": (64, 64, 32)}
OVERLAPS = (0.5, 0.25)
PRECISIONS = {"fp32": False, "bf16": True}


class FirstWindowsOnly(torch.nn.Module):
    """Runs `model` on the first `real_windows` calls; later calls copy the last observed phase.

    Args:
        model: the iterU-Net.
        real_windows: calls that run the model (one window each with a window batch of 1).
    """

    def __init__(self, model: torch.nn.Module, real_windows: int):
        super().__init__()
        self.model, self.real_windows = model, real_windows
        self.seconds: list[float] = []

    def forward(self, pre, observed, times_s):
        """Same arguments and output as the model's, without teacher."""
        if len(self.seconds) >= self.real_windows:
            n_targets = times_s.shape[1] - observed.shape[1]
            return observed[:, -1:].expand(-1, n_targets, *observed.shape[2:]).clone()
        start = time.perf_counter()
        predictions = self.model(pre, observed, times_s)
        self.seconds.append(time.perf_counter() - start)
        return predictions

    def check_protocol(self, n_observed: int, n_targets: int) -> None:
        """The model's own rule."""
        self.model.check_protocol(n_observed, n_targets)


def make_inputs(folder: Path, quick: bool) -> tuple[Path, Path]:
    """Simulate the case and save a fresh run; returns (case folder, run folder)."""
    sizes = QUICK if quick else FULL
    case = simulate_case(plan_cohort(1, seed=3)[0], PhantomConfig(shape=sizes["shape"]))
    case_dir = save_case(case, folder / "cases")
    config = preset("paper")
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, features=sizes["features"]),
        train=dataclasses.replace(config.train, patch=sizes["patch"]),
    )
    torch.manual_seed(0)
    model = IterUNet(features=sizes["features"])
    run = RunDir(folder / "run")
    run.create(config)
    save_weights(run.last_weights, model)
    return case_dir, run.path


def lesion_crop(case: Case, patch: tuple[int, int, int]) -> tuple[Case, np.ndarray]:
    """The `patch`-sized crop centred on the largest lesion, and that lesion's mask in it."""
    labels, sizes = np.unique(case.seg[case.seg > 0], return_counts=True)
    lesion = case.seg == labels[np.argmax(sizes)]
    centre = np.argwhere(lesion).mean(axis=0).round().astype(int)
    box = tuple(
        slice(start, start + size)
        for start, size in (
            (min(max(c - p // 2, 0), s - p), p)
            for c, p, s in zip(centre, patch, case.shape, strict=True)
        )
    )
    crop = dataclasses.replace(
        case, phases=case.phases[(slice(None), *box)], seg=case.seg[box], roi=case.roi[box]
    )
    return crop, lesion[box]


def measure(case_dir: Path, run_dir: Path, bf16: bool, real_windows: int | None) -> dict:
    """One precision, in this process: whole case at each overlap, then the lesion crop."""
    run = load_run(run_dir)
    case = load_case(case_dir)
    cuda = run.device.type == "cuda"
    if cuda:
        tune_process(run.device)
        predict_case(run, case, amp=bf16)  # autotunes the convolutions for this window
        torch.cuda.reset_peak_memory_stats()
    result = {"device": torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPU"}
    for overlap in OVERLAPS:
        stand_in = FirstWindowsOnly(run.model, real_windows if overlap == OVERLAPS[0] else 0)
        model = run.model if cuda or real_windows is None else stand_in
        start = time.perf_counter()
        prediction = predict_case(
            dataclasses.replace(run, model=model), case, overlap=overlap, amp=bf16
        )
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if model is stand_in and stand_in.seconds:
            # The first window also builds the oneDNN kernels: not counted when there are more.
            timed = stand_in.seconds[1:] or stand_in.seconds
            per_window = statistics.median(timed)
            result["s_per_window"] = per_window
            result["model_windows"] = len(timed)
            seconds += prediction.windows_run * per_window - sum(stand_in.seconds)
        elif model is stand_in:
            seconds += prediction.windows_run * result["s_per_window"]
        result[f"overlap_{overlap}"] = {
            "seconds": seconds,
            "extrapolated": model is stand_in,
            "windows_run": prediction.windows_run,
            "windows_box": count_region_windows(case.roi, run.config.train.patch, overlap),
            "windows_volume": count_windows(case.shape, run.config.train.patch, overlap),
        }
    if cuda:
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    crop, lesion = lesion_crop(case, run.config.train.patch)
    predicted = predict_case(run, crop, amp=bf16).phases
    result["lesion_means"] = [float(phase[lesion].mean()) for phase in predicted]
    result["lesion_enhancement"] = float(
        crop.phases[-1][lesion].mean() - crop.phases[0][lesion].mean()
    )
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_child(case_dir: Path, run_dir: Path, precision: str, real_windows: int | None) -> dict:
    """`measure` in a fresh process, so its peak RSS is the prediction's own."""
    command = [sys.executable, __file__, "--child", str(case_dir), str(run_dir), precision]
    if real_windows is not None:
        command += ["--real-windows", str(real_windows)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(results: dict[str, dict], shape: tuple[int, ...]) -> None:
    device = next(iter(results.values()))["device"]
    print(f"whole case {'x'.join(map(str, shape))}, device {device}, torch {torch.__version__}")
    for precision, result in results.items():
        if "s_per_window" in result:
            print(
                f"{precision}: model {result['s_per_window']:.2f} s per window "
                f"(median of {result['model_windows']} timed windows)"
            )
        for overlap in OVERLAPS:
            figures = result[f"overlap_{overlap}"]
            how = "extrapolated" if figures["extrapolated"] else "measured"
            print(
                f"{precision} overlap {overlap}: {figures['seconds']:.3f} s ({how}), windows run "
                f"{figures['windows_run']} of {figures['windows_box']} over the ROI's box "
                f"({figures['windows_volume']} over the whole volume)"
            )
        cuda = f", CUDA peak {result['cuda_peak_gib']:.2f} GiB" if "cuda_peak_gib" in result else ""
        print(f"{precision}: peak RSS {result['peak_rss_gib']:.2f} GiB{cuda}")
    fp32, bf16 = results["fp32"], results["bf16"]
    differences = np.abs(np.subtract(bf16["lesion_means"], fp32["lesion_means"]))
    enhancement = fp32["lesion_enhancement"]
    print(
        f"lesion: enhancement {enhancement:.1f} (signal units); largest bf16 - fp32 lesion-mean "
        f"difference {differences.max():.3f} = {100 * differences.max() / enhancement:.3f} % "
        "of it (acceptance < 1 %)"
    )
    fastest = min(results, key=lambda name: results[name]["overlap_0.5"]["seconds"])
    print(f"whole case, overlap 0.5, {fastest}:")
    print(f"whole_case_s: {results[fastest]['overlap_0.5']['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128x128x48 case, small U-Net")
    parser.add_argument("--full", action="store_true", help="run the model on every window")
    parser.add_argument("--real-windows", type=int, default=2, help="CPU: windows run per case")
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "RUN", "PRECISION"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.real_windows < 1:
        parser.error(f"--real-windows: need at least 1, got {args.real_windows}")
    real_windows = None if args.full else args.real_windows
    if args.child:
        case_dir, run_dir, precision = args.child
        result = measure(Path(case_dir), Path(run_dir), PRECISIONS[precision], real_windows)
        print(json.dumps(result))
        return
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as folder:
        case_dir, run_dir = make_inputs(Path(folder), args.quick)
        results = {name: run_child(case_dir, run_dir, name, real_windows) for name in PRECISIONS}
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    report(results, (QUICK if args.quick else FULL)["shape"])


if __name__ == "__main__":
    main()
