"""The models compute what they computed when `tests/data/model_reference.safetensors` was made.

The file holds fixed weights, inputs, the outputs of every model and the gradients of one
training step's loss (free-running and teacher-forced), made on CPU in fp32 with the models
of commit `3b0cced` (list-of-phases interface, channels-last kernels inside the blocks).
The plain models and the accelerated ones (`dcesynth.accel`) must reproduce the outputs
and the loss to 1e-5 and the gradients to 1e-4 relative: the file was made on a CPU with
AVX-512, and fp32 rounding differs with the CPU's kernels (gradients up to 1.2e-5 apart on
an AVX2 CPU), while a change of the maths moves them by far more.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcesynth.accel import accelerate
from dcesynth.model import BaselineUNet, IterUNet
from dcesynth.train.losses import CombinedLoss, LossWeights

REFERENCE = Path(__file__).parent / "data" / "model_reference.safetensors"
FEATURES = (2, 2, 4, 4, 16, 2)
RELATIVE = 1e-5
GRADIENT_RELATIVE = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, relative=RELATIVE) -> None:
    """Largest difference at most ``relative`` of the largest value."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= relative * scale, f"{name}: max error {error:.3g}, scale {scale:.3g}"


def _model(kind: str) -> torch.nn.Module:
    if kind == "iterunet":
        return IterUNet(features=FEATURES, temporal=True, time_dim=16)
    if kind == "iterunet_notime":
        return IterUNet(features=FEATURES, temporal=False)
    return BaselineUNet(2, features=FEATURES)


CASES = [
    ("iterunet_teacher", "iterunet", True),
    ("iterunet_free", "iterunet", False),
    ("iterunet_notime", "iterunet_notime", False),
    ("baseline", "baseline", False),
]


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
@pytest.mark.parametrize(("record", "weights", "teacher"), CASES)
def test_outputs_and_gradients_match_the_reference(
    reference, record, weights, teacher, accelerated
):
    torch.manual_seed(0)
    model = _model(weights)
    loss = CombinedLoss(LossWeights(1.0, 0.5, 1.0, 0.1, 2.0), None)
    if accelerated:
        accelerate(model, torch.device("cpu"))
        accelerate(loss, torch.device("cpu"))
    prefix = f"{weights}.weights."
    model.load_state_dict(
        {k[len(prefix) :]: v for k, v in reference.items() if k.startswith(prefix)}
    )
    pre, phases, times_s = reference["pre"], reference["phases"], reference["times_s"]
    lesion = reference["lesion"].bool()
    targets = phases[:, 1:]
    preds = model(pre, phases[:, :1], times_s, teacher=targets if teacher else None)
    total, _ = loss(preds, targets, None, lesion)
    total.backward()
    _close(f"{record} outputs", preds.detach(), reference[f"{record}.outputs"])
    _close(f"{record} loss", total.detach().reshape(1), reference[f"{record}.loss"])
    # Relative to the whole gradient: some (biases before an instance norm) are zero up to
    # rounding, and rounding is all they could differ by.
    names = [name for name, _ in model.named_parameters()]
    _close(
        f"{record} gradients",
        torch.cat([parameter.grad.flatten() for _, parameter in model.named_parameters()]),
        torch.cat([reference[f"{record}.grads.{name}"].flatten() for name in names]),
        GRADIENT_RELATIVE,
    )
