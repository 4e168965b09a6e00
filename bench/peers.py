"""The peers, run by the same harness as sdlora: the diffusers LoRA recipe and LyCORIS LoCon on its loop.

`Recipe` is diffusers' examples/text_to_image/train_text_to_image_lora.py (and its _sdxl twin) reduced
to what runs per step, with no caches: the images are opened, resized, centre-cropped and normalised by
the dataset on every access, captions are tokenized there too, and every step runs the VAE encode
(`latent_dist.sample()`) and the text encoder(s) before the UNet. The adapter is peft's
`LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0])`
added with `unet.add_adapter`, the optimizer AdamW over the trainable parameters, the optimizer, data
loader and schedule go through `accelerator.prepare`, gradients are clipped to max_grad_norm, and the
LoRA is saved with `save_lora_weights` from the fp32 peft state dict, all as the script does.
(torchvision and `datasets` are not used: the transforms are Resize(bilinear) -> CenterCrop ->
ToTensor -> Normalize([0.5], [0.5]) written out with PIL and numpy, the image folder read directly.)

`adapter="lycoris"` swaps the peft adapter for LyCORIS 4.1.3's LoCon network (kohya entry point
`lycoris.kohya.create_network`, algo "locon") on the same loop. Its built-in full/unet-only presets
name time_embedding twice on a diffusers UNet (a duplicate-name assert), so it runs with a preset of
the classes kohya targets on SD UNets (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D),
which adapts exactly the modules sdlora's LoCon does.

`cache=True` precomputes the VAE latents and text states once (an informative row, not a recipe: it
isolates the adapter + loop cost from the caching sdlora does).

Run a whole training (for bench.end_to_end):  python -m bench.peers --adapter peft --model DIR --data DIR
--output DIR --epochs 10 --resolution 64 --batch-size 4 --rank 16
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RECIPE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# The module classes kohya's LoCon targets on SD UNets; with no names, time_embedding is not adapted.
LYCORIS_LOCON_PRESET = """\
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


# --- the recipe's data: a folder of images with .txt captions -------------------------------------


def recipe_transform(image, resolution: int, flip: bool = False):
    """transforms.Resize(res, BILINEAR) -> CenterCrop(res) -> [RandomHorizontalFlip] -> ToTensor ->
    Normalize([0.5], [0.5]); returns (tensor, original (h, w), crop top-left (top, left))."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    top = int(round((size[1] - resolution) / 2.0))
    left = int(round((size[0] - resolution) / 2.0))
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return (tensor - 0.5) / 0.5, (height, width), (top, left)


class RecipeDataset(torch.utils.data.Dataset):
    """The recipe's `train_dataset.with_transform(preprocess_train)`: decoding, transforms and tokenizing
    happen on every access."""

    def __init__(self, folder: Path, tokenizers: list, resolution: int, random_flip: bool = False):
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.captions = [_caption(p) for p in self.paths]
        self.tokenizers, self.resolution, self.random_flip = tokenizers, resolution, random_flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        flip = self.random_flip and random.random() < 0.5
        pixels, original, crop = recipe_transform(rgb, self.resolution, flip)
        ids = [tok(self.captions[index], max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids[0] for tok in self.tokenizers]
        return {"pixel_values": pixels, "input_ids": ids, "original_size": original, "crop_top_left": crop,
                "index": index}


def _caption(path: Path) -> str:
    text = path.with_suffix(".txt")
    return ", ".join(line.strip() for line in text.read_text().splitlines() if line.strip()) if text.is_file() else ""


def collate(examples: list[dict]) -> dict:
    pixels = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format).float()
    ids = [torch.stack([e["input_ids"][i] for e in examples]) for i in range(len(examples[0]["input_ids"]))]
    return {"pixel_values": pixels, "input_ids": ids, "original_sizes": [e["original_size"] for e in examples],
            "crop_top_lefts": [e["crop_top_left"] for e in examples], "index": [e["index"] for e in examples]}


# --- the recipe ----------------------------------------------------------------------------------


class Recipe:
    """One contender: setup(), then batches() / step(batch) per optimizer step, export(path)."""

    def __init__(self, model_dir, data_dir, resolution: int, batch_size: int, rank: int, alpha: float | None = None,
                 adapter: str = "peft", network: str = "lora", conv_rank: int = 8, conv_alpha: float | None = None,
                 learning_rate: float = 1e-4, seed: int = 42, mixed_precision: str = "no", cache: bool = False,
                 epochs: int = 1, workdir: Path | None = None, gradient_checkpointing: bool = False):
        if adapter == "peft" and network != "lora":
            raise ValueError("the diffusers recipe trains LoRA on attention only")
        self.model_dir, self.data_dir = Path(model_dir), Path(data_dir)
        self.resolution, self.batch_size, self.rank = resolution, batch_size, rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.conv_rank = conv_rank
        self.conv_alpha = float(conv_alpha if conv_alpha is not None else conv_rank)
        self.adapter, self.network_type, self.learning_rate = adapter, network, learning_rate
        self.seed, self.mixed_precision, self.cache, self.epochs = seed, mixed_precision, cache, epochs
        self.workdir = Path(workdir) if workdir else None
        self.gradient_checkpointing = gradient_checkpointing
        self.breakdown: dict[str, float] = {}

    # -- setup: as the script, in its order ---------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision if cuda else "no", cpu=not cuda)
        set_seed(self.seed)
        where = self.model_dir
        self.sdxl = (where / "text_encoder_2").is_dir()
        self.noise_scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler")
        self.tokenizers = [CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")]
        self.text_encoders = [CLIPTextModel.from_pretrained(where, subfolder="text_encoder")]
        if self.sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2"))
            self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2"))
        self.vae = AutoencoderKL.from_pretrained(where, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet")
        for part in [self.unet, self.vae, *self.text_encoders]:
            part.requires_grad_(False)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                              torch.float32)
        device = self.accelerator.device
        self.unet.to(device, dtype=self.weight_dtype)
        # SD1 recipe: the VAE in weight_dtype; SDXL recipe: fp32 (its VAE overflows in fp16).
        self.vae.to(device, dtype=torch.float32 if self.sdxl else self.weight_dtype)
        for encoder in self.text_encoders:
            encoder.to(device, dtype=self.weight_dtype)
        if self.gradient_checkpointing:  # the script's --gradient_checkpointing
            self.unet.enable_gradient_checkpointing()
        params = self._attach_adapter()
        self.params_to_clip = [p for group in params for p in group["params"]] if isinstance(params[0], dict) \
            else list(params)
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        dataset = RecipeDataset(self.data_dir, self.tokenizers, self.resolution)
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collate, batch_size=self.batch_size,
                                             num_workers=0, generator=generator)
        total = self.epochs * math.ceil(len(loader))
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
        self.unet, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            self.unet, optimizer, loader, lr_scheduler)
        self.steps_per_epoch = len(self.loader)
        self.unet.train()  # the script calls it once per epoch; nothing in the loop switches it off
        self._cached: dict[int, tuple] = {}
        if self.cache:
            self._fill_cache()

    def _attach_adapter(self):
        if self.adapter == "peft":
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                                target_modules=RECIPE_TARGETS)
            self.unet.add_adapter(config)
            if self.accelerator.mixed_precision == "fp16":
                cast_training_params(self.unet, dtype=torch.float32)
            return [p for p in self.unet.parameters() if p.requires_grad]
        if self.adapter == "lycoris":
            import logging

            from lycoris.kohya import create_network
            from lycoris.logging import logger

            logger.setLevel(logging.WARNING)
            preset = (self.workdir or Path(".")) / "lycoris-locon-preset.toml"
            preset.parent.mkdir(parents=True, exist_ok=True)
            preset.write_text(LYCORIS_LOCON_PRESET)
            kwargs = dict(preset=str(preset), algo="locon")
            if self.network_type == "locon":
                kwargs.update(conv_dim=self.conv_rank, conv_alpha=self.conv_alpha)
            else:
                kwargs.update(conv_dim=0)
            self.network = create_network(1.0, self.rank, self.alpha, self.vae, self.text_encoders, self.unet,
                                          warn_on_unmatched=False, **kwargs)
            self.network.apply_to(self.text_encoders, self.unet, apply_text_encoder=False, apply_unet=True)
            self.network.to(self.accelerator.device)
            params, _ = self.network.prepare_optimizer_params(None, self.learning_rate, self.learning_rate)
            return params
        raise ValueError(f"unknown adapter {self.adapter!r}")

    def adapted_modules(self) -> int:
        if self.adapter == "peft":
            return sum(1 for _, m in self.unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
        return len(self.network.unet_loras)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params_to_clip)

    # -- per step ---------------------------------------------------------------------------------
    def batches(self):
        """The recipe's data loader, epoch after epoch (its work counts in the step, as in the script)."""
        while True:
            yield from self.loader

    def _encode_prompt(self, input_ids: list[torch.Tensor]):
        device = self.accelerator.device
        if not self.sdxl:
            return self.text_encoders[0](input_ids[0].to(device), return_dict=False)[0], None
        # train_text_to_image_lora_sdxl.py's encode_prompt: penultimate states side by side, pooled of TE2.
        states, pooled = [], None
        for encoder, ids in zip(self.text_encoders, input_ids):
            out = encoder(ids.to(device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            states.append(out[-1][-2])
        return torch.cat(states, dim=-1), pooled

    def _time_ids(self, batch) -> torch.Tensor:
        target = (self.resolution, self.resolution)
        rows = [list(o) + list(c) + list(target) for o, c in zip(batch["original_sizes"], batch["crop_top_lefts"])]
        return torch.tensor(rows, device=self.accelerator.device, dtype=self.weight_dtype)

    def _fill_cache(self) -> None:
        with torch.no_grad():
            for index in range(len(self.loader.dataset)):
                batch = collate([self.loader.dataset[index]])
                latents = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist.sample()
                states, pooled = self._encode_prompt(batch["input_ids"])
                self._cached[index] = (latents[0], states[0], None if pooled is None else pooled[0])

    def _marks(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.breakdown[name] = self.breakdown.get(name, 0.0) + now - since
        return now

    def step(self, batch) -> float:
        acc, device, started = self.accelerator, self.accelerator.device, time.perf_counter()
        with acc.accumulate(self.unet):
            if self.cache:
                rows = [self._cached[i] for i in batch["index"]]
                latents = torch.stack([r[0] for r in rows]).to(device)
                states = torch.stack([r[1] for r in rows]).to(device)
                pooled = torch.stack([r[2] for r in rows]).to(device) if rows[0][2] is not None else None
            else:
                pixels = batch["pixel_values"].to(device, dtype=self.vae.dtype)
                latents = self.vae.encode(pixels).latent_dist.sample()
                started = self._marks("vae_encode", started)
                states, pooled = self._encode_prompt(batch["input_ids"])
                started = self._marks("text_encoder", started)
            latents = (latents * self.vae.config.scaling_factor).to(self.weight_dtype)
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            if self.noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            added = {"text_embeds": pooled, "time_ids": self._time_ids(batch)} if self.sdxl else None
            prediction = self.unet(noisy, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
            acc.backward(loss)
            started = self._marks("unet_forward_backward", started)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params_to_clip, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self._marks("optimizer", started)
        return float(loss.detach())

    # -- the saved LoRA -------------------------------------------------------------------------------
    def export(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.adapter == "peft":
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            unet = self.accelerator.unwrap_model(self.unet).to(torch.float32)
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            pipeline = StableDiffusionXLPipeline if self.sdxl else StableDiffusionPipeline
            pipeline.save_lora_weights(save_directory=str(path.parent), unet_lora_layers=layers,
                                       weight_name=path.name, safe_serialization=True)
            return path
        self.network.save_weights(str(path), torch.float16, {})  # kohya's usual save_precision fp16
        return path

    def export_bytes_per_param(self) -> int:
        return 4 if self.adapter == "peft" else 2


# --- a whole training, for bench.end_to_end --------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", choices=("peft", "lycoris"), default="peft")
    parser.add_argument("--network", choices=("lora", "locon"), default="lora")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument("--conv-alpha", type=float)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    recipe = Recipe(args.model, args.data, args.resolution, args.batch_size, args.rank, args.alpha, args.adapter,
                    args.network, args.conv_rank, args.conv_alpha, seed=args.seed, epochs=args.epochs,
                    workdir=output)
    recipe.setup()
    step = 0
    for _epoch in range(args.epochs):
        for batch in recipe.loader:
            loss = recipe.step(batch)
            step += 1
            if not math.isfinite(loss):
                print(f"non-finite loss at step {step}", file=sys.stderr)
                return 1
    final = recipe.export(output / "pytorch_lora_weights.safetensors")
    print(f"Saved {final} after {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
