"""Scanning a kohya-style folder, the pre-flight report, and the deterministic per-epoch batch plan."""
from collections import Counter

import pytest
import torch
from PIL import Image

from networks.errors import SdloraError
from trainer.data.buckets import BucketSpec
from trainer.data.captions import CaptionOptions, split_tags
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.data.steps import BatchCount

# At 128 px with 64 px steps the buckets are 64x192, 64x256, 128x128, 192x64 and 256x64.
SMALL = BucketSpec(resolution=128, step=64, min_side=64, max_side=256)


def _image(path, size, colour=(200, 40, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png", (96, 96))
    (root / "a.txt").write_text("red square, flat\n", encoding="utf-8")
    _image(root / "b.jpg", (200, 80))
    (root / "b.txt").write_text("\ufeffwide\nsecond line\n", encoding="utf-8")  # BOM and two lines
    _image(root / "c.webp", (100, 100))  # no caption
    _image(root / "10_mystyle" / "d.png", (80, 200), (0, 0, 0, 0), "RGBA")
    (root / "10_mystyle" / "d.txt").write_text("tall thing", encoding="utf-8")
    _image(root / "10_mystyle" / "e.bmp", (100, 90))  # no caption -> class word
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _image(root / "notes" / "f.png", (64, 64))  # not a kohya folder name
    _image(root / "0_reg" / "g.png", (64, 64))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "orphan.txt").write_text("no image", encoding="utf-8")
    return root


def _scan(folder, seed=0, **options):
    return ImageDataset.scan(DatasetOptions(folder=folder, buckets=SMALL, **options), seed=seed)


def test_scan_finds_items_with_repeats_captions_and_buckets(folder):
    dataset = _scan(folder)
    by_name = {item.path.name: item for item in dataset.items}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.webp", "d.png", "e.bmp"]
    expected = {
        "a.png": ("red square, flat", 1, (128, 128), (96, 96)),
        "b.jpg": ("wide, second line", 1, (192, 64), (200, 80)),
        "c.webp": ("", 1, (128, 128), (100, 100)),
        "d.png": ("tall thing", 10, (64, 192), (80, 200)),
        "e.bmp": ("mystyle", 10, (128, 128), (100, 90)),
    }
    for name, (caption, repeats, bucket, size) in expected.items():
        item = by_name[name]
        assert (item.caption, item.repeats, item.bucket, item.size) == (caption, repeats, bucket, size)
    assert by_name["d.png"].has_alpha and not by_name["a.png"].has_alpha
    assert [item.index for item in dataset.items] == list(range(5))


def test_report_lists_what_the_preflight_check_shows(folder):
    report = _scan(folder).report
    assert report.images_found == 6 and report.usable == 5
    assert [s.name for s in report.skipped] == ["broken.png"]
    assert sorted(s.name for s in report.ignored_folders) == ["0_reg", "notes"]
    assert report.captions_missing == ["10_mystyle/e.bmp", "c.webp"]
    assert report.caption_extension == ".txt"
    assert report.bucket_counts == {(128, 128): 3, (192, 64): 1, (64, 192): 1}
    assert report.samples_per_epoch == 1 + 1 + 1 + 10 + 10
    as_dict = report.to_dict()
    assert as_dict["buckets"][0] == {"width": 64, "height": 192, "images": 1}
    assert "broken.png" in report.summary() and "2 images have no .txt caption" in report.summary()


def test_caption_extension_is_configurable(folder):
    (folder / "c.caption").write_text("from caption file", encoding="utf-8")
    dataset = _scan(folder, caption_extension="caption")
    captions = {item.path.name: item.caption for item in dataset.items}
    assert captions["c.webp"] == "from caption file"
    assert captions["a.png"] == ""  # a.txt is not read any more
    assert dataset.report.caption_extension == ".caption"


def test_class_word_can_lead_every_caption(folder):
    captions = {i.path.name: i.caption for i in _scan(folder, prepend_class_word=True).items}
    assert captions["d.png"] == "mystyle, tall thing"
    assert captions["e.bmp"] == "mystyle"
    assert captions["a.png"] == "red square, flat"  # root images have no class word


def test_keep_tokens_separator_is_read_out_of_captions_and_keeps_the_marked_tags(folder):
    (folder / "10_mystyle" / "d.txt").write_text("look ||| one, two, three, four ||| by me", encoding="utf-8")
    options = CaptionOptions(shuffle_tags=True, keep_tokens_separator="|||")
    dataset = _scan(folder, captions=options, prepend_class_word=True)
    item = next(i for i in dataset.items if i.path.name == "d.png")
    assert item.caption == "mystyle, look, one, two, three, four, by me"  # what the cache, validation, tags see
    seen = {s.caption for e in range(3) for b in dataset.batches(e, 1) for s in b.samples if s.item == item.index}
    assert len(seen) > 3
    for caption in seen:
        tags = split_tags(caption)
        assert tags[:2] == ["mystyle", "look"] and tags[-1] == "by me" and "|||" not in caption


def test_default_repeats_apply_to_root_images(folder):
    dataset = _scan(folder, default_repeats=3)
    assert {i.path.name: i.repeats for i in dataset.items}["a.png"] == 3
    assert dataset.report.samples_per_epoch == 3 * 3 + 10 + 10


def test_disabled_buckets_put_everything_in_the_square(folder):
    spec = BucketSpec(resolution=128, step=64, min_side=64, max_side=256, enabled=False)
    dataset = ImageDataset.scan(DatasetOptions(folder=folder, buckets=spec))
    assert {item.bucket for item in dataset.items} == {(128, 128)}


@pytest.mark.parametrize("contents", ["empty", "only_broken", "only_other_folders"])
def test_no_usable_images_is_one_sentence_naming_the_folder(tmp_path, contents):
    if contents == "only_broken":
        (tmp_path / "x.jpg").write_bytes(b"nope")
    if contents == "only_other_folders":
        _image(tmp_path / "photos" / "x.png", (64, 64))
    with pytest.raises(SdloraError, match=rf"^No usable images in '{tmp_path}': .+\.$"):
        _scan(tmp_path)


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(SdloraError, match="does not exist"):
        _scan(tmp_path / "nowhere")


def _flat(batches):
    return [(s.item, s.flip, s.caption) for batch in batches for s in batch.samples]


def test_epoch_plan_covers_every_repeat_once_in_single_bucket_batches(folder):
    dataset = _scan(folder)
    batches = dataset.batches(epoch=0, batch_size=4)
    counts = Counter(s.item for batch in batches for s in batch.samples)
    assert counts == {item.index: item.repeats for item in dataset.items}
    for batch in batches:
        assert 1 <= len(batch.samples) <= 4
        assert {dataset.items[s.item].bucket for s in batch.samples} == {batch.bucket}
    assert dataset.batch_count(4) == BatchCount(len(batches), len(batches))
    # 128x128 holds 1 + 1 + 10 samples (3 batches), 64x192 10 (3), 192x64 1 (1)
    assert len(batches) == 7


def test_epoch_plan_is_reproducible_and_changes_per_epoch(folder):
    first = _scan(folder, seed=5)
    restarted = _scan(folder, seed=5)  # a resumed run scans again with the same seed
    assert _flat(first.batches(3, 2)) == _flat(restarted.batches(3, 2))
    assert _flat(first.batches(3, 2)) != _flat(first.batches(4, 2))
    assert _flat(first.batches(3, 2)) != _flat(_scan(folder, seed=6).batches(3, 2))
    assert first.batches(3, 2)[4:] == restarted.batches(3, 2)[4:]  # skip to (epoch, batch index)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batch_count_is_the_length_of_the_batch_plan(folder, batch_size, world_size):
    dataset = _scan(folder)
    count = dataset.batch_count(batch_size, world_size)
    assert count.per_epoch == len(dataset.batches(2, batch_size))
    assert count.per_process == len(dataset.batches(2, batch_size, world_size - 1, world_size))


def test_batch_count_refuses_a_batch_size_below_one(folder):
    with pytest.raises(SdloraError, match="train.batch_size is 0; use 1 or more."):
        _scan(folder).batch_count(0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharding_gives_each_rank_every_nth_batch_and_equal_lengths(folder, world_size):
    dataset = _scan(folder)
    full = dataset.batches(1, 3)
    shards = [dataset.batches(1, 3, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    assert len(shards[0]) == dataset.batch_count(3, world_size).per_process
    assert dataset.batch_count(3, world_size).per_epoch == len(full)
    interleaved = [shards[i % world_size][i // world_size] for i in range(world_size * len(shards[0]))]
    assert interleaved[: len(full)] == full
    assert interleaved[len(full) :] == full[: len(interleaved) - len(full)]  # padding wraps around


def test_rank_outside_world_is_refused(folder):
    with pytest.raises(SdloraError, match="rank 2"):
        _scan(folder).batches(0, 1, rank=2, world_size=2)


def test_flipped_sample_reports_a_mirrored_crop(tmp_path):
    Image.new("RGB", (300, 64)).save(tmp_path / "wide.png")  # 256x64 bucket, resized 300x64
    dataset = _scan(tmp_path, random_crop=True, flip=True, default_repeats=8)
    samples = [s for b in dataset.batches(0, 1) for s in b.samples]
    assert {s.flip for s in samples} == {False, True}
    for sample in samples:
        left = sample.placement.crop_left_top[0]
        assert sample.as_seen.crop_left_top[0] == (300 - 256 - left if sample.flip else left)
        assert sample.as_seen.sdxl_time_ids()[:2] == (64, 300)


def test_flip_is_drawn_per_sample_and_leaves_the_order_alone(folder):
    plain, flipped = _scan(folder), _scan(folder, flip=True)
    assert not any(s.flip for b in plain.batches(0, 2) for s in b.samples)
    flips = [s.flip for b in flipped.batches(0, 2) for s in b.samples]
    assert 3 <= sum(flips) <= len(flips) - 3
    items = [[s.item for s in b.samples] for b in plain.batches(0, 2)]
    assert items == [[s.item for s in b.samples] for b in flipped.batches(0, 2)]


def test_caption_augmentation_is_per_sample_per_epoch(folder):
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1)
    for name in ("d.txt", "e.txt"):
        (folder / "10_mystyle" / name).write_text("sks, one, two, three, four, five", encoding="utf-8")
    dataset = _scan(folder, captions=options)
    styled = {item.index for item in dataset.items if item.path.parent.name == "10_mystyle"}
    epoch0 = [s.caption for b in dataset.batches(0, 1) for s in b.samples if s.item in styled]
    epoch1 = [s.caption for b in dataset.batches(1, 1) for s in b.samples if s.item in styled]
    assert all(split_tags(c)[0] == "sks" for c in epoch0 + epoch1)
    assert len(set(epoch0)) > 5  # 20 repeats of two items are not all shuffled alike
    assert sorted(epoch0) != sorted(epoch1)
    assert _flat(dataset.batches(0, 1)) == _flat(_scan(folder, captions=options).batches(0, 1))


def test_pixels_are_chw_float_in_minus_one_to_one(tmp_path):
    _image(tmp_path / "white.png", (100, 300), (255, 255, 255))
    half = Image.new("RGB", (128, 128), (0, 0, 0))
    half.paste((255, 255, 255), (64, 0, 128, 128))
    half.save(tmp_path / "half.png")
    dataset = _scan(tmp_path)
    white, half_item = sorted(dataset.items, key=lambda i: i.path.name != "white.png")
    pixels = dataset.pixels(white)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 192, 64)
    assert torch.allclose(pixels, torch.ones_like(pixels))
    half_pixels = dataset.pixels(half_item)
    assert half_pixels[:, :, :60].max() == -1.0 and half_pixels[:, :, 68:].min() == 1.0
    assert torch.equal(dataset.pixels(half_item, flip=True), half_pixels.flip(-1))


def test_alpha_mask_follows_the_crop(tmp_path):
    cutout = Image.new("RGBA", (128, 128), (10, 10, 10, 0))
    cutout.paste((10, 10, 10, 255), (0, 0, 64, 128))  # opaque left half
    cutout.save(tmp_path / "cutout.png")
    _image(tmp_path / "opaque.png", (128, 128))
    dataset = _scan(tmp_path)
    cut, opaque = dataset.items
    alpha = dataset.alpha(cut)
    assert alpha.shape == (128, 128)
    assert alpha[:, :60].min() == 1.0 and alpha[:, 68:].max() == 0.0
    assert dataset.alpha(cut, flip=True)[:, 68:].min() == 1.0
    assert dataset.alpha(opaque) is None
    assert dataset.pixels(cut)[:, :, 68:].min() == 1.0  # transparent part is white


def test_random_crop_is_drawn_per_sample_per_epoch(tmp_path):
    gradient = Image.linear_gradient("L").rotate(90).resize((300, 64)).convert("RGB")  # 256x64 bucket, 44 px spare
    gradient.save(tmp_path / "wide.png")
    dataset = _scan(tmp_path, random_crop=True, default_repeats=4, seed=2)
    assert dataset.items[0].placement.crop_left_top == (22, 0)  # the item keeps the cacheable centre crop
    crops = [s.placement.crop_left_top for epoch in range(3) for b in dataset.batches(epoch, 1) for s in b.samples]
    assert len(set(crops)) > 4 and all(0 <= left <= 44 and top == 0 for left, top in crops)
    assert crops == [s.placement.crop_left_top for e in range(3) for b in _scan(
        tmp_path, random_crop=True, default_repeats=4, seed=2).batches(e, 1) for s in b.samples]
    sample = next(s for b in dataset.batches(0, 1) for s in b.samples if s.placement.crop_left_top != (22, 0))
    expected = dataset.pixels(dataset.items[0], placement=sample.placement)
    assert torch.equal(dataset.sample_pixels(sample), expected)
    assert not torch.equal(expected, dataset.pixels(dataset.items[0]))  # the gradient shows the shift
    centred = _scan(tmp_path, default_repeats=4).batches(0, 1)
    assert {s.placement.crop_left_top for b in centred for s in b.samples} == {(22, 0)}


def test_bucket_no_upscale_from_the_config_keeps_small_images_at_their_size(tmp_path):
    from trainer.config.presets import resolve_config

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (1024, 1024), (30, 30, 200)).save(tmp_path / "big.png")
    cfg = resolve_config(None, [f"dataset.path={tmp_path}", "dataset.resolution=512", "dataset.bucket_no_upscale=true"])
    buckets = {item.path.name: item.bucket for item in ImageDataset.scan(cfg.dataset.options()).items}
    assert buckets == {"small.png": (256, 192), "big.png": (512, 512)}
    cfg = resolve_config(None, [f"dataset.path={tmp_path}", "dataset.resolution=512"])
    assert {item.path.name: item.bucket for item in ImageDataset.scan(cfg.dataset.options()).items}["small.png"] \
        != (256, 192)


@pytest.mark.parametrize("repeats, train_samples, balanced", [
    ([1, 1, 1], 7, [3, 2, 2]),  # one pass is short: one more each, in order
    ([5, 5, 5], 7, [5, 5, 0]),  # more than needed: the first ones, the last left out
    ([2], 3, [3]),
    ([10, 10], 5, [10, 0]),
])
def test_reg_images_are_balanced_to_the_training_samples_as_kohya_does(repeats, train_samples, balanced):
    from trainer.data.dataset import balance_reg_repeats

    assert balance_reg_repeats(repeats, train_samples) == balanced


def test_reg_folder_joins_the_epoch_flagged_and_balanced(folder, tmp_path):
    reg = tmp_path / "reg"
    for i in range(3):
        _image(reg / "1_person" / f"r{i}.png", (96, 96), (10 * i, 0, 0))
    dataset = _scan(folder, reg_folder=reg)
    train = [i for i in dataset.items if not i.is_reg]
    regs = [i for i in dataset.items if i.is_reg]
    assert [i.index for i in dataset.items] == list(range(len(dataset.items)))  # the plan addresses positions
    train_samples = sum(i.repeats for i in train)  # 3 root images + 2 x 10 in 10_mystyle = 23
    assert train_samples == 23 and sum(i.repeats for i in regs) == train_samples
    assert [i.repeats for i in regs] == [8, 8, 7] and {i.caption for i in regs} == {"person"}
    report = dataset.report
    assert (report.reg_images, report.reg_used, report.reg_samples_per_epoch) == (3, 3, 23)
    assert report.samples_per_epoch == 46 and report.usable == 5  # the training folder's own count
    assert "Regularization: 3 of 3 images in" in report.summary()
    planned = Counter(s.item for b in dataset.batches(0, 2) for s in b.samples)
    assert sum(planned[i.index] for i in regs) == 23


@pytest.mark.parametrize("contents, message", [
    (None, "Regularization folder '{reg}' does not exist; point dataset.reg_path at a folder of class images "
           "or leave it empty."),
    ("empty", "No usable images in the regularization folder '{reg}': add .png/.jpg/.jpeg/.webp/.bmp files"),
])
def test_a_bad_reg_folder_is_one_sentence(folder, tmp_path, contents, message):
    reg = tmp_path / "reg"
    if contents == "empty":
        reg.mkdir()
    with pytest.raises(SdloraError) as error:
        _scan(folder, reg_folder=reg)
    assert str(error.value).startswith(message.format(reg=reg))


def test_validation_never_holds_out_a_reg_image(folder, tmp_path):
    from trainer.objective.validation import split_dataset

    for i in range(8):
        _image(tmp_path / "reg" / "1_person" / f"r{i}.png", (96, 96))
    dataset = _scan(folder, reg_folder=tmp_path / "reg")
    for seed in range(10):
        kept, held = split_dataset(dataset, 4, seed)
        assert len(held) == 4 and not any(item.is_reg for item in held)
        assert sum(item.is_reg for item in kept.items) == sum(item.is_reg for item in dataset.items)


def test_a_validation_folder_is_validated_as_is_without_reg_images(folder, tmp_path):
    from trainer.objective.validation import validation_items

    _image(tmp_path / "reg" / "1_person" / "r0.png", (96, 96))
    _image(tmp_path / "val" / "v0.png", (96, 96))
    dataset = _scan(folder, reg_folder=tmp_path / "reg")
    kept, held = validation_items(dataset, folder=str(tmp_path / "val"))
    assert [item.path.name for item in held] == ["v0.png"] and kept is dataset
