"""Device-specific speed paths, applied in one explicit call; the maths stays in `model/`.

`accelerate(module, device)` prepares a model (or a loss) for the device it runs on;
`tune_process(device)` sets process-wide options once; `use_bf16` chooses the precision;
`make_adamw` the optimiser's kernel; `windows_per_call` how many sliding windows one model
call takes. Outputs and gradients are those of the plain modules (fp32, to float rounding:
`tests/test_accel.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dcesynth.accel.cpu import bf16_is_fast, keep_channels_last, keep_freed_host_memory


def accelerate(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply `device`'s speed paths to `module` in place and return it.

    On CPU the U-Nets run channels-last (`dcesynth.accel.cpu`); on CUDA the default layout
    and cuDNN's kernels stay.
    """
    if device.type == "cpu":
        keep_channels_last(module)
    return module


def tune_process(device: torch.device) -> None:
    """Process-wide settings for training on `device`: on CPU keep freed memory in the heap
    (`keep_freed_host_memory`), on CUDA let cuDNN pick the fastest convolution algorithms."""
    if device.type == "cpu":
        keep_freed_host_memory()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def use_bf16(device: torch.device, requested: bool | None = None) -> bool:
    """Whether to run under bf16 autocast on `device`.

    Args:
        device: where the model runs.
        requested: the user's choice (`--amp` / `--no-amp`, `TrainConfig.amp`); None lets
            the device decide: bf16 on CUDA, and on a CPU where it is faster than fp32
            (one with bf16 matrix units, `bf16_is_fast`).
    """
    if requested is not None:
        return requested
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bf16_is_fast()


# PyTorch runs a 3-D convolution of batch 1 on its own slow kernel instead of oneDNN's when
# batch x channels x the first two spatial sizes is at most 20,480 (ATen's use_mkldnn rule),
# which every level of a U-Net on 32x32x16 windows is. Batches of 2 or more always take
# oneDNN: 4 such windows ran 3.5x faster per window than one at a time (docs/performance.md).
SMALL_WINDOW_VOXELS = 32 * 32 * 32
SMALL_WINDOW_BATCH = 4


def windows_per_call(device: torch.device, patch: Sequence[int]) -> int:
    """Windows per model call in sliding-window prediction on `device`.

    CUDA: 8. CPU: 4 for windows of at most 32x32x32 voxels, which a batch of one would send
    to PyTorch's slow native convolution; 1 for larger windows, which take oneDNN anyway and
    whose activations are large.
    """
    if device.type == "cuda":
        return 8
    return SMALL_WINDOW_BATCH if math.prod(patch) <= SMALL_WINDOW_VOXELS else 1


def make_adamw(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel (one launch per step rather than a few per tensor)."""
    parameters = list(parameters)
    fused = all(p.device.type == "cuda" for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


__all__ = ["accelerate", "make_adamw", "tune_process", "use_bf16", "windows_per_call"]
