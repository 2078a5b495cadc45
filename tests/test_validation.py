"""Validation during training: whole-volume lesion enhancement errors, mixed protocols."""

import numpy as np
import pytest
import torch

from dcesynth.case import Case
from dcesynth.data.sampling import prepare_case
from dcesynth.train.validation import validate

PATCH = (16, 16, 16)


class CopyForward(torch.nn.Module):
    """Predicts every target phase as the last observed one."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pre, observed, times_s):
        n_targets = times_s.shape[1] - observed.shape[1]
        return observed[:, -1:].expand(-1, n_targets, *observed.shape[2:])


class AddsOne(CopyForward):
    """Predicts every target phase as the last observed one plus 1 (normalised units)."""

    def forward(self, pre, observed, times_s):
        return super().forward(pre, observed, times_s) + 1.0


def random_case(n_phases: int, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    shape = (24, 20, 16)
    phases = rng.uniform(100.0, 200.0, (n_phases, *shape)).astype(np.float32)
    seg = np.zeros(shape, dtype=np.int16)
    seg[8:12, 6:10, 4:8] = 1
    roi = np.zeros(shape, dtype=np.uint8)
    roi[4:20, 2:18, 2:14] = 1
    times = list(np.linspace(0.0, 300.0, n_phases))
    return Case(f"c{seed}", phases, times, seg, roi, np.eye(4))


def test_each_case_is_scored_on_its_own_protocol():
    cases = [prepare_case(random_case(n, seed), PATCH) for seed, n in enumerate((4, 4, 6))]
    metrics = validate(CopyForward(), cases, PATCH, amp=False)

    means = [c.phases[:, c.lesion_mask].mean(axis=1, dtype=np.float64) for c in cases]
    copy_errors = [(m - m[1]) ** 2 for m in means]
    last = np.mean([e[-1] for e in copy_errors])
    assert metrics["val_enh_error_last"] == pytest.approx(last)
    assert metrics["val_enh_error_last_copy"] == pytest.approx(last)
    # 3dyn exists in every case, 5dyn only in the 6-phase one.
    assert metrics["val_enh_error_3dyn"] == pytest.approx(np.mean([e[3] for e in copy_errors]))
    assert metrics["val_enh_error_5dyn"] == pytest.approx(copy_errors[2][5])
    assert "val_enh_error_6dyn" not in metrics


def test_the_whole_lesion_is_predicted_by_the_windows():
    # A constant offset everywhere the windows run: a lesion voxel left out of the windows
    # would keep 1dyn and pull the lesion mean's error below 1.
    cases = [prepare_case(random_case(5, seed), PATCH) for seed in range(2)]
    metrics = validate(AddsOne(), cases, PATCH, amp=False)
    means = [c.phases[:, c.lesion_mask].mean(axis=1, dtype=np.float64) for c in cases]
    expected = np.mean([(m[-1] - (m[1] + 1.0)) ** 2 for m in means])
    assert metrics["val_enh_error_last"] == pytest.approx(expected, rel=1e-5)
