"""The training loop: a folder of images and a base model in, a trained LoRA/LoCon in the run folder out.

Everything random is either drawn from the global RNGs (saved and restored by accelerate) or derived
from (seed, epoch), so a run stopped at step k and resumed ends with the same weights, bit for bit on
CPU, as one that never stopped.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from networks.errors import SdloraError
from networks.inspect import lora_family
from networks.load_check import check_lora_file
from networks.lora_file import DTYPES, atomic_write, read_lora, save_lora
from networks.max_norm import apply_max_norm
from networks.metadata import network_metadata
from networks.network import LoraNetwork, NetworkSpec
from trainer.buckets import BucketSpec
from trainer.captions import CaptionOptions
from trainer.config import TrainConfig, save_config
from trainer.dataset import DatasetOptions, ImageDataset
from trainer.ema import AdapterEMA, ema_file
from trainer.family import unet_conditioning
from trainer.latent_cache import LatentCache, scale_latents, vae_identity
from trainer.lora_init import initialise
from trainer.loss_mask import LossMasks
from trainer.model_loading import check_model_spec, load_model
from trainer.objective import (
    diffusion_loss,
    perturbed_input_noise,
    sample_noise,
    sample_timesteps,
    training_target,
    with_zero_terminal_snr,
)
from trainer.optimizers import build_lr_scheduler, build_optimizer
from trainer.prefetch import PixelPrefetch, batch_pixels
from trainer.run_dir import RunDir
from trainer.sampling import build_pipeline, render_samples
from trainer.state import Position, load_state, save_state
from trainer.stop import StopSignal
from trainer.text_cache import TextEmbeddingCache, text_cache_allowed
from trainer.tiny_models import cache_root
from trainer.validation import ValidationSample, ValidationSet, unet_predictor, validation_items

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests trace with "eager" (no C++ build)


def dataset_options(cfg: TrainConfig) -> DatasetOptions:
    data = cfg.dataset
    buckets = BucketSpec(resolution=data.resolution, step=data.bucket_step, min_side=data.resolved_min_bucket_side,
                         max_side=data.resolved_max_bucket_side, enabled=data.enable_buckets,
                         no_upscale=data.bucket_no_upscale)
    captions = CaptionOptions(shuffle_tags=data.shuffle_captions, keep_tokens=data.keep_tokens,
                              caption_dropout=data.caption_dropout, tag_dropout=data.tag_dropout,
                              keep_tokens_separator=data.keep_tokens_separator,
                              dropout_every_n_epochs=data.caption_dropout_every_n_epochs)
    return DatasetOptions(folder=Path(data.path), buckets=buckets, captions=captions,
                          caption_extension=data.caption_extension, default_repeats=data.default_repeats,
                          random_crop=data.random_crop, flip=data.flip,
                          reg_folder=Path(data.reg_path) if data.reg_path else None)


def build_network(cfg: TrainConfig, model, continued_copy: Path | None = None) -> LoraNetwork:
    """The spec's adapters, or the spec's continued from network.weights (not attached yet). A resumed run
    reads the copy it made of that file at its start (`continued_copy`): the original may have changed or
    gone since; the resumed state then sets every weight."""
    parts = (model.family.name, model.unet, model.text_encoders, network_spec(cfg))
    if not cfg.network.weights:
        return LoraNetwork.create(*parts)
    path = continued_copy or Path(cfg.network.weights).expanduser()
    state, metadata = read_lora(path)
    made_for = lora_family(state, metadata)
    if made_for and made_for != model.family.name:
        raise SdloraError(f"network.weights {path.name} was made for {made_for} but the base model is "
                          f"{model.family.name}; continue it on an {made_for} model.")
    return LoraNetwork.continue_from(*parts, state, source=path.name)


def network_spec(cfg: TrainConfig) -> NetworkSpec:
    net = cfg.network
    # alpha and its ratio as given (not resolved), so per-block ranks (block_dims) keep alpha / r too
    return NetworkSpec(type=net.type, rank=net.rank, alpha=net.alpha, alpha_ratio=net.alpha_ratio,
                       conv_rank=net.conv_rank, conv_alpha=net.conv_alpha, conv_alpha_ratio=net.conv_alpha_ratio,
                       init=net.init, rslora=net.rslora, dropout=net.dropout,
                       rank_dropout=net.rank_dropout, module_dropout=net.module_dropout,
                       train_unet=net.train_unet, train_text_encoder=net.train_text_encoder,
                       conv_in_out=net.include_conv_in_out, time_embedding=net.include_time_embedding,
                       include_convs=net.include_convs, factor=net.factor, decompose_both=net.decompose_both,
                       target_modules=tuple(net.target_modules) if net.target_modules else None,
                       down_lr_weight=net.down_lr_weight, mid_lr_weight=net.mid_lr_weight,
                       up_lr_weight=net.up_lr_weight, block_lr_zero_threshold=net.block_lr_zero_threshold,
                       block_dims=net.block_dims, block_alphas=net.block_alphas, conv_block_dims=net.conv_block_dims,
                       conv_block_alphas=net.conv_block_alphas)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        if not cfg.output.dir:
            raise SdloraError("output.dir is empty; give the run folder with --output DIR.")
        if not cfg.dataset.path:
            raise SdloraError("dataset.path is empty; give the image folder with --data DIR.")
        check_model_spec(cfg.model.path)  # before the run folder exists: a typo leaves nothing behind
        self.cfg, self.resume = cfg, resume
        self.run = RunDir(cfg.output.dir)
        mixed = cfg.train.mixed_precision if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        self.stop = StopSignal()

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        scanned = ImageDataset.scan(dataset_options(cfg), seed=cfg.train.seed)
        if self.main and not self.resume:  # once per run: a resume scans the same folder again
            self._report_skipped(scanned.report)
        # Held-out images leave the dataset before anything indexes it (caches, masks, the batch plan).
        self.dataset, held_out = validation_items(scanned, cfg.validation.images, cfg.validation.folder,
                                                  cfg.validation.seed)
        self.loss_masks = LossMasks(self.dataset, cfg.dataset.loss_mask, cfg.dataset.mask_folder) \
            if cfg.dataset.loss_mask != "none" else None
        # The main process first: it builds a missing demo model once (transformers saves weights only on
        # rank 0 once torch.distributed is up), the others then load the finished folder.
        with self.accelerator.main_process_first():
            self.model = load_model(cfg.model.path, family=cfg.model.family,
                                    prediction_type=cfg.model.prediction_type, config_dir=cfg.model.config_dir,
                                    vae=cfg.model.vae)
        if cfg.train.zero_terminal_snr:  # training noise and validation only; previews keep the model's sampler
            self.model = replace(self.model, noise_scheduler=with_zero_terminal_snr(self.model.noise_scheduler))
        self._place_models()
        self._build_caches()
        workers = cfg.dataset.num_workers
        self.prefetch = PixelPrefetch(self.dataset, workers) if workers and self._encodes_every_step() else None
        copy = self.run.weights_copy if self.resume and self.run.weights_copy.is_file() else None
        self.network = build_network(cfg, self.model, copy).attach()
        self.network.to(self.accelerator.device)
        self.training_unet = self.model.unet
        initialise(self)
        # Only the training forward is compiled, after the adapters' hooks are in (so they are traced) and
        # after LoRA-GA's gradient pass (base weights requiring grad would be a second compile); samples and
        # validation call the plain UNet and cost no compile of their own shapes.
        if cfg.train.compile:
            self.training_unet = torch.compile(self.model.unet, backend=COMPILE_BACKEND)
        # After the init (PiSSA/LoRA-GA change the starting weights), before checkpoint registration.
        self.ema = AdapterEMA(self.network, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        optimizer = build_optimizer(self.network, cfg.train)
        self.total_steps = self._total_steps()
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.train, self.total_steps)
        # The network and schedule are not `prepare`d: gradients are averaged by hand (see _sync_gradients)
        # and the schedule steps once per optimizer step, as it was built.
        self.optimizer = self.accelerator.prepare(optimizer)
        self.accelerator.register_for_checkpointing(self.network, self.lr_scheduler)
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        self.validation = self._validation_set(held_out) if held_out and self.main else None
        self._release_cached_encoders()
        self.tensorboard = open_tensorboard(self.run.root / "tensorboard") if cfg.output.tensorboard and self.main \
            else None

    def _report_skipped(self, report) -> None:
        """Name every image the run leaves out, on stderr and as a `skipped` event, as the pre-flight does."""
        left_out = [(p, "image") for p in report.skipped] + [(p, "folder") for p in report.ignored_folders]
        left_out += [(p, "regularization image or folder") for p in report.reg_problems]
        for problem, what in left_out:
            print(f"Skipped {what} {problem.name}: {problem.reason}.", file=sys.stderr)
            self.run.emit("skipped", name=problem.name, reason=problem.reason, kind=what)

    def _place_models(self) -> None:
        model, device = self.model, self.accelerator.device
        for part in [model.unet, *model.text_encoders]:
            _move(part.requires_grad_(False).eval(), device, self.weight_dtype)
        # The VAE only encodes (once, into the cache) and decodes previews: fp32 avoids SDXL's fp16 overflow.
        _move(model.vae.requires_grad_(False).eval(), device, torch.float32)
        if self.cfg.train.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if self.cfg.network.train_text_encoder:
                for encoder in model.text_encoders:
                    encoder.gradient_checkpointing_enable()

    def _build_caches(self) -> None:
        cfg, model = self.cfg, self.model
        # Keyed by image content and VAE, so one disk cache serves every run on the machine.
        folder = cache_root() / "latents" if cfg.dataset.cache_latents == "disk" else None
        self.latents = None
        if cfg.dataset.cache_latents != "none":
            self.latents = LatentCache(model.vae, self.dataset, vae_identity(model.vae, model.vae_identity),
                                       folder=folder)
            if not cfg.dataset.random_crop:  # random crops are encoded when drawn, never the centre crop
                self._build_shared(self.latents, self.dataset.items)
        self.encode_text = self._encode_captions
        if cfg.dataset.cache_text_encoder_outputs and text_cache_allowed(dataset_options(cfg).captions,
                                                                          cfg.network.train_text_encoder):
            self.encode_text = TextEmbeddingCache(self._encode_captions, encoder_id=model.source)
            self._build_shared(self.encode_text, sorted({item.caption for item in self.dataset.items}))

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

    def _release_cached_encoders(self) -> None:
        """Drop what the caches made dead weight for the rest of the run (host RAM on CPU, VRAM on GPU): the
        text encoder(s), as every training and validation caption is in the text cache, and the VAE's encoder
        half, as every latent is in the latent cache (both built at setup). Sample previews encode new
        prompts and decode, so where they are drawn (the main process) the text encoders and the decoder stay;
        the VAE config always stays (latents are scaled by it)."""
        cfg, model = self.cfg, self.model
        sampling = cfg.sample.every_steps or cfg.sample.every_epochs or cfg.sample.at_start
        previews = self.main and bool(cfg.sample.prompts) and bool(sampling)
        if isinstance(self.encode_text, TextEmbeddingCache) and not previews:
            model.text_encoders.clear()
        if self.latents is not None and not cfg.dataset.random_crop:  # every latent was built above
            del model.vae.encoder, model.vae.quant_conv
        if not previews:
            del model.vae.decoder, model.vae.post_quant_conv

    def _validation_set(self, items) -> ValidationSet:
        cfg, model = self.cfg, self.model
        if isinstance(self.encode_text, TextEmbeddingCache):  # so the text encoders need not stay for it
            self.encode_text.build(sorted({item.caption for item in items}))
        # get() encodes by item path, so the training dataset's pixel pipeline serves held-out items too.
        cache = LatentCache(model.vae, self.dataset, vae_identity(model.vae, model.vae_identity))
        samples = []
        for item in items:
            latents = cache.get(item)
            mask = self.loss_masks.latent(item, False, item.placement, tuple(latents.shape[-2:])) \
                if self.loss_masks else None
            samples.append(ValidationSample(latents.cpu(), item.caption, item.placement, mask))
        return ValidationSet(samples, model.noise_scheduler, model.prediction_type, cfg.validation.timesteps,
                             cfg.validation.seed, batch_size=cfg.train.batch_size)

    def _validate(self, step: int) -> None:
        device = self.accelerator.device
        predict = unet_predictor(self.model, self.encode_text, device, self.weight_dtype, self.accelerator.autocast)
        result = self.validation.evaluate(predict, self.network, device=device, dtype=self.weight_dtype)
        self.run.emit("validation", **result.event_fields(step))
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("validation_loss", result.loss, step)

    def _total_steps(self) -> int:
        if self.cfg.train.max_steps:
            return self.cfg.train.max_steps
        return self.cfg.train.epochs * self.steps_per_epoch()

    def steps_per_epoch(self) -> int:
        batches = len(self._epoch_batches(0))
        return math.ceil(batches / self.cfg.train.gradient_accumulation_steps)

    def _epoch_batches(self, epoch: int):
        acc = self.accelerator
        return self.dataset.batches(epoch, self.cfg.train.batch_size, acc.process_index, acc.num_processes)

    # -- one step ----------------------------------------------------------------------------
    def _encode_captions(self, captions: list[str]) -> dict:
        with torch.set_grad_enabled(self.cfg.network.train_text_encoder and torch.is_grad_enabled()):
            embeds = self.model.family.encode_prompt(self.model.text_encoders, self.model.tokenizers, captions,
                                                     self.cfg.model.clip_skip, self.cfg.model.prompt_chunks)
        out = {"hidden": embeds.encoder_hidden_states}
        if embeds.pooled is not None:
            out["pooled"] = embeds.pooled
        return out

    def _encodes_every_step(self) -> bool:
        return self.latents is None or self.cfg.dataset.random_crop  # random crops are never cached

    def _batch_latents(self, batch) -> torch.Tensor:
        if not self._encodes_every_step():
            return self.latents.get_batch(batch).to(self.accelerator.device)
        vae = self.model.vae
        pixels = self.prefetch.pixels(batch) if self.prefetch else batch_pixels(self.dataset, batch)
        with torch.no_grad():
            raw = vae.encode(pixels.to(vae.device)).latent_dist.mode()
        return scale_latents(raw, vae.config)

    def micro_step_loss(self, batch) -> torch.Tensor:
        cfg, model, device = self.cfg, self.model, self.accelerator.device
        latents = self._batch_latents(batch).to(self.weight_dtype)
        encoded = self.encode_text([s.caption for s in batch.samples])
        hidden, added = unet_conditioning(model.family, encoded, [s.as_seen for s in batch.samples], device,
                                          self.weight_dtype)
        mask = self.loss_masks.batch(batch, tuple(latents.shape[-2:])) if self.loss_masks else None
        train = cfg.train
        noise = sample_noise(latents, train.noise_offset, train.multires_noise_iterations, train.multires_noise_discount,
                             train.noise_offset_random_strength, train.adaptive_noise_scale)
        timesteps = sample_timesteps(latents.shape[0], model.noise_scheduler.config.num_train_timesteps, device,
                                     train.min_timestep, train.max_timestep)
        noisy = model.noise_scheduler.add_noise(
            latents, perturbed_input_noise(noise, train.ip_noise_gamma, train.ip_noise_gamma_random_strength), timesteps)
        with self.accelerator.autocast():
            prediction = self.training_unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        target = training_target(model.noise_scheduler, latents, noise, timesteps, model.prediction_type)
        return diffusion_loss(prediction, target, timesteps, model.noise_scheduler, model.prediction_type,
                              train.min_snr_gamma, mask=None if mask is None else mask.to(device),
                              debiased=train.debiased_estimation, loss_type=train.loss_type, huber_c=train.huber_c,
                              huber_schedule=train.huber_schedule, sample_weights=self._prior_weights(batch),
                              scale_v_like_noise=train.scale_v_pred_loss_like_noise_pred
                              and model.prediction_type == "v_prediction",  # kohya refuses it for epsilon
                              v_pred_like_loss=train.v_pred_like_loss
                              if model.prediction_type == "epsilon" else 0.0)  # kohya refuses it for v-prediction

    def _prior_weights(self, batch) -> torch.Tensor | None:
        """train.prior_loss_weight for regularization samples, 1 for the rest; None when all are 1."""
        weights = [self.cfg.train.prior_loss_weight if self.dataset.items[s.item].is_reg else 1.0
                   for s in batch.samples]
        return None if all(w == 1.0 for w in weights) else torch.tensor(weights)

    def optimizer_step(self, batches) -> float:
        """Accumulate gradients over `batches`, then one optimizer step; returns the mean loss."""
        self.network.train()
        total = 0.0
        for batch in batches:
            loss = self.micro_step_loss(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss.detach()))
            self.accelerator.backward(loss / len(batches))
            total += float(loss.detach()) / len(batches)
        self._sync_gradients()
        if self.cfg.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.network.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        if self.cfg.train.scale_weight_norms:  # on the weights just stepped, before EMA averages them
            self.max_norm_stats = apply_max_norm(self.network.trained_adapters(), self.cfg.train.scale_weight_norms)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self._mean_across_processes(total)

    def _sync_gradients(self) -> None:
        """Average adapter gradients across processes (the network is not wrapped in DDP, since its
        forward runs inside the UNet's, not through a wrapper DDP could hook)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def _mean_across_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> Path | None:
        cfg, run = self.cfg, self.run
        if self.main:
            run.create()
            if not self.resume:
                save_config(cfg, run.config)
                self._copy_continued_file()
            run.write_pid()
        self.accelerator.wait_for_everyone()
        try:
            self.setup()
            position = Position()
            if self.resume:
                position = load_state(self.accelerator, run.state)
                self.network.sync_base()  # PiSSA / LoRA-GA: base = original - scale * (resumed) B0 A0
            return self._loop(position)
        finally:
            if self.main:
                run.clear_pid()
            if getattr(self, "tensorboard", None) is not None:
                self.tensorboard.close()

    def _loop(self, position: Position) -> Path | None:
        cfg, run = self.cfg, self.run
        accum = cfg.train.gradient_accumulation_steps
        if self.main:
            run.emit("started", total_steps=self.total_steps, epochs=self._epochs(), start_step=position.step,
                     name=cfg.name, num_images=len(self.dataset), **self._encoded_counts())
        stop = self.stop.install()
        started, start_step = time.perf_counter(), position.step
        if self.show_progress:  # made here, not before setup: an error there leaves no empty bar behind
            from tqdm import tqdm

            self.progress = tqdm(total=self.total_steps, initial=position.step, unit="step", dynamic_ncols=True)
        try:
            if cfg.sample.at_start and position.step == 0:
                self._sample(0)
            plan_epoch, plan = None, []
            while position.step < self.total_steps:
                if plan_epoch != position.epoch:  # a pure function of (seed, epoch): built once per epoch, not per
                    plan_epoch, plan = position.epoch, self._epoch_batches(position.epoch)  # step (O(images) each)
                    if self.prefetch is not None:
                        self.prefetch.start(plan, position.batch)
                if position.batch >= len(plan):
                    position.epoch, position.batch = position.epoch + 1, 0
                    self._after_epoch(position)
                    continue
                group = plan[position.batch: position.batch + accum]
                try:
                    loss = self.optimizer_step(group)
                except NonFiniteLoss as error:
                    return self._fail_non_finite(position, error.value)
                position.step += 1
                position.batch += len(group)
                if self.main:
                    self._report_step(position, loss, started, start_step)
                self._after_step(position)
                if self._stop_requested(stop):
                    self._save_checkpoint(position)
                    if self.main:
                        run.emit("stopped", step=position.step,
                                 checkpoint=run.relative(run.checkpoint_path(cfg.name, position.step)))
                    return None
            if self.prefetch is not None:
                self.prefetch.close()  # no more batches: free the workers before samples and export
            return self._finish(position)
        finally:
            stop.uninstall()
            if self.prefetch is not None:
                self.prefetch.close()

    def _copy_continued_file(self) -> None:
        """Keep the LoRA file this run continues inside the run folder (a missing one is reported at setup)."""
        source = Path(self.cfg.network.weights or "").expanduser()
        if not self.cfg.network.weights or not source.is_file():
            return
        target = self.run.weights_copy
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0) if self.accelerator.num_processes > 1 \
            else stop.requested

    def _encoded_counts(self) -> dict:
        """What this process ran through the VAE and text encoder for the caches (the rest came from disk or
        from the other processes)."""
        text = self.encode_text
        return {"encoded_images": self.latents.encode_count if self.latents is not None else 0,
                "encoded_captions": text.encoded_captions if isinstance(text, TextEmbeddingCache) else 0}

    def _epochs(self) -> int:
        return math.ceil(self.total_steps / max(1, self.steps_per_epoch()))

    def _reported_lr(self) -> float:
        """The learning rate now, as set (the first group's, without its block weight)."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            weight = group.get("block_weight", 1.0)
            if weight:
                return lr / weight
        return 0.0

    def _report_step(self, position: Position, loss: float, started: float, start_step: int) -> None:
        done = position.step - start_step
        rate = done / max(time.perf_counter() - started, 1e-9)
        eta = (self.total_steps - position.step) / rate if rate > 0 else None
        lr = self._reported_lr()
        norms = self.max_norm_stats
        extra = {} if norms is None else {"keys_scaled": norms.keys_scaled, "max_key_norm": round(norms.max_norm, 6),
                                          "mean_key_norm": round(norms.mean_norm, 6)}
        self.run.emit("step", step=position.step, epoch=position.epoch + 1, loss=round(loss, 6), lr=lr,
                      it_per_s=round(rate, 4), eta_s=round(eta, 1) if eta is not None else None,
                      total_steps=self.total_steps, **extra)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, position.step)
            self.tensorboard.add_scalar("lr", lr, position.step)
            for key, value in extra.items():
                self.tensorboard.add_scalar(key, value, position.step)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    progress = None
    show_progress = False
    prefetch = None
    max_norm_stats = None  # of the last step, when train.scale_weight_norms is on
    tensorboard = None
    last_sample_step = -1

    def _after_step(self, position: Position) -> None:
        cfg = self.cfg
        if self.validation is not None and cfg.validation.every_steps \
                and position.step % cfg.validation.every_steps == 0:
            self._validate(position.step)
        if cfg.sample.every_steps and position.step % cfg.sample.every_steps == 0:
            self._sample(position.step)
        if cfg.save.every_steps and position.step % cfg.save.every_steps == 0 \
                and position.step < self.total_steps:
            self._save_checkpoint(position)

    def _after_epoch(self, position: Position) -> None:
        cfg, epoch = self.cfg, position.epoch
        if position.step >= self.total_steps:
            return
        if cfg.sample.every_epochs and epoch % cfg.sample.every_epochs == 0:
            self._sample(position.step)
        if cfg.save.every_epochs and epoch % cfg.save.every_epochs == 0:
            self._save_checkpoint(position)

    # -- outputs -----------------------------------------------------------------------------
    def _sample(self, step: int) -> None:
        if not (self.main and self.cfg.sample.prompts):
            return
        self.last_sample_step = step
        self.network.eval()
        pipeline = build_pipeline(self.model, self.cfg.sample.sampler)
        size = (self.cfg.dataset.resolution, self.cfg.dataset.resolution)
        paths = render_samples(pipeline, self.cfg.sample.prompts, size, self.run.samples, step, self.model.family,
                               self.cfg.model.clip_skip, self.cfg.model.prompt_chunks)
        self.run.emit("sample", step=step, paths=[self.run.relative(p) for p in paths],
                      prompts=[p.prompt for p in self.cfg.sample.prompts])

    def _export(self, path: Path, position: Position, state: dict | None = None, title: str | None = None) -> Path:
        """Write a LoRA file, then verify it loads the way generators read it (a `load_check` event)."""
        cfg, model = self.cfg, self.model
        training = {"ss_resolution": f"({cfg.dataset.resolution}, {cfg.dataset.resolution})",
                    "ss_steps": position.step,
                    "ss_epoch": math.ceil(position.step / max(1, self.steps_per_epoch())),
                    "ss_learning_rate": cfg.train.learning_rate,
                    "ss_num_train_images": sum(1 for i in self.dataset.items if not i.is_reg),
                    "ss_num_reg_images": sum(1 for i in self.dataset.items if i.is_reg),
                    "ss_seed": cfg.train.seed, "ss_tag_frequency": self._tag_frequency(),
                    "ss_clip_skip": cfg.model.clip_skip, "ss_max_token_length": cfg.model.max_token_length,
                    "ss_scale_weight_norms": cfg.train.scale_weight_norms or None,
                    "modelspec.resolution": f"{cfg.dataset.resolution}x{cfg.dataset.resolution}"}
        if state is None:
            state = self.network.kohya_state_dict(DTYPES[cfg.save.precision], exact=cfg.network.export == "exact")
        metadata = network_metadata(self.network, cfg.network.type, model.prediction_type == "v_prediction",
                                    title=title or cfg.name, training=training,
                                    minimal=cfg.save.metadata == "minimal", state=state)
        if self.network.export_errors:  # PiSSA / LoRA-GA re-ranked to r: how far from the true change
            metadata["sdlora_rerank_max_relative_error"] = f"{max(self.network.export_errors.values()):.6g}"
        save_lora(path, state, metadata)
        check = check_lora_file(path, model.family.name, model.unet, model.text_encoders)
        self.run.emit("load_check", **check.event_fields(self.run.relative(path)))
        if not check.ok:
            raise SdloraError(f"{path.name} failed the load check ({check.problems[0]}); it is kept for "
                              "inspection but is not a usable LoRA.")
        return path

    def _tag_frequency(self) -> dict:
        counts: dict[str, int] = {}
        for item in (i for i in self.dataset.items if not i.is_reg):  # what the LoRA learned, not its anchors
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return {Path(self.cfg.dataset.path).name: counts}

    def _save_checkpoint(self, position: Position) -> None:
        cfg, run = self.cfg, self.run
        self.accelerator.wait_for_everyone()
        if self.main:
            path = run.checkpoint_path(cfg.name, position.step)
            self._export(path, position)  # the LoRA first: a state is never newer than its checkpoint
            save_state(self.accelerator, run.state, position)
            run.prune_checkpoints(cfg.save.keep_last)
            run.emit("checkpoint", step=position.step, path=run.relative(path))
        self.accelerator.wait_for_everyone()

    def _finish(self, position: Position) -> Path:
        cfg, run = self.cfg, self.run
        self.accelerator.wait_for_everyone()
        final = run.final_file(cfg.name)
        if self.main:
            if (cfg.sample.every_steps or cfg.sample.every_epochs) and self.last_sample_step != position.step:
                self._sample(position.step)  # always show where the run ended
            self._export(final, position)
            extra = {}
            if self.ema is not None:
                ema_state = self.ema.kohya_state_dict(DTYPES[cfg.save.precision], exact=cfg.network.export == "exact",
                                                      max_norm=cfg.train.scale_weight_norms)
                extra["ema_path"] = run.relative(self._export(ema_file(final), position, ema_state, cfg.name + "-ema"))
            save_state(self.accelerator, run.state, position)
            run.emit("finished", step=position.step, path=run.relative(final), **extra)
        return final

    def _fail_non_finite(self, position: Position, value: float) -> None:
        checkpoints = self.run.list_checkpoints()
        fix = "lower train.learning_rate"
        if torch.cuda.is_available() and self.cfg.train.mixed_precision == "fp16":
            fix += ' or set train.mixed_precision = "bf16" (fp16 overflows more easily)'
        if checkpoints:  # a resume restores the old rate with the optimizer, so a new run continues the file
            where = (f"the last checkpoint ({checkpoints[-1].name}) is intact; {fix} and continue from it in a new "
                     f"run with --set network.weights={checkpoints[-1]}")
        else:
            where = f"no checkpoint was saved yet, so {fix} and start the run again"
        raise SdloraError(f"The loss became {value} at step {position.step + 1}; {where}.")


def open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SdloraError("output.tensorboard = true needs the tensorboard package; run 'pip install "
                          "tensorboard' or set it to false.") from None
    return SummaryWriter(str(folder))


def _move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Cast only when needed: diffusers warns on any dtype `.to()`, even a no-op one."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path | None:
    """Run training; errors are written as an `error` event, then re-raised for the front door."""
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.show_progress = progress and trainer.main
        # The step bar is the run's only bar: loading and saving bars are noise on stderr and in train.log.
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        return trainer.train()
    except SdloraError as error:
        if trainer.main and trainer.run.root.is_dir():
            trainer.run.emit("error", message=str(error), step=_last_step(trainer.run))
        raise
    finally:
        if trainer.progress is not None:
            trainer.progress.close()


def _last_step(run: RunDir) -> int:
    steps = [e["step"] for e in run.events() if e.get("event") == "step"]
    return steps[-1] if steps else 0
