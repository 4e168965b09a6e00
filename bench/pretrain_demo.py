"""Pretrain demo:shapes, the tiny text-to-image model that draws, from nothing, on 2 CPU cores (~1 hour).

    python -m bench.pretrain_demo --work /tmp/demo-pretrain --output trainer/assets/demo_shapes

Three stages, each reproducible from --seed (same seed, same data, same initial weights):
1. the VAE (AutoencoderKL, scale factor 4) on 32 px crops of plain scenes with codec extras (outlines,
   shadows, dots in random colours), L1 + MSE, a small KL term; its scaling_factor is 1/std of the latents;
2. the UNet (SD1's block types, conv proj_in/out) and a small CLIP text encoder, together, on plain scenes
   only (trainer/plain_scenes.py), epsilon prediction on SD's scaled-linear schedule, min-SNR-5 weights,
   10% empty captions (for classifier-free guidance), an EMA of the weights that is what gets shipped;
   then --offset-steps more at a constant --offset-lr with offset noise (Guttenberg's --noise-offset):
   with SD's schedule the last step keeps 7% of the image, so a model trained without it takes its
   images' mean colour from the starting noise (pastel, whatever the prompt), and a LoRA cannot move it;
   then --v-steps more as a v-prediction model on a zero-terminal-SNR schedule (Lin et al. 2024, as SD2-v
   was fine-tuned from its epsilon base): the last timestep is pure noise, so every colour, background
   included, comes from the prompt (and a LoRA's style), which offset noise only approximates;
3. the VAE decoder alone, with the encoder frozen (the UNet's latents stay valid), to sharpen its images.

--work keeps a checkpoint every --save-every steps and a preview grid; a killed run picks up from the
last checkpoint. The result is written in fp16 as a diffusers folder (without the tokenizer, which ships
once in trainer/assets/clip_tokenizer). docs/DEMO_MODEL.md records the run that made the shipped model.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.demo.plain_scenes import make_illustration, make_plain_scene
from trainer.model.tiny_models import _scheduler, load_clip_tokenizer

SIZE = 64
PREVIEW_PROMPTS = [
    "a red circle", "a blue square on a white background", "a teal triangle", "a coral diamond",
    "a mustard square", "a plum circle", "a yellow circle and a green square", "a pink triangle on a black background",
]


def v_scheduler() -> DDIMScheduler:
    """The schedule of the v-prediction phase and of the shipped model: SD's betas rescaled to zero terminal
    SNR, sampled with trailing timesteps so the first step is the pure-noise one it was trained on."""
    return DDIMScheduler.from_config(_scheduler("sd1").config, prediction_type="v_prediction",
                                     rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                     clip_sample=False, set_alpha_to_one=False)


def vae_config(layers: int = 1) -> dict:
    # Three levels (scale factor 2**2 = 4): a 64 px image is a 16x16 latent, enough for thin outlines.
    # Several channels per norm group: with one, GroupNorm is InstanceNorm and flat colours lose their level.
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=layers,
        norm_num_groups=8, latent_channels=4, sample_size=SIZE,
    )


def text_encoder_config() -> CLIPTextConfig:
    # The real vocabulary (the shipped tokenizer emits ids up to 49,407); SD1's OpenAI-CLIP padding.
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", pad_token_id=1, bos_token_id=49406,
        eos_token_id=49407,
    )


def unet_config() -> dict:
    # SD1's layout at small width: cross-attention in all blocks but the deepest, 1x1 conv proj_in/out,
    # ResNet 3x3 convs, conv down/upsamplers, so every LoRA/LoCon key has its SD1 name.
    return dict(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96),
        layers_per_block=1, norm_num_groups=16, attention_head_dim=4, cross_attention_dim=48,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=False,
    )


def plain_scene_set(count: int, seed: int, codec_extras: bool) -> tuple[torch.Tensor, list[str]]:
    """`count` scenes as uint8 NCHW and their captions; scene i depends only on (seed, i)."""
    pixels, captions = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8), []
    for index in range(count):
        image, caption = make_plain_scene(SIZE, random.Random(f"{seed}-{codec_extras}-{index}"), codec_extras)
        pixels[index] = np.asarray(image)
        captions.append(caption)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, **state) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path, **parts) -> tuple[int, dict]:
    """save_checkpoint's counterpart: each part gets the state saved under its name; (step, state), or
    (0, {}) when there is no checkpoint yet."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, weights_only=False)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return state["step"], state


# --- stage 1: the VAE ----------------------------------------------------------------------------------


def train_vae(args, work: Path) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args.vae_layers))
    # Start the posterior nearly deterministic (log-variance -10, as SD's VAE ends up): with the default
    # log-variance 0, the decoder would learn from latents drowned in unit noise, slowly and blurrily.
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -10.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    checkpoint = work / "vae.pt"
    start, state = load_checkpoint(checkpoint, model=vae, optimizer=optimizer)
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    if args.export_only and not start:
        raise SystemExit(f"--export-only: no VAE checkpoint in {work}; run without it first.")
    args.reached["vae"] = start if args.export_only else args.vae_steps
    if start >= args.vae_steps or args.export_only:
        return vae
    pixels = codec_images(args)
    generator = torch.Generator().manual_seed(args.seed + 2 + start)
    began = time.time()
    for step in range(start, args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        batch = _random_crops(pixels, args.vae_batch, 32, generator)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / batch[0].numel()
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0:
            _log(work, "vae", step + 1, args.vae_steps, loss.item(), began, start)
        if (step + 1) % args.save_every == 0 or step + 1 == args.vae_steps:
            save_checkpoint(checkpoint, model=vae.state_dict(), optimizer=optimizer.state_dict(),
                            rng=torch.get_rng_state(), step=step + 1)
    return vae


def codec_images(args) -> torch.Tensor:
    """The VAE's images: plain scenes with codec extras, of which an --illustrations share is replaced by
    illustrations in random colours (thin outlines, offset shadows, faint dots; make_illustration)."""
    pixels, _ = plain_scene_set(args.vae_images, args.seed + 1, codec_extras=True)
    drawn = round(args.illustrations * args.vae_images)
    for index in range(drawn):
        image = make_illustration(SIZE, random.Random(f"{args.seed}-illustration-{index}"))
        pixels[index] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return pixels


def _random_crops(pixels: torch.Tensor, count: int, crop: int, generator) -> torch.Tensor:
    picks = torch.randint(0, len(pixels), (count,), generator=generator)
    offsets = torch.randint(0, SIZE - crop + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    crops = []
    for index, (y, x), flip in zip(picks.tolist(), offsets.tolist(), flips.tolist()):
        piece = pixels[index, :, y:y + crop, x:x + crop]
        crops.append(piece.flip(-1) if flip else piece)
    return to_unit(torch.stack(crops))


def finetune_decoder(args, work: Path, vae: AutoencoderKL) -> None:
    """Stage 3: the decoder alone, longer, with the encoder (so the latents the UNet learned) frozen, as
    SD's ft-MSE VAE was made; it sharpens what the UNet's latents decode to without retraining the UNet."""
    decoder = [vae.decoder, vae.post_quant_conv]
    parameters = [p for module in decoder for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.vae_lr / 2, weight_decay=0.0)
    checkpoint = work / "decoder.pt"
    start, _ = load_checkpoint(checkpoint, model=vae, optimizer=optimizer)
    args.reached["decoder"] = start if args.export_only else args.decoder_steps
    if start < args.decoder_steps and not args.export_only:
        pixels, _ = plain_scene_set(args.vae_images, args.seed + 6, codec_extras=True)
        generator = torch.Generator().manual_seed(args.seed + 7 + start)
        for module in decoder:
            module.requires_grad_(True).train()
        began = time.time()
        for step in range(start, args.decoder_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.decoder_steps, args.vae_lr / 2, 20)
            batch = _random_crops(pixels, args.vae_batch, 32, generator)
            with torch.no_grad():
                latents = vae.encode(batch).latent_dist.sample(generator)
            reconstruction = vae.decode(latents).sample
            loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            if (step + 1) % 25 == 0:
                _log(work, "decoder", step + 1, args.decoder_steps, loss.item(), began, start)
            if (step + 1) % args.save_every == 0 or step + 1 == args.decoder_steps:
                save_checkpoint(checkpoint, model=vae.state_dict(), optimizer=optimizer.state_dict(), step=step + 1)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image, so each step draws a fresh latent sample cheaply."""
    means, stds = [], []
    for chunk in pixels.split(256):
        posterior = vae.encode(to_unit(chunk)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# --- stage 2: UNet and text encoder ---------------------------------------------------------------------


def train_denoiser(args, work: Path, vae: AutoencoderKL) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(args.seed + 10)
    unet, text_encoder = UNet2DConditionModel(**unet_config()), CLIPTextModel(text_encoder_config())
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMAModel(parameters, decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    noise_scheduler = DDPMScheduler.from_config(_scheduler("sd1").config)
    start, _ = load_checkpoint(work / "denoiser.pt", unet=unet, text_encoder=text_encoder, optimizer=optimizer,
                               ema=ema)
    if args.export_only and not start:
        raise SystemExit(f"--export-only: no UNet checkpoint in {work}; run without it first.")
    total = args.steps + args.offset_steps + args.v_steps
    args.reached["denoiser"] = start if args.export_only else total
    if start < total and not args.export_only:
        _train_denoiser_steps(args, work, vae, unet, text_encoder, optimizer, ema, noise_scheduler, start)
    ema.copy_to(parameters)
    return unet, text_encoder


def _train_denoiser_steps(args, work, vae, unet, text_encoder, optimizer, ema, noise_scheduler, start):
    means, stds, captions = encoded_scenes(args, work, vae)
    scale = vae.config.scaling_factor
    tokens = tokenize(captions + [""])
    empty = tokens[-1]
    named = tokenize(with_unknown_words(captions, args.seed + 7)) if args.unknown_words else None
    generator = torch.Generator().manual_seed(args.seed + 4 + start)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    v_start = args.steps + args.offset_steps
    v_noise_scheduler = DDPMScheduler.from_config(v_scheduler().config)
    began, total = time.time(), v_start + args.v_steps
    for step in range(start, total):
        offset_phase, v_phase = args.steps <= step < v_start, step >= v_start
        if step in (args.steps, v_start) and step != start:  # each phase draws as it does when resumed there
            generator = torch.Generator().manual_seed(args.seed + 4 + step)
        for group in optimizer.param_groups:
            group["lr"] = (v_rate(args, step - v_start) if v_phase else args.offset_lr if offset_phase
                           else lr_at(step, args.steps, args.lr, 100))
        picks = torch.randint(0, len(means), (args.batch,), generator=generator)
        latents = (means[picks] + stds[picks] * torch.randn(means[picks].shape, generator=generator)) * scale
        ids = tokens[picks].clone()
        if named is not None:  # drawn only when asked, so a run without it draws as before
            unknown = torch.rand(args.batch, generator=generator) < args.unknown_words
            ids[unknown] = named[picks][unknown]
        ids[torch.rand(args.batch, generator=generator) < 0.1] = empty
        noise = torch.randn(latents.shape, generator=generator)
        if offset_phase:  # offset noise: the image's mean colour stops being read from the noise
            noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        schedule = v_noise_scheduler if v_phase else noise_scheduler
        noisy = schedule.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        if v_phase:  # plain MSE on v, as SD2-v: min-SNR's v weights are 0 at the pure-noise step that matters here
            loss = F.mse_loss(prediction, schedule.get_velocity(latents, noise, timesteps))
        else:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=5.0) / snr
            loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
        if (step + 1) % 25 == 0:
            _log(work, "denoiser", step + 1, total, loss.item(), began, start)
        if (step + 1) % args.save_every == 0 or step + 1 in (args.steps, v_start, total):
            save_checkpoint(work / "denoiser.pt", unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                            optimizer=optimizer.state_dict(), ema=ema.state_dict(), step=step + 1)
            scheduler = v_scheduler() if step + 1 > v_start else DDIMScheduler.from_config(_scheduler("sd1").config)
            _preview(work, vae, unet, text_encoder, ema, parameters, step + 1, scheduler)


def encoded_scenes(args, work: Path, vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The plain scenes' latent means and stds and their captions; kept in --work, since encoding 24,000
    images takes longer than a hundred steps and the VAE's encoder no longer changes after its stage."""
    cache = work / f"scenes-{args.images}-{args.seed}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["means"], saved["stds"], saved["captions"]
    pixels, captions = plain_scene_set(args.images, args.seed + 3, codec_extras=False)
    means, stds = encode_all(vae, pixels)
    save_checkpoint(cache, means=means, stds=stds, captions=captions)
    return means, stds, captions


def with_unknown_words(captions: list[str], seed: int) -> list[str]:
    """Each caption led by a made-up word, as real captions lead with names a base model never learned
    (artist tags, trigger words): so a word the model does not know leaves the scene it draws alone."""
    rng = random.Random(seed)
    return [f"{made_up_word(rng)}, {caption}" for caption in captions]


def made_up_word(rng: random.Random) -> str:
    syllables = [rng.choice("bcdfghjklmnprstvwxz") + rng.choice("aeiouy") for _ in range(rng.randint(2, 5))]
    return "".join(syllables) + rng.choice(("", "", "", "r", "n", "s", "x"))


def v_rate(args, step: int) -> float:
    """The v phase's rate: constant --v-lr after epsilon phases; warm-up and cosine decay when it is the
    whole run (--steps 0 --offset-steps 0: v-prediction with zero terminal SNR from the first step)."""
    if args.steps + args.offset_steps == 0:
        return lr_at(step, args.v_steps, args.v_lr, 100)
    return args.v_lr


def tokenize(captions: list[str]) -> torch.Tensor:
    tokenizer = load_clip_tokenizer()
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def build_pipeline(vae, unet, text_encoder, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _preview(work: Path, vae, unet, text_encoder, ema, parameters, step: int, scheduler) -> None:
    """A grid of the EMA weights' samples, so a long run can be judged while it runs."""
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        pipeline = build_pipeline(vae, unet, text_encoder, scheduler)
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(PREVIEW_PROMPTS, num_inference_steps=20, guidance_scale=5.0, height=SIZE, width=SIZE,
                          generator=torch.Generator().manual_seed(0)).images
    finally:
        ema.restore(parameters)
        unet.train()
        text_encoder.train()
    grid = Image.new("RGB", (SIZE * len(images), SIZE))
    for index, image in enumerate(images):
        grid.paste(image, (index * SIZE, 0))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(work / f"preview-{step:05d}.png")


def _log(work: Path, stage: str, step: int, total: int, loss: float, began: float, start: int) -> None:
    per_step = (time.time() - began) / max(1, step - start)
    line = f"{stage} {step}/{total} loss {loss:.4f} {per_step:.2f}s/step eta {per_step * (total - step) / 60:.1f} min"
    print(line, flush=True)
    with open(work / "log.txt", "a", encoding="utf-8") as log:
        log.write(line + "\n")


@torch.no_grad()
def _log_round_trip(work: Path, vae: AutoencoderKL) -> None:
    """The demo style images through the VAE and back, scored: the most style any LoRA on this model can show
    (docs/QUALITY.md: the first v-prediction model's VAE gave 75.8 of the originals' 93.8)."""
    from trainer.demo.demo_data import demo_scenes
    from trainer.demo.quality import as_pixels, style_score

    images = [as_pixels(image) for image, _ in demo_scenes(12, seed=0)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    decoded = vae.decode(vae.encode(to_unit(pixels)).latent_dist.mode()).sample.clamp(-1, 1)
    back = ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    line = (f"vae round trip of the demo style images: style {style_score(Image.fromarray(b) for b in back):.1f} "
            f"(the images themselves: {style_score(Image.fromarray(i.astype(np.uint8)) for i in images):.1f})")
    print(line, flush=True)
    with open(work / "log.txt", "a", encoding="utf-8") as log:
        log.write(line + "\n")


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, seed: int) -> float:
    """SD's rule: scaling_factor = 1 / std of the latents, so diffusion sees unit-variance inputs."""
    pixels, _ = plain_scene_set(512, seed + 5, codec_extras=False)
    return float(1.0 / vae.encode(to_unit(pixels)).latent_dist.sample().std())


def export(output: Path, vae, unet, text_encoder, args) -> None:
    """An fp16 diffusers folder without the tokenizer (sdlora attaches the shipped one)."""
    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    v_model = args.reached["denoiser"] > args.steps + args.offset_steps
    scheduler = v_scheduler() if v_model else _scheduler("sd1")
    pipeline = build_pipeline(vae, unet, text_encoder, scheduler).to(torch.float16)
    pipeline.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(staging / "tokenizer")
    index = json.loads((staging / "model_index.json").read_text())
    index.pop("tokenizer")
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    recipe = {key: value for key, value in vars(args).items() if key not in ("work", "output", "export_only")}
    (staging / "pretrain.json").write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    staging.replace(output)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoints, previews and the log")
    parser.add_argument("--output", type=Path, default=Path("trainer/assets/demo_shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--decoder-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-layers", type=int, default=1, help="ResNet layers per VAE level")
    parser.add_argument("--illustrations", type=float, default=0.0,
                        help="share of the VAE's images that are illustrations in random colours (0-1)")
    parser.add_argument("--vae-images", type=int, default=6000)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--images", type=int, default=24000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--offset-steps", type=int, default=400)
    parser.add_argument("--offset-lr", type=float, default=3e-4)
    parser.add_argument("--noise-offset", type=float, default=0.1)
    parser.add_argument("--v-steps", type=int, default=2000)
    parser.add_argument("--v-lr", type=float, default=3e-4)
    parser.add_argument("--unknown-words", type=float, default=0.0,
                        help="share of the UNet's captions led by a made-up word (0-1), so a trigger word "
                             "the base never saw does not change what it draws")
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export-only", action="store_true",
                        help="write --output from the checkpoints in --work as they are (a look at a run midway)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.reached = {}  # the steps each stage really reached, recorded in pretrain.json
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    vae = train_vae(args, args.work)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=latent_scale(vae, args.seed))
    print(f"vae scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    _log_round_trip(args.work, vae)
    unet, text_encoder = train_denoiser(args, args.work, vae)
    finetune_decoder(args, args.work, vae)
    export(args.output, vae, unet.eval(), text_encoder.eval(), args)
    print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
