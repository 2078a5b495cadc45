"""Validation during training: lesion enhancement errors on patches of mixed protocols."""

import numpy as np
import pytest
import torch

from dcesynth.train.validation import validate


class CopyForward(torch.nn.Module):
    """Predicts every target phase as the last observed one."""

    def forward(self, pre, observed, times_s):
        n_targets = times_s.shape[1] - observed.shape[1]
        return observed[:, -1:].expand(-1, n_targets, *observed.shape[2:])


def patches(n_cases: int, n_phases: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    phases = torch.as_tensor(rng.normal(size=(n_cases, n_phases, 8, 8, 8)), dtype=torch.float32)
    lesion = torch.zeros(n_cases, 1, 8, 8, 8, dtype=torch.bool)
    lesion[..., 2:5, 2:5, 2:5] = True
    times = torch.linspace(0, 300, n_phases).expand(n_cases, -1)
    return {"phases": phases, "times_s": times, "lesion": lesion}


def test_each_case_is_scored_on_its_own_protocol():
    batches = [patches(2, 4, seed=0), patches(3, 6, seed=1)]
    metrics = validate(CopyForward(), batches, torch.device("cpu"), amp=False)

    means = [b["phases"][..., 2:5, 2:5, 2:5].double().mean(dim=(2, 3, 4)).numpy() for b in batches]
    copy_errors = [(m - m[:, 1:2]) ** 2 for m in means]
    last = np.concatenate([e[:, -1] for e in copy_errors])
    assert metrics["val_enh_error_last"] == pytest.approx(last.mean())
    assert metrics["val_enh_error_last_copy"] == pytest.approx(last.mean())
    # 3dyn exists in every case, 5dyn only in the 6-phase ones.
    both = np.concatenate([e[:, 3] for e in copy_errors])
    assert metrics["val_enh_error_3dyn"] == pytest.approx(both.mean())
    assert metrics["val_enh_error_5dyn"] == pytest.approx(copy_errors[1][:, 5].mean())
    assert "val_enh_error_6dyn" not in metrics
