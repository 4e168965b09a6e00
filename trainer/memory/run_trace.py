"""A run's three memory peaks traced on its meta model: the training step (the trainer's own BatchLoss), filling
the latent cache (the VAE encode LatentCache runs) and drawing a preview (UNet with guidance, VAE decode).

Autocast: the trainer's half-precision step runs the UNet under `accelerator.autocast()` with the frozen
weights already cast to the weight dtype. Autocast does not apply to meta tensors, so the trace makes its
casts itself (trainer/memory/meta_autocast.py): the adapters' fp32 inputs and weights cast to the half dtype
for their matmuls, and on CUDA the norms computed in fp32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from networks.network import LoraNetwork
from trainer.caches.latent_cache import ENCODE_BATCH
from trainer.caches.supply import fills_latents_at_setup
from trainer.caches.text_cache import text_cache_allowed
from trainer.config import TrainConfig
from trainer.data.buckets import Placement
from trainer.data.dataset import Batch, Sample
from trainer.memory.live_bytes import LiveBytes, flash_attention, storage_bytes
from trainer.memory.meta_autocast import autocast_casts
from trainer.memory.meta_model import META, MetaModel, on_meta
from trainer.memory.tracer import StepTrace, trace_step
from trainer.model.tiny_models import load_clip_tokenizer
from trainer.objective.diffusion import Objective
from trainer.run.batch_loss import BatchLoss

CACHE_BATCH = ENCODE_BATCH  # images per VAE encode when memory allows (trainer/caches/latent_cache.py)
EMA_BYTES_PER_PARAMETER = 4  # AdapterEMA's fp32 shadow copy of each adapter weight


@dataclass
class _MetaAccelerator:
    """What BatchLoss asks of the accelerator: autocast turns on the state under which autocast_casts casts
    (meta_autocast.py), in the weight dtype of a half-precision run."""

    dtype: torch.dtype
    device = META

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)


@dataclass
class _MetaSupply:
    """BatchSupply's two per-step answers: latents from the cache (or the VAE, when encoded every step) and
    caption states (cached, or the text encoders' forward, with gradients when they train)."""

    cfg: TrainConfig
    model: MetaModel
    latent_shape: tuple
    pixel_shape: tuple

    def batch_latents(self, batch) -> torch.Tensor:
        if self.cfg.dataset.cache_latents != "none" and not self.cfg.dataset.random_crop:
            return torch.zeros(self.latent_shape, device=META)
        with torch.no_grad():
            return self.model.vae.encode(torch.zeros(self.pixel_shape, device=META)).latent_dist.mode()

    def encode_text(self, captions: list[str]) -> dict:
        cfg, model = self.cfg, self.model
        tokenizers = [load_clip_tokenizer(pad) for pad in model.family.tokenizer_pad_tokens]
        with torch.set_grad_enabled(cfg.network.train_text_encoder and torch.is_grad_enabled()):
            embeds = model.family.encode_prompt(model.text_encoders, tokenizers, captions, cfg.model.clip_skip,
                                                cfg.model.prompt_chunks)
        out = {"hidden": embeds.encoder_hidden_states}
        if embeds.pooled is not None:
            out["pooled"] = embeds.pooled
        return out


def text_states_cached(cfg: TrainConfig) -> bool:
    """As BatchSupply.build decides: cached unless the text encoder trains or captions vary per epoch."""
    return cfg.dataset.cache_text_encoder_outputs and text_cache_allowed(cfg.dataset.options().captions,
                                                                         cfg.network.train_text_encoder)


def previews_drawn(cfg: TrainConfig) -> bool:
    sample = cfg.sample
    return bool(sample.prompts) and bool(sample.every_steps or sample.every_epochs or sample.at_start)


def vae_factor(model: MetaModel) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def trace_training(cfg: TrainConfig, model: MetaModel, side: int, device_type: str = "cuda") -> StepTrace:
    """The step at a `side` x `side` bucket (the largest area) and the batch size, as Trainer.optimizer_step
    runs it for one micro-batch, with `device_type`'s autocast casts (bench.memory measures a CPU step)."""
    batch_size, factor = cfg.train.batch_size, vae_factor(model)
    with on_meta():  # the adapters are made on the meta device, not made on the CPU and moved
        network = LoraNetwork.create(model.family.name, model.unet, model.text_encoders, cfg.network.spec(),
                                     device=META)
    network.attach()
    network.train()
    supply = _MetaSupply(cfg, model, (batch_size, model.unet.config.in_channels, side // factor, side // factor),
                         (batch_size, 3, side, side))
    cached = text_states_cached(cfg)
    if cached:  # the states come from the text cache; the encoders ran once at setup
        states = cached_text_states(cfg, model, supply)
        supply.encode_text = lambda captions: states
    placement = Placement((side, side), (side, side), (side, side), (0, 0))
    batch = Batch((side, side), tuple(Sample(0, False, "", placement) for _ in range(batch_size)))
    dataset = SimpleNamespace(items=[SimpleNamespace(is_reg=False)])
    loss = BatchLoss(model, model.unet, supply, Objective(cfg.train, model.noise_scheduler, _prediction(model)),
                     dataset, None, cfg.train.prior_loss_weight, _MetaAccelerator(model.weight_dtype),
                     model.weight_dtype)
    trainable = list(network.parameters())
    # The stepping runs (an SGD step without momentum keeps no state); the optimizer's and EMA's states are
    # added per trainable parameter by the caller (state_bytes), so a change of optimizer needs no new trace.
    with autocast_casts(device_type):
        return trace_step(resident_frozen(cfg, model, cached), trainable, lambda: loss(batch),
                          lambda: torch.optim.SGD(trainable, lr=cfg.train.learning_rate), 0, cfg.train.max_grad_norm)


_TEXT_STATES: dict[tuple, dict] = {}  # (model source, dtype, batch, clip skip, chunks) -> {name: (shape, dtype)}


def cached_text_states(cfg: TrainConfig, model: MetaModel, supply: _MetaSupply) -> dict[str, torch.Tensor]:
    """The text cache's states for a batch, as meta tensors. Only their shapes and dtypes matter, which depend
    on the encoders' configs and the settings in the key, so the encoders' forward (a second a trace for
    SDXL's two) runs once per key."""
    key = (model.source, model.weight_dtype, cfg.train.batch_size, cfg.model.clip_skip, cfg.model.prompt_chunks)
    if key not in _TEXT_STATES or not model.source:
        with torch.no_grad():
            states = supply.encode_text([""] * cfg.train.batch_size)
        _TEXT_STATES[key] = {name: (state.shape, state.dtype) for name, state in states.items()}
    return {name: torch.zeros(shape, dtype=dtype, device=META) for name, (shape, dtype) in _TEXT_STATES[key].items()}


def state_bytes(cfg: TrainConfig, parameters: int) -> int:
    """The optimizer's and EMA's states, counted per trainable parameter (OPTIMIZER_FACTS: AdamW's two fp32
    moments 8 bytes; bitsandbytes' AdamW8bit, unusable without CUDA, two 8-bit moments 2 bytes; the EMA one
    fp32 copy 4): torch's AdamW does run on meta and a test checks that its traced states are 8 bytes a
    parameter, but its per-tensor loop over SDXL's adapters costs 20 s there."""
    # Imported here: the pre-flight package imports this module.
    from trainer.preflight.learning_rates import OPTIMIZER_FACTS

    per_parameter = OPTIMIZER_FACTS[cfg.train.optimizer][0] + (EMA_BYTES_PER_PARAMETER if cfg.ema.enabled else 0)
    return per_parameter * parameters


def resident_frozen(cfg: TrainConfig, model: MetaModel, cached: bool) -> list[torch.Tensor]:
    """The frozen tensors on the device while training: BatchSupply.release_encoders drops the text encoders
    once their states are cached (unless previews need them), the VAE encoder once every latent is cached,
    the VAE decoder where no previews are drawn."""
    previews = previews_drawn(cfg)
    parts = [model.unet]
    if not cached or previews:
        parts += model.text_encoders
    vae = model.vae
    if cfg.dataset.cache_latents == "none" or cfg.dataset.random_crop:
        parts += [vae.encoder, vae.quant_conv]
    if previews:
        parts += [vae.decoder, vae.post_quant_conv]
    return [t for part in parts if part is not None for t in [*part.parameters(), *part.buffers()]]


def trace_cache_fill(cfg: TrainConfig, model: MetaModel, side: int, images: int = CACHE_BATCH) -> int:
    """What is on the card while the caches fill (the VAE and text encoders: build_run moves the UNet after
    them) plus the VAE encode of `images` (at most CACHE_BATCH: one bucket's images go through together) at the
    largest bucket, fp32."""
    if cfg.dataset.cache_latents == "none":
        return 0
    waiting = [] if fills_latents_at_setup(cfg) else list(model.unet.parameters())
    loaded = storage_bytes([*waiting, *model.vae.parameters()]
                           + [p for e in model.text_encoders for p in e.parameters()])
    live = LiveBytes()
    with flash_attention(), live, torch.no_grad():
        model.vae.encode(torch.zeros(min(images, CACHE_BATCH), 3, side, side, device=META)).latent_dist.mode()
    return loaded + live.peak


def trace_sampling(cfg: TrainConfig, model: MetaModel) -> int:
    """The larger of one guided UNet call and the VAE decode at the largest sample size, above what training
    holds; 0 when no previews are drawn."""
    if not previews_drawn(cfg):
        return 0
    width = max(p.width or cfg.dataset.resolution for p in cfg.sample.prompts)
    height = max(p.height or cfg.dataset.resolution for p in cfg.sample.prompts)
    factor, guided = vae_factor(model), 2  # classifier-free guidance runs the prompt and the negative together
    latent = (guided, model.unet.config.in_channels, height // factor, width // factor)
    live = LiveBytes()
    with flash_attention(), live, torch.no_grad():
        embeds = _MetaSupply(cfg, model, latent, ()).encode_text([""] * guided)
        hidden, added = _conditioning(model, embeds, width, height, guided)
        model.unet(torch.zeros(latent, device=META, dtype=model.weight_dtype), torch.zeros(guided, device=META),
                   hidden, added_cond_kwargs=added)
        del embeds, hidden, added
        model.vae.decode(torch.zeros(1, *latent[1:], device=META))
    return live.peak


def _conditioning(model: MetaModel, embeds: dict, width: int, height: int, count: int):
    from trainer.model.family import unet_conditioning

    placement = Placement((width, height), (width, height), (width, height), (0, 0))
    return unet_conditioning(model.family, embeds, [placement] * count, META, model.weight_dtype)


def _prediction(model: MetaModel) -> str:
    return model.noise_scheduler.config.prediction_type


def _count(params) -> int:
    return sum(p.numel() for p in params)
