"""The memory model (trainer/memory): a traced step equals a hand count of its tensors, and the savers lower
the predicted peak by the part they should."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.check_command import add_check_subcommand
from tests.test_caches import SMALL, _draw, tiny_vae
from trainer.caches.latent_cache import LatentCache, vae_identity
from trainer.config import TrainConfig
from trainer.config.overrides import apply_overrides
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.demo.demo_data import make_demo_dataset
from trainer.memory import GIB, cache_encode_batch, fixed_bytes, meta_outputs, predict_memory
from trainer.memory import _traced as traced
from trainer.memory.tracer import trace_step

F32 = 4


def test_trace_of_a_tiny_model_equals_a_hand_count_of_its_tensors():
    frozen, trained = nn.Linear(4, 8, device="meta"), nn.Linear(8, 2, device="meta")
    frozen.requires_grad_(False)
    x = torch.zeros(3, 4, device="meta")

    def loss():
        return trained(torch.relu(frozen(x))).square().mean()

    params = list(trained.parameters())
    step = trace_step(list(frozen.parameters()), params, loss,
                      lambda: torch.optim.AdamW(params, foreach=False), max_grad_norm=1.0)
    assert step.frozen_weights == (4 * 8 + 8) * F32  # 160
    weights = (8 * 2 + 2) * F32  # 72
    # weights, gradients and AdamW's two fp32 moments per parameter (the 8 bytes the pre-flight counts for
    # SDXL's adapters); its step counters stay on the host (capturable=False) and are not counted.
    assert step.trainable == weights + weights + 2 * weights
    # Kept for backward: relu's output (3 x 8, read by relu's and the second layer's backward), the second
    # layer's output (3 x 2, read by square's backward) and the loss scalar; the first layer's output and
    # the square die in the forward (nothing frozen needs them).
    assert step.activations == (3 * 8 + 3 * 2 + 1) * F32
    assert step.peak >= step.frozen_weights + step.trainable + step.activations
    # FLOPs: both forward matmuls, and the trained layer's weight gradient (nothing below it needs one).
    assert step.flops == 2 * 3 * 4 * 8 + 2 * 3 * 8 * 2 + 2 * 3 * 8 * 2


def _config(*overrides) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["dataset.path=/nonexistent", *overrides])


def test_gradient_checkpointing_lowers_the_activations_part():
    plain = predict_memory(_config("model.path=demo:sd1", "dataset.resolution=256"))
    checkpointed = predict_memory(_config("model.path=demo:sd1", "dataset.resolution=256",
                                          "train.gradient_checkpointing=true"))
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 2
    assert checkpointed.parts["frozen_weights"] == plain.parts["frozen_weights"]
    assert checkpointed.parts["trainable"] == plain.parts["trainable"]


def test_fp8_base_stores_the_frozen_linear_and_conv_weights_in_one_byte():
    from trainer.memory import _model_configs
    from trainer.memory.meta_model import build_meta_model

    base = ("model.path=demo:sd1", "dataset.resolution=256", "train.mixed_precision=bf16")
    half, fp8 = predict_memory(_config(*base)), predict_memory(_config(*base, "model.fp8_base=true"))
    cfg = _config(*base)
    model = build_meta_model(*_model_configs(cfg), cfg)
    stored = sum(m.weight.numel() for m in model.unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    # The text encoders are not resident (their states are cached), so the UNet's Linear/Conv weights go
    # from 2 bytes to 1: frozen_weights drops by one byte per such weight.
    assert half.parts["frozen_weights"] - fp8.parts["frozen_weights"] == stored


def _sdxl_check(tmp_path, capsys, *sets: str) -> dict:
    # A two-tensor file whose keys say SDXL is enough: the pre-flight reads only a .safetensors header
    # (trainer/model/facts.py safetensors_keys -> detect_checkpoint_family), takes the shipped sdxl-base
    # configs for a single file, and the memory trace builds the model from those configs on the meta device;
    # no weight is ever read (a real SDXL-shaped file of zeros would be 6.9 GB).
    model = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1, dtype=torch.float16),
               "model.diffusion_model.out.2.bias": torch.zeros(1, dtype=torch.float16)}, str(model))
    if not (tmp_path / "data").is_dir():
        make_demo_dataset(tmp_path / "data", count=1, seed=3)
    top = argparse.ArgumentParser()
    add_check_subcommand(top.add_subparsers())
    args = top.parse_args(["check", "--model", str(model), "--data", str(tmp_path / "data"), "--set",
                           "dataset.resolution=1024", "--set", "train.mixed_precision=bf16", "--json",
                           *[word for value in sets for word in ("--set", value)]])
    args.handler(args)
    return json.loads(capsys.readouterr().out)["estimate"]


def test_check_on_an_sdxl_single_file_prints_the_traced_peak_its_parts_and_the_cards(tmp_path, capsys):
    estimate = _sdxl_check(tmp_path, capsys)
    parts = estimate["parts"]
    assert estimate["family"] == "sdxl" and parts["frozen_weights"] == 2_567_463_684 * 2  # the bf16 UNet alone
    # r16 LoRA on SDXL's attention (23.2 M parameters): fp32 weights, gradients and AdamW's two moments.
    assert parts["trainable"] == 680_923_040 and 8.2 * GIB < parts["activations"] < 8.4 * GIB
    assert set(parts) == {"frozen_weights", "trainable", "activations", "largest_temporary", "fixed"}
    assert estimate["peak_bytes"] == sum(parts.values()) and 15.4 * GIB < estimate["peak_bytes"] < 15.6 * GIB
    assert estimate["fits_gb"] == [16, 24] and estimate["cache_encode_batch"] == 1  # a one-image dataset


@pytest.mark.skipif(not os.environ.get("SDLORA_SLOW_TESTS"), reason="traces SDXL at 1024 px three times: "
                    "about 25 s of CPU; set SDLORA_SLOW_TESTS=1")
def test_check_on_an_sdxl_single_file_lists_the_changes_under_8_gb(tmp_path, capsys):
    estimate = _sdxl_check(tmp_path, capsys, "train.memory_budget_gb=8")
    changes = estimate["changes_to_fit"]
    assert [(c["overrides"], round(c["peak_bytes"] / GIB, 1)) for c in changes] == [
        ({"train.gradient_checkpointing": True}, 7.2)]  # the UNet waits off the card while the cache fills
    assert estimate["budget_bytes"] == 8 * GIB and changes[-1]["peak_bytes"] <= 8 * GIB < estimate["peak_bytes"]


def test_remembered_meta_outputs_change_no_byte_of_the_trace(monkeypatch):
    cfg = _config("model.path=demo:sd1", "dataset.resolution=128", "train.gradient_checkpointing=true")
    remembered = predict_memory(cfg)  # a second trace of the same shapes runs on remembered outputs
    traced.__globals__["_TRACES"].clear()
    again = predict_memory(cfg)
    traced.__globals__["_TRACES"].clear()
    monkeypatch.setattr(meta_outputs, "_CACHE", {})
    monkeypatch.setattr(meta_outputs, "CACHE_LIMIT", 0)  # every op through its meta kernel
    assert again == remembered == predict_memory(cfg)


def test_a_half_precision_trace_makes_autocasts_casts():
    # The adapters' fp32 inputs are cast to bf16 for their matmuls (kept for backward in bf16, not fp32), and
    # CUDA autocast computes the norms in fp32 where CPU autocast keeps bf16: bench.memory's sd15-256-bf16 row
    # measured 333 MiB above the loaded model on a CPU step against 332 traced with the CPU's casts.
    cfg = _config("model.path=demo:sd1", "dataset.resolution=256", "train.mixed_precision=bf16")
    plain = traced(cfg, "cpu")[0]
    cuda = traced(cfg, "cuda")[0]
    assert cuda.activations > plain.activations  # the fp32 norm outputs
    assert plain.frozen_weights == cuda.frozen_weights and plain.trainable == cuda.trainable


def test_a_tight_budget_fills_the_latent_cache_one_image_at_a_time():
    cfg = _config("model.path=demo:sd1", "dataset.resolution=256")
    fills = traced(cfg)[1]
    assert fills[4] > fills[2] > fills[1]
    one_image = fills[1] + fixed_bytes(fills[1])  # a budget that filling the cache fits one image at a time only
    roomy, tight = predict_memory(cfg, 4), predict_memory(cfg, 4, budget_bytes=one_image)
    assert cache_encode_batch(cfg, None, 4) == 4 and cache_encode_batch(cfg, one_image, 4) == 1
    assert cache_encode_batch(cfg, fills[2] + fixed_bytes(fills[2]), 4) == 2
    # The cache fill's figure is the one-image encode's: the VAE's activations for 4 images less those of 1.
    assert roomy.cache_fill_bytes - tight.cache_fill_bytes > fills[4] - fills[1] > 0
    assert cache_encode_batch(cfg, 64 * GIB, 3) == 3  # a bucket of 3 images: all at once when they fit


@pytest.fixture
def four_images(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index, size in enumerate([(64, 64), (60, 55), (50, 50), (70, 64)]):
        _draw(folder / f"img{index}.png", size, index)
    return ImageDataset.scan(DatasetOptions(folder=folder, buckets=SMALL))


def test_latents_encoded_one_at_a_time_equal_the_batch_of_four(four_images):
    vae = tiny_vae(scaling_factor=0.5)
    batched = LatentCache(vae, four_images, vae_identity(vae, "tiny"), batch_size=4)
    single = LatentCache(vae, four_images, vae_identity(vae, "tiny"), batch_size=1)
    assert batched.build() == single.build() == 4
    for item in four_images.items:
        torch.testing.assert_close(single.get(item), batched.get(item), rtol=1e-4, atol=1e-5)


def test_an_out_of_memory_encode_halves_the_batch_and_keeps_the_latents(four_images):
    vae = tiny_vae(scaling_factor=0.5)
    expected = LatentCache(vae, four_images, vae_identity(vae, "tiny"), batch_size=1)
    expected.build()
    encode, batches = vae.encode, []

    def full_card(pixels):  # a card with room for one image per encode
        batches.append(len(pixels))
        if len(pixels) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return encode(pixels)

    vae.encode = full_card
    cache = LatentCache(vae, four_images, vae_identity(vae, "tiny"), batch_size=4)
    assert cache.build() == 4 and cache.batch_size == 1
    largest = max(len(group) for group in _buckets(four_images).values())
    assert batches[:2] == [min(4, largest), min(2, largest)] and batches.count(1) == 4
    for item in four_images.items:
        torch.testing.assert_close(cache.get(item), expected.get(item), rtol=1e-4, atol=1e-5)


def _buckets(dataset) -> dict:
    groups: dict = {}
    for item in dataset.items:
        groups.setdefault(item.bucket, []).append(item)
    return groups


def test_the_bench_measures_the_allocators_tensor_bytes_without_the_tracer():
    from bench.memory import allocator_peak

    mib = 2 ** 20
    with allocator_peak() as measured:
        first = torch.empty(mib // 4)  # 1 MiB of fp32
        second = torch.empty(mib // 2)  # 2 MiB
        del first
        third = torch.empty(mib // 8)  # 0.5 MiB, after the first is freed: the peak stays at 3 MiB
        del second, third
    assert measured["peak"] == 3 * mib


def test_the_bench_rows_set_what_their_names_say(tmp_path):
    from bench.memory import GPU_ROWS, ROWS, row_config, table_line

    for name, row in {**ROWS, **GPU_ROWS}.items():
        cfg = row_config(row, tmp_path)
        assert cfg.dataset.resolution == int(name.split("-")[1])
        assert cfg.train.gradient_checkpointing == ("-gc" in name)
        assert cfg.model.fp8_base == name.endswith("fp8")
        assert cfg.train.mixed_precision == ("bf16" if "bf16" in name else "no")
    gpu_row = {"row": "sdxl-1024-bf16-gc", "predicted_bytes": 2 ** 30, "measured_bytes": 2 ** 30, "ratio": 1.0,
               "predicted_allocated": 3 * 2 ** 30, "max_allocated": 3 * 2 ** 30, "allocated_ratio": 1.0,
               "predicted_reserved": 4 * 2 ** 30, "max_reserved": 2 ** 32,
               "reserved_ratio": 1.0}
    assert table_line(gpu_row).split() == ["sdxl-1024-bf16-gc", "1024", "1024", "1.00", "3072", "3072", "1.00",
                                           "4096", "4096", "1.00"]


def test_the_unet_waits_off_the_card_while_the_latent_cache_fills():
    from trainer.memory import _model_configs
    from trainer.memory.meta_model import build_meta_model
    from trainer.memory.run_trace import trace_cache_fill
    from trainer.run.build import _place

    cfg = _config("model.path=demo:sd1", "dataset.resolution=256")
    model = build_meta_model(*_model_configs(cfg), cfg)
    unet_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    # Random crops are encoded when drawn, with the UNet on the card; a cache filled at setup runs without it.
    drawn = trace_cache_fill(_config("model.path=demo:sd1", "dataset.resolution=256", "dataset.random_crop=true"),
                             model, 256)
    assert drawn - trace_cache_fill(cfg, model, 256) == unet_bytes > 0
    # build_run's placement: the UNet stays on the CPU until the cache is filled, the VAE goes to the device.
    unet, vae = nn.Linear(2, 2), nn.Linear(2, 2)
    _place(cfg, torch.device("meta"), torch.float32, "unet", unet)
    _place(cfg, torch.device("meta"), torch.float32, "vae", vae)
    assert unet.weight.device.type == "cpu" and vae.weight.device.type == "meta"
    uncached = _config("model.path=demo:sd1", "dataset.cache_latents=none")
    _place(uncached, torch.device("meta"), torch.float32, "unet", unet)
    assert unet.weight.device.type == "meta"
