"""Tests for dcesynth.accel: the device speed paths compute what the plain models do."""

import copy
import re
from pathlib import Path

import pytest
import torch

from dcesynth.accel import accelerate, use_bf16
from dcesynth.accel.cpu import ChannelsLastInstanceNorm3d, ChannelsLastUNet3D
from dcesynth.model import BaselineUNet, IterUNet
from dcesynth.train.losses import CombinedLoss, LossWeights

CPU = torch.device("cpu")
MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "dcesynth" / "model"


def _pair(build):
    torch.manual_seed(0)
    plain = build()
    accelerated = accelerate(copy.deepcopy(plain), CPU)
    return plain, accelerated


def _run(model, loss, x, times_s, teacher):
    model.zero_grad()
    preds = model(x[:, :1], x[:, 1:2], times_s, teacher=x[:, 2:] if teacher else None)
    lesion = torch.zeros_like(x[:, :1], dtype=torch.bool)
    lesion[..., 4:12, 4:12, 2:8] = True
    total, _ = loss(preds, x[:, 2:], None, lesion)
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return preds.detach(), grads


TIMES_S = torch.tensor([[60.0, 150.0, 240.0, 330.0], [90.0, 200.0, 310.0, 420.0]])
LOSS_WEIGHTS = LossWeights(1.0, 0.5, 1.0, 0.1, 2.0)


def _build(name: str, features: tuple[int, ...]) -> torch.nn.Module:
    if name == "iterunet":
        return IterUNet(features=features)
    return BaselineUNet(3, features=features)


def _phases(spatial: tuple[int, int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((2, 5, *spatial), generator=generator).cumsum(1) * 0.5


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("teacher", [False, True], ids=["free-running", "teacher-forced"])
@pytest.mark.parametrize(
    ("name", "features", "spatial"),
    [
        ("iterunet", (2, 2, 4, 4, 16, 2), (32, 32, 16)),
        ("baseline", (4, 4, 8, 8, 16, 4), (16, 16, 32)),
    ],
)
def test_accelerated_model_gives_the_plain_outputs_and_gradients(name, features, spatial, teacher):
    """Outputs and the gradients of one training step's loss, accelerated in fp32, agree to
    1e-5 relative with the plain model's in float64: its exact maths. (Against the plain
    model in fp32 the gap is the rounding of both, which depends on the CPU's kernels: a
    free-running gradient of the plain fp32 model is 9e-4 off float64 on an AVX2 CPU.)"""
    plain, fast = _pair(lambda: _build(name, features))
    x = _phases(spatial)
    exact = CombinedLoss(LOSS_WEIGHTS, None).double()
    expected = _run(plain.double(), exact, x.double(), TIMES_S.double(), teacher)
    actual = _run(fast, accelerate(CombinedLoss(LOSS_WEIGHTS, None), CPU), x, TIMES_S, teacher)
    for what, a, e in zip(("outputs", "gradients"), actual, expected, strict=True):
        assert _relative(a.double(), e) <= 1e-5, what


@pytest.mark.parametrize(
    ("features", "spatial"),
    [
        ((8, 8, 16, 32, 64, 8), (32, 32, 16)),  # the product presets' model and patch
        ((2, 2, 4, 4, 8, 2), (32, 16, 16)),  # one row of voxels per sample at the bottom
    ],
)
def test_larger_accelerated_models_are_as_exact_as_the_plain_ones(features, spatial):
    """Outputs agree to 1e-5 relative. Gradients are compared with float64 (the plain
    model; oneDNN has no float64 channels-last path): the L1 and GDL terms' kinks and
    instance norms over the few voxels of a patch's deepest level amplify float32 rounding,
    so the plain model's own float32 gradients are up to ~1e-4 off float64 there (4-step
    free-running rollout), and the accelerated model's must be within 1e-3."""
    plain, fast = _pair(lambda: IterUNet(features=features))
    exact = copy.deepcopy(plain).double()
    x = _phases(spatial)
    outputs, gradients = _run(
        fast, accelerate(CombinedLoss(LOSS_WEIGHTS, None), CPU), x, TIMES_S, False
    )
    plain_outputs, _ = _run(plain, CombinedLoss(LOSS_WEIGHTS, None), x, TIMES_S, False)
    _, exact_gradients = _run(
        exact, CombinedLoss(LOSS_WEIGHTS, None), x.double(), TIMES_S.double(), False
    )
    assert _relative(outputs, plain_outputs) <= 1e-5
    assert _relative(gradients.double(), exact_gradients) <= 1e-3


def test_accelerate_keeps_parameter_names_and_values():
    plain, fast = _pair(lambda: IterUNet(features=(4, 4, 8, 8, 16, 4)))
    assert isinstance(fast.unet, ChannelsLastUNet3D)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, fast.state_dict()[key])
    again = accelerate(fast, CPU)
    assert again is fast and type(fast.unet) is ChannelsLastUNet3D


def test_accelerated_model_runs_channels_last_on_cpu():
    _, fast = _pair(lambda: IterUNet(features=(4, 4, 8, 8, 16, 4)))
    layouts = []
    fast.unet.final_conv.register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
    )
    x = torch.randn(2, 3, 32, 32, 16)  # batch 2: a batch of 1 is both layouts at once
    with torch.no_grad():
        fast(x[:, :1], x[:, 1:2], torch.tensor([[60.0, 150.0]] * 2))
    assert layouts == [True]


def test_use_bf16_follows_the_request_then_the_device(monkeypatch):
    assert use_bf16(CPU, True) and not use_bf16(torch.device("cuda"), False)
    assert use_bf16(torch.device("cuda"))
    monkeypatch.setattr("dcesynth.accel.bf16_is_fast", lambda: False)
    assert not use_bf16(CPU)
    monkeypatch.setattr("dcesynth.accel.bf16_is_fast", lambda: True)
    assert use_bf16(CPU)


def test_model_package_holds_no_device_specific_code():
    pattern = re.compile(r"torch\.ops\.aten|device\.type|channels_last|memory_format|mallopt|cudnn")
    for path in MODEL_DIR.glob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels", [5, 32])  # rows of 32 voxels; rows of one voxel
def test_channels_last_instance_norm_equals_instance_norm(affine, channels):
    """Values, layout and gradients (input, weight, bias) of the per-sample channels-last norm
    equal torch's instance norm on the contiguous tensor."""
    torch.manual_seed(0)
    reference = torch.nn.InstanceNorm3d(channels, affine=affine)
    if affine:
        torch.nn.init.normal_(reference.weight)
        torch.nn.init.normal_(reference.bias)
    norm = ChannelsLastInstanceNorm3d(channels, affine=affine)
    norm.load_state_dict(reference.state_dict())
    x = torch.randn(3, channels, 8, 6, 4) * 3 + 1
    upstream = torch.randn(3, channels, 8, 6, 4)

    def run(module, data):
        data = data.detach().requires_grad_()
        out = module(data)
        out.backward(upstream)
        grads = [data.grad] + [p.grad for p in module.parameters()]
        return out, grads

    expected, expected_grads = run(reference, x)
    actual, actual_grads = run(norm, x.contiguous(memory_format=torch.channels_last_3d))
    assert actual.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(actual_grads) == len(expected_grads) == (3 if affine else 1)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_channels_last_instance_norm_bf16_is_as_close_as_torch():
    """bf16 input, 28 channels (the paper's level 0: pooled column statistics): output and
    input gradient are within one bf16 step (2**-7 of the largest value) of a float64
    instance norm, as torch's own bf16 instance norm is; weight and bias gradients are
    within 1e-3."""
    torch.manual_seed(0)
    shape = (2, 28, 16, 16, 8)
    reference = torch.nn.InstanceNorm3d(28, affine=True)
    torch.nn.init.normal_(reference.weight)
    torch.nn.init.normal_(reference.bias)
    norm = ChannelsLastInstanceNorm3d(28, affine=True)
    norm.load_state_dict(reference.state_dict())
    x = (torch.randn(shape) * 0.5 + 3).to(torch.bfloat16)
    upstream = torch.randn(shape).to(torch.bfloat16)

    def run(module, data):
        data = data.detach().requires_grad_()
        out = module(data)
        out.backward(upstream.to(out.dtype))
        return [t.double() for t in (out, data.grad, module.weight.grad, module.bias.grad)]

    actual = run(norm, x.contiguous(memory_format=torch.channels_last_3d))
    torch_bf16 = run(copy.deepcopy(reference), x)
    exact = run(reference.double(), x.double())
    for name, a, t, e in zip(
        ("output", "input gradient"), actual[:2], torch_bf16[:2], exact[:2], strict=True
    ):
        bf16_step = e.abs().max().item() * 2**-7
        assert (t - e).abs().max().item() <= bf16_step  # the bound holds for torch
        assert (a - e).abs().max().item() <= bf16_step, name
    for a, e in zip(actual[2:], exact[2:], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
