"""Dihedral helpers, the half-pixel label shift and the batch augmenter."""

import time

import numpy as np
import pytest
import torch
from dihedral_reference import NUMPY_DIHEDRAL

from ensemble_kit.config import AugmentSpec, config_from_dict, tta_list
from ensemble_kit.errors import EkError
from ensemble_kit.geometry import DIHEDRAL, dihedral, dihedral_inverse, shift_label
from ensemble_kit.training.augment import Augmenter


def _asymmetric(batch=2, channels=3, height=4, width=5):
    return torch.arange(batch * channels * height * width, dtype=torch.float32).view(
        batch, channels, height, width
    )


# --- dihedral group -----------------------------------------------------------------------


def test_d4_tta_is_the_whole_dihedral_group():
    """`tta: [d4]` names each of the eight transforms of the numpy reference, identity first."""
    expanded = tta_list(config_from_dict({"tta": ["d4"]}))
    assert set(expanded) == set(NUMPY_DIHEDRAL) and len(expanded) == 8
    assert expanded[0] == "identity"


@pytest.mark.parametrize("name", DIHEDRAL)
def test_dihedral_matches_numpy(name):
    x = _asymmetric()
    expected = np.ascontiguousarray(NUMPY_DIHEDRAL[name](x.numpy()))
    assert np.array_equal(dihedral(x, name).numpy(), expected)


def test_transpose_and_antitranspose_by_index():
    x = _asymmetric(1, 1, 4, 5)[0, 0]
    height, width = x.shape
    transposed, anti = dihedral(x, "transpose"), dihedral(x, "antitranspose")
    for i in range(width):
        for j in range(height):
            assert transposed[i, j] == x[j, i]
            assert anti[i, j] == x[height - 1 - j, width - 1 - i]


def test_rot90_turns_counter_clockwise():
    x = torch.tensor([[1, 2], [3, 4]])
    assert dihedral(x, "rot90").tolist() == [[2, 4], [1, 3]]


@pytest.mark.parametrize("name", DIHEDRAL)
def test_dihedral_inverse_undoes_it(name):
    x = _asymmetric(height=5, width=5)
    assert torch.equal(dihedral_inverse(dihedral(x, name), name), x)
    assert torch.equal(dihedral(dihedral_inverse(x, name), name), x)


def test_dihedral_elements_are_distinct():
    x = _asymmetric(height=5, width=5)
    images = {tuple(dihedral(x, name).flatten().tolist()) for name in DIHEDRAL}
    assert len(images) == 8


def test_unknown_dihedral_name():
    with pytest.raises(EkError, match="did you mean hflip"):
        dihedral(torch.zeros(2, 2), "hflp")


# --- half-pixel label shift ---------------------------------------------------------------


def test_shift_spreads_an_impulse_over_a_2x2_block():
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 3, 4] = 1.0
    up_left = shift_label(impulse)
    expected = torch.zeros(1, 1, 8, 8)
    expected[0, 0, 2:4, 3:5] = 0.25
    assert torch.allclose(up_left, expected, atol=1e-6)
    down_right = shift_label(impulse, 0.5, 0.5)
    expected = torch.zeros(1, 1, 8, 8)
    expected[0, 0, 3:5, 4:6] = 0.25
    assert torch.allclose(down_right, expected, atol=1e-6)


def test_shift_moves_a_ramp_by_the_shift():
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = (3 * rows + cols).view(1, 1, 8, 8)
    shifted = shift_label(ramp, dx=-0.5, dy=0.25)  # out[y, x] = in[y - dy, x - dx]
    expected = 3 * (rows - 0.25) + (cols + 0.5)
    assert torch.allclose(shifted[0, 0, 1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5)
    assert shifted.dtype == ramp.dtype


def _labels_of(scene, size):
    """Label pixels (i, j) sample the scene at (i - 0.5, j - 0.5): half a pixel down-right."""
    rows, cols = torch.meshgrid(torch.arange(size) - 0.5, torch.arange(size) - 0.5, indexing="ij")
    return scene(rows.double(), cols.double()).view(1, 1, size, size)


def _scene(y, x):
    return torch.sin(0.7 * y + 0.3 * x) + 0.05 * y * x**2 + (y > 4).double()


def _flipped_scene(name, size):
    """The scene seen through the dihedral transform ``name`` of a size×size image."""
    n = size - 1
    source = {
        "identity": lambda y, x: (y, x),
        "hflip": lambda y, x: (y, n - x),
        "vflip": lambda y, x: (n - y, x),
        "hvflip": lambda y, x: (n - y, n - x),
        "transpose": lambda y, x: (x, y),
        "rot90": lambda y, x: (x, n - y),
        "rot270": lambda y, x: (n - x, y),
        "antitranspose": lambda y, x: (n - x, n - y),
    }[name]
    return lambda y, x: _scene(*source(y, x))


@pytest.mark.parametrize("name", DIHEDRAL)
def test_centred_labels_make_flips_exact(name):
    size = 12
    inner = slice(1, size - 1)  # border padding differs at the edges
    flipped_scene_labels = _labels_of(_flipped_scene(name, size), size)
    # the scene transform agrees with the image transform on pixel centres
    centres = torch.arange(size).double()
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    assert torch.allclose(
        dihedral(_scene(rows, cols), name), _flipped_scene(name, size)(rows, cols)
    )
    centred_then_flipped = dihedral(shift_label(_labels_of(_scene, size)), name)
    centred_of_flipped = shift_label(flipped_scene_labels)
    assert torch.allclose(
        centred_then_flipped[..., inner, inner], centred_of_flipped[..., inner, inner], atol=1e-9
    )
    uncorrected_matches = torch.allclose(
        dihedral(_labels_of(_scene, size), name)[..., inner, inner],
        flipped_scene_labels[..., inner, inner],
    )
    assert uncorrected_matches == (name in ("identity", "transpose"))


# --- augmenter ----------------------------------------------------------------------------


def _batch(batch=32, channels=3, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator) + 0.1
    targets = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()
    return images, targets


def _run(spec, images, targets, seed=0):
    return Augmenter(spec)(images, targets, torch.Generator().manual_seed(seed))


def _same(a, b):
    return torch.equal(a, b)


def test_disabled_returns_the_inputs():
    images, targets = _batch()
    augmenter = Augmenter(AugmentSpec())
    assert not augmenter.enabled
    out_images, out_targets = augmenter(images, targets, torch.Generator())
    assert out_images is images and out_targets is targets
    assert Augmenter(AugmentSpec(mixup=0.1)).enabled


@pytest.mark.parametrize("field,dim", [("hflip", -1), ("vflip", -2)])
def test_flip_flips_the_chosen_samples(field, dim):
    images, targets = _batch()
    out_images, out_targets = _run(AugmentSpec(**{field: 0.5}), images, targets)
    flipped = [_same(out_images[i], images[i].flip(dim)) for i in range(len(images))]
    kept = [_same(out_images[i], images[i]) for i in range(len(images))]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(images)
    for i, was_flipped in enumerate(flipped):
        expected = targets[i].flip(dim) if was_flipped else targets[i]
        assert _same(out_targets[i], expected)


@pytest.mark.parametrize("field", ["hflip", "vflip", "rot90", "crop", "cutout", "cutmix", "mixup"])
def test_probability_one_changes_every_sample(field):
    images, targets = _batch()
    out_images, _ = _run(AugmentSpec(**{field: 1.0}), images, targets)
    for i in range(len(images)):
        assert not _same(out_images[i], images[i]), f"{field} left sample {i} unchanged"


def test_rot90_turns_image_and_target_together():
    images, targets = _batch()
    out_images, out_targets = _run(AugmentSpec(rot90=1.0), images, targets)
    turns = []
    for i in range(len(images)):
        k = next(k for k in (1, 2, 3) if _same(out_images[i], torch.rot90(images[i], k, (-2, -1))))
        assert _same(out_targets[i], torch.rot90(targets[i], k, (-2, -1)))
        turns.append(k)
    assert set(turns) == {1, 2, 3}


def test_rot90_skips_non_square_batches():
    images, targets = torch.rand(4, 3, 8, 10), torch.rand(4, 1, 8, 10)
    out_images, out_targets = _run(AugmentSpec(rot90=1.0), images, targets)
    assert _same(out_images, images) and _same(out_targets, targets)


def test_geometric_transforms_move_targets_with_images():
    images, _ = _batch()
    spec = AugmentSpec(hflip=0.5, vflip=0.5, rot90=0.5, crop=0.5, cutmix=0.5, mixup=0.5)
    out_images, out_targets = _run(spec, images, images[:, :1].clone())
    assert torch.allclose(out_targets, out_images[:, :1], atol=1e-6)


def test_crop_keeps_the_shape_and_zooms_in():
    size = 32
    ramp = torch.arange(size, dtype=torch.float32).expand(4, 1, size, size).contiguous()
    spec = AugmentSpec(crop=1.0, crop_scale=(0.25, 0.25))  # a box of half the side
    out_images, out_targets = _run(spec, ramp.repeat(1, 3, 1, 1), ramp)
    assert out_images.shape == (4, 3, size, size) and out_targets.shape == (4, 1, size, size)
    steps = out_images[:, :, :, 2:-1].diff(dim=-1)
    assert torch.allclose(steps, torch.full_like(steps, 0.5), atol=1e-4)
    assert (out_images.amin(dim=(1, 2, 3)) >= 0).all()
    assert (out_images.amax(dim=(1, 2, 3)) <= size - 1).all()


def test_full_scale_crop_is_the_identity():
    images, targets = _batch()
    out_images, out_targets = _run(AugmentSpec(crop=1.0, crop_scale=(1.0, 1.0)), images, targets)
    assert torch.allclose(out_images, images, atol=1e-5)
    assert torch.allclose(out_targets, targets, atol=1e-5)


def test_cutout_zeros_holes_in_the_image_only():
    images, targets = _batch(size=32)
    spec = AugmentSpec(cutout=1.0, cutout_holes=2, cutout_size=0.25)
    out_images, out_targets = _run(spec, images, targets)
    assert _same(out_targets, targets)
    holes = out_images == 0
    assert _same(torch.where(holes, images, out_images), images)  # only zeros were written
    assert (holes.all(dim=1) == holes.any(dim=1)).all()  # every channel
    zeroed = holes[:, 0].float().mean(dim=(1, 2))
    assert (zeroed > 0).all() and (zeroed <= 2 * 0.25**2 + 1e-6).all()


def test_cutmix_pastes_a_box_of_another_sample_in_image_and_target():
    batch, size = 16, 16
    values = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1)
    images = values.expand(batch, 3, size, size).contiguous()
    targets = values.expand(batch, 1, size, size) / 100
    out_images, out_targets = _run(AugmentSpec(cutmix=1.0), images, targets, seed=3)
    assert torch.allclose(out_targets * 100, out_images[:, :1])
    for i in range(batch):
        pasted = out_images[i, 0] != values[i].item()
        assert pasted.any()
        assert len(out_images[i, 0][pasted].unique()) == 1  # one partner
        rows, cols = pasted.any(dim=1).nonzero(), pasted.any(dim=0).nonzero()
        box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # a rectangle
        assert abs(box.shape[0] - box.shape[1]) <= 1  # a square: never clipped at an edge


def test_mixup_is_a_convex_mix_of_two_samples():
    batch, size = 8, 4
    values = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1)
    images = values.expand(batch, 3, size, size).contiguous()
    targets = values.expand(batch, 1, size, size) / 10
    out_images, out_targets = _run(AugmentSpec(mixup=1.0), images, targets)
    assert torch.allclose(out_targets * 10, out_images[:, :1], atol=1e-5)
    mixed = out_images[:, 0, 0, 0]
    assert torch.allclose(out_images, mixed.view(batch, 1, 1, 1).expand_as(out_images))
    assert (mixed >= 1).all() and (mixed <= batch).all()


def test_mixup_weights_are_beta_distributed():
    # two samples mix only with each other: image 0 becomes 1 - λ
    images = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    targets = images[:, :1]
    alpha = 0.4
    weights = torch.stack(
        [
            1
            - _run(AugmentSpec(mixup=1.0, mixup_alpha=alpha), images, targets, seed=s)[0][
                0, 0, 0, 0
            ]
            for s in range(400)
        ]
    )
    assert len(weights.unique()) == len(weights)
    assert abs(weights.mean().item() - 0.5) < 0.05
    expected_variance = 1 / (4 * (2 * alpha + 1))  # 0.139; a uniform λ would give 0.083
    assert abs(weights.var().item() - expected_variance) < 0.025


def test_mixup_keeps_soft_targets_in_range():
    images, targets = _batch()
    _, out_targets = _run(AugmentSpec(mixup=1.0), images, targets)
    assert (out_targets >= 0).all() and (out_targets <= 1).all()
    assert ((out_targets > 0) & (out_targets < 1)).any()


ALL_ON = AugmentSpec(hflip=0.5, vflip=0.5, rot90=0.5, crop=0.5, cutout=0.5, cutmix=0.5, mixup=0.5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(hflip=1.5),
        dict(crop=0.5, crop_scale=(0.0, 1.0)),
        dict(crop_scale=(0.9, 0.5)),
        dict(mixup=0.5, mixup_alpha=0.0),
        dict(cutout=0.5, cutout_holes=0),
    ],
)
def test_bad_spec_is_refused(bad):
    with pytest.raises(EkError, match="augment"):
        Augmenter(AugmentSpec(**bad))


@pytest.mark.parametrize("field", ["hflip", "vflip", "rot90", "crop", "cutout", "cutmix", "mixup"])
def test_each_augmentation_follows_the_seed(field):
    images, targets = _batch()
    spec = AugmentSpec(**{field: 0.5})
    first, second, other = (_run(spec, images, targets, seed=s) for s in (7, 7, 8))
    assert _same(first[0], second[0]) and _same(first[1], second[1])
    assert not _same(first[0], other[0])


def test_same_seed_same_batch_other_seed_differs():
    images, targets = _batch()
    first, second, other = (_run(ALL_ON, images, targets, seed=s) for s in (7, 7, 8))
    assert _same(first[0], second[0]) and _same(first[1], second[1])
    assert not _same(first[0], other[0])


def test_inputs_are_not_modified():
    images, targets = _batch()
    copies = images.clone(), targets.clone()
    _run(ALL_ON, images, targets)
    assert _same(images, copies[0]) and _same(targets, copies[1])


def test_single_sample_batch_runs():
    images, targets = _batch(batch=1)
    out_images, out_targets = _run(ALL_ON, images, targets)
    assert out_images.shape == images.shape and out_targets.shape == targets.shape


def test_a_64px_batch_is_quick():
    images, targets = _batch(batch=16, channels=9, size=64)
    augmenter = Augmenter(
        AugmentSpec(hflip=1, vflip=1, rot90=1, crop=1, cutout=1, cutmix=1, mixup=1)
    )
    generator = torch.Generator().manual_seed(0)
    augmenter(images, targets, generator)
    start = time.perf_counter()
    out_images, out_targets = augmenter(images, targets, generator)
    assert time.perf_counter() - start < 5.0  # ~0.05 s alone; generous for a shared machine
    assert out_images.shape == images.shape and out_targets.shape == targets.shape


def test_training_crop_cuts_the_same_window_from_image_and_target():
    from ensemble_kit.training.augment import Augmenter

    images = torch.arange(3 * 2 * 8 * 10, dtype=torch.float32).reshape(3, 2, 8, 10)
    targets = images[:, :1] * 2
    augmenter = Augmenter(AugmentSpec(crop=(4, 6)))
    out_images, out_targets = augmenter(images, targets, torch.Generator().manual_seed(3))
    assert out_images.shape == (3, 2, 4, 6) and out_targets.shape == (3, 1, 4, 6)
    for b in range(3):
        first = out_images[b, 0, 0, 0]
        (top, left) = [int(v) for v in torch.nonzero(images[b, 0] == first)[0]]
        assert torch.equal(out_images[b], images[b, :, top : top + 4, left : left + 6])
        assert torch.equal(out_targets[b], targets[b, :, top : top + 4, left : left + 6])


def test_masked_crops_hold_a_masked_pixel_and_a_too_large_crop_is_refused():
    from ensemble_kit.training.augment import Augmenter

    images = torch.rand(6, 1, 32, 40)
    targets = torch.zeros(6, 2, 32, 40)
    for b in range(6):  # one masked pixel per sample, far from the others, class b % 2
        targets[b, b % 2, 3 + 4 * b, 37 - 5 * b] = 1
    augmenter = Augmenter(AugmentSpec(crop=(8, 8), crop_masked=1.0))
    for seed in range(5):
        _, cropped = augmenter(images, targets, torch.Generator().manual_seed(seed))
        assert cropped.shape == (6, 2, 8, 8)
        assert all(cropped[b].sum() == 1 for b in range(6))
    with pytest.raises(EkError, match="larger than the images"):
        Augmenter(AugmentSpec(crop=(64, 8)))(images, targets, torch.Generator())


def test_crop_takes_a_probability_or_a_size_in_configs():
    from ensemble_kit.config import config_from_dict

    assert config_from_dict({"name": "a", "augment": {"crop": [256, 400]}}).augment.crop == (
        256,
        400,
    )
    assert config_from_dict({"name": "a", "augment": {"crop": 0.5}}).augment.crop == 0.5
    for bad in ([0, 4], 1.5, [1, 2, 3]):
        with pytest.raises(EkError, match="augment.crop"):
            config_from_dict({"name": "a", "augment": {"crop": bad}})
