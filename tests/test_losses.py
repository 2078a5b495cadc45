"""Tests of the training loss terms, CombinedLoss and the MedicalNet perceptual-network loader."""

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dcesynth.train.losses import (
    CombinedLoss,
    LossWeights,
    enhancement_weight,
    gradient_difference_loss,
    region_mean_error,
    ssim_loss,
)
from dcesynth.train.perceptual import (
    PERCEPTUAL_OFF_MESSAGE,
    MedicalNetResNet10,
    load_perceptual_network,
)

SHAPE = (1, 1, 32, 32, 16)


def _volume(seed: int) -> torch.Tensor:
    """A smooth random TI-normalised-like volume (B, 1, X, Y, Z)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    return 2.0 * F.avg_pool3d(noise, kernel_size=3, stride=1, padding=1) + 1.0


@pytest.fixture(scope="module")
def resnet10() -> MedicalNetResNet10:
    torch.manual_seed(0)
    network = MedicalNetResNet10()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return network


def _pixel_only(**weights: float) -> CombinedLoss:
    return CombinedLoss(LossWeights(**weights), perceptual_net=None)


def test_identical_prediction_gives_zero_loss(resnet10):
    target = _volume(1)
    total, terms = CombinedLoss(LossWeights(), resnet10)(target.clone(), target)
    assert terms["l1"] == 0.0
    assert terms["gdl"] == 0.0
    assert terms["ssim"] == pytest.approx(0.0, abs=1e-5)
    assert terms["perceptual"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.0, abs=1e-5)


def test_constant_shift_gives_l1_equal_to_shift_times_weight():
    target = _volume(2)
    total, terms = _pixel_only(l1=0.1, ssim=0.0, gdl=0.0)(target + 0.75, target)
    assert terms["l1"] == pytest.approx(0.75, rel=1e-5)
    assert total.item() == pytest.approx(0.075, rel=1e-5)


def test_terms_of_zero_weight_are_not_computed():
    target = _volume(2)
    _, terms = _pixel_only(l1=1.0, ssim=0.0, gdl=0.0)(_volume(5), target)
    assert set(terms) == {"l1", "total"}
    _, terms = _pixel_only(l1=1.0, ssim=0.5, gdl=0.0)(_volume(5), target)
    assert set(terms) == {"l1", "ssim", "total"}


def test_loss_is_summed_over_rollout_steps():
    target = _volume(3)
    loss = _pixel_only()
    one_step, _ = loss(target + 0.5, target)
    three_steps, _ = loss(torch.cat([target + 0.5] * 3, 1), torch.cat([target] * 3, 1))
    assert three_steps.item() == pytest.approx(3 * one_step.item(), rel=1e-5)


def test_gdl_ignores_constant_offset():
    target = _volume(4)
    assert gradient_difference_loss(target + 3.0, target).item() == pytest.approx(0.0, abs=1e-6)


def test_gdl_penalises_blur():
    target = _volume(5)
    blurred = F.avg_pool3d(target, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    assert gradient_difference_loss(blurred, target).item() > 0.05


def test_ssim_loss_grows_with_noise():
    target = _volume(6)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    slight = ssim_loss(target + 0.1 * noise, target).item()
    strong = ssim_loss(target + 1.0 * noise, target).item()
    assert 0.0 < slight < strong


def test_ssim_window_larger_than_patch_is_rejected():
    target = _volume(8)
    with pytest.raises(ValueError, match="window 17"):
        ssim_loss(target, target, window=17)


def test_gradient_reaches_prediction(resnet10):
    target = _volume(9)
    pred = (target + 0.3 * _volume(10)).requires_grad_()
    total, _ = CombinedLoss(LossWeights(), resnet10)(pred, target)
    total.backward()
    assert pred.grad is not None
    assert pred.grad.abs().sum().item() > 0.0


def test_perceptual_term_larger_for_different_image(resnet10):
    target = _volume(11)
    loss = CombinedLoss(LossWeights(l1=0.0, ssim=0.0, perceptual=1.0, gdl=0.0), resnet10)
    same, _ = loss(target.clone(), target)
    different, terms = loss(_volume(12), target)
    assert different.item() > same.item() + 1e-3
    assert terms["perceptual"] == pytest.approx(different.item())


def test_without_network_perceptual_term_is_absent():
    target = _volume(13)
    total, terms = _pixel_only()(_volume(14), target)
    assert "perceptual" not in terms
    expected = 0.1 * terms["l1"] + terms["ssim"] + 0.1 * terms["gdl"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_zero_weight_mask_gives_zero_loss(resnet10):
    pred = _volume(15).requires_grad_()
    target = _volume(16)
    loss = CombinedLoss(LossWeights(), resnet10)
    total, terms = loss(pred, target, weight=torch.zeros(SHAPE))
    total.backward()
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in terms.values())
    assert torch.isfinite(pred.grad).all()


def test_enhancement_weight_is_sqrt_of_absolute_change():
    first_post = torch.full(SHAPE, 1.0)
    last_post = first_post.clone()
    last_post[..., 0] = 5.0
    last_post[..., 1] = -8.0
    weight = enhancement_weight(first_post, last_post)
    assert weight.shape == SHAPE
    assert weight[..., 0].unique().tolist() == [2.0]
    assert weight[..., 1].unique().tolist() == [3.0]
    assert weight[..., 2:].abs().max().item() == 0.0


def test_bfloat16_autocast_gives_float32_loss_close_to_float32(resnet10):
    target = _volume(17)
    pred = target + 0.3 * _volume(18)
    loss = CombinedLoss(LossWeights(), resnet10)
    reference, _ = loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = loss(pred.bfloat16(), target.bfloat16())
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=0.02)


def test_mismatched_rollout_lengths_are_rejected():
    target = _volume(19)
    with pytest.raises(ValueError, match="one shape"):
        _pixel_only()(torch.cat([target, target], 1), target)


def test_loader_reads_medicalnet_wrapped_checkpoint(tmp_path, resnet10):
    path = tmp_path / "resnet_10_23dataset.pth"
    state = {f"module.{key}": value for key, value in resnet10.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)
    torch.save({"state_dict": state}, path)
    loaded = load_perceptual_network(path)
    for key, value in resnet10.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loader_reads_safetensors(tmp_path, resnet10):
    path = tmp_path / "resnet10.safetensors"
    save_file({key: value.contiguous() for key, value in resnet10.state_dict().items()}, path)
    loaded = load_perceptual_network(path)
    for key, value in resnet10.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loaded_network_is_frozen_and_stays_in_eval(tmp_path, resnet10):
    path = tmp_path / "resnet10.pth"
    torch.save(resnet10.state_dict(), path)
    loaded = load_perceptual_network(path)
    CombinedLoss(LossWeights(), loaded).train()
    assert not loaded.training
    assert not any(parameter.requires_grad for parameter in loaded.parameters())


def test_no_path_returns_none_and_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="dcesynth"):
        assert load_perceptual_network(None) is None
    messages = [record.getMessage() for record in caplog.records if record.name == "dcesynth"]
    assert messages == [PERCEPTUAL_OFF_MESSAGE]
    assert "never downloaded" in messages[0]


def test_wrong_keys_raise_naming_the_file(tmp_path):
    path = tmp_path / "not_medicalnet.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"not_medicalnet\.pth.*unexpected keys: encoder\.weight"):
        load_perceptual_network(path)


def test_missing_key_raises_naming_the_file(tmp_path, resnet10):
    path = tmp_path / "partial.pth"
    state = dict(resnet10.state_dict())
    del state["layer4.0.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"partial\.pth.*missing keys: layer4\.0\.conv2\.weight"):
        load_perceptual_network(path)


def test_wrong_tensor_shape_raises_naming_the_file(tmp_path, resnet10):
    path = tmp_path / "resnet18_like.pth"
    state = dict(resnet10.state_dict())
    state["conv1.weight"] = torch.zeros(64, 1, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet18_like\.pth.*shapes"):
        load_perceptual_network(path)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(ValueError, match=r"absent\.pth.*not found"):
        load_perceptual_network(path)


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.safetensors"])
def test_corrupt_file_raises_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*cannot read"):
        load_perceptual_network(path)


def test_ssim_loss_matches_monai_compute_ssim_and_cs():
    from monai.metrics import compute_ssim_and_cs

    torch.manual_seed(0)
    pred = torch.randn(2, 1, 32, 32, 16)
    target = pred + 0.3 * torch.randn_like(pred)
    data_range = (target.amax(dim=(1, 2, 3, 4)) - target.amin(dim=(1, 2, 3, 4))).view(
        -1, 1, 1, 1, 1
    )
    ssim_map, _ = compute_ssim_and_cs(
        pred,
        target,
        spatial_dims=3,
        kernel_size=(7,) * 3,
        kernel_sigma=(1.5,) * 3,
        data_range=data_range,
    )
    assert ssim_loss(pred, target).item() == pytest.approx(1 - ssim_map.mean().item(), abs=1e-5)


def test_lesion_term_is_the_squared_error_of_the_lesion_mean():
    target = _volume(17).repeat(3, 1, 1, 1, 1)
    pred = target.clone()
    lesion = torch.zeros(target.shape, dtype=torch.bool)
    lesion[0, :, 4:8, 4:8, 4:8] = True
    lesion[1, :, 10:12, 10:12, 2:4] = True
    pred[0][lesion[0]] += 0.5  # patch 0: lesion mean off by 0.5
    pred[1][lesion[1]] -= 1.0  # patch 1: off by 1.0; patch 2 holds no lesion
    pred[2] += 7.0
    assert region_mean_error(pred, target, lesion).item() == pytest.approx((0.25 + 1.0) / 2)
    loss = _pixel_only(l1=0.0, ssim=0.0, gdl=0.0, lesion=2.0)
    total, terms = loss(torch.cat([pred, pred], 1), torch.cat([target, target], 1), lesion=lesion)
    assert terms["lesion"] == pytest.approx(1.25, rel=1e-5)
    assert total.item() == pytest.approx(2.5, rel=1e-5)


def test_lesion_term_is_zero_without_lesion_voxels_and_needs_masks():
    target = _volume(18)
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    assert region_mean_error(target + 3.0, target, empty).item() == 0.0
    with pytest.raises(ValueError, match="lesion masks"):
        _pixel_only(lesion=1.0)(target, target)
    assert "lesion" not in _pixel_only()(target, target)[1]


def test_parenchyma_term_is_the_region_error_over_the_roi_outside_lesions():
    target = _volume(19).repeat(2, 1, 1, 1, 1)
    parenchyma = torch.zeros(target.shape, dtype=torch.bool)
    parenchyma[:, :, 2:10, 2:10, 2:6] = True
    pred = target.clone()
    pred[0][parenchyma[0]] += 1.5  # patch 0: parenchyma mean off by 1.5, patch 1 exact
    loss = _pixel_only(l1=0.0, ssim=0.0, gdl=0.0, parenchyma=3.0)
    total, terms = loss(pred, target, parenchyma=parenchyma)
    assert terms["parenchyma"] == pytest.approx(2.25 / 2, rel=1e-5)
    assert total.item() == pytest.approx(3.0 * 2.25 / 2, rel=1e-5)
    assert "parenchyma" not in _pixel_only()(target, target)[1]
    with pytest.raises(ValueError, match="ROI masks"):
        loss(pred, target)
