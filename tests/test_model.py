"""Tests for dcesynth.model: iterU-Net, the per-phase baseline and their blocks."""

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


def small_iterunet(temporal: bool = True, n_case_features: int = 0) -> IterUNet:
    torch.manual_seed(0)
    model = IterUNet(features=SMALL_FEATURES, temporal=temporal, n_case_features=n_case_features)
    return with_random_output(model).eval()


def phases(count: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """`(B, count, X, Y, Z)` random phases."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn((shape[0], count, *shape[2:]), generator=generator)


def times(*seconds: float, batch: int = SHAPE[0]) -> torch.Tensor:
    """`(batch, len(seconds))` times, the same for every sample."""
    return torch.tensor(seconds).expand(batch, -1)


def step(model, pre, current, current_time_s, target_time_s):
    """One step of `model` from `current` to `target_time_s`, `(B, 1, X, Y, Z)`."""
    return model(pre, current, times(current_time_s, target_time_s))


def record_unet_inputs(model: IterUNet) -> list[torch.Tensor]:
    """The inputs `(B, 2, X, Y, Z)` (pre, current) of every U-Net pass, as they happen."""
    calls = []
    model.unet.register_forward_pre_hook(lambda _module, args: calls.append(args[0].clone()))
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
def test_paper_features_give_one_output_per_target():
    torch.manual_seed(0)
    model = IterUNet(features=PAPER_FEATURES).eval()
    x = phases(2, (2, 1, 32, 32, 16))
    outputs = model(x[:, :1], x[:, 1:], times(85.0, *TARGET_TIMES_S))
    assert outputs.shape == (2, 4, 32, 32, 16)


@torch.no_grad()
def test_step_output_is_current_phase_plus_network_output():
    model = small_iterunet()
    torch.nn.init.zeros_(model.unet.final_conv.weight)
    torch.nn.init.zeros_(model.unet.final_conv.bias)
    x = phases(2)
    assert torch.equal(step(model, x[:, :1], x[:, 1:], 85.0, 155.0), x[:, 1:])


@torch.no_grad()
def test_convlstm_state_carries_to_the_next_step():
    model = small_iterunet()
    x = phases(3)
    pre, first, second = x[:, :1], x[:, 1:2], x[:, 2:]
    warmed = model(pre, torch.cat([first, second], 1), times(85.0, 155.0, 225.0))
    cold = step(model, pre, second, 155.0, 225.0)
    assert (warmed - cold).abs().max() > 1e-4


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
    x = phases(2)
    to_155 = step(model, x[:, :1], x[:, 1:], 85.0, 155.0)
    to_365 = step(model, x[:, :1], x[:, 1:], 85.0, 365.0)
    assert (to_155 - to_365).abs().max() > 1e-4


@torch.no_grad()
def test_current_time_changes_the_prediction():
    model = small_iterunet()
    x = phases(2)
    from_85 = step(model, x[:, :1], x[:, 1:], 85.0, 365.0)
    from_295 = step(model, x[:, :1], x[:, 1:], 295.0, 365.0)
    assert (from_85 - from_295).abs().max() > 1e-4


@torch.no_grad()
def test_temporal_off_ignores_time():
    model = small_iterunet(temporal=False)
    x = phases(2)
    to_155 = step(model, x[:, :1], x[:, 1:], 85.0, 155.0)
    to_365 = step(model, x[:, :1], x[:, 1:], 200.0, 365.0)
    assert torch.equal(to_155, to_365)


@torch.no_grad()
def test_each_sample_gets_its_own_times():
    model = small_iterunet()
    x = phases(2)
    mixed = model(x[:, :1], x[:, 1:], torch.tensor([[85.0, 155.0], [85.0, 365.0]]))
    to_365 = step(model, x[:, :1], x[:, 1:], 85.0, 365.0)
    to_155 = step(model, x[:, :1], x[:, 1:], 85.0, 155.0)
    torch.testing.assert_close(mixed[0], to_155[0])
    torch.testing.assert_close(mixed[1], to_365[1])


@pytest.mark.parametrize(
    ("observed", "times_s", "teacher", "match"),
    [
        ((2, 0, 16, 16, 32), (2, 2), None, "at least one observed"),
        ((2, 1, 16, 16, 32), (2, 1), None, "times_s"),
        ((2, 1, 16, 16, 32), (3, 3), None, "times_s"),
        ((1, 1, 16, 16, 32), (2, 3), None, "observed"),
        ((2, 1, 16, 16, 32), (2, 3), (2, 1, 16, 16, 32), "teacher"),
    ],
)
def test_arguments_of_the_wrong_shape_raise(observed, times_s, teacher, match):
    model = small_iterunet()
    pre = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=match):
        model(
            pre,
            torch.zeros(observed),
            torch.zeros(times_s),
            None if teacher is None else torch.zeros(teacher),
        )


@torch.no_grad()
def test_time_embedding_is_computed_once_per_step_and_projected_as_vectors():
    model = small_iterunet()
    x = phases(2)
    embedding_calls, projection_input_shapes = [], []
    model.time_embedding.register_forward_hook(lambda *_: embedding_calls.append(1))
    for projection in model.unet.time_projections:
        projection.register_forward_hook(
            lambda _module, inputs, _output: projection_input_shapes.append(inputs[1].shape)
        )
    model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0))
    assert len(embedding_calls) == 2
    assert projection_input_shapes == [(2, 128)] * 9 * 2


def test_sinusoidal_encoding_separates_every_second_from_0_to_600_s():
    encoding = SinusoidalTimeEncoding(64)(torch.arange(0.0, 601.0))
    distances = torch.cdist(encoding, encoding) + torch.eye(601) * 1e3
    assert distances.min() > 0.5


@pytest.mark.parametrize(("temporal", "n_case_features"), [(True, 0), (False, 0), (True, 3)])
@pytest.mark.parametrize("n_observed", [1, 2])
def test_teacher_forcing_equals_stepping_with_the_real_phases(
    temporal, n_case_features, n_observed
):
    """A teacher-forced rollout (all steps in one batch) is a free-running rollout of one
    step at a time fed the real phases: the same values and gradients."""
    model = small_iterunet(temporal, n_case_features)
    statistics = torch.randn(SHAPE[0], n_case_features) if n_case_features else None
    x = phases(1 + n_observed + 4)
    pre, observed = x[:, :1], x[:, 1 : 1 + n_observed]
    observed_times = [85.0, 155.0][:n_observed]
    targets = TARGET_TIMES_S[n_observed - 1 :]
    real = x[:, 1 + n_observed : 1 + n_observed + len(targets)]

    def stepped():
        outputs = []
        for k, target_time in enumerate(targets):
            fed = torch.cat([observed, real[:, :k]], 1)
            fed_times = [*observed_times, *targets[:k], target_time]
            outputs.append(model(pre, fed, times(*fed_times), case_features=statistics))
        return torch.cat(outputs, 1)

    def values_and_gradients(rollout):
        model.zero_grad()
        outputs = rollout()
        outputs.square().mean().backward()
        return outputs, [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = values_and_gradients(stepped)
    actual, actual_grads = values_and_gradients(
        lambda: model(
            pre,
            observed,
            times(*observed_times, *targets),
            teacher=real,
            case_features=statistics,
        )
    )
    assert actual.shape[1] == len(targets)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_free_running_feeds_the_own_predictions():
    model = small_iterunet()
    x = phases(2)
    calls = record_unet_inputs(model)
    outputs = model(x[:, :1], x[:, 1:], times(85.0, *TARGET_TIMES_S))
    fed = [call[:, 1:] for call in calls]
    assert torch.equal(fed[0], x[:, 1:])
    assert all(torch.equal(fed[k], outputs[:, k - 1 : k]) for k in range(1, 4))


@torch.no_grad()
def test_teacher_mask_feeds_each_sample_its_real_or_its_own_phase():
    """Scheduled sampling: all True is teacher forcing, all False free-running, and a mixed
    mask feeds each sample, step by step, the real phase where True and its own prediction
    where False."""
    model = small_iterunet()
    x = phases(6)
    pre, observed, real, times_s = x[:, :1], x[:, 1:2], x[:, 2:], times(85.0, *TARGET_TIMES_S)
    forced = model(pre, observed, times_s, teacher=real)
    free = model(pre, observed, times_s)
    every = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(model(pre, observed, times_s, real, every), forced)
    torch.testing.assert_close(model(pre, observed, times_s, real, ~every), free)

    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    calls = record_unet_inputs(model)
    outputs = model(pre, observed, times_s, teacher=real, teacher_mask=mask)
    fed = [call[:, 1:] for call in calls]
    assert torch.equal(fed[0], observed)
    for k in range(1, 4):
        for b in range(2):
            expected = real[b, k - 1] if mask[b, k - 1] else outputs[b, k - 1]
            assert torch.equal(fed[k][b, 0], expected)


@pytest.mark.parametrize(
    ("mask", "with_teacher"),
    [
        (torch.ones(2, 4, dtype=torch.bool), False),
        (torch.ones(2, 3, dtype=torch.bool), True),
        (torch.ones(2, 4), True),
    ],
    ids=["without-teacher", "wrong-shape", "not-bool"],
)
def test_bad_teacher_masks_raise(mask, with_teacher):
    model = small_iterunet()
    x = phases(6)
    teacher = x[:, 2:] if with_teacher else None
    with pytest.raises(ValueError, match="teacher_mask"):
        model(x[:, :1], x[:, 1:2], times(85.0, *TARGET_TIMES_S), teacher, mask)


@torch.no_grad()
def test_rollout_starts_from_the_last_observed_phase():
    model = small_iterunet()
    x = phases(3)
    calls = record_unet_inputs(model)
    outputs = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0, 295.0))
    assert outputs.shape[1] == 2
    assert torch.equal(calls[0][:, 1:], x[:, 2:])


@torch.no_grad()
def test_baseline_returns_one_prediction_per_target_and_ignores_teacher():
    torch.manual_seed(0)
    model = with_random_output(BaselineUNet(n_targets=4, features=SMALL_FEATURES)).eval()
    x = phases(6)
    free = model(x[:, :1], x[:, 1:2], times(85.0, *TARGET_TIMES_S))
    forced = model(x[:, :1], x[:, 1:2], times(85.0, *TARGET_TIMES_S), teacher=x[:, 2:])
    assert free.shape == (2, 4, 16, 16, 32)
    assert torch.equal(free, forced)
    assert (free[:, 0] - free[:, 3]).abs().max() > 1e-4


@torch.no_grad()
def test_baseline_predicts_from_the_first_observed_phase():
    torch.manual_seed(0)
    model = BaselineUNet(n_targets=3, features=SMALL_FEATURES).eval()
    x = phases(3)
    from_first = model(x[:, :1], x[:, 1:2], times(85.0, 155.0, 225.0, 295.0))
    from_both = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0, 295.0))
    assert torch.equal(from_first[:, 1:], from_both)


def test_baseline_rejects_a_different_number_of_targets():
    model = BaselineUNet(n_targets=4, features=SMALL_FEATURES)
    x = phases(2)
    with pytest.raises(ValueError, match="predicts 4 phases after 1dyn"):
        model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0))


def test_models_say_which_protocols_they_serve():
    iterunet = small_iterunet()
    baseline = BaselineUNet(n_targets=4, features=SMALL_FEATURES)
    iterunet.check_protocol(1, 7)
    iterunet.check_protocol(3, 1)
    baseline.check_protocol(1, 4)
    baseline.check_protocol(2, 3)
    with pytest.raises(ValueError, match="asks for 5"):
        baseline.check_protocol(2, 4)


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
    x = phases(2, (1, 1, 16, 16, 40))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(x[:, :1], x[:, 1:], times(85.0, 155.0, batch=1))


def test_bf16_autocast_rollout_is_finite():
    model = small_iterunet()
    x = phases(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0))
    assert torch.isfinite(outputs).all()


def case_conditioned(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    temporal = name == "iterunet"
    model = build_model(
        "baseline" if name == "baseline" else "iterunet",
        SMALL_FEATURES,
        temporal,
        n_targets=2,
        n_case_features=3,
    )
    return with_random_output(model).eval()


@torch.no_grad()
@pytest.mark.parametrize("name", ["iterunet", "iterunet-no-temporal", "baseline"])
def test_case_features_condition_the_prediction(name):
    """Two samples of one image: the same breast statistics give the same prediction,
    different ones a different prediction, in every model built with them."""
    model = case_conditioned(name)
    x = phases(2, (1, 1, 16, 16, 32)).expand(2, -1, -1, -1, -1)
    same = torch.tensor([[0.5, 1.0, -2.0], [0.5, 1.0, -2.0]])
    different = torch.tensor([[0.5, 1.0, -2.0], [0.5, 1.0, 2.0]])
    outputs = [
        model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0), case_features=statistics)
        for statistics in (same, different)
    ]
    torch.testing.assert_close(outputs[0][0], outputs[0][1])
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    assert (outputs[1][1] - outputs[1][0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("n_case_features", "given", "match"),
    [
        (3, None, r"takes 3 breast statistics per case, shape \(2, 3\); got None"),
        (3, (2, 4), r"got \(2, 4\)"),
        (3, (1, 3), r"got \(1, 3\)"),
        (0, (2, 3), "takes 0 breast statistics"),
    ],
)
def test_case_features_must_fit_the_model(n_case_features, given, match):
    model = small_iterunet(n_case_features=n_case_features)
    x = phases(2)
    statistics = None if given is None else torch.zeros(given)
    with pytest.raises(ValueError, match=match):
        model(x[:, :1], x[:, 1:], times(85.0, 155.0), case_features=statistics)


def prior_iterunet() -> IterUNet:
    torch.manual_seed(0)
    return with_random_output(IterUNet(features=SMALL_FEATURES, prior=True)).eval()


@torch.no_grad()
def test_a_prior_model_with_zero_output_follows_the_prior_changes():
    """next = current + (prior[target] - prior[current]) + U-Net, free-running and
    teacher-forced; the U-Net sees the prior's change as its last input channel."""
    model = prior_iterunet()
    torch.nn.init.zeros_(model.unet.final_conv.weight)
    torch.nn.init.zeros_(model.unet.final_conv.bias)
    x, prior, teacher = phases(2), phases(4) * 3, phases(3) - 1
    calls = record_unet_inputs(model)
    free = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0, 295.0), prior=prior)
    torch.testing.assert_close(free, x[:, 1:] + prior[:, 1:] - prior[:, :1])
    torch.testing.assert_close(calls[1][:, 2:], prior[:, 2:3] - prior[:, 1:2])
    forced = model(
        x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0, 295.0), teacher=teacher, prior=prior
    )
    inputs = torch.cat([x[:, 1:], teacher[:, :-1]], dim=1)
    torch.testing.assert_close(forced, inputs + prior[:, 1:] - prior[:, :-1])


@torch.no_grad()
def test_a_prior_model_with_zero_prior_changes_is_a_model_with_one_more_input():
    model = prior_iterunet()
    x = phases(2)
    flat = x[:, 1:].expand(-1, 3, -1, -1, -1)
    out = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0), prior=flat)
    assert model.unet.in_channels == 3  # pre, current, the prior's change
    assert out.shape == (2, 2, *SHAPE[2:])
    assert (out - x[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("with_prior", "given", "match"),
    [
        (True, None, r"takes a prior of shape \(2, 3, 16, 16, 32\); got None"),
        (True, (2, 2, 16, 16, 32), r"got \(2, 2, 16, 16, 32\)"),
        (False, (2, 3, 16, 16, 32), "takes no prior"),
    ],
)
def test_a_prior_must_fit_the_model(with_prior, given, match):
    model = prior_iterunet() if with_prior else small_iterunet()
    x = phases(2)
    prior = None if given is None else torch.zeros(given)
    with pytest.raises(ValueError, match=match):
        model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0), prior=prior)


def test_only_iterunet_is_built_with_a_prior():
    assert build_model("iterunet", SMALL_FEATURES, True, 4, prior=True).uses_prior
    with pytest.raises(ValueError, match="only iterunet steps from a prior, not 'baseline'"):
        build_model("baseline", SMALL_FEATURES, False, 4, prior=True)


@torch.no_grad()
def test_an_untrained_prior_model_rolls_out_the_prior():
    torch.manual_seed(0)
    model = IterUNet(features=SMALL_FEATURES, prior=True).eval()
    x, prior = phases(2), phases(3) * 2
    out = model(x[:, :1], x[:, 1:], times(85.0, 155.0, 225.0), prior=prior)
    torch.testing.assert_close(out, x[:, 1:] + prior[:, 1:] - prior[:, :1])
