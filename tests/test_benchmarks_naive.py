"""benchmarks/naive.py: the naive peer of the training-step benchmark computes our function."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dcesynth.model import IterUNet
from dcesynth.train.losses import CombinedLoss, LossWeights, enhancement_weight

NAIVE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "naive.py"
SPEC = importlib.util.spec_from_file_location("naive", NAIVE_PATH)
naive = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(naive)

TINY_FEATURES = (4, 4, 8, 8, 16, 4)
TIMES_S = (0.0, 85.0, 155.0, 225.0, 295.0, 365.0)


def twin_models(device: str = "cpu") -> tuple[IterUNet, "naive.NaiveIterUNet"]:
    torch.manual_seed(0)
    ours = IterUNet(features=TINY_FEATURES)
    return ours.to(device), naive.copy_weights(ours, naive.NaiveIterUNet(TINY_FEATURES)).to(device)


def phases(device: str = "cpu") -> torch.Tensor:
    """`(2, 6, 32, 32, 16)`: pre, then five phases of growing enhancement."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn((2, 1, 32, 32, 16), generator=generator)
    return torch.cat(
        [base + 0.5 * k * torch.rand(base.shape, generator=generator) for k in range(6)], dim=1
    ).to(device)


def both_losses(free_running: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ours, reference = twin_models(device)
    images = phases(device)
    times_s = torch.tensor(TIMES_S[1:], device=device).expand(2, -1)
    teacher = None if free_running else images[:, 2:]
    weight = enhancement_weight(images[:, 1:2], images[:, -1:]) if free_running else None
    ours_preds = ours(images[:, :1], images[:, 1:2], times_s, teacher=teacher)
    naive_preds = reference(images[:, :1], images[:, 1:2], times_s, teacher)
    ours_loss, _ = CombinedLoss(LossWeights(), None)(ours_preds, images[:, 2:], weight)
    return ours_loss, naive.naive_loss(naive_preds, images[:, 2:], weight)


def test_same_weights_give_the_same_warmup_loss():
    ours_loss, naive_loss = both_losses(free_running=False)
    torch.testing.assert_close(ours_loss, naive_loss, rtol=1e-5, atol=0)


def test_same_weights_give_the_same_free_running_weighted_loss():
    ours_loss, naive_loss = both_losses(free_running=True)
    torch.testing.assert_close(ours_loss, naive_loss, rtol=1e-5, atol=0)


def test_same_weights_give_the_same_output_conv_gradient():
    ours, reference = twin_models()
    images = phases()
    times_s = torch.tensor(TIMES_S[1:]).expand(2, -1)
    ours_preds = ours(images[:, :1], images[:, 1:2], times_s)
    naive_preds = reference(images[:, :1], images[:, 1:2], times_s)
    CombinedLoss(LossWeights(), None)(ours_preds, images[:, 2:])[0].backward()
    naive.naive_loss(naive_preds, images[:, 2:]).backward()
    torch.testing.assert_close(
        ours.unet.final_conv.weight.grad, reference.final_conv.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_copy_weights_keeps_the_convlstm_gates_apart():
    ours, reference = twin_models()
    input_gate, forget_gate, output_gate, candidate = ours.unet.conv_lstm.gates.weight.chunk(4)
    naive_gates = reference.conv_lstm.conv.weight.chunk(4)
    assert torch.equal(naive_gates[2], candidate) and torch.equal(naive_gates[3], output_gate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_weights_give_the_same_loss_on_cuda():
    ours_loss, naive_loss = both_losses(free_running=True, device="cuda")
    torch.testing.assert_close(ours_loss, naive_loss, rtol=1e-4, atol=0)
