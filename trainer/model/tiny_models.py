"""The built-in tiny models ("demo:shapes", "demo:sd1", "demo:sd2", "demo:sdxl") and the offline CLIP tokenizer.

demo:shapes is an SD1-architecture model pretrained by bench/pretrain_demo.py to draw plain scenes of
shapes (docs/DEMO_MODEL.md); its fp16 weights ship under assets/demo_shapes, without a tokenizer, which
is added when the folder is copied into the cache. It is what the demo preset trains on, so a user sees
a LoRA learn a style.

Each of the other three has random weights but the real family's architecture: the same block types, conv vs
linear projections, prediction type, text encoders, SDXL's text_time conditioning and a VAE with a scale
factor of 8. So every module kind LoRA/LoCon adapts exists, every key name matches the real model's, and
a 64 px image gives an 8x8 latent, small enough to train in seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from networks.atomic import atomic_folder
from networks.errors import SdloraError
from networks.spec import FAMILIES
from trainer.config import DEMO_MODELS

ASSETS = Path(__file__).parents[1] / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
SHAPES_DIR = ASSETS / "demo_shapes"
DEMO_NAMES = tuple(name.removeprefix("demo:") for name in DEMO_MODELS)
# OpenCLIP (SD2's encoder, SDXL's second encoder) pads with "!" (id 0) where OpenAI CLIP pads with EOS.
OPENCLIP_PAD = "!"

# The real SD schedule; every SD1/SD2/SDXL checkpoint was trained with it.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the shipped vocabulary; pad_token="!" gives the OpenCLIP variant."""
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=pad_token)


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise SdloraError(f"Unknown model family {family!r}; use one of {', '.join(FAMILIES)}.")
    return family


def _unet_config(family: str) -> dict:
    common = dict(
        sample_size=8,  # 64 px / VAE factor 8
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
    )
    if family == "sd1":
        # SD1: attention in every block but the last, 1x1 conv proj_in/proj_out.
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            use_linear_projection=False,
        )
    if family == "sd2":
        # SD2: as SD1 but Linear projections and per-block head counts (a tuple), OpenCLIP context.
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    # SDXL: no attention in the first block, deeper transformers later, text_time added conditioning.
    te2 = _text_encoder_configs("sdxl")[1]
    time_dim = 8
    return dict(
        common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + te2["hidden_size"],  # TE1 and TE2 hidden states concatenated
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled TE2 embedding + 6 micro-conditioning numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=te2["projection_dim"] + 6 * time_dim,
    )


def _vae_config(family: str) -> dict:
    # Four levels like the real VAE (scale factor 2**3 = 8), with few channels so it stays tiny.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def _clip_config(hidden_size: int, act: str, **extra) -> dict:
    # vocab_size must be the real 49,408: the shipped tokenizer emits ids up to 49,407.
    return dict(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        **extra,
    )


def _text_encoder_configs(family: str) -> list[dict]:
    if family == "sd1":
        return [_clip_config(32, "quick_gelu", pad_token_id=1)]  # OpenAI CLIP ViT-L
    if family == "sd2":
        return [_clip_config(32, "gelu", pad_token_id=0, projection_dim=32)]  # OpenCLIP ViT-H
    return [
        _clip_config(32, "quick_gelu", pad_token_id=1),  # CLIP ViT-L
        _clip_config(64, "gelu", pad_token_id=0, projection_dim=40),  # OpenCLIP ViT-bigG, with projection
    ]


def _scheduler(family: str):
    """The scheduler each real model ships with (its config is also what training reads)."""
    if family == "sd1":
        return PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if family == "sd2":  # SD2.x 768-v
        return DDIMScheduler(
            **_SD_SCHEDULE,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    return EulerDiscreteScheduler(
        **_SD_SCHEDULE, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon"
    )


def build_tiny_pipeline_components(family: str, seed: int = 0) -> dict:
    """The pipeline's components (the kwargs of its constructor), with random weights fixed by seed."""
    _check_family(family)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(family))
    vae = AutoencoderKL(**_vae_config(family))
    te_configs = [CLIPTextConfig(**c) for c in _text_encoder_configs(family)]
    components = dict(unet=unet, vae=vae, scheduler=_scheduler(family))
    if family == "sdxl":
        components.update(
            text_encoder=CLIPTextModel(te_configs[0]),
            text_encoder_2=CLIPTextModelWithProjection(te_configs[1]),
            tokenizer=load_clip_tokenizer(),
            tokenizer_2=load_clip_tokenizer(OPENCLIP_PAD),
        )
        return components
    pad = OPENCLIP_PAD if family == "sd2" else "<|endoftext|>"
    components.update(text_encoder=CLIPTextModel(te_configs[0]), tokenizer=load_clip_tokenizer(pad))
    return components


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    components = build_tiny_pipeline_components(family, seed)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**components)
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_demo_model(directory: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Write a built-in model ("shapes" or a family's random tiny one) as a diffusers folder that
    DiffusionPipeline.from_pretrained opens."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SdloraError(
            f"The folder {directory} is not empty; choose a new or empty folder for the demo model."
        )
    if family == "shapes":
        _copy_shapes_model(directory)
    else:
        build_tiny_pipeline(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory


def _copy_shapes_model(directory: Path) -> None:
    """The shipped demo:shapes weights plus the shipped tokenizer, as a complete diffusers folder."""
    if not (SHAPES_DIR / "model_index.json").is_file():
        raise SdloraError(f"The demo:shapes weights are missing from {SHAPES_DIR}; reinstall sdlora or "
                          "remake them with python -m bench.pretrain_demo.")
    shutil.copytree(SHAPES_DIR, directory, dirs_exist_ok=True)
    _open_in_fp32(directory / "text_encoder" / "config.json")
    load_clip_tokenizer().save_pretrained(directory / "tokenizer")
    index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _open_in_fp32(config_file: Path) -> None:
    """The weights ship in fp16 to stay small. diffusers loads the UNet and VAE in fp32 unless told otherwise,
    but transformers 5 loads the text encoder in the config's `dtype`, so a plain
    `DiffusionPipeline.from_pretrained(folder)` would mix fp16 and fp32 and fail at the first prompt. Naming
    fp32 here makes every part open in one dtype."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def cache_root() -> Path:
    """Where sdlora keeps rebuildable files (demo models, latent caches): $SDLORA_CACHE or ~/.cache/sdlora."""
    return Path(os.environ.get("SDLORA_CACHE") or Path.home() / ".cache" / "sdlora")


def _demo_fingerprint(name: str) -> str:
    """Changes whenever the tiny architecture (or the shipped demo:shapes files) does, so a stale cached
    folder is never reused."""
    if name == "shapes":
        digest = hashlib.sha256(b"text encoder in fp32")  # how the copy is made, so older copies are remade
        for path in sorted(p for p in SHAPES_DIR.rglob("*") if p.is_file()):
            digest.update(path.relative_to(SHAPES_DIR).as_posix().encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()[:12]
    configs = [
        _unet_config(name),
        _vae_config(name),
        _text_encoder_configs(name),
        # diffusers' private keys (e.g. _use_default_values, built from a set) vary between processes
        {k: v for k, v in _scheduler(name).config.items() if not k.startswith("_")},
    ]
    text = json.dumps(configs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_complete(folder: Path) -> None:
    """Every model part has its weights: a partial folder must never become the cached demo model."""
    for part in ("unet", "vae", "text_encoder"):
        if not list((folder / part).glob("*.safetensors")):
            raise SdloraError(f"Building the demo model wrote no weights to {folder / part}; check the disk "
                              "and run again.")


def demo_model_path(name: str) -> Path:
    """The demo model's folder in the cache, built on first use (atomically, so concurrent runs are safe)."""
    if name not in DEMO_NAMES:
        raise SdloraError(f"Unknown demo model demo:{name}; use one of "
                          f"{', '.join('demo:' + n for n in DEMO_NAMES)}.")
    target = cache_root() / "demo-models" / f"{name}-{_demo_fingerprint(name)}"

    def build(staging: Path) -> None:
        save_demo_model(staging, name)
        _check_complete(staging)

    return build_folder_once(target, build)


def build_folder_once(target: Path, build) -> Path:
    """Run build(staging) in a temp folder beside `target`, then rename it into place; reuse `target` when
    it exists. Parallel processes may race: the first rename wins and the others use its copy."""
    if (target / "model_index.json").is_file():
        return target
    try:
        atomic_folder(target, build)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    return target
