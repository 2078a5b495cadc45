"""Phantom throughput: cases per second at 128x128x64 with the paper's six phases.

Four figures: simulation alone and simulation + writing the case (gzipped NIfTI),
each in one process and in ``--workers`` processes. The last line,
``simulate_cases_per_s``, is simulate + write in ``--workers`` processes, which is
what ``dcesynth simulate`` does (goal: >= 1 case/s on 2 cores).

Usage: ``python benchmarks/simulate.py [--cases 8] [--workers 2]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dcesynth.phantom import CasePlan, PhantomConfig, plan_cohort, simulate_case, simulate_cohort

CONFIG = PhantomConfig(shape=(128, 128, 64))


def simulate_only(plan: CasePlan) -> str:
    """Simulate one case and drop it (top-level, so worker processes can run it)."""
    return simulate_case(plan, CONFIG).case_id


def simulate_in_memory(n_cases: int, workers: int) -> None:
    plans = plan_cohort(n_cases, seed=0)
    if workers == 1:
        list(map(simulate_only, plans))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(simulate_only, plans))


def simulate_and_write(n_cases: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        simulate_cohort(Path(folder), n_cases, seed=0, config=CONFIG, workers=workers)


def cases_per_s(run: Callable[[int, int], None], n_cases: int, workers: int) -> float:
    start = time.perf_counter()
    run(n_cases, workers)
    return n_cases / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="cases per measurement")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel runs")
    args = parser.parse_args()
    simulate_only(plan_cohort(1, seed=1)[0])  # warm-up: imports, dcmri, numpy caches
    shape = "x".join(map(str, CONFIG.shape))
    print(f"{args.cases} cases of {shape}, {len(CONFIG.times_s)} phases")
    results = {}
    for label, run in (("simulate", simulate_in_memory), ("simulate+write", simulate_and_write)):
        for workers in (1, args.workers):
            results[label, workers] = cases_per_s(run, args.cases, workers)
            print(f"{label:>15}, {workers} worker(s): {results[label, workers]:.2f} cases/s")
    print(f"simulate_cases_per_s: {results['simulate+write', args.workers]:.2f}")


if __name__ == "__main__":
    main()
