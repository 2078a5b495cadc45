"""Checkpoints that resume exactly and load without executing pickled code.

Weights are safetensors; the training state holds only tensors, numbers and strings
and is read with ``torch.load(weights_only=True)``, which refuses code. Where a run
keeps them: ``dcesynth.rundir``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from dcesynth.io import InputError, atomic_write_bytes


def save_weights(path: Path, model: torch.nn.Module, step: int | None = None) -> None:
    """Write the model's state dict as safetensors, atomically.

    The metadata names the model class, the training step (when given) and, for the
    baseline, its number of target phases, which `predict` needs to rebuild it.
    """
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"model_class": type(model).__name__}
    if step is not None:
        metadata["step"] = str(step)
    if hasattr(model, "n_targets"):
        metadata["n_targets"] = str(model.n_targets)
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_weights(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load finite safetensors weights into ``model`` (strict); else InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: cannot read weights ({exc})") from exc
    for key, tensor in tensors.items():
        # NaN weights would predict NaN images without any error downstream.
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"{path}: weights hold NaN or infinite values ({key})")
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise InputError(f"{path}: weights do not fit the model ({exc})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{path}: weights do not fit the model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    return model


def weights_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors weights file ({} when it has none)."""
    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: cannot read weights ({exc})") from exc


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write training state (optimizer, scheduler, counters) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """Read training state with ``weights_only=True`` (no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise InputError(f"{path}: cannot read checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(state, dict) or not {"step", "best"} <= state.keys():
        raise InputError(f"{path}: not a training state (no step and best)")
    return state
