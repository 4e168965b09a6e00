"""Where the training step's inputs come from: latents (cached once, or encoded each step with worker
processes decoding ahead) and caption states (cached once, or encoded each step while the text encoder trains),
and the encoders dropped once the caches made them dead weight. The training loop asks for a batch's
latents and captions and knows nothing of how they were made."""
from __future__ import annotations

import torch
from accelerate.utils import gather_object

from networks.errors import SdloraError
from trainer.caches.latent_cache import LatentCache, scale_latents, vae_identity
from trainer.caches.prefetch import PixelPrefetch, batch_pixels
from trainer.caches.text_cache import TextEmbeddingCache, text_cache_allowed
from trainer.config import TrainConfig
from trainer.data.dataset import ImageDataset
from trainer.model.model_loading import LoadedModel
from trainer.model.tiny_models import cache_root


def fills_latents_at_setup(cfg: TrainConfig) -> bool:
    """Whether build() encodes the dataset's latents before the first step (random crops are encoded when
    drawn): then the UNet waits off the card until they are done (build_run), and the memory model's cache fill
    leaves it out."""
    return cfg.dataset.cache_latents != "none" and not cfg.dataset.random_crop


class BatchSupply:
    def __init__(self, cfg: TrainConfig, model: LoadedModel, dataset: ImageDataset, accelerator):
        self.cfg, self.model, self.dataset, self.accelerator = cfg, model, dataset, accelerator
        self.latents: LatentCache | None = None
        self.encode_text = self._encode_captions
        self.prefetch: PixelPrefetch | None = None

    # -- built once, at setup ----------------------------------------------------------------
    def build(self) -> None:
        """Fill the caches the config asks for (every process its share), then start the prefetch workers
        when images are encoded every step."""
        cfg, model = self.cfg, self.model
        # Keyed by image content and VAE, so one disk cache serves every run on the machine.
        folder = cache_root() / "latents" if cfg.dataset.cache_latents == "disk" else None
        if cfg.dataset.cache_latents != "none":
            # Imported here: the memory model traces BatchLoss, which imports this module.
            from trainer.memory import run_cache_batch

            self.latents = LatentCache(model.vae, self.dataset, vae_identity(model.vae, model.vae_identity),
                                       folder=folder, batch_size=run_cache_batch(cfg))
            if fills_latents_at_setup(cfg):  # random crops are encoded when drawn, never the centre crop
                self._build_shared(self.latents, self.dataset.items)
        if cfg.dataset.cache_text_encoder_outputs and text_cache_allowed(cfg.dataset.options().captions,
                                                                          cfg.network.train_text_encoder):
            self.encode_text = TextEmbeddingCache(self._encode_captions, encoder_id=model.source)
            self._build_shared(self.encode_text, sorted({item.caption for item in self.dataset.items}))
        workers = cfg.dataset.num_workers
        if workers and self.encodes_every_step():
            self.prefetch = PixelPrefetch(self.dataset, workers)

    def _build_shared(self, cache, keys: list) -> None:
        """Fill a cache with every entry; with several processes each encodes its share and they swap
        results, since the epoch plan may deal any image to any process (N times less encoding)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            cache.build(keys)
            return
        share = keys[acc.process_index::acc.num_processes]
        try:
            cache.build(share)
            problem = None
        except SdloraError as error:
            problem = str(error)
        # Also the barrier after which a disk cache holds every share. A bad image is in one process's
        # share only: every process stops with its sentence, so the main one can record it.
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            raise SdloraError(problems[0])
        if cache.folder is None:
            for entries in gather_object([cache.entries(share)]):
                cache.add(entries)
        # Finds everything (from memory or disk) and keys every entry now, while the encoders are still
        # here; a node that does not share the disk encodes what it lacks, as a single process would.
        cache.build(keys)

    def cache_captions(self, captions) -> None:
        """Also cache these captions (held-out validation images'), so the text encoders need not stay."""
        if isinstance(self.encode_text, TextEmbeddingCache):
            self.encode_text.build(sorted(set(captions)))

    def release_encoders(self, previews: bool) -> None:
        """Drop what the caches made dead weight for the rest of the run (host RAM on CPU, VRAM on GPU): the
        text encoder(s), as every training and validation caption is in the text cache, and the VAE's encoder
        half, as every latent is in the latent cache (both built at setup). Sample previews encode new
        prompts and decode, so where they are drawn (`previews`) the text encoders and the decoder stay;
        the VAE config always stays (latents are scaled by it)."""
        model = self.model
        if isinstance(self.encode_text, TextEmbeddingCache) and not previews:
            model.text_encoders.clear()
        if self.latents is not None and not self.cfg.dataset.random_crop:  # every latent was built above
            del model.vae.encoder, model.vae.quant_conv
        if not previews:
            del model.vae.decoder, model.vae.post_quant_conv

    # -- each step ---------------------------------------------------------------------------
    def _encode_captions(self, captions: list[str]) -> dict:
        cfg, model = self.cfg, self.model
        with torch.set_grad_enabled(cfg.network.train_text_encoder and torch.is_grad_enabled()):
            embeds = model.family.encode_prompt(model.text_encoders, model.tokenizers, captions,
                                                cfg.model.clip_skip, cfg.model.prompt_chunks)
        out = {"hidden": embeds.encoder_hidden_states}
        if embeds.pooled is not None:
            out["pooled"] = embeds.pooled
        return out

    def encodes_every_step(self) -> bool:
        return self.latents is None or self.cfg.dataset.random_crop  # random crops are never cached

    def batch_latents(self, batch) -> torch.Tensor:
        if not self.encodes_every_step():
            return self.latents.get_batch(batch).to(self.accelerator.device)
        vae = self.model.vae
        pixels = self.prefetch.pixels(batch) if self.prefetch else batch_pixels(self.dataset, batch)
        with torch.no_grad():
            raw = vae.encode(pixels.to(vae.device)).latent_dist.mode()
        return scale_latents(raw, vae.config)

    def start_epoch(self, plan, first_batch: int) -> None:
        if self.prefetch is not None:
            self.prefetch.start(plan, first_batch)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()

    def encoded_counts(self) -> dict:
        """What this process ran through the VAE and text encoder for the caches (the rest came from disk or
        from the other processes)."""
        text = self.encode_text
        return {"encoded_images": self.latents.encode_count if self.latents is not None else 0,
                "encoded_captions": text.encoded_captions if isinstance(text, TextEmbeddingCache) else 0}
