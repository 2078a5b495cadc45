"""Tests for dcesynth.model: iterU-Net, the per-phase baseline and their blocks."""

import copy

import pytest
import torch

from dcesynth.model import (
    PAPER_FEATURES,
    BaselineUNet,
    ConvLSTMCell3D,
    IterUNet,
    SinusoidalTimeEncoding,
    UNet3D,
    build_model,
)
from dcesynth.model.blocks import ChannelsLastInstanceNorm3d

SMALL_FEATURES = (4, 4, 8, 8, 16, 4)
SHAPE = (2, 1, 16, 16, 32)
TARGET_TIMES_S = [155.0, 225.0, 295.0, 365.0]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def with_random_output(model: torch.nn.Module) -> torch.nn.Module:
    """Give every output convolution clearly non-zero weights, so that changes show."""
    for unet in model.modules():
        if isinstance(unet, UNet3D):
            torch.nn.init.normal_(unet.final_conv.weight, std=0.5)
            torch.nn.init.normal_(unet.final_conv.bias, std=0.1)
    return model


def small_iterunet(temporal: bool = True) -> IterUNet:
    torch.manual_seed(0)
    return with_random_output(IterUNet(features=SMALL_FEATURES, temporal=temporal)).eval()


def phases(count: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def record_step_inputs(model: IterUNet, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls = []
    original_step = model.step

    def spy(pre, current, current_time_s, target_time_s, state=None):
        calls.append((current, current_time_s, target_time_s))
        return original_step(pre, current, current_time_s, target_time_s, state)

    monkeypatch.setattr(model, "step", spy)
    return calls


def test_paper_features_parameter_count_is_near_reference():
    count = count_parameters(IterUNet(features=PAPER_FEATURES, temporal=True))
    assert 5.4e6 <= count <= 6.7e6


def test_temporal_off_has_no_time_or_convlstm_parameters():
    temporal, plain = small_iterunet(True), small_iterunet(False)
    names = [name for name, _ in plain.named_parameters()]
    assert not [name for name in names if "time" in name or "lstm" in name]
    assert any("conv_lstm" in name for name, _ in temporal.named_parameters())
    assert any("time_projections" in name for name, _ in temporal.named_parameters())
    assert count_parameters(plain) < count_parameters(temporal)


@torch.no_grad()
def test_rollout_with_paper_features_gives_one_output_per_target():
    torch.manual_seed(0)
    model = IterUNet(features=PAPER_FEATURES).eval()
    pre, first = phases(2, (2, 1, 32, 32, 16))
    outputs = model.rollout(pre, [first], [85.0], TARGET_TIMES_S)
    assert len(outputs) == 4
    assert all(output.shape == (2, 1, 32, 32, 16) for output in outputs)


@torch.no_grad()
def test_step_output_is_current_phase_plus_network_output():
    model = small_iterunet()
    torch.nn.init.zeros_(model.unet.final_conv.weight)
    torch.nn.init.zeros_(model.unet.final_conv.bias)
    pre, current = phases(2)
    prediction, _ = model.step(pre, current, 85.0, 155.0)
    assert torch.equal(prediction, current)


@torch.no_grad()
def test_convlstm_state_carries_to_the_next_step():
    model = small_iterunet()
    pre, first, second = phases(3)
    _, state = model.step(pre, first, 85.0, 155.0)
    from_zero_state, _ = model.step(pre, second, 155.0, 225.0, None)
    from_carried_state, _ = model.step(pre, second, 155.0, 225.0, state)
    assert (from_zero_state - from_carried_state).abs().max() > 1e-4


@torch.no_grad()
def test_convlstm_missing_state_equals_zero_state():
    torch.manual_seed(0)
    cell = ConvLSTMCell3D(3, 5)
    x = torch.randn(2, 3, 8, 8, 8)
    zeros = torch.zeros(2, 5, 8, 8, 8)
    hidden, cell_state = cell(x, None)
    hidden_zero, cell_state_zero = cell(x, (zeros, zeros))
    torch.testing.assert_close(hidden, hidden_zero)
    torch.testing.assert_close(cell_state, cell_state_zero)


@torch.no_grad()
def test_target_time_changes_the_prediction():
    model = small_iterunet()
    pre, current = phases(2)
    to_155, _ = model.step(pre, current, 85.0, 155.0)
    to_365, _ = model.step(pre, current, 85.0, 365.0)
    assert (to_155 - to_365).abs().max() > 1e-4


@torch.no_grad()
def test_current_time_changes_the_prediction():
    model = small_iterunet()
    pre, current = phases(2)
    from_85, _ = model.step(pre, current, 85.0, 365.0)
    from_295, _ = model.step(pre, current, 295.0, 365.0)
    assert (from_85 - from_295).abs().max() > 1e-4


@torch.no_grad()
def test_temporal_off_ignores_time():
    model = small_iterunet(temporal=False)
    pre, current = phases(2)
    to_155, state = model.step(pre, current, 85.0, 155.0)
    to_365, _ = model.step(pre, current, 200.0, 365.0)
    assert torch.equal(to_155, to_365)
    assert state is None


@torch.no_grad()
def test_float_times_equal_per_sample_tensor_times():
    model = small_iterunet()
    pre, current = phases(2)
    from_floats, _ = model.step(pre, current, 85.0, 155.0)
    from_tensors, _ = model.step(pre, current, torch.full((2,), 85.0), torch.full((2,), 155.0))
    torch.testing.assert_close(from_floats, from_tensors)


def test_time_tensor_of_wrong_batch_size_raises():
    model = small_iterunet()
    pre, current = phases(2)
    with pytest.raises(ValueError, match="target_time_s"):
        model.step(pre, current, 85.0, torch.tensor([155.0, 225.0, 295.0]))


@torch.no_grad()
def test_time_embedding_is_computed_once_per_step_and_projected_as_vectors():
    model = small_iterunet()
    pre, current = phases(2)
    embedding_calls, projection_input_shapes = [], []
    model.time_embedding.register_forward_hook(lambda *_: embedding_calls.append(1))
    for projection in model.unet.time_projections:
        projection.register_forward_hook(
            lambda _module, inputs, _output: projection_input_shapes.append(inputs[0].shape)
        )
    model.rollout(pre, [current], [85.0], [155.0, 225.0])
    assert len(embedding_calls) == 2
    assert projection_input_shapes == [(2, 128)] * 9 * 2


def test_sinusoidal_encoding_separates_every_second_from_0_to_600_s():
    encoding = SinusoidalTimeEncoding(64)(torch.arange(0.0, 601.0))
    distances = torch.cdist(encoding, encoding) + torch.eye(601) * 1e3
    assert distances.min() > 0.5


@pytest.mark.parametrize("batch_steps", [True, False])
@pytest.mark.parametrize("temporal", [True, False])
@pytest.mark.parametrize("n_observed", [1, 2])
def test_teacher_forcing_equals_stepping_with_the_real_phases(temporal, n_observed, batch_steps):
    """A teacher-forced rollout, its steps batched or not, is `step` fed the real phases:
    the same values and gradients."""
    model = small_iterunet(temporal)
    pre, *observed = phases(1 + n_observed)
    real = phases(6)[2:]
    times = [85.0, 155.0][:n_observed]
    targets = TARGET_TIMES_S[n_observed - 1 :]
    real = real[: len(targets)]

    def stepped():
        state = None
        if temporal:
            for phase in observed[:-1]:
                _, state = model.unet.first_level(torch.cat([pre, phase], dim=1), state)
        current, current_time = observed[-1], times[-1]
        outputs = []
        for target_time, teacher in zip(targets, real, strict=True):
            prediction, state = model.step(pre, current, current_time, target_time, state)
            outputs.append(prediction)
            current, current_time = teacher, target_time
        return outputs

    def values_and_gradients(rollout):
        model.zero_grad()
        outputs = rollout()
        sum(output.square().mean() for output in outputs).backward()
        return outputs, [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = values_and_gradients(stepped)
    actual, actual_grads = values_and_gradients(
        lambda: model.rollout(pre, observed, times, targets, real, batch_steps)
    )
    assert len(actual) == len(targets)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_free_running_feeds_the_own_predictions(monkeypatch):
    model = small_iterunet()
    pre, first = phases(2)
    calls = record_step_inputs(model, monkeypatch)
    outputs = model.rollout(pre, [first], [85.0], TARGET_TIMES_S)
    fed = [current for current, _, _ in calls]
    assert fed[0] is first
    assert all(fed[k] is outputs[k - 1] for k in range(1, 4))
    assert [times[1:] for times in calls] == [
        (85.0, 155.0),
        (155.0, 225.0),
        (225.0, 295.0),
        (295.0, 365.0),
    ]


@torch.no_grad()
def test_rollout_starts_from_the_last_observed_phase(monkeypatch):
    model = small_iterunet()
    pre, first, second = phases(3)
    calls = record_step_inputs(model, monkeypatch)
    outputs = model.rollout(pre, [first, second], [85.0, 155.0], [225.0, 295.0])
    assert len(outputs) == 2
    assert calls[0][0] is second
    assert calls[0][1:] == (155.0, 225.0)


@torch.no_grad()
def test_earlier_observed_phases_warm_the_convlstm_state():
    model = small_iterunet()
    pre, first, second = phases(3)
    warmed = model.rollout(pre, [first, second], [85.0, 155.0], [225.0])
    cold = model.rollout(pre, [second], [155.0], [225.0])
    assert (warmed[0] - cold[0]).abs().max() > 1e-4


@torch.no_grad()
def test_baseline_returns_one_prediction_per_target_and_ignores_teacher():
    torch.manual_seed(0)
    model = with_random_output(BaselineUNet(n_targets=4, features=SMALL_FEATURES)).eval()
    pre, first, *real = phases(6)
    free = model.rollout(pre, [first], [85.0], TARGET_TIMES_S)
    forced = model.rollout(pre, [first], [85.0], TARGET_TIMES_S, teacher=real)
    assert len(free) == 4
    assert all(output.shape == SHAPE for output in free)
    assert all(torch.equal(a, b) for a, b in zip(free, forced, strict=True))
    assert (free[0] - free[3]).abs().max() > 1e-4


@torch.no_grad()
def test_baseline_predicts_from_the_first_observed_phase():
    torch.manual_seed(0)
    model = BaselineUNet(n_targets=2, features=SMALL_FEATURES).eval()
    pre, first, second = phases(3)
    from_first = model.rollout(pre, [first], [85.0], [225.0, 295.0])
    from_both = model.rollout(pre, [first, second], [85.0, 155.0], [225.0, 295.0])
    assert all(torch.equal(a, b) for a, b in zip(from_first, from_both, strict=True))


def test_baseline_rejects_a_different_number_of_targets():
    model = BaselineUNet(n_targets=4, features=SMALL_FEATURES)
    pre, first = phases(2)
    with pytest.raises(ValueError, match="exactly 4"):
        model.rollout(pre, [first], [85.0], [155.0, 225.0])


def test_build_model_builds_both_names():
    iterunet = build_model("iterunet", SMALL_FEATURES, temporal=False, n_targets=4)
    baseline = build_model("baseline", SMALL_FEATURES, temporal=True, n_targets=3)
    assert isinstance(iterunet, IterUNet) and iterunet.time_embedding is None
    assert isinstance(baseline, BaselineUNet) and len(baseline.unets) == 3


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="'unet'"):
        build_model("unet", SMALL_FEATURES, temporal=True, n_targets=4)


def test_spatial_size_not_divisible_by_16_raises():
    model = small_iterunet()
    pre, current = phases(2, (1, 1, 16, 16, 40))
    with pytest.raises(ValueError, match="divisible by 16"):
        model.step(pre, current, 85.0, 155.0)


def test_bf16_autocast_rollout_is_finite():
    model = small_iterunet()
    pre, first = phases(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.rollout(pre, [first], [85.0], [155.0, 225.0])
    assert all(torch.isfinite(output).all() for output in outputs)


@torch.no_grad()
def test_channels_last_3d_matches_contiguous():
    model = small_iterunet()
    pre, first = phases(2)
    expected = model.rollout(pre, [first], [85.0], [155.0, 225.0])
    model.to(memory_format=torch.channels_last_3d)
    pre, first = (x.to(memory_format=torch.channels_last_3d) for x in (pre, first))
    actual = model.rollout(pre, [first], [85.0], [155.0, 225.0])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


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
