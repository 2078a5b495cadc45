"""Training data: deterministic foreground-aware patch batches, aligned augmentation, padding."""

import numpy as np
import pytest
import torch
from monai import transforms

from dcesynth.case import Case
from dcesynth.data.sampling import (
    PatchBatches,
    PreparedCase,
    augmentation,
    crop,
    prepare_case,
)
from dcesynth.data.tinorm import CASE_FEATURES, PRE_UNIT
from dcesynth.io import InputError

PATCH = (16, 16, 16)
SHAPE = (48, 48, 32)
CENTRE = tuple(p // 2 for p in PATCH)


def coordinate_case(lesion_boxes, roi_box=((16, 32), (16, 32), (10, 22))) -> PreparedCase:
    """A case whose three phases are the voxels' x, y and z indices.

    A patch then tells where it was cut: its centre voxel holds the volume coordinates of
    the patch centre. Lesions and the ROI are boxes far enough from the border that a patch
    centred on any of their voxels is never shifted to fit inside the volume.
    """
    phases = np.stack(np.indices(SHAPE).astype(np.float32))
    lesion = np.zeros(SHAPE, dtype=bool)
    for box in lesion_boxes:
        lesion[tuple(slice(*side) for side in box)] = True
    roi = np.zeros(SHAPE, dtype=bool)
    roi[tuple(slice(*side) for side in roi_box)] = True
    return PreparedCase(
        case_id="coordinates",
        phases=phases,
        context=np.zeros((0, *SHAPE), dtype=np.float32),
        times_s=np.array([0.0, 85.0, 155.0], dtype=np.float32),
        lesion_voxels=np.argwhere(lesion),
        roi_voxels=np.argwhere(roi | lesion),
        lesion_mask=lesion,
    )


def random_case(seed: int, n_phases: int = 4) -> PreparedCase:
    rng = np.random.default_rng(seed)
    case = coordinate_case([((20, 24), (20, 24), (14, 18))])
    case.phases = rng.standard_normal((n_phases, *SHAPE)).astype(np.float32)
    case.times_s = np.linspace(0.0, 300.0, n_phases, dtype=np.float32)
    return case


def test_same_step_gives_the_same_batch():
    batches = PatchBatches([random_case(0), random_case(1)], PATCH, 2, 10, seed=3)
    first, again = batches[4], PatchBatches([random_case(0), random_case(1)], PATCH, 2, 10, 3)[4]
    assert torch.equal(first["phases"], again["phases"])
    assert torch.equal(first["times_s"], again["times_s"])


@pytest.mark.parametrize(("step", "rank"), [(5, 0), (4, 1)], ids=["another-step", "another-rank"])
def test_another_step_or_rank_gives_another_batch(step, rank):
    cases = [random_case(0), random_case(1)]
    reference = PatchBatches(cases, PATCH, 2, 10, seed=3, rank=0)[4]["phases"]
    other = PatchBatches(cases, PATCH, 2, 10, seed=3, rank=rank)[step]["phases"]
    assert not torch.equal(reference, other)


def test_batch_holds_two_patches_per_case_with_all_phases():
    batch = PatchBatches([random_case(0, n_phases=5)], PATCH, 3, 10, seed=0)[0]
    assert batch["phases"].shape == (6, 5, *PATCH)
    assert batch["phases"].dtype == torch.float32
    assert batch["times_s"].shape == (6, 5)
    assert batch["times_s"][0].tolist() == [0.0, 75.0, 150.0, 225.0, 300.0]


def test_first_patch_of_each_case_is_centred_in_a_lesion_second_in_the_roi():
    case = coordinate_case([((20, 24), (20, 24), (14, 18))])
    roi_mask = np.zeros(SHAPE, dtype=bool)
    roi_mask[tuple(case.roi_voxels.T)] = True
    batches = PatchBatches([case], PATCH, 2, 20, seed=0, augment=False)
    for step in range(20):
        centres = batches[step]["phases"][:, :, CENTRE[0], CENTRE[1], CENTRE[2]].long()
        for index, centre in enumerate(centres.tolist()):
            mask = case.lesion_mask if index % 2 == 0 else roi_mask
            assert mask[tuple(centre)], (step, index, centre)


def test_without_the_roi_patch_every_patch_is_centred_in_a_lesion():
    case = coordinate_case([((20, 24), (20, 24), (14, 18))])
    batches = PatchBatches([case], PATCH, 3, 10, seed=0, augment=False, roi_patch=False)
    for step in range(10):
        batch = batches[step]
        assert batch["phases"].shape[0] == batch["lesion"].shape[0] == 3
        centres = batch["phases"][:, :, CENTRE[0], CENTRE[1], CENTRE[2]].long()
        for centre in centres.tolist():
            assert case.lesion_mask[tuple(centre)], (step, centre)


def test_lesion_offset_moves_the_lesion_patch_centre_within_the_bound():
    case = coordinate_case([((22, 23), (22, 23), (16, 17))])  # a one-voxel lesion
    batches = PatchBatches([case], PATCH, 1, 40, seed=0, augment=False, lesion_offset=0.5)
    offsets = np.array(
        [
            batches[step]["phases"][0, :, CENTRE[0], CENTRE[1], CENTRE[2]].long().numpy()
            - np.array([22, 22, 16])
            for step in range(40)
        ]
    )
    bound = np.array([p // 4 for p in PATCH])
    assert (np.abs(offsets) <= bound).all()
    assert len({tuple(offset) for offset in offsets}) > 20


def test_augmentation_moves_all_phases_together():
    # Noise is drawn per phase by design; the spatial transforms must act on all phases alike.
    spatial = augmentation(PATCH).spatial
    volume = np.random.default_rng(0).standard_normal(PATCH).astype(np.float32)
    identical_phases = np.stack([volume] * 4)
    changed = 0
    for seed in range(12):
        spatial.set_random_state(seed=seed)
        out = np.asarray(spatial(identical_phases.copy()))
        assert out.shape == identical_phases.shape
        for phase in out[1:]:
            np.testing.assert_array_equal(phase, out[0])
        changed += not np.array_equal(out[0], volume)
    assert changed >= 6


def test_augmentation_keeps_the_lesion_mask_and_context_on_their_voxels():
    case = coordinate_case([((20, 24), (20, 28), (14, 18))])
    augment = augmentation(PATCH)
    augment.intensity = transforms.Compose([])
    start = np.array([14, 14, 8])
    phases, lesion = crop(case.phases, start, PATCH), crop(case.lesion_mask, start, PATCH)
    context = phases[:2] * 10.0
    moved = 0
    for seed in range(12):
        out, out_context, masks = augment(phases, context, lesion[None], seed)
        mask = masks[0]
        # Each voxel's phases hold the volume coordinates it came from.
        origin = tuple(np.rint(out).astype(int))
        np.testing.assert_array_equal(mask, case.lesion_mask[origin])
        np.testing.assert_array_equal(out_context, out[:2] * 10.0)
        moved += not np.array_equal(mask, lesion)
    assert moved >= 6


@pytest.mark.parametrize("augment", [False, True])
def test_batch_holds_the_lesion_and_parenchyma_masks_of_each_patch(augment):
    case = coordinate_case([((20, 24), (20, 24), (14, 18))])
    batches = PatchBatches([case], PATCH, 1, 4, seed=0, augment=augment)
    if augment:
        batches.transform.intensity = transforms.Compose([])
    batch = batches[1]
    roi = np.zeros(SHAPE, dtype=bool)
    roi[16:32, 16:32, 10:22] = True
    origin = tuple(batch["phases"].round().long().permute(1, 0, 2, 3, 4).reshape(3, -1).numpy())
    for key, volume in (("lesion", case.lesion_mask), ("parenchyma", roi & ~case.lesion_mask)):
        assert batch[key].shape == (2, 1, *PATCH) and batch[key].dtype == torch.bool
        np.testing.assert_array_equal(batch[key].numpy(), volume[origin].reshape(2, 1, *PATCH))
    assert batch["parenchyma"].any() and batch["lesion"].any()


def test_patches_keep_their_shape_when_the_patch_is_not_square_in_plane():
    patch = (32, 16, 16)
    batches = PatchBatches([random_case(0)], patch, 1, 12, seed=0)
    assert {tuple(batches[step]["phases"].shape) for step in range(12)} == {(2, 4, *patch)}


def test_prepare_case_pads_a_volume_smaller_than_the_patch():
    rng = np.random.default_rng(0)
    shape = (20, 40, 10)
    seg = np.zeros(shape, dtype=np.int16)
    seg[8:12, 18:22, 4:6] = 1
    roi = np.zeros(shape, dtype=np.uint8)
    roi[4:16, 10:30, 2:8] = 1
    phases = rng.uniform(100.0, 200.0, (3, *shape)).astype(np.float32)
    case = Case("small", phases, [0.0, 85.0, 155.0], seg, roi, np.eye(4))

    prepared = prepare_case(case, (32, 32, 16))

    assert prepared.phases.shape == (3, 32, 40, 16)
    assert prepared.lesion_mask.shape == (32, 40, 16)
    inside = roi > 0
    reference = phases[1][inside]
    expected = (phases - reference.mean()) / reference.std()
    np.testing.assert_allclose(prepared.phases[:, :20, :, :10], expected, rtol=1e-5, atol=1e-5)
    assert np.all(prepared.phases[:, 20:] == prepared.phases.min())
    assert prepared.lesion_mask.sum() == 32 and not prepared.lesion_mask[20:].any()
    assert len(prepared.roi_voxels) == inside.sum()
    batch = PatchBatches([prepared], (32, 32, 16), 1, 1, seed=0)[0]
    assert batch["phases"].shape == (2, 3, 32, 32, 16)


def test_relative_enhancement_context_is_the_signal_ratio_padded_with_zeros():
    shape = (20, 24, 10)
    phases = np.full((3, *shape), 100.0, dtype=np.float32)
    phases[1] = 130.0
    phases[1, :5] = 250.0  # relative enhancement 1.5
    phases[0, :2] = 0.0  # air: the floor, then the clip at 6
    roi = np.zeros(shape, dtype=np.uint8)
    roi[:, :, 2:8] = 1
    case = Case("ratio", phases, [0.0, 85.0, 155.0], np.zeros(shape, np.int16), roi, np.eye(4))

    plain = prepare_case(case, (32, 32, 16))
    prepared = prepare_case(case, (32, 32, 16), relative_enhancement=True)

    assert plain.context.shape == (0, 32, 32, 16)
    assert prepared.context.shape == (1, 32, 32, 16)
    context = prepared.context[0]
    np.testing.assert_allclose(context[:2, :24, :10], 6.0)
    np.testing.assert_allclose(context[2:5, :24, :10], 1.5, rtol=1e-6)
    np.testing.assert_allclose(context[5:20, :24, :10], 0.3, rtol=1e-5)
    assert not context[20:].any() and not context[:, 24:].any() and not context[..., 10:].any()
    batch = PatchBatches([prepared], (32, 32, 16), 1, 1, seed=0)[0]
    assert batch["context"].shape == (2, 1, 32, 32, 16)


@pytest.mark.parametrize("normalisation", ["ti", "pre"])
def test_case_features_are_the_breast_statistics_of_pre_and_1dyn(normalisation):
    shape = (20, 24, 10)
    phases = np.full((3, *shape), 50.0, dtype=np.float32)
    roi = np.zeros(shape, dtype=np.uint8)
    roi[:, :, 2:8] = 1
    phases[:2, roi > 0] = 100.0
    phases[1, :10, :, 2:8] = 120.0
    phases[1, 10:, :, 2:8] = 140.0  # 1dyn in the ROI: mean 130, std 10
    case = Case("stats", phases, [0.0, 85.0, 155.0], np.zeros(shape, np.int16), roi, np.eye(4))

    prepared = prepare_case(
        case, (32, 32, 16), normalisation=normalisation, with_case_features=True
    )

    unit = 10.0 if normalisation == "ti" else PRE_UNIT * 100.0
    reference = 130.0 if normalisation == "ti" else 100.0
    expected = dict(
        pre_mean=(100.0 - reference) / unit,
        pre_std=0.0,
        post_mean=(130.0 - reference) / unit,
        post_std=10.0 / unit,
        post_signal_to_spread=13.0,
        relative_enhancement_median=0.3,
    )
    assert tuple(expected) == CASE_FEATURES
    np.testing.assert_allclose(
        prepared.case_features, list(expected.values()), rtol=1e-5, atol=1e-6
    )
    batch = PatchBatches([prepared], (32, 32, 16), 1, 1, seed=0)[0]
    np.testing.assert_array_equal(batch["case_features"], np.stack([prepared.case_features] * 2))
    assert prepare_case(case, (32, 32, 16)).case_features.shape == (0,)


def test_pre_referenced_normalisation_does_not_move_with_contrast_uptake():
    rng = np.random.default_rng(4)
    shape = (32, 32, 16)
    pre = rng.uniform(80.0, 120.0, shape).astype(np.float32)
    enhancement = np.zeros(shape, dtype=np.float32)
    enhancement[8:16, 8:16, 4:12] = 150.0
    enhancement[20:28] = 20.0
    roi = np.zeros(shape, dtype=np.uint8)
    roi[4:30, 4:30, 2:14] = 1
    pre_mean = pre[roi > 0].mean()
    prepared = {}
    for uptake in (1.0, 3.0):
        phases = np.stack([pre, pre + uptake * enhancement, pre + 0.8 * uptake * enhancement])
        case = Case("up", phases, [0.0, 85.0, 155.0], np.zeros(shape, np.int16), roi, np.eye(4))
        referenced = prepare_case(case, shape, normalisation="pre")
        expected = (phases - pre_mean) / (PRE_UNIT * pre_mean)
        np.testing.assert_allclose(referenced.phases, expected, rtol=1e-5, atol=1e-5)
        # A voxel's relative enhancement survives the map (TI-norm's offset removes it).
        signal = 1 + PRE_UNIT * referenced.phases
        relative = signal[1] / signal[0] - 1
        np.testing.assert_allclose(relative, uptake * enhancement / pre, rtol=1e-4, atol=1e-5)
        prepared[uptake] = (referenced, prepare_case(case, shape))
    # More contrast uptake leaves the normalised pre-contrast image as it was under "pre";
    # under TI-norm it is rescaled by 1dyn's spread.
    (referenced_1, ti_1), (referenced_3, ti_3) = prepared[1.0], prepared[3.0]
    np.testing.assert_array_equal(referenced_1.phases[0], referenced_3.phases[0])
    assert np.abs(ti_1.phases[0] - ti_3.phases[0]).max() > 0.2


def test_pre_referenced_normalisation_refuses_a_dark_pre_contrast_roi():
    shape = (8, 8, 4)
    phases = np.zeros((3, *shape), dtype=np.float32)
    phases[1:] = 5.0
    case = Case(
        "dark", phases, [0.0, 85.0, 155.0], np.zeros(shape, np.int16), np.ones(shape), np.eye(4)
    )
    with pytest.raises(
        InputError, match="dark: pre-contrast mean inside the breast ROI is not positive"
    ):
        prepare_case(case, shape, normalisation="pre")


def test_mixed_protocols_give_batches_of_one_length_in_proportion_to_their_cases():
    cases = [random_case(i, n_phases=n) for i, n in enumerate((4, 4, 4, 6, 8, 8))]
    batches = PatchBatches(cases, PATCH, 2, 600, seed=0)
    lengths = [batches[step]["phases"].shape[1] for step in range(600)]
    shares = {n: lengths.count(n) / len(lengths) for n in (4, 6, 8)}
    assert shares == pytest.approx({4: 3 / 6, 6: 1 / 6, 8: 2 / 6}, abs=0.06)
    for step in range(20):
        batch = batches[step]
        assert batch["times_s"].shape == (4, batch["phases"].shape[1])
