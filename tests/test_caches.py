"""Latent cache (content-keyed, disk-persistent, scaled on read) and text-embedding cache (once per caption)."""
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from transformers.modeling_outputs import BaseModelOutputWithPooling

from trainer.caches.latent_cache import LatentCache, vae_identity
from trainer.caches.text_cache import TextEmbeddingCache, text_cache_allowed
from trainer.data.buckets import BucketSpec
from trainer.data.captions import CaptionOptions
from trainer.data.dataset import DatasetOptions, ImageDataset

# 64 px buckets in 32 px steps: several buckets while keeping every VAE encode cheap.
SMALL = BucketSpec(resolution=64, step=32, min_side=32, max_side=128)


def tiny_vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        mid_block_add_attention=False,  # attention over every latent pixel would dominate the test time
        **config,
    ).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Convolutions this small gain nothing from a second thread, and lose several times over to
    # thread hand-offs when the CPU is shared (parallel test runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(scaling_factor=0.5)


def _draw(path, size, seed):
    image = Image.new("RGB", size, (seed * 40 % 256, 120, 200))
    ImageDraw.Draw(image).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=(250, seed * 60 % 256, 20))
    image.save(path)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    # Three square images and one wide one: two buckets.
    for index, size in enumerate([(64, 64), (60, 55), (50, 50), (100, 35)]):
        _draw(folder / f"img{index}.png", size, index)
    return ImageDataset.scan(DatasetOptions(folder=folder, buckets=SMALL))


def _cache(vae, dataset, folder=None, batch_size=2):
    return LatentCache(vae, dataset, vae_identity(vae, "tiny"), folder=folder, batch_size=batch_size)


def test_only_changed_images_are_encoded_again(vae, dataset, tmp_path):
    cache_dir = tmp_path / "latents"
    first = _cache(vae, dataset, cache_dir)
    assert first.build() == 4 and first.encode_count == 4
    before = {item.path.name: first.get(item) for item in dataset.items}

    unchanged = _cache(vae, dataset, cache_dir)
    assert unchanged.build() == 0 and unchanged.encode_count == 0
    assert all(torch.equal(unchanged.get(item), before[item.path.name]) for item in dataset.items)

    touched = dataset.items[1]
    _draw(touched.path, touched.size, seed=9)
    after_edit = _cache(vae, dataset, cache_dir)
    after_edit.build()
    assert after_edit.encode_count == 1
    assert not torch.equal(after_edit.get(touched), before[touched.path.name])
    assert not list(cache_dir.glob("*.tmp"))  # atomic writes leave no temporaries behind


def test_get_returns_scaled_posterior_mean(vae, dataset):
    item = dataset.items[0]
    cached = _cache(vae, dataset).get(item)
    with torch.no_grad():
        mean = vae.encode(dataset.pixels(item)[None]).latent_dist.mean[0]
    assert cached.shape == (4, item.bucket[1] // 2, item.bucket[0] // 2)
    torch.testing.assert_close(cached, mean * 0.5)


def test_shift_factor_is_subtracted_before_scaling(dataset):
    shifted = tiny_vae(scaling_factor=2.0, shift_factor=0.25)
    item = dataset.items[0]
    with torch.no_grad():
        mean = shifted.encode(dataset.pixels(item)[None]).latent_dist.mean[0]
    torch.testing.assert_close(_cache(shifted, dataset).get(item), (mean - 0.25) * 2.0)


def test_flip_is_its_own_entry_encoded_lazily_once(vae, dataset):
    cache = _cache(vae, dataset)
    item = dataset.items[0]
    plain, mirrored = cache.get(item), cache.get(item, flip=True)
    assert cache.encode_count == 2
    assert not torch.allclose(plain, mirrored)
    assert torch.equal(cache.get(item, flip=True), mirrored) and cache.encode_count == 2


def test_build_batches_per_bucket(vae, dataset, monkeypatch):
    shapes = []
    encode = vae.encode

    def spy(pixels):
        shapes.append(tuple(pixels.shape))
        return encode(pixels)

    monkeypatch.setattr(vae, "encode", spy)
    cache = _cache(vae, dataset, batch_size=2)
    assert cache.build(flips=(False, True)) == 8
    # 3 square images x 2 flips = 6 -> 3 batches of 2; 1 wide x 2 flips -> 1 batch of 2
    assert sorted(shapes) == sorted([(2, 3, 64, 64)] * 3 + [(2, 3, 32, 96)])
    batch = dataset.batches(0, 2)[0]
    assert cache.get_batch(batch).shape[0] == len(batch.samples) and cache.encode_count == 8


def test_build_defaults_to_both_mirror_images_when_the_dataset_flips(vae, dataset):
    flipping = ImageDataset(DatasetOptions(dataset.options.folder, SMALL, flip=True), dataset.items, dataset.report)
    assert _cache(vae, flipping).build() == 8
    assert _cache(vae, dataset).build() == 4


def test_disk_only_cache_reads_back_from_disk(vae, dataset, tmp_path):
    cache = LatentCache(vae, dataset, "tiny", folder=tmp_path, keep_in_memory=False)
    item = dataset.items[0]
    first = cache.get(item)
    assert torch.equal(cache.get(item), first) and cache.encode_count == 1
    (tmp_path / f"{cache.key(item)}.safetensors").unlink()
    cache.get(item)
    assert cache.encode_count == 2  # nothing was held in memory


def test_random_crops_are_encoded_but_not_stored(vae, tmp_path):
    Image.new("RGB", (100, 32), (40, 80, 120)).save(tmp_path / "wide.png")  # 96x32 bucket with spare width
    (tmp_path / "wide.txt").write_text("x", encoding="utf-8")
    dataset = ImageDataset.scan(DatasetOptions(folder=tmp_path, buckets=SMALL, random_crop=True, default_repeats=3))
    cache = _cache(vae, dataset, tmp_path / "latents")
    assert cache.build() == 1  # the centred crop
    batch = dataset.batches(0, 3)[0]
    latents = cache.get_batch(batch)
    assert latents.shape == (3, 4, 16, 48) and cache.encode_count == 1 + 3
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 1


def test_key_changes_with_what_changes_the_latent(vae, dataset):
    cache = _cache(vae, dataset)
    item = dataset.items[0]
    other_vae = LatentCache(vae, dataset, vae_identity(vae, "another-model"))
    assert len({cache.key(item), cache.key(item, flip=True), other_vae.key(item), cache.key(dataset.items[1])}) == 4
    assert vae_identity(vae, "x") != vae_identity(tiny_vae(scaling_factor=0.18215), "x")


def test_damaged_cache_file_is_re_encoded(vae, dataset, tmp_path):
    cache_dir = tmp_path / "latents"
    _cache(vae, dataset, cache_dir).build()
    item = dataset.items[0]
    damaged = cache_dir / f"{_cache(vae, dataset, cache_dir).key(item)}.safetensors"
    damaged.write_bytes(b"half a file")
    fresh = _cache(vae, dataset, cache_dir)
    assert fresh.build() == 1 and fresh.encode_count == 1


class CountingEncoder:
    """Stands in for CLIP: each caption becomes a row derived from its length."""

    def __init__(self, structure="tuple"):
        self.calls, self.structure = [], structure

    def __call__(self, captions):
        self.calls.append(list(captions))
        hidden = torch.stack([torch.full((3, 2), float(len(c))) for c in captions])
        pooled = hidden[:, 0, :] + 1
        if self.structure == "tensor":
            return hidden
        if self.structure == "model_output":
            return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
        return hidden, pooled, None


def test_each_unique_caption_is_encoded_once():
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder)
    hidden, pooled, nothing = cache(["a", "bb", "a"])
    assert encoder.calls == [["a", "bb"]]
    assert hidden.shape == (3, 3, 2) and hidden[:, 0, 0].tolist() == [1.0, 2.0, 1.0]
    assert pooled[:, 0].tolist() == [2.0, 3.0, 2.0] and nothing is None
    cache(["bb", "a"])
    cache(["ccc", "a"])
    assert encoder.calls == [["a", "bb"], ["ccc"]]
    assert cache.encoded_captions == 3


@pytest.mark.parametrize("structure", ["tensor", "model_output"])
def test_output_structure_is_preserved(structure):
    cache = TextEmbeddingCache(CountingEncoder(structure))
    output = cache(["x", "yy"])
    expected = CountingEncoder(structure)(["x", "yy"])
    if structure == "tensor":
        assert torch.equal(output, expected)
    else:  # a ModelOutput comes back as a dict, indexed by the same keys
        assert torch.equal(output["last_hidden_state"], expected["last_hidden_state"])
        assert torch.equal(output["pooler_output"], expected["pooler_output"])


def test_disk_cache_survives_a_new_object_and_respects_encoder_identity(tmp_path):
    first = CountingEncoder()
    TextEmbeddingCache(first, "clip-a", tmp_path)(["a", "bb"])
    again = CountingEncoder()
    hidden, pooled, nothing = TextEmbeddingCache(again, "clip-a", tmp_path)(["bb", "a"])
    assert again.calls == [] and hidden[:, 0, 0].tolist() == [2.0, 1.0] and nothing is None
    other = CountingEncoder()
    TextEmbeddingCache(other, "clip-b", tmp_path)(["a"])
    assert other.calls == [["a"]]


@pytest.mark.parametrize(
    "options, train_text_encoder, allowed",
    [
        (CaptionOptions(), False, True),
        (CaptionOptions(keep_tokens=2), False, True),
        (CaptionOptions(), True, False),
        (CaptionOptions(shuffle_tags=True), False, False),
        (CaptionOptions(caption_dropout=0.1), False, False),
    ],
)
def test_text_cache_allowed(options, train_text_encoder, allowed):
    assert text_cache_allowed(options, train_text_encoder) is allowed


def test_two_processes_each_encode_half_and_swap_entries(vae, dataset):
    items = dataset.items
    first, second = _cache(vae, dataset), _cache(vae, dataset)
    assert first.build(items[0::2]) == 2 and second.build(items[1::2]) == 2
    first.add(second.entries(items[1::2]))
    second.add(first.entries(items[0::2]))
    assert first.build() == 0 and second.build() == 0  # nothing left to encode in either
    assert first.encode_count == second.encode_count == 2
    for item in items:
        assert torch.equal(first.get(item), second.get(item))
    assert first.entries(items[1::2]).keys() == second.entries(items[1::2]).keys()


def test_text_cache_build_encodes_missing_captions_in_fixed_chunks_and_shares_entries():
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder)
    assert cache.build(["a", "bb", "a", "ccc"], batch_size=2) == 3
    assert encoder.calls == [["a", "bb"], ["ccc"]]
    other = TextEmbeddingCache(CountingEncoder())
    other.add(cache.entries(["bb", "ccc", "never-encoded"]))
    assert other.build(["bb", "ccc"]) == 0 and other.encoded_captions == 0
    assert torch.equal(other(["ccc"])[0], cache(["ccc"])[0])
