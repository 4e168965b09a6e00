"""Bucket tables (kohya's), image-to-bucket assignment, and the cover-then-crop placement."""
import random

import numpy as np
import pytest
from PIL import Image

from networks.errors import SdloraError
from trainer.data.buckets import BucketSpec, bucket_for, bucket_sizes, closest_bucket, place, render

SPEC_512 = BucketSpec(resolution=512, step=64, min_side=256, max_side=1024)

# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand.
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024),
    (320, 704), (320, 768),
    (384, 640),
    (448, 576),
    (512, 512),
    (576, 448),
    (640, 384),
    (704, 320),
    (768, 320),
    (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_bucket_table_at_512():
    assert bucket_sizes(SPEC_512) == BUCKETS_512


def test_default_sides_at_512_are_kohyas():
    assert bucket_sizes(BucketSpec(resolution=512)) == BUCKETS_512


@pytest.mark.parametrize("resolution", [64, 128, 512, 768, 1024])
def test_every_bucket_obeys_the_rules(resolution):
    spec = BucketSpec(resolution=resolution)
    sizes = bucket_sizes(spec)
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= resolution * resolution
        assert spec.smallest <= min(width, height) and max(width, height) <= spec.largest
        assert (height, width) in sizes


@pytest.mark.parametrize(
    "image_size, bucket",
    [
        ((1000, 1000), (512, 512)),
        ((64, 64), (512, 512)),
        ((600, 800), (448, 576)),  # 0.75 sits nearer 0.78 than 0.6
        ((800, 600), (576, 448)),
        ((1920, 1080), (640, 384)),
        ((1080, 1920), (384, 640)),
        ((100, 400), (256, 1024)),
        ((4000, 1000), (1024, 256)),
        ((10000, 100), (1024, 256)),  # beyond the extremes: the most extreme bucket
    ],
)
def test_images_go_to_the_closest_aspect_ratio(image_size, bucket):
    assert closest_bucket(image_size, BUCKETS_512) == bucket


@pytest.mark.parametrize("image_size", [(1920, 1080), (300, 900), (77, 77)])
def test_disabled_buckets_send_everything_to_the_square(image_size):
    buckets = bucket_sizes(BucketSpec(resolution=512, enabled=False))
    assert buckets == [(512, 512)]
    assert closest_bucket(image_size, buckets) == (512, 512)


@pytest.mark.parametrize(
    "spec, key",
    [
        (BucketSpec(resolution=500), "dataset.resolution"),
        (BucketSpec(resolution=512, step=60), "dataset.bucket_step"),
        (BucketSpec(resolution=512, min_side=576), "min_bucket_side"),
        (BucketSpec(resolution=512, max_side=448), "max_bucket_side"),
        (BucketSpec(resolution=512, min_side=100), "min_bucket_side"),
    ],
)
def test_invalid_specs_name_the_key(spec, key):
    with pytest.raises(SdloraError, match=key):
        bucket_sizes(spec)


@pytest.mark.parametrize(
    "image_size, bucket, resized, crop",
    [
        ((1000, 500), (512, 512), (1024, 512), (256, 0)),
        ((500, 1000), (512, 512), (512, 1024), (0, 256)),
        ((256, 256), (512, 512), (512, 512), (0, 0)),  # small images are scaled up to cover
        ((600, 800), (448, 576), (448, 597), (0, 10)),
    ],
)
def test_center_placement_covers_then_crops(image_size, bucket, resized, crop):
    placement = place(image_size, bucket)
    assert placement.resized_size == resized
    assert placement.crop_left_top == crop
    assert placement.crop_box == (crop[0], crop[1], crop[0] + bucket[0], crop[1] + bucket[1])
    assert placement.original_size == image_size


def test_random_crop_is_deterministic_and_in_range():
    draws = [place((1000, 500), (512, 512), True, random.Random(seed)).crop_left_top for seed in range(20)]
    assert draws == [place((1000, 500), (512, 512), True, random.Random(seed)).crop_left_top for seed in range(20)]
    assert all(0 <= left <= 512 and top == 0 for left, top in draws)
    assert len(set(draws)) > 10


def test_flipped_placement_mirrors_the_crop_and_sdxl_ids():
    placement = place((1000, 500), (512, 512), True, random.Random(4))
    left = placement.crop_left_top[0]
    assert placement.flipped().crop_left_top == (1024 - 512 - left, 0)
    assert placement.flipped().flipped() == placement
    assert place((1000, 500), (512, 512)).sdxl_time_ids() == (500, 1000, 0, 256, 512, 512)


def test_render_crops_the_centre_at_the_bucket_size():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # right half blue
    out = np.asarray(render(image, place(image.size, (64, 64))))
    assert out.shape == (64, 64, 3)
    # The centred crop spans x 50..150 of the original: red on the left half, blue on the right.
    assert out[32, :28, 0].min() > 240 and out[32, :28, 2].max() < 15
    assert out[32, 36:, 2].min() > 240 and out[32, 36:, 0].max() < 15


def test_render_uses_the_placements_offset():
    gradient = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (64, 1))).convert("RGB")
    left_crop = place((256, 64), (64, 64), True, random.Random(0))
    left = left_crop.crop_left_top[0]
    out = np.asarray(render(gradient, left_crop))[:, :, 0]
    assert abs(int(out[10, 32]) - (left + 32)) <= 1


NO_UPSCALE = BucketSpec(resolution=512, step=64, min_side=256, max_side=1024, no_upscale=True)


@pytest.mark.parametrize("image_size, bucket", [
    ((300, 200), (256, 192)),    # smaller than 512^2: its own size, sides cut to multiples of 64
    ((512, 512), (512, 512)),
    ((1024, 1024), (512, 512)),  # larger: scaled down to 512^2 pixels first, as without the option
    ((2000, 500), (1024, 256)),  # ... and to max_bucket_side
    ((40, 700), (64, 640)),      # a side under one step gets one step
])
def test_no_upscale_buckets_follow_the_image(image_size, bucket):
    assert bucket_for(image_size, NO_UPSCALE, bucket_sizes(NO_UPSCALE)) == bucket
    placement = place(image_size, bucket)
    if image_size[0] >= bucket[0] and image_size[1] >= bucket[1]:
        assert placement.resized_size[0] <= image_size[0] and placement.resized_size[1] <= image_size[1]


def test_without_the_option_small_images_are_upscaled_to_the_table():
    spec = BucketSpec(resolution=512, step=64, min_side=256, max_side=1024)
    assert bucket_for((300, 200), spec, bucket_sizes(spec)) == closest_bucket((300, 200), bucket_sizes(spec))
    assert place((300, 200), bucket_for((300, 200), spec, bucket_sizes(spec))).resized_size[0] > 300
