"""The GPU paths: model, training and prediction on CUDA agree with the CPU (skipped without)."""

import numpy as np
import pytest
import torch

from dcesynth.accel import use_bf16
from dcesynth.config import preset
from dcesynth.infer import load_run, predict_case
from dcesynth.model import IterUNet
from dcesynth.train.trainer import build_trainer
from test_infer import make_case, make_run
from test_model import SMALL_FEATURES, TARGET_TIMES_S, phases, times, with_random_output
from test_train import cohort, tiny  # noqa: F401 (cohort is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 convolutions: with TF32 (cuDNN's default) four steps of a U-Net differ from
    the CPU by up to 1e-2 (seen on an H200), which would hide real differences."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@torch.no_grad()
@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_rollout_on_cuda_matches_cpu(teacher_forcing):
    torch.manual_seed(0)
    model = with_random_output(IterUNet(features=SMALL_FEATURES))
    x = phases(6)
    times_s = times(85.0, *TARGET_TIMES_S)
    teacher = x[:, 2:] if teacher_forcing else None
    expected = model(x[:, :1], x[:, 1:2], times_s, teacher)
    model.cuda()
    x = x.cuda()
    actual = model(x[:, :1], x[:, 1:2], times_s.cuda(), x[:, 2:] if teacher_forcing else None)
    assert actual.is_cuda
    torch.testing.assert_close(actual.cpu(), expected, **TOLERANCE)


def test_rollout_with_gradients_matches_cpu():
    """Free-running rollout on CUDA: same outputs and weight gradients as the CPU."""
    torch.manual_seed(0)
    model = with_random_output(IterUNet(features=SMALL_FEATURES))
    x = phases(6)
    grads = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        inputs, times_s = x.to(device), times(85.0, *TARGET_TIMES_S).to(device)
        model(inputs[:, :1], inputs[:, 1:2], times_s).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * grads[0].abs().max())


def test_training_on_cuda_uses_fused_adamw_and_bf16(cohort, tmp_path):  # noqa: F811
    config = tiny(preset("demo"), amp=None)
    trainer = build_trainer(cohort, tmp_path / "run", config)
    assert trainer.device.type == "cuda"
    assert use_bf16(trainer.device, config.train.amp)
    losses = []
    trainer.fit(on_step=lambda step, stage, terms, speed: losses.append(terms["total"]))
    trainer.close()
    assert trainer.optimizer.defaults["fused"]
    assert len(losses) == config.train.total_steps
    assert all(np.isfinite(losses))
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def test_prediction_on_cuda_matches_cpu(tmp_path):
    case = make_case()
    run_dir = make_run(tmp_path)
    on_cpu = predict_case(load_run(run_dir, torch.device("cpu")), case, amp=False)
    run = load_run(run_dir, torch.device("cuda"))
    on_cuda = predict_case(run, case, amp=False)
    assert on_cuda.windows_run == on_cpu.windows_run
    np.testing.assert_allclose(on_cuda.phases, on_cpu.phases, rtol=1e-3, atol=0.05)
    in_bf16 = predict_case(run, case, amp=True)
    lesion = case.seg > 0
    enhancement = case.phases[-1][lesion].mean() - case.phases[0][lesion].mean()
    for fp32_phase, bf16_phase in zip(on_cuda.phases, in_bf16.phases, strict=True):
        assert abs(bf16_phase[lesion].mean() - fp32_phase[lesion].mean()) < 0.01 * enhancement
