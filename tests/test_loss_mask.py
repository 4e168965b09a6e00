"""Masked loss end to end: from an RGBA image (or a mask file) to diffusion_loss ignoring masked pixels."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from networks.errors import SdloraError
from trainer.data.buckets import BucketSpec
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.data.loss_mask import LossMasks, latent_mask, missing_masks
from trainer.objective.diffusion import diffusion_loss

TRANSPARENT_COLUMNS = 36  # pixels 0..35 transparent: latent columns 0-3 fully, column 4 half (32..39)


def rgba_image(path, hidden_rgb=(255, 0, 0)):
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[..., :3] = (20, 120, 220)
    pixels[:, :TRANSPARENT_COLUMNS, :3] = hidden_rgb
    pixels[:, TRANSPARENT_COLUMNS:, 3] = 255
    Image.fromarray(pixels, "RGBA").save(path)


def scan(folder, flip=False):
    options = DatasetOptions(folder=folder, buckets=BucketSpec(resolution=64, min_side=64, max_side=128), flip=flip)
    return ImageDataset.scan(options)


EXPECTED_COLUMNS = [0, 0, 0, 0, 0.5, 1, 1, 1]


def test_alpha_mask_is_area_averaged_onto_the_latent_grid(tmp_path):
    rgba_image(tmp_path / "cut.png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "opaque.png")
    dataset = scan(tmp_path)
    masks = LossMasks(dataset, "alpha")
    batch = dataset.batches(0, batch_size=2)[0]
    mask = masks.batch(batch, (8, 8))
    assert mask.shape == (2, 1, 8, 8)
    by_name = {dataset.items[s.item].path.name: mask[i, 0] for i, s in enumerate(batch.samples)}
    assert torch.equal(by_name["cut.png"], torch.tensor(EXPECTED_COLUMNS).expand(8, 8))
    assert torch.equal(by_name["opaque.png"], torch.ones(8, 8))  # no alpha: the whole image counts
    mirrored = masks.latent(dataset.items[0], True, dataset.items[0].placement, (8, 8))
    assert torch.equal(mirrored[0, 0], torch.tensor(EXPECTED_COLUMNS[::-1]))


def test_masked_loss_ignores_masked_pixels_end_to_end(tmp_path):
    rgba_image(tmp_path / "cut.png")
    dataset = scan(tmp_path)
    batch = dataset.batches(0, batch_size=1)[0]
    mask = LossMasks(dataset, "alpha").batch(batch, (8, 8))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    target, prediction = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])

    def loss(pred):
        return float(diffusion_loss(pred, target, t, scheduler, "epsilon", mask=mask))

    base = loss(prediction)
    in_masked = prediction.clone()
    in_masked[..., :4] += 10.0  # latent columns the transparent pixels fully cover
    assert loss(in_masked) == base
    in_visible = prediction.clone()
    in_visible[..., 6] += 1.0
    assert loss(in_visible) != base
    # the same number as an explicit weighted mean over the visible latents
    weight = torch.tensor(EXPECTED_COLUMNS).expand(1, 4, 8, 8)
    explicit = ((prediction - target) ** 2 * weight).sum() / weight.sum()
    assert base == pytest.approx(float(explicit), rel=1e-6)


def test_mask_folder_same_stem_grayscale_any_size(tmp_path):
    data, masks_dir = tmp_path / "data", tmp_path / "masks"
    (data / "10_style").mkdir(parents=True)
    masks_dir.mkdir()
    Image.new("RGB", (128, 64), (50, 60, 70)).save(data / "10_style" / "wide.png")  # centre-cropped to 64x64
    Image.new("RGB", (64, 64), (50, 60, 70)).save(data / "10_style" / "plain.png")
    gray = np.zeros((32, 64), dtype=np.uint8)  # half the image's size: stretched onto it
    gray[:, 32:] = 255  # the image's right half (x >= 64) trains
    Image.fromarray(gray, "L").save(masks_dir / "wide.png")
    dataset = scan(data)
    masks = LossMasks(dataset, "folder", masks_dir)
    wide = next(i for i in dataset.items if i.path.name == "wide.png")
    plain = next(i for i in dataset.items if i.path.name == "plain.png")
    assert wide.placement.crop_box == (32, 0, 96, 64)
    # the crop shows x 32..95: black up to 63, white from 64, i.e. the bucket's left half 0, right half 1
    got = masks.latent(wide, False, wide.placement, (8, 8))[0]
    assert torch.allclose(got, torch.tensor([0.0] * 4 + [1.0] * 4).expand(8, 8), atol=0.05)  # bilinear edge
    assert masks.pixel_mask(plain) is None
    assert missing_masks(masks) == ["10_style/plain.png"]
    with pytest.raises(SdloraError, match="mask folder .* does not exist"):
        LossMasks(dataset, "folder", tmp_path / "nope")


def test_latent_mask_keeps_the_mean():
    pixels = torch.rand(64, 48)
    assert latent_mask(pixels, (8, 6)).mean().item() == pytest.approx(pixels.mean().item(), rel=1e-5)


def test_reg_images_never_take_a_training_images_mask(tmp_path):
    data, reg, masks_dir = tmp_path / "data", tmp_path / "reg" / "1_person", tmp_path / "masks"
    for folder in (data, reg, masks_dir):
        folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(data / "0.png")
    Image.new("RGB", (64, 64)).save(reg / "0.png")  # the same name as the training image
    Image.new("RGB", (64, 64)).save(reg / "1.png")
    Image.new("L", (64, 64), 0).save(masks_dir / "0.png")
    dataset = ImageDataset.scan(DatasetOptions(folder=data, buckets=BucketSpec(resolution=64, step=64),
                                               reg_folder=tmp_path / "reg"))
    masks = LossMasks(dataset, "folder", masks_dir)
    train, reg_item = (next(i for i in dataset.items if i.is_reg is flag) for flag in (False, True))
    assert masks.pixel_mask(train) is not None and masks.pixel_mask(reg_item) is None
    assert missing_masks(masks) == []  # reg images train on every pixel, and are not reported
