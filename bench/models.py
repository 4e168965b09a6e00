"""The benchmark's models and data: an SD1-shaped scaled UNet saved as a diffusers folder, the tiny SDXL,
the full SD1.5/SDXL configs for GPU mode, and FLOP counts (on the meta device, so nothing is allocated).

The bench SD1 model keeps SD1.5's layout exactly (4 down blocks, CrossAttn x3 + Down, layers_per_block 2,
attention_head_dim 8, cross-attention 768, 1x1 conv proj_in/out, quick_gelu CLIP) with block_out_channels
scaled from (320, 640, 1280, 1280) to (32, 64, 128, 128). The VAE keeps SD1.5's layout with channels
(128, 256, 512, 512) scaled to (14, 28, 56, 56): at 128 px one VAE encode then costs 0.63x a UNet LoRA
step in FLOPs, as it does for SD1.5 at 512 px (0.65x), so the latent cache sdlora relies on is neither
flattered nor penalised. The text encoder must output 768-d states (the cross-attention width),
so it is CLIP with hidden size 768 and no transformer layer (token + position embedding and the final
norm): SD1.5's text encoder is 0.5% of a no-cache step's FLOPs at 512 px, and even one 768-wide layer
would be 14% here, which would flatter the text cache; with none it is ~0%, which slightly understates
it (see `flop_table` and docs/PERFORMANCE.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from trainer.model.tiny_models import build_folder_once

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONFIGS = REPO_ROOT / "trainer" / "assets" / "configs"
SD1_BENCH_CHANNELS = (32, 64, 128, 128)
SD1_BENCH_VAE_CHANNELS = (14, 28, 56, 56)
SD1_BENCH_TEXT_ENCODER = dict(hidden_size=768, num_hidden_layers=0, num_attention_heads=12, intermediate_size=3072)
# The scaled SD1 bench model, the tiny SDXL, the tiny SD1 (tests), and the full-size SD1.5 and SDXL
# architectures with random weights (GPU mode; sd15 also on CPU at a small resolution, for memory).
MODELS = ("sd1", "sdxl", "tiny", "sd15", "sdxl-base")


def work_dir() -> Path:
    """Where models, data and runs are built (ignored by git); SDLORA_BENCH_WORK moves it."""
    path = Path(os.environ.get("SDLORA_BENCH_WORK") or BENCH_DIR / ".work")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def sd15_config(part: str) -> dict:
    """The shipped SD1.5 config of `part` (unet, vae, text_encoder, scheduler)."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return _load_json(CONFIGS / "sd15" / part / name)


def sdxl_config(part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return _load_json(CONFIGS / "sdxl-base" / part / name)


def sd1_bench_unet_config(channels=SD1_BENCH_CHANNELS) -> dict:
    config = sd15_config("unet")
    config.update(block_out_channels=list(channels), sample_size=16)
    return config


def sd1_bench_vae_config(channels=SD1_BENCH_VAE_CHANNELS) -> dict:
    config = sd15_config("vae")
    config.update(block_out_channels=list(channels), norm_num_groups=min(32, channels[0]), sample_size=128)
    return config


def sd1_bench_text_encoder_config() -> dict:
    # Token ids as the shipped tokenizer emits them (bos 49406, eos = pad 49407), like the tiny models.
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1, **SD1_BENCH_TEXT_ENCODER)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_sd1_bench_pipeline(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.model.tiny_models import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd1_bench_unet_config())
    vae = AutoencoderKL(**sd1_bench_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**sd1_bench_text_encoder_config()))
    scheduler = PNDMScheduler.from_config(sd15_config("scheduler"))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def model_path(model: str) -> Path:
    """The diffusers folder of a bench model: sd1 (scaled SD1.5), sdxl (tiny SDXL) or tiny (tiny SD1)."""
    if model == "sd1":
        key = _fingerprint(sd1_bench_unet_config(), sd1_bench_vae_config(), sd1_bench_text_encoder_config())
        return build_folder_once(work_dir() / "models" / f"sd1-bench-{key}",
                           lambda d: build_sd1_bench_pipeline().save_pretrained(d, safe_serialization=True))
    if model in ("sdxl", "tiny"):
        from trainer.model.tiny_models import demo_model_path

        return demo_model_path("sdxl" if model == "sdxl" else "sd1")
    if model in ("sd15", "sdxl-base"):
        return build_folder_once(work_dir() / "models" / f"{model}-full-random", lambda d: save_full_size_model(d, model))
    raise ValueError(f"unknown bench model {model!r}; use one of {', '.join(MODELS)}")


def save_full_size_model(folder: Path, model: str) -> None:
    """The real SD1.5 / SDXL-base architecture from the shipped configs, random weights, fp16 files."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.model.tiny_models import OPENCLIP_PAD, load_clip_tokenizer

    config = sd15_config if model == "sd15" else sdxl_config
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster on a GPU
        parts = dict(unet=UNet2DConditionModel.from_config(config("unet")).half().cpu(),
                     vae=AutoencoderKL.from_config(config("vae")).half().cpu(),
                     text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))).half().cpu(),
                     tokenizer=load_clip_tokenizer())
        if model == "sdxl-base":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2")))
            parts.update(text_encoder_2=te2.half().cpu(), tokenizer_2=load_clip_tokenizer(OPENCLIP_PAD))
    if model == "sdxl-base":
        pipeline = StableDiffusionXLPipeline(scheduler=EulerDiscreteScheduler.from_config(config("scheduler")), **parts)
    else:
        pipeline = StableDiffusionPipeline(scheduler=PNDMScheduler.from_config(config("scheduler")), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False, **parts)
    pipeline.save_pretrained(folder, safe_serialization=True)


def dataset_path(count: int = 40) -> Path:
    """`count` generated demo images with captions (trainer.demo.demo_data), built once."""
    from trainer.demo.demo_data import make_demo_dataset

    folder = work_dir() / f"data{count}"
    if len(list(folder.glob("*.png"))) == count:
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f".data{count}-", dir=work_dir()))
    try:
        make_demo_dataset(staging, count=count, seed=0)
        if not folder.exists():
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- FLOPs --------------------------------------------------------------------------------------


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def unet_step_flops(unet_config: dict, resolution: int, batch: int = 1, text_tokens: int = 77,
                    added_cond: bool = False) -> dict:
    """FLOPs of one LoRA training step of a UNet (forward, and backward to the input through frozen
    weights, which is what LoRA training needs besides the adapters' own tiny weight gradients),
    counted on the meta device. Returns {"forward", "step"} in FLOPs for the whole batch."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
        side = resolution // 8
        sample = torch.randn(batch, unet_config.get("in_channels", 4), side, side, requires_grad=True)
        context = torch.randn(batch, text_tokens, unet_config["cross_attention_dim"])
        timesteps = torch.full((batch,), 500)
        kwargs = {}
        if added_cond:
            time_dim = unet_config["addition_time_embed_dim"]
            pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * time_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled),
                                           "time_ids": torch.randn(batch, 6)}
        forward = count_flops(lambda: unet(sample, timesteps, context, **kwargs))
        step = count_flops(lambda: unet(sample, timesteps, context, **kwargs).sample.sum().backward())
    return {"forward": forward, "step": step}


def vae_encode_flops(vae_config: dict, resolution: int, batch: int = 1) -> int:
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
        pixels = torch.randn(batch, 3, resolution, resolution)
        return count_flops(lambda: vae.encode(pixels))


def text_encoder_flops(te_config: dict, batch: int = 1) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        encoder = CLIPTextModel(CLIPTextConfig(**te_config))
        ids = torch.zeros(batch, 77, dtype=torch.long)
        return count_flops(lambda: encoder(ids))


def flop_table(resolution: int, sd15_resolution: int = 512) -> dict:
    """Per-image FLOPs of the recipe's per-step parts for the bench SD1 model and for real SD1.5.

    Shows how much of a no-cache step the VAE encode and text encoder are, on both models."""
    rows = {}
    for name, unet, vae, te, res in (
        ("bench_sd1", sd1_bench_unet_config(), sd1_bench_vae_config(), sd1_bench_text_encoder_config(), resolution),
        ("sd15", sd15_config("unet"), sd15_config("vae"), sd15_config("text_encoder"), sd15_resolution),
    ):
        unet_flops = unet_step_flops(unet, res)
        vae_flops, te_flops = vae_encode_flops(vae, res), text_encoder_flops(te)
        total = unet_flops["step"] + vae_flops + te_flops
        rows[name] = {"resolution": res, "unet_forward": unet_flops["forward"], "unet_step": unet_flops["step"],
                      "vae_encode": vae_flops, "text_encoder": te_flops,
                      "vae_share": vae_flops / total, "text_encoder_share": te_flops / total}
    return rows
