"""Checks made before a command starts work: output paths, disk space, memory.

Inputs are never modified: an output folder may not be, contain or lie inside a
folder the command reads. A command that would fill the disk or the memory says so,
with its estimate, before it writes or computes anything.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from dcesynth.case import read_meta
from dcesynth.io import InputError, nearest_existing, nifti_shape

MIB = 2**20
NIFTI_HEADER_BYTES = 352


def check_out_apart_from_inputs(
    out: Path, inputs: Iterable[Path | None], option: str = "--out"
) -> None:
    """Refuse an output folder that is, contains or lies inside an input path.

    Args:
        out: the output folder (need not exist yet).
        inputs: folders and files the command reads; None entries are ignored.
        option: the option that named ``out``, for the message.

    Raises:
        InputError: ``out`` overlaps one of ``inputs``.
    """
    target = Path(out).resolve()
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).resolve()
        if target == resolved or resolved in target.parents:
            raise InputError(f"{option} {out}: is inside the input {source}")
        if target in resolved.parents:
            raise InputError(f"{option} {out}: contains the input {source}")


def check_holds_no_cases(out: Path, option: str = "--out") -> None:
    """Refuse an output folder holding case folders: predictions would replace them."""
    out = Path(out)
    if not out.is_dir():
        return
    for child in sorted(out.iterdir()):
        if (child / "meta.json").is_file():
            raise InputError(
                f"{option} {out}: holds the case {child.name}; predictions would replace it"
            )


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the disk that holds (or will hold) ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_disk_space(out: Path, needed_bytes: int, option: str = "--out") -> None:
    """Refuse to start when the disk of ``out`` has less than ``needed_bytes`` free."""
    free = free_disk_bytes(out)
    if needed_bytes > free:
        raise InputError(
            f"{option} {out}: needs about {needed_bytes / MIB:.1f} MiB, "
            f"the disk has {free / MIB:.1f} MiB free"
        )


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def prediction_disk_bytes(shape: tuple[int, ...], n_targets: int) -> int:
    """Bytes ``predict`` writes for one case: float32 phases and a uint8 kinetic map.

    Gzip barely shrinks noisy float32 images, so the uncompressed size is the estimate.
    """
    voxels = math.prod(shape)
    return n_targets * (4 * voxels + NIFTI_HEADER_BYTES) + voxels + NIFTI_HEADER_BYTES


def prediction_memory_bytes(shape: tuple[int, ...], n_phases: int, n_targets: int) -> int:
    """Peak host memory of predicting one case of ``n_phases`` phases, as float32 volumes.

    The case (``n_phases``), its normalised inputs and ROI (``n_phases + 1``), the
    sliding-window output and its blending weights (``2 * n_targets``), the
    prediction in signal units and the synthesized series typed by the kinetic map
    (``n_phases + n_targets``). Window activations are small beside these.
    """
    volumes = n_phases + (n_phases + 1) + 2 * n_targets + (n_phases + n_targets)
    return 4 * volumes * math.prod(shape)


def prediction_needs(
    case_dir: Path, n_inputs: int, protocol_s: list[float] | None
) -> tuple[int, int]:
    """``(disk bytes, memory bytes)`` of predicting one case, from meta.json and a header.

    Args:
        case_dir: the case folder; only its meta.json and the pre phase's header are read.
        n_inputs: observed phases, pre included.
        protocol_s: the whole protocol's times (``--times``), else the case's own.
    """
    meta = read_meta(case_dir)
    shape = nifti_shape(Path(case_dir) / "pre.nii.gz")[:3]
    n_targets = max(len(protocol_s or meta["times_s"]) - n_inputs, 0)
    n_phases = len(meta["times_s"])
    return (
        prediction_disk_bytes(shape, n_targets),
        prediction_memory_bytes(shape, n_phases, n_targets),
    )


def check_memory(where: str, needed_bytes: int) -> None:
    """Refuse a prediction whose estimated memory exceeds what is available now."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise InputError(
            f"{where}: predicting it needs about {needed_bytes / MIB:.0f} MiB of memory, "
            f"{available / MIB:.0f} MiB available"
        )
